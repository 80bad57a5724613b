"""O3's declared stages and ``PAPER``; each stage is one engine run (or one evaluation) whose result
is JSON, so that the runner skips finished ones when a killed recipe runs again:

    base -> base_eval -> for t in 1..T: request_t, detector_t, eval_t
         -> ablations (always-on, per-request gate, gate variants, λ = 0 adapters, gradient ascent,
                       detectors on the pretrained encoder)
         -> report (with the O3 folder OUTPUT/o3, reloaded as a user would load it)
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import save_file

from ...compat import plain_loading
from ...config import OptimConfig
from ...engine import read_metrics
from ...parts.fact_world import build_word_tokenizer
from ...parts.lm import AnswerLM, build_lm, encode_records, load_lm, load_tokenizer
from ...runner import Paper, Stage, StageContext
from .config import O3Config
from .detector import (Detector, DetectorConfig, DetectorTraining, check_backbone, extract_features, load_backbone,
                       resolve_backbone)
from .detector_baselines import BASELINES, baseline_logits
from .evaluation import (adapter_overlap, adapters, base_dir, evaluate_ablation, evaluate_base, evaluate_gate,
                         evaluate_request, forget_records, load_scores, on_main_then_broadcast, score_files, world)
from .method import GradientAscent, UnlearnRequest, unlearning_answers
from .report import report, summary
from .tofu_stages import check_tofu, tofu_stages


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
    rows = [r for r in read_metrics(ctx.dir) if "orth_penalty" in r]
    return {"adapter_dir": str(ctx.dir / "adapter"), "target_rate": final["target_rate"], "steps": engine.step,
            "orth_penalty_first": rows[0]["orth_penalty"] if rows else None,
            "orth_penalty_last": rows[-1]["orth_penalty"] if rows else None,
            "trainable_params": method.n_trainable}


def calibration_keys(records, folds: str) -> list[str]:
    """Cross-fitting fold keys: a fact's wordings together (``fact``), a wording's facts together
    (``wording``: the question with its person's name taken out; held-out scores are then those of
    a new wording of facts the bank holds, as held-out templates are), or each question alone."""
    if folds == "fact":
        return [r.fact for r in records]
    if folds == "wording":
        return [r.question.replace(r.group, "{name}") + "|" + r.attribute for r in records]
    return [str(i) for i in range(len(records))]


def calibration_negatives(cfg: O3Config, t: int, dcfg: DetectorConfig) -> list[int]:
    """Record indices of request t's people's retained facts, trained wordings (the owner's
    training data, never a held-out wording): the lower bound of τ when ``retained_negatives``."""
    _, sets = world(cfg)
    return list(sets.partial_retain_train[t - 1]) if dcfg.retained_negatives and sets.partial_retain_train else []


def train_detector(ctx: StageContext, t: int, records, dcfg: DetectorConfig | None = None,
                   variants: bool = True) -> dict:
    """Request t's detector on its forget ``records``: the encoder LoRA is trained on every process
    (an engine run); calibration (cross-fitted by ``detector.calibration_folds``) and the
    scores of every record (cached for evaluation) train nothing, so they run on the main process
    with the saved adapter reloaded, unsharded."""
    cfg: O3Config = ctx.cfg
    data, _ = world(cfg)
    dcfg, out = dcfg or cfg.detector, ctx.dir
    optim = OptimConfig(lr=dcfg.lr, schedule="constant", weight_decay=0.0, grad_clip=1.0)
    engine = ctx.engine(max_steps=max(1, dcfg.train_steps), optim=optim)
    texts = [r.question for r in records]
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
        feats = extract_features(encoder, tokenizer, texts, dcfg.max_length)
        all_feats = extract_features(encoder, tokenizer, [r.question for r in data.records], dcfg.max_length)
        scores, calibration = {}, {}
        for name, variant in {"": dcfg, **(GATE_VARIANTS(dcfg) if variants else {})}.items():
            detector = Detector(encoder, tokenizer, variant, dcfg.backbone)
            negatives = calibration_negatives(cfg, t, variant)
            fitted = detector.fit(feats, seed=cfg.run.seed + t,
                                  groups=calibration_keys(records, variant.calibration_folds),
                                  negatives=all_feats[:, negatives] if negatives else None)
            scores["logit" + (f"_{name}" if name else "")] = detector.logit_from_features(all_feats)
            if not name:  # the detector itself: saved, its parts cached for the report
                calibration = fitted
                cos_dist, maha = detector.stats.parts(all_feats[detector.layer_slice()])
                scores.update({"cos_distance": cos_dist.mean(1), "mahalanobis": maha.mean(1)})
                detector.save(out / "detector")
        save_file({k: v.contiguous() for k, v in scores.items()}, str(out / "scores.safetensors"))
        return calibration

    calibration = on_main_then_broadcast(fit_and_score)
    return {"detector_dir": str(out / "detector"), "scores": str(out / "scores.safetensors"),
            "steps": engine.step, **calibration}


def GATE_VARIANTS(dcfg: DetectorConfig) -> dict:
    """Detector variants fitted on the same features, reported as gate ablations."""
    return {"cosine_only": replace(dcfg, mahalanobis_weight=0.0),
            "mahalanobis_only": replace(dcfg, gamma=0.0),
            "random_folds": replace(dcfg, calibration_folds="question"),  # calibration folds by question
            # the paper's calibration: every layer, forget data only, folds by fact
            "paper_calibration": replace(dcfg, layers=0, retained_negatives=False, calibration_folds="fact")}


def detector_baselines(ctx: StageContext, data, sets) -> dict:
    """``name_lookup`` and ``bag_of_words`` detectors through O3's calibration and max gate, on
    O3's adapters after the last request, beside O3's own gate (same metrics)."""
    cfg: O3Config = ctx.cfg
    T = cfg.data.requests
    texts = [r.question for r in data.records]
    rows = {}
    for kind in BASELINES:
        logits = []
        for t in range(1, T + 1):
            forget = [(r.question, r.group, k) for r, k in zip(forget_records(cfg, t), calibration_keys(
                forget_records(cfg, t), cfg.detector.calibration_folds))]
            negatives = [texts[i] for i in calibration_negatives(cfg, t, cfg.detector)]
            logits.append(baseline_logits(kind, cfg.detector, forget, texts, negatives, seed=cfg.run.seed + t))
        rows[kind] = evaluate_gate(cfg, data, sets, base_dir(ctx), adapters(ctx, "request_", T), torch.stack(logits, 1))
    o3_logits = load_scores(score_files(ctx, T))["logit"]
    rows["o3"] = evaluate_gate(cfg, data, sets, base_dir(ctx), adapters(ctx, "request_", T), o3_logits)
    return rows


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


def check(cfg: O3Config) -> None:
    """Before any compute: a missing encoder, a missing data file, too few people for the requests."""
    check_backbone(cfg.detector.backbone)
    world(cfg)
    check_tofu(cfg)


def _evaluation(fn):
    """An evaluation stage's function: the data and sets of its config, then ``fn``."""
    return lambda ctx: fn(ctx, *world(ctx.cfg))


def stages(cfg: O3Config) -> list[Stage]:
    T = cfg.data.requests
    out = [Stage("base", train_base),
           Stage("base_eval", _evaluation(lambda ctx, data, sets: evaluate_base(ctx.cfg, data, sets, base_dir(ctx))),
                 needs=("base",))]
    for t in range(1, T + 1):
        out += [
            Stage(f"request_{t}", lambda ctx, t=t: unlearn_request(
                ctx, t, adapters(ctx, "request_", t - 1), forget_records(ctx.cfg, t), ctx.cfg.unlearn.orth_lambda),
                needs=("base",)),
            Stage(f"detector_{t}", lambda ctx, t=t: train_detector(ctx, t, forget_records(ctx.cfg, t)), needs=("base",)),
            Stage(f"eval_{t}", _evaluation(lambda ctx, data, sets, t=t: evaluate_request(
                ctx.cfg, data, sets, t, base_dir(ctx), adapters(ctx, "request_", t), score_files(ctx, t))),
                needs=("base", f"request_{t}", f"detector_{t}")),
        ]
    out.append(Stage("detector_baselines", _evaluation(detector_baselines),
                     needs=("base", f"request_{T}", *[f"detector_{t}" for t in range(1, T + 1)])))
    return (out + _gate_ablations(cfg) + _lambda0_ablation(cfg) + _retrained_ablations(cfg)
            + tofu_stages(cfg, unlearn_request, train_detector))


def _gate_ablations(cfg: O3Config) -> list[Stage]:
    """The same adapters under other gates: always on, per request, the detector variants."""
    T, ab = cfg.data.requests, cfg.ablations
    last = (f"request_{T}", f"detector_{T}")

    def ablation(name: str, gate: str, with_scores: bool, key: str = "logit") -> Stage:
        return Stage(f"ablation_{name}", _evaluation(lambda ctx, data, sets: evaluate_ablation(
            ctx.cfg, data, sets, base_dir(ctx), adapters(ctx, "request_", T), gate,
            score_files(ctx, T) if with_scores else [], key=key)), needs=("base", *last))

    out = []
    if ab.always_on:
        out.append(ablation("always_on", "always_on", False))
    if ab.per_request_gate:
        out.append(ablation("per_request_gate", "per_request", True))
    if ab.gate_variants:
        out += [ablation(f"gate_{name}", cfg.unlearn.gate, True, key=f"logit_{name}")
                for name in GATE_VARIANTS(cfg.detector)]
    return out


def _lambda0_ablation(cfg: O3Config) -> list[Stage]:
    """The same adapters retrained with λ = 0, evaluated gated and ungated."""
    T = cfg.data.requests
    if not cfg.ablations.lambda0:
        return []
    out = [Stage(f"ablation_lambda0_request_{t}", lambda ctx, t=t: unlearn_request(
        ctx, t, adapters(ctx, "ablation_lambda0_request_", t - 1), forget_records(ctx.cfg, t), orth_lambda=0.0),
        needs=("base",)) for t in range(1, T + 1)]

    def lambda0_eval(ctx, data, sets):
        dirs = adapters(ctx, "ablation_lambda0_request_", T)
        ungated = evaluate_ablation(ctx.cfg, data, sets, base_dir(ctx), dirs, "always_on", [])
        return {**evaluate_ablation(ctx.cfg, data, sets, base_dir(ctx), dirs, ctx.cfg.unlearn.gate,
                                    score_files(ctx, T)),
                "adapter_overlap": adapter_overlap(dirs),  # and the λ=0 adapters composed without the gate:
                "ungated_composed_target_rate": ungated.get("composed_target_rate")}

    return out + [Stage("ablation_lambda0_eval", _evaluation(lambda0_eval),
                        needs=("base", f"request_{T}", f"detector_{T}",
                               *[f"ablation_lambda0_request_{t}" for t in range(1, T + 1)]))]


def _retrained_ablations(cfg: O3Config) -> list[Stage]:
    """Detectors on the pretrained encoder; gradient ascent instead of adapters."""
    T, ab = cfg.data.requests, cfg.ablations
    last = (f"request_{T}", f"detector_{T}")
    out = []
    if ab.detector_untrained and cfg.detector.train_steps:  # the same detectors on the pretrained encoder
        untrained = replace(cfg.detector, train_steps=0)
        out += [Stage(f"ablation_detector0_{t}", lambda ctx, t=t: train_detector(
            ctx, t, forget_records(ctx.cfg, t), untrained, variants=False), needs=("base",)) for t in range(1, T + 1)]
        out.append(Stage("ablation_detector0_eval", _evaluation(lambda ctx, data, sets: evaluate_ablation(
            ctx.cfg, data, sets, base_dir(ctx), adapters(ctx, "request_", T), ctx.cfg.unlearn.gate,
            [str(ctx.stage_dir(f"ablation_detector0_{t}") / "scores.safetensors") for t in range(1, T + 1)])),
            needs=("base", *last, *[f"ablation_detector0_{t}" for t in range(1, T + 1)])))
    if ab.gradient_ascent:  # each request ascends from the previous request's model
        def ga_model(ctx: StageContext, t: int) -> str:
            return base_dir(ctx) if t == 0 else str(ctx.stage_dir(f"ablation_ga_request_{t}") / "model")

        out += [Stage(f"ablation_ga_request_{t}", lambda ctx, t=t: gradient_ascent(
            ctx, ga_model(ctx, t - 1), t, forget_records(ctx.cfg, t)), needs=("base",)) for t in range(1, T + 1)]
        out.append(Stage("ablation_ga_eval", _evaluation(lambda ctx, data, sets: evaluate_ablation(
            ctx.cfg, data, sets, ga_model(ctx, T), [], "off", [])), needs=("base", f"ablation_ga_request_{T}")))
    return out


PAPER = Paper(name="O3", config=O3Config, stages=stages, report=report, check=check, summary=summary,
              main_model="o3", card="peft", model_class="athanor.methods.o3:O3Model")
