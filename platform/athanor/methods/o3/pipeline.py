"""O3's stages, each one engine run (or one evaluation) whose result is JSON, so that
``athanor.stages.Stages`` can skip finished ones when a killed recipe runs again:

    base LM -> for t in 1..T: request_t (orthogonal LoRA) -> detector_t -> eval_t
            -> ablations (λ = 0 adapters, gradient ascent) -> publish

Evaluation runs on the main process with plain (non-DeepSpeed) models and is broadcast, since
it trains nothing; detector scores of every record are cached by the detector stage.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list

from ...config import OptimConfig, TrainConfig, positive
from ...engine import Engine, process_state
from .detector import Detector, DetectorTraining, extract_features, load_backbone, resolve_backbone
from .lm import AnswerLM, build_lm, encode_records, load_lm, load_tokenizer
from .lora import GradientAscent, UnlearnRequest, save_adapter, unlearning_answers
from .model import O3Model
from .world import QAData, build_word_tokenizer


@dataclass
class AblationConfig:
    always_on: bool = True  # the same adapters with w = 1 for every input
    per_request_gate: bool = True  # adapter t scaled by w_t(x) only, instead of max_t w_t(x)
    gate_variants: bool = True  # detectors without Mahalanobis / without cosine / calibrated by random folds
    lambda0: bool = True  # adapters retrained with λ = 0
    gradient_ascent: bool = True  # full-model gradient ascent on each forget set, no gate
    ga_steps: int = 10
    ga_lr: float = 1e-3

    def validate(self) -> None:
        positive(self.ga_steps, "ablations.ga_steps")
        positive(self.ga_lr, "ablations.ga_lr")


@dataclass
class EvalSets:
    """Indices into ``data.records`` of every set the report measures."""
    forget_train: list[list[int]]  # per request: its groups, trained phrasings (S.U.)
    forget_heldout: list[list[int]]  # per request: its groups, held-out phrasings (D.U.)
    retain: list[int]  # groups never requested, every phrasing (R.D.)
    utility: list[int]  # facts of another kind, never requested
    forget_all: list[list[int]] = field(default_factory=list)

    @classmethod
    def build(cls, data: QAData, requests: list[list[str]], retained: list[str]) -> "EvalSets":
        def idx(pred):
            return [i for i, r in enumerate(data.records) if pred(r)]

        fact = [lambda r, g=set(gs), h=h: r.kind == "fact" and r.group in g and r.heldout == h
                for gs in requests for h in (False, True)]
        sets = cls([idx(f) for f in fact[0::2]], [idx(f) for f in fact[1::2]],
                   idx(lambda r: r.kind == "fact" and r.group in set(retained)), idx(lambda r: r.kind == "utility"))
        sets.forget_all = [a + b for a, b in zip(sets.forget_train, sets.forget_heldout)]
        return sets


def stage_config(cfg: TrainConfig, max_steps: int, optim: OptimConfig) -> TrainConfig:
    return TrainConfig(run=replace(cfg.run, max_steps=max_steps), optim=optim, engine=cfg.engine)


@contextlib.contextmanager
def plain_loading():
    """Load models unsharded on one process (evaluation, publishing) even after a ZeRO-3 stage:
    once DeepSpeed is set up, ``from_pretrained`` builds models under ``zero.Init``, a collective
    the other processes would not join."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if ref is not None and ref() is not None:
            hf_deepspeed.set_hf_deepspeed_config(ref())


def on_main_then_broadcast(fn):
    """Run ``fn()`` on the main process only; every process gets its (picklable) result."""
    state = process_state()
    box = [fn() if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(box)
    return box[0]


# ---------------------------------------------------------------------------- stages
def train_base(cfg, data: QAData, out: Path) -> dict:
    """The target LM memorises every fact in its trained phrasings (+ utility facts)."""
    t0 = time.time()
    if cfg.model.name_or_path and not cfg.run.max_steps:  # already fine-tuned on the facts (TOFU): use as is
        return {"model_dir": cfg.model.name_or_path, "steps": 0, "seconds": 0.0}
    engine = Engine(stage_config(cfg, cfg.run.max_steps, cfg.optim), output_dir=out)
    tokenizer = load_tokenizer(cfg.model.name_or_path) if cfg.model.name_or_path else build_word_tokenizer(
        data, extra_words=cfg.unlearn.refusal.split())
    def enc(records):
        return encode_records(tokenizer, records, cfg.data.prompt_template, cfg.data.max_length)

    trained = [r for r in data.records if not r.heldout]
    evals = {"train": enc(trained), "heldout": enc([r for r in data.records if r.heldout])}
    method = AnswerLM(build_lm(cfg.model, len(tokenizer), cfg.data.max_length), enc(trained), evals,
                      cfg.data.batch_size)
    method.setup(engine)
    final = engine.fit(method, method.batches(cfg.run.seed)) if cfg.run.max_steps else {}
    model_dir = str(out / "model")
    state_dict = engine.accelerator.get_state_dict(method.model)  # gathers ZeRO-3 shards: all ranks
    if engine.is_main:
        engine.unwrap("model").save_pretrained(model_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
    engine.accelerator.wait_for_everyone()
    return {"model_dir": model_dir, "steps": engine.step, "n_params": method.n_params,
            **{k: v for k, v in final.items()}, "seconds": time.time() - t0}


def unlearn_request(cfg, data: QAData, t: int, base_dir: str, earlier: list[str], records, out: Path,
                    orth_lambda: float) -> dict:
    """Request t's LoRA on its forget records (trained phrasings), orthogonal to ``earlier``."""
    t0 = time.time()
    ucfg = replace(cfg.unlearn, orth_lambda=orth_lambda)
    engine = Engine(stage_config(cfg, ucfg.max_steps, ucfg.optim()), output_dir=out)
    tokenizer = load_tokenizer(base_dir)
    answers = unlearning_answers(records, ucfg, data, seed=cfg.run.seed * 1000 + t)
    train = encode_records(tokenizer, records, cfg.data.prompt_template, cfg.data.max_length, answers)
    method = UnlearnRequest(load_lm(base_dir, cfg.model.dtype), t, ucfg, train, [Path(d) for d in earlier])
    method.setup(engine)
    final = engine.fit(method, method.batches(cfg.run.seed + t))
    save_adapter(engine, method, out / "adapter")
    rows = [r for r in _metrics(out) if "orth_penalty" in r]
    return {"adapter_dir": str(out / "adapter"), "target_rate": final["target_rate"], "steps": engine.step,
            "orth_penalty_first": rows[0]["orth_penalty"] if rows else None,
            "orth_penalty_last": rows[-1]["orth_penalty"] if rows else None,
            "trainable_params": method.n_trainable, "seconds": time.time() - t0}


def train_detector(cfg, t: int, records, base_dir: str, data: QAData, out: Path) -> dict:
    """Request t's detector on its forget ``records``: the encoder LoRA is trained on every process
    (an engine run); calibration (cross-fitted by fact: a fact's phrasings share a fold) and the
    scores of every record of ``data`` (cached for evaluation) train nothing, so they run on the
    main process with the saved adapter reloaded, unsharded."""
    from peft import PeftModel
    from safetensors.torch import save_file

    t0 = time.time()
    dcfg = cfg.detector
    optim = OptimConfig(lr=dcfg.lr, schedule="constant", weight_decay=0.0, grad_clip=1.0)
    engine = Engine(stage_config(cfg, max(1, dcfg.train_steps), optim), output_dir=out)
    texts, facts = [r.question for r in records], [r.fact for r in records]
    backbone = resolve_backbone(dcfg.backbone, base_dir)
    method = DetectorTraining(backbone, dcfg, texts)
    method.setup(engine)
    if dcfg.train_steps:
        engine.fit(method, method.batches(cfg.run.seed + t))
    lora_state = engine.accelerator.get_state_dict(method.model)  # gathers ZeRO-3 shards: all ranks
    if engine.is_main:
        engine.unwrap("encoder").save_pretrained(out / "detector" / "encoder_lora", state_dict=lora_state,
                                                 safe_serialization=True)
    engine.accelerator.wait_for_everyone()

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
        for name, (variant, groups) in GATE_VARIANTS(dcfg, facts).items():  # what carries the gate
            other = Detector(encoder, tokenizer, variant, dcfg.backbone)
            other.fit(feats, seed=cfg.run.seed + t, groups=groups)
            scores[f"logit_{name}"] = other.logit_from_features(all_feats)
        detector.save(out / "detector")
        save_file({k: v.contiguous() for k, v in scores.items()}, str(out / "scores.safetensors"))
        return calibration

    calibration = on_main_then_broadcast(fit_and_score)
    return {"detector_dir": str(out / "detector"), "scores": str(out / "scores.safetensors"),
            "steps": engine.step, **calibration, "seconds": time.time() - t0}


def GATE_VARIANTS(dcfg, facts: list[str]) -> dict:
    """Detector variants fitted on the same features, reported as gate ablations."""
    return {"cosine_only": (replace(dcfg, mahalanobis_weight=0.0), facts),
            "mahalanobis_only": (replace(dcfg, gamma=0.0), facts),
            "random_folds": (dcfg, None)}  # calibration folds by question instead of by fact


def gradient_ascent(cfg, base_dir: str, t: int, records, out: Path) -> dict:
    """Baseline: the whole previous model ascends the CE of request t's true answers."""
    t0 = time.time()
    optim = OptimConfig(lr=cfg.ablations.ga_lr, schedule="constant", weight_decay=0.0, grad_clip=1.0)
    engine = Engine(stage_config(cfg, cfg.ablations.ga_steps, optim), output_dir=out)
    tokenizer = load_tokenizer(base_dir)
    train = encode_records(tokenizer, records, cfg.data.prompt_template, cfg.data.max_length)
    method = GradientAscent(load_lm(base_dir, cfg.model.dtype), train, cfg.unlearn.batch_size)
    method.setup(engine, optim, cfg.ablations.ga_steps)
    final = engine.fit(method, method.batches(cfg.run.seed + t))
    state_dict = engine.accelerator.get_state_dict(method.model)
    if engine.is_main:
        engine.unwrap("model").save_pretrained(out / "model", state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out / "model")
    engine.accelerator.wait_for_everyone()
    return {"model_dir": str(out / "model"), "forget_acc_after": final["forget_acc"], "seconds": time.time() - t0}


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


def measure(o3: O3Model, data: QAData, sets: EvalSets, t: int, logits: torch.Tensor | None) -> dict:
    """The report's metrics after request t (1-based) for one model and gate."""
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
           "retain_acc": acc(sets.retain), "utility": acc(sets.utility),
           "earlier_requests_forget_acc": acc(earlier) if earlier else None,
           "mean_w_forget": mean_w(sets.forget_all[t - 1]), "mean_w_retain": mean_w(sets.retain),
           "mean_w_utility": mean_w(sets.utility)}
    return out


def detector_metrics(scores: dict[str, torch.Tensor], sets: EvalSets, t: int, key: str = "logit") -> dict:
    """AUROC of forget (requests 1..t) vs retain records for the gate and its parts."""
    forget = [i for s in sets.forget_all[:t] for i in s]
    heldout = [i for s in sets.forget_heldout[:t] for i in s]
    gate = scores[key][:, :t].amax(1)  # max over requests, monotone in w(x)
    cosine = -scores["cos_distance"][:, :t].amin(1)
    maha = -scores["mahalanobis"][:, :t].amin(1)
    return {"auroc": auroc(gate[forget], gate[sets.retain]),
            "auroc_heldout_templates": auroc(gate[heldout], gate[sets.retain]) if heldout else None,
            "auroc_max_cosine_only": auroc(cosine[forget], cosine[sets.retain]),
            "auroc_mahalanobis_only": auroc(maha[forget], maha[sets.retain])}


def evaluate_request(cfg, data: QAData, sets: EvalSets, t: int, base_dir: str, adapters: list[str],
                     score_paths: list[str]) -> dict:
    def run():
        with plain_loading():
            scores = load_scores(score_paths)
            o3 = O3Model.from_parts(base_dir, [Path(a) for a in adapters], [], cfg.unlearn.gate,
                                    cfg.data.prompt_template, cfg.data.max_length, cfg.model.dtype, detectors=[])
            return {**measure(o3, data, sets, t, scores["logit"]), **detector_metrics(scores, sets, t)}
    return on_main_then_broadcast(run)


def evaluate_base(cfg, data: QAData, sets: EvalSets, base_dir: str) -> dict:
    def run():
        with plain_loading():
            o3 = O3Model.from_parts(base_dir, [], [], "off", cfg.data.prompt_template, cfg.data.max_length,
                                    cfg.model.dtype, detectors=[])

        def acc(idx):
            return o3.answer_matches([data.records[i] for i in idx]).float().mean().item() if idx else None

        return {"forget_acc_train": [acc(s) for s in sets.forget_train],
                "forget_acc_heldout_templates": [acc(s) for s in sets.forget_heldout],
                "retain_acc": acc(sets.retain), "utility": acc(sets.utility)}
    return on_main_then_broadcast(run)


def evaluate_ablation(cfg, data: QAData, sets: EvalSets, base_dir: str, adapters: list[str], gate: str,
                      score_paths: list[str], key: str = "logit") -> dict:
    """Metrics after the last request; ``key`` picks a gate variant's cached logits."""
    def run():
        with plain_loading():
            scores = load_scores(score_paths) if score_paths else None
            o3 = O3Model.from_parts(base_dir, [Path(a) for a in adapters], [], gate, cfg.data.prompt_template,
                                    cfg.data.max_length, cfg.model.dtype, detectors=[])
            t = len(sets.forget_train)
            if scores is None:
                return measure(o3, data, sets, t, None)
            return {**measure(o3, data, sets, t, scores[key]), **detector_metrics(scores, sets, t, key)}
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


def run_ablations(cfg, stages, data: QAData, sets: EvalSets, base_dir: str, adapters: list[str],
                  score_paths: list[str]) -> dict:
    """The same metrics after the last request for: w = 1, per-request gates, λ = 0, gradient ascent."""
    ab, out = cfg.ablations, {}
    if ab.always_on:
        out["always_on"] = stages.run("ablation_always_on", lambda d: evaluate_ablation(
            cfg, data, sets, base_dir, adapters, "always_on", []))
    if ab.per_request_gate:
        out["per_request_gate"] = stages.run("ablation_per_request_gate", lambda d: evaluate_ablation(
            cfg, data, sets, base_dir, adapters, "per_request", score_paths))
    if ab.gate_variants:
        for name in GATE_VARIANTS(cfg.detector, []):
            out[f"gate_{name}"] = stages.run(f"ablation_gate_{name}", lambda d: evaluate_ablation(
                cfg, data, sets, base_dir, adapters, cfg.unlearn.gate, score_paths, key=f"logit_{name}"))
    if ab.lambda0:
        zero: list[str] = []
        for t, idx in enumerate(sets.forget_train, start=1):
            records = [data.records[i] for i in idx]
            stages.run(f"ablation_lambda0_request_{t}", lambda d: unlearn_request(
                cfg, data, t, base_dir, zero, records, d, orth_lambda=0.0))
            zero.append(str(stages.dir(f"ablation_lambda0_request_{t}") / "adapter"))
        out["lambda0"] = stages.run("ablation_lambda0_eval", lambda d: {
            **evaluate_ablation(cfg, data, sets, base_dir, zero, cfg.unlearn.gate, score_paths),
            "adapter_overlap": adapter_overlap(zero)})
    if ab.gradient_ascent:
        model_dir = base_dir
        for t, idx in enumerate(sets.forget_train, start=1):
            records = [data.records[i] for i in idx]
            stages.run(f"ablation_ga_request_{t}", lambda d: gradient_ascent(cfg, model_dir, t, records, d))
            model_dir = str(stages.dir(f"ablation_ga_request_{t}") / "model")
        out["gradient_ascent"] = stages.run("ablation_ga_eval", lambda d: evaluate_ablation(
            cfg, data, sets, model_dir, [], "off", []))
    return out


__all__ = ["AblationConfig", "EvalSets", "train_base", "unlearn_request", "train_detector", "gradient_ascent",
           "evaluate_request", "evaluate_base", "evaluate_ablation", "adapter_overlap", "run_ablations"]
