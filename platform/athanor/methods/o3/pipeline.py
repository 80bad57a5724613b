"""O3's stages, each one engine run (or one evaluation) whose result is JSON, so that the runner
(``athanor.runner``) skips finished ones when a killed recipe runs again; ``paper`` lists them:

    base LM -> for t in 1..T: request_t (orthogonal LoRA) -> detector_t -> eval_t
            -> ablations (λ = 0 adapters, gradient ascent) -> report (and the O3 folder)

Evaluation runs on the main process with plain (non-DeepSpeed) models and is broadcast, since
it trains nothing; detector scores of every record are cached by the detector stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list

from ...compat import plain_loading
from ...config import OptimConfig, RunConfig, TrainConfig, positive
from ...engine import process_state
from ...runner import StageContext
from .detector import Detector, DetectorConfig, DetectorTraining, extract_features, load_backbone, resolve_backbone
from ...parts.lm import AnswerLM, ModelConfig, build_lm, encode_records, load_lm, load_tokenizer
from .lora import GradientAscent, UnlearnConfig, UnlearnRequest, unlearning_answers
from .model import O3Model
from ...parts.fact_world import DataConfig, QAData, build_word_tokenizer, load_data, request_groups, retained_groups


@dataclass
class AblationConfig:
    always_on: bool = True  # the same adapters with w = 1 for every input
    per_request_gate: bool = True  # adapter t scaled by w_t(x) only, instead of max_t w_t(x)
    gate_variants: bool = True  # detectors without Mahalanobis / without cosine / calibrated by random folds
    lambda0: bool = True  # adapters retrained with λ = 0
    gradient_ascent: bool = True  # full-model gradient ascent on each forget set, no gate
    detector_untrained: bool = True  # detectors on the pretrained encoder (detector.train_steps = 0)
    ga_steps: int = 10
    ga_lr: float = 1e-3

    def validate(self) -> None:
        positive(self.ga_steps, "ablations.ga_steps")
        positive(self.ga_lr, "ablations.ga_lr")


@dataclass
class O3Config(TrainConfig):
    # run.max_steps and optim: the base LM that memorises the facts (0 steps: use model.name_or_path as is)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/o3", max_steps=500, eval_every=250,
                                                             log_every=10))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=20, weight_decay=0.1))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    ablations: AblationConfig = field(default_factory=AblationConfig)


@dataclass
class EvalSets:
    """Indices into ``data.records`` of every set the report measures."""
    forget_train: list[list[int]]  # per request: its groups, trained phrasings (S.U.)
    forget_heldout: list[list[int]]  # per request: its groups, held-out phrasings (D.U.)
    retain: list[int]  # groups never requested, every phrasing (R.D.)
    utility: list[int]  # facts of another kind, never requested
    forget_all: list[list[int]] = field(default_factory=list)  # per request: trained + held-out templates
    forget_paraphrase: list[list[int]] = field(default_factory=list)  # per request: PARAPHRASES wordings
    retain_paraphrase: list[int] = field(default_factory=list)  # retained people's paraphrases

    @classmethod
    def build(cls, data: QAData, requests: list[list[str]], retained: list[str]) -> "EvalSets":
        def idx(pred):
            return [i for i, r in enumerate(data.records) if pred(r)]

        fact = [lambda r, g=set(gs), h=h: r.kind == "fact" and r.group in g and r.heldout == h and not r.paraphrase
                for gs in requests for h in (False, True)]
        kept = set(retained)
        sets = cls([idx(f) for f in fact[0::2]], [idx(f) for f in fact[1::2]],
                   idx(lambda r: r.kind == "fact" and r.group in kept and not r.paraphrase),
                   idx(lambda r: r.kind == "utility"))
        sets.forget_all = [a + b for a, b in zip(sets.forget_train, sets.forget_heldout)]
        sets.forget_paraphrase = [idx(lambda r, g=set(gs): r.paraphrase and r.group in g) for gs in requests]
        sets.retain_paraphrase = idx(lambda r: r.paraphrase and r.group in kept)
        return sets


_WORLDS: dict[str, tuple[QAData, EvalSets]] = {}


def world(cfg: O3Config) -> tuple[QAData, EvalSets]:
    """The QA data and its evaluation sets (built once per process and data config)."""
    key = repr(cfg.data)
    if key not in _WORLDS:
        data = load_data(cfg.data)
        requests = request_groups(data, cfg.data)
        _WORLDS[key] = data, EvalSets.build(data, requests, retained_groups(data, requests))
    return _WORLDS[key]


def base_dir(ctx: StageContext) -> str:
    """The base LM folder (relative when trained here, so the output folder can move)."""
    base = ctx.results["base"]
    return str(ctx.stage_dir("base") / "model") if base["steps"] else base["model_dir"]


def on_main_then_broadcast(fn):
    """Run ``fn()`` on the main process only; every process gets its (picklable) result."""
    state = process_state()
    box = [fn() if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(box)
    return box[0]


# ---------------------------------------------------------------------------- stages
def train_base(ctx: StageContext) -> dict:
    """The target LM memorises every fact in its trained phrasings (+ utility facts)."""
    cfg: O3Config = ctx.cfg
    if cfg.model.name_or_path and not cfg.run.max_steps:  # already fine-tuned on the facts (TOFU): use as is
        return {"model_dir": cfg.model.name_or_path, "steps": 0, "seconds": 0.0}
    data, _ = world(cfg)
    engine = ctx.engine()  # first: it seeds every process, then the model is built
    tokenizer = load_tokenizer(cfg.model.name_or_path) if cfg.model.name_or_path else build_word_tokenizer(
        data, extra_words=cfg.unlearn.refusal.split())

    def enc(records):
        return encode_records(tokenizer, records, cfg.data.prompt_template, cfg.data.max_length)

    trained = [r for r in data.records if not r.heldout]
    evals = {"train": enc(trained), "heldout": enc([r for r in data.records if r.heldout])}
    method = AnswerLM(build_lm(cfg.model, len(tokenizer), cfg.data.max_length), enc(trained), evals,
                      cfg.data.batch_size, seed=cfg.run.seed)
    if cfg.run.max_steps:
        _, final = ctx.fit(method, engine=engine)
    else:  # the base LM as built (untrained): nothing to fit
        method.setup(engine)
        final = {}
    model_dir = engine.save_pretrained("model", ctx.dir / "model")
    if ctx.is_main:
        tokenizer.save_pretrained(model_dir)
    ctx.barrier()
    return {"model_dir": str(model_dir), "steps": engine.step, "n_params": method.n_params, **final}


def unlearn_request(ctx: StageContext, t: int, earlier: list[str], records, orth_lambda: float) -> dict:
    """Request t's LoRA on its forget ``records`` (trained phrasings), orthogonal to the ``earlier`` adapters."""
    cfg: O3Config = ctx.cfg
    data, _ = world(cfg)
    ucfg = replace(cfg.unlearn, orth_lambda=orth_lambda)
    engine = ctx.engine(max_steps=ucfg.max_steps, optim=ucfg.optim())  # first: it seeds every process
    base = base_dir(ctx)
    tokenizer = load_tokenizer(base)
    answers = unlearning_answers(records, ucfg, data, seed=cfg.run.seed * 1000 + t)
    train = encode_records(tokenizer, records, cfg.data.prompt_template, cfg.data.max_length, answers)
    method = UnlearnRequest(load_lm(base, cfg.model.dtype), t, ucfg, train, [Path(d) for d in earlier],
                            seed=cfg.run.seed + t)
    _, final = ctx.fit(method, engine=engine)
    engine.save_pretrained("model", ctx.dir / "adapter")  # adapter_config.json + adapter_model.safetensors
    rows = [r for r in _metrics(ctx.dir) if "orth_penalty" in r]
    return {"adapter_dir": str(ctx.dir / "adapter"), "target_rate": final["target_rate"], "steps": engine.step,
            "orth_penalty_first": rows[0]["orth_penalty"] if rows else None,
            "orth_penalty_last": rows[-1]["orth_penalty"] if rows else None,
            "trainable_params": method.n_trainable}


def train_detector(ctx: StageContext, t: int, records, dcfg: DetectorConfig | None = None,
                   variants: bool = True) -> dict:
    """Request t's detector on its forget ``records``: the encoder LoRA is trained on every process
    (an engine run); calibration (cross-fitted by fact: a fact's phrasings share a fold) and the
    scores of every record (cached for evaluation) train nothing, so they run on the main process
    with the saved adapter reloaded, unsharded."""
    from peft import PeftModel
    from safetensors.torch import save_file

    cfg: O3Config = ctx.cfg
    data, _ = world(cfg)
    dcfg, out = dcfg or cfg.detector, ctx.dir
    optim = OptimConfig(lr=dcfg.lr, schedule="constant", weight_decay=0.0, grad_clip=1.0)
    engine = ctx.engine(max_steps=max(1, dcfg.train_steps), optim=optim)
    texts, facts = [r.question for r in records], [r.fact for r in records]
    backbone = resolve_backbone(dcfg.backbone, base_dir(ctx))
    method = DetectorTraining(backbone, dcfg, texts, seed=cfg.run.seed + t)
    if dcfg.train_steps:
        ctx.fit(method, engine=engine)
    else:
        method.setup(engine)
    engine.save_pretrained("encoder", out / "detector" / "encoder_lora")

    def fit_and_score() -> dict:
        with plain_loading():
            encoder, tokenizer, _ = load_backbone(backbone)
            encoder = PeftModel.from_pretrained(encoder, out / "detector" / "encoder_lora")
        detector = Detector(encoder, tokenizer, dcfg, dcfg.backbone)
        feats = extract_features(encoder, tokenizer, texts, dcfg.max_length)
        calibration = detector.fit(feats, seed=cfg.run.seed + t, groups=facts)
        all_feats = extract_features(encoder, tokenizer, [r.question for r in data.records], dcfg.max_length)
        cos_dist, maha = detector.stats.parts(all_feats)
        scores = {"logit": detector.logit_from_features(all_feats), "cos_distance": cos_dist.mean(1),
                  "mahalanobis": maha.mean(1)}
        for name, (variant, groups) in (GATE_VARIANTS(dcfg, facts) if variants else {}).items():  # what carries the gate
            other = Detector(encoder, tokenizer, variant, dcfg.backbone)
            other.fit(feats, seed=cfg.run.seed + t, groups=groups)
            scores[f"logit_{name}"] = other.logit_from_features(all_feats)
        detector.save(out / "detector")
        save_file({k: v.contiguous() for k, v in scores.items()}, str(out / "scores.safetensors"))
        return calibration

    calibration = on_main_then_broadcast(fit_and_score)
    return {"detector_dir": str(out / "detector"), "scores": str(out / "scores.safetensors"),
            "steps": engine.step, **calibration}


def GATE_VARIANTS(dcfg: DetectorConfig, facts: list[str]) -> dict:
    """Detector variants fitted on the same features, reported as gate ablations."""
    return {"cosine_only": (replace(dcfg, mahalanobis_weight=0.0), facts),
            "mahalanobis_only": (replace(dcfg, gamma=0.0), facts),
            "random_folds": (dcfg, None)}  # calibration folds by question instead of by fact


def gradient_ascent(ctx: StageContext, model_dir: str, t: int, records) -> dict:
    """Baseline: the whole previous model ascends the CE of request t's true answers."""
    cfg: O3Config = ctx.cfg
    optim = OptimConfig(lr=cfg.ablations.ga_lr, schedule="constant", weight_decay=0.0, grad_clip=1.0)
    engine = ctx.engine(max_steps=cfg.ablations.ga_steps, optim=optim)  # first: it seeds every process
    tokenizer = load_tokenizer(model_dir)
    train = encode_records(tokenizer, records, cfg.data.prompt_template, cfg.data.max_length)
    method = GradientAscent(load_lm(model_dir, cfg.model.dtype), train, cfg.unlearn.batch_size, optim,
                            cfg.ablations.ga_steps, seed=cfg.run.seed + t)
    _, final = ctx.fit(method, engine=engine)
    engine.save_pretrained("model", ctx.dir / "model")
    if ctx.is_main:
        tokenizer.save_pretrained(ctx.dir / "model")
    ctx.barrier()
    return {"model_dir": str(ctx.dir / "model"), "forget_acc_after": final["forget_acc"]}


# ---------------------------------------------------------------------------- evaluation
def _metrics(out: Path) -> list[dict]:
    from ...engine import read_metrics

    return read_metrics(out)


def load_scores(paths: list[str]) -> dict[str, torch.Tensor]:
    """Stack the detector stages' cached scores: each [n_records, T]."""
    from safetensors.torch import load_file

    loaded = [load_file(p) for p in paths]
    return {k: torch.stack([s[k] for s in loaded], dim=1) for k in loaded[0]}


def auroc(positive_scores: torch.Tensor, negative_scores: torch.Tensor) -> float:
    from sklearn.metrics import roc_auc_score

    y = [1] * len(positive_scores) + [0] * len(negative_scores)
    return float(roc_auc_score(y, torch.cat([positive_scores, negative_scores]).double().numpy()))


def measure(o3: O3Model, data: QAData, sets: EvalSets, t: int, logits: torch.Tensor | None,
            targets: list[list[str]] | None = None) -> dict:
    """The report's metrics after request t (1-based) for one model and gate; with ``targets``
    (per request, the unlearning answers its adapter was trained to give on its trained
    questions) also ``composed_target_rate``: the share of requests 1..t's trained questions that
    the composed adapters still answer with their own request's target. Each adapter was trained
    alone on the base LM, so a rate below the adapters' own ``target_rate`` is interference."""
    def acc(idx):
        if not idx:
            return None
        records = [data.records[i] for i in idx]
        weights = o3.adapter_weights(logits[idx] if logits is not None else None, len(idx))
        return o3.answer_matches(records, weights).float().mean().item()

    def mean_w(idx):
        return o3.adapter_weights(logits[idx] if logits is not None else None, len(idx)).amax(1).mean().item() \
            if o3.adapters else 0.0

    earlier = [i for s in sets.forget_all[:t - 1] for i in s]
    out = {"request": t, "forget_acc_train": acc(sets.forget_train[t - 1]),
           "forget_acc_heldout_templates": acc(sets.forget_heldout[t - 1]),
           "forget_acc_paraphrase": acc(sets.forget_paraphrase[t - 1]),
           "retain_acc": acc(sets.retain), "retain_acc_paraphrase": acc(sets.retain_paraphrase),
           "utility": acc(sets.utility),
           "earlier_requests_forget_acc": acc(earlier) if earlier else None,
           "mean_w_forget": mean_w(sets.forget_all[t - 1]), "mean_w_retain": mean_w(sets.retain),
           "mean_w_utility": mean_w(sets.utility)}
    if targets is not None and o3.adapters:
        idx = [i for s in sets.forget_train[:t] for i in s]
        weights = o3.adapter_weights(logits[idx] if logits is not None else None, len(idx))
        answers = [a for request in targets[:t] for a in request]
        hits = o3.answer_matches([data.records[i] for i in idx], weights, answers)
        out["composed_target_rate"] = hits.float().mean().item()
    return out


def detector_metrics(scores: dict[str, torch.Tensor], sets: EvalSets, t: int, key: str = "logit") -> dict:
    """AUROC of forget (requests 1..t) vs retain records for the gate and its parts."""
    forget = [i for s in sets.forget_all[:t] for i in s]
    heldout = [i for s in sets.forget_heldout[:t] for i in s]
    paraphrase = [i for s in sets.forget_paraphrase[:t] for i in s]
    negatives = sets.retain + sets.retain_paraphrase + sets.utility  # every question no request touches
    gate = scores[key][:, :t].amax(1)  # max over requests, monotone in w(x)
    cosine = -scores["cos_distance"][:, :t].amin(1)
    maha = -scores["mahalanobis"][:, :t].amin(1)
    return {"auroc": auroc(gate[forget], gate[sets.retain]),  # pooled: 2/3 of its positives are stored questions
            # questions the detectors never stored (vs retained/utility questions)
            "auroc_heldout_templates": auroc(gate[heldout], gate[negatives]) if heldout else None,
            "auroc_paraphrase": auroc(gate[paraphrase], gate[negatives]) if paraphrase else None,
            # at the calibrated threshold (w = ½): never-stored forget questions caught, untouched ones let through
            "caught_new_forget": (gate[heldout + paraphrase] > 0).float().mean().item() if heldout + paraphrase
            else None,
            "passed_untouched": (gate[negatives] < 0).float().mean().item(),
            "auroc_max_cosine_only": auroc(cosine[forget], cosine[sets.retain]),
            "auroc_mahalanobis_only": auroc(maha[forget], maha[sets.retain])}


def request_targets(cfg: O3Config, data: QAData, sets: EvalSets) -> list[list[str]]:
    """Per request, the answers its adapter was trained on (as ``unlearn_request`` draws them)."""
    return [unlearning_answers([data.records[i] for i in idx], cfg.unlearn, data, seed=cfg.run.seed * 1000 + t)
            for t, idx in enumerate(sets.forget_train, start=1)]


def evaluate_request(cfg: O3Config, data: QAData, sets: EvalSets, t: int, base_dir: str, adapters: list[str],
                     score_paths: list[str]) -> dict:
    def run():
        with plain_loading():
            scores = load_scores(score_paths)
            o3 = O3Model.from_parts(base_dir, [Path(a) for a in adapters], [], cfg.unlearn.gate,
                                    cfg.data.prompt_template, cfg.data.max_length, cfg.model.dtype, detectors=[])
            return {**measure(o3, data, sets, t, scores["logit"], request_targets(cfg, data, sets)), **detector_metrics(scores, sets, t)}
    return on_main_then_broadcast(run)


def evaluate_base(cfg: O3Config, data: QAData, sets: EvalSets, base_dir: str) -> dict:
    def run():
        with plain_loading():
            o3 = O3Model.from_parts(base_dir, [], [], "off", cfg.data.prompt_template, cfg.data.max_length,
                                    cfg.model.dtype, detectors=[])

        def acc(idx):
            return o3.answer_matches([data.records[i] for i in idx]).float().mean().item() if idx else None

        return {"forget_acc_train": [acc(s) for s in sets.forget_train],
                "forget_acc_heldout_templates": [acc(s) for s in sets.forget_heldout],
                "forget_acc_paraphrase": [acc(s) for s in sets.forget_paraphrase],
                "retain_acc": acc(sets.retain), "retain_acc_paraphrase": acc(sets.retain_paraphrase),
                "utility": acc(sets.utility)}
    return on_main_then_broadcast(run)


def evaluate_ablation(cfg: O3Config, data: QAData, sets: EvalSets, base_dir: str, adapters: list[str], gate: str,
                      score_paths: list[str], key: str = "logit") -> dict:
    """Metrics after the last request; ``key`` picks a gate variant's cached logits."""
    def run():
        with plain_loading():
            scores = load_scores(score_paths) if score_paths else None
            o3 = O3Model.from_parts(base_dir, [Path(a) for a in adapters], [], gate, cfg.data.prompt_template,
                                    cfg.data.max_length, cfg.model.dtype, detectors=[])
            t = len(sets.forget_train)
            targets = request_targets(cfg, data, sets)
            if scores is None:
                return measure(o3, data, sets, t, None, targets)
            return {**measure(o3, data, sets, t, scores[key], targets), **detector_metrics(scores, sets, t, key)}
    return on_main_then_broadcast(run)


def adapter_overlap(adapters: list[str]) -> float | None:
    """Mean over modules and pairs s<t of ‖A_s A_tᵀ‖_F / (‖A_s‖_F ‖A_t‖_F): 0 = orthogonal subspaces."""
    from .lora import earlier_lora_A

    if len(adapters) < 2:
        return None
    per = [earlier_lora_A([Path(a)]) for a in adapters]
    values = []
    for s in range(len(per)):
        for t in range(s + 1, len(per)):
            for key, a_s in per[s].items():
                a_t = per[t][key]
                values.append(((a_s @ a_t.T).norm() / (a_s.norm() * a_t.norm())).item())
    return sum(values) / len(values)


__all__ = ["AblationConfig", "O3Config", "EvalSets", "world", "train_base", "unlearn_request", "train_detector",
           "gradient_ascent", "evaluate_request", "evaluate_base", "evaluate_ablation", "adapter_overlap"]
