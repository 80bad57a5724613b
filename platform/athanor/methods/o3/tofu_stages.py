"""O3's TOFU stages: the retain-only reference model, TOFU's metrics (``parts.tofu_metrics``) for
the base LM, the retain-only model, O3 after every request and the open-unlearning baselines
(``baselines``) after every request, and O3's unlearning stages re-run with more seeds:

    tofu_retain_only -> tofu_base, tofu_retain_only_eval
    for t: tofu_o3_t                                 (O3's adapters 1..t, detectors 1..t, gated)
    for each baseline m, for t: baseline_m_t          (full fine-tuning from baseline_m_{t-1})
    for each extra seed k: o3_seedk_request_t (+ o3_seedk_detector_t), t = 1..T, then o3_seedk_eval

The extra seeds re-run O3's adapters (run.seed + k: LoRA init and dropout) on the same base LM,
retain-only model and detectors; ``tofu.seed_detectors`` retrains the detectors per seed too (their
encoder training and calibration folds), at about four times the adapters' cost on the tiny world.
The base LM is trained once (training it three times would double the recipe's time).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ...compat import plain_loading
from ...config import ConfigError
from ...parts.lm import AnswerLM, build_lm, encode_records, load_lm, load_tokenizer
from ...parts.tofu_metrics import Scorer, aggregate, item_scores
from ...runner import Stage, StageContext
from .baselines import Unlearner
from .evaluation import adapters, base_dir, evaluate_request, forget_records, on_main_then_broadcast, world
from .model import O3Model
from .tofu_data import eval_items, retain_only_records


def check_tofu(cfg) -> None:
    """Before compute: a retain-only model must be trainable here or named."""
    if cfg.tofu.enabled and cfg.tofu.trained_here() and not cfg.run.max_steps:
        raise ConfigError("run.max_steps 0 (a base LM used as is) needs tofu.retain_model: the retain-only model "
                          "cannot be trained with the base LM's recipe here")


def train_retain_only(ctx: StageContext) -> dict:
    """The base LM's recipe (model, steps, optimiser, seed) on every record whose fact no request forgets."""
    cfg = ctx.cfg
    if not cfg.tofu.trained_here():
        return {"model_dir": cfg.tofu.retain_model, "steps": 0}
    data, sets = world(cfg)
    engine = ctx.engine()  # first: it seeds every process (the same init as the base LM), then the model is built
    tokenizer = load_tokenizer(base_dir(ctx))  # the base LM's vocabulary: NLLs stay comparable
    records = retain_only_records(data, sets)
    train = encode_records(tokenizer, records, cfg.data.prompt_template, cfg.data.max_length)
    method = AnswerLM(build_lm(cfg.model, len(tokenizer), cfg.data.max_length), train, {"train": train},
                      cfg.data.batch_size, seed=cfg.run.seed)
    _, final = ctx.fit(method, engine=engine)
    model_dir = engine.save_pretrained("model", ctx.dir / "model")
    if ctx.is_main:
        tokenizer.save_pretrained(model_dir)
    ctx.barrier()
    return {"model_dir": str(model_dir), "steps": engine.step, "records": len(records), **final}


def score_items(cfg, make_scorer, upto: int) -> dict:
    """TOFU's per-item scores on requests 1..upto's forget items, set aggregates elsewhere."""
    data, sets = world(cfg)
    items, n = eval_items(cfg, data, sets), cfg.tofu.max_new_tokens

    def scores(item_list, options=False):
        return item_scores(make_scorer(item_list), item_list, n, options=options)

    return {"forget": [scores(items["forget"][r]) for r in range(upto)],
            "retain": aggregate(scores(items["retain"]), forget=False),
            "utility": [aggregate(scores(u, options=True), forget=False) for u in items["utility"]]}


def score_plain(cfg, model_dir: str, upto: int) -> dict:
    """TOFU's scores of a plain LM folder (base, retain-only, a baseline), on the main process."""
    def run():
        with plain_loading():
            model, tokenizer = load_lm(model_dir, cfg.model.dtype).eval(), load_tokenizer(model_dir)
        return score_items(cfg, lambda _items: Scorer(model, tokenizer, cfg.data.prompt_template,
                                                      cfg.data.max_length), upto)
    return on_main_then_broadcast(run)


def score_o3(cfg, base: str, adapter_dirs: list[str], detector_dirs: list[str]) -> dict:
    """TOFU's scores of O3 (adapters gated by the detectors' w(x) of each question)."""
    def run():
        with plain_loading():
            o3 = O3Model.from_parts(base, [Path(a) for a in adapter_dirs], [Path(d) for d in detector_dirs],
                                    cfg.unlearn.gate, cfg.data.prompt_template, cfg.data.max_length, cfg.model.dtype)

        def scorer(items):
            weights = o3.weights_for([it.question for it in items])
            return Scorer(o3.lm, o3.tokenizer, cfg.data.prompt_template, cfg.data.max_length,
                          gate=lambda rows: o3.gated(weights[rows]))
        return score_items(cfg, scorer, len(adapter_dirs))
    return on_main_then_broadcast(run)


def detectors(ctx: StageContext, prefix: str, upto: int) -> list[str]:
    return [str(ctx.stage_dir(f"{prefix}{s}") / "detector") for s in range(1, upto + 1)]


def baseline_request(ctx: StageContext, method: str, t: int, prefix: str = "") -> dict:
    """Baseline ``method``'s request t from the model request t-1 left (stage ``<prefix><t-1>``,
    default ``baseline_<method>_``); TOFU's scores after it."""
    cfg = ctx.cfg
    data, sets = world(cfg)
    bcfg = cfg.baselines
    prefix = prefix or f"baseline_{method}_"
    previous = base_dir(ctx) if t == 1 else str(ctx.stage_dir(f"{prefix}{t - 1}") / "model")
    engine = ctx.engine(max_steps=getattr(bcfg, f"{method}_steps"), optim=bcfg.optim(method))  # seeds first
    tokenizer = load_tokenizer(previous)
    enc = lambda rs: encode_records(tokenizer, rs, cfg.data.prompt_template, cfg.data.max_length)  # noqa: E731
    retain = enc(retain_only_records(data, sets)) if method != "grad_ascent" else None
    reference = load_lm(previous, cfg.model.dtype) if method == "npo" else None
    unlearner = Unlearner(method, load_lm(previous, cfg.model.dtype), enc(forget_records(cfg, t)), retain, bcfg,
                          reference, seed=cfg.run.seed + t)
    _, final = ctx.fit(unlearner, engine=engine)
    model_dir = engine.save_pretrained("model", ctx.dir / "model")
    if ctx.is_main:
        tokenizer.save_pretrained(model_dir)
    ctx.barrier()
    return {"model_dir": str(model_dir), "steps": engine.step, "forget_acc_after": final.get("forget_acc"),
            "tofu": score_plain(cfg, str(model_dir), t)}


def seed_stages(cfg, unlearn_request, train_detector) -> list[Stage]:
    """O3's adapters (and with tofu.seed_detectors its detectors) again with run.seed + k
    (k = 1 .. tofu.seeds - 1), evaluated after the last request."""
    T, out = cfg.data.requests, []
    kinds = ("request", "detector") if cfg.tofu.seed_detectors else ("request",)
    for k in range(1, cfg.tofu.seeds):
        def seeded(ctx: StageContext, k=k) -> StageContext:
            run = dataclasses.replace(ctx.cfg.run, seed=ctx.cfg.run.seed + k)
            return dataclasses.replace(ctx, cfg=dataclasses.replace(ctx.cfg, run=run))

        for t in range(1, T + 1):
            out.append(Stage(f"o3_seed{k}_request_{t}", lambda ctx, t=t, k=k: unlearn_request(
                seeded(ctx, k), t, adapters(ctx, f"o3_seed{k}_request_", t - 1), forget_records(ctx.cfg, t),
                ctx.cfg.unlearn.orth_lambda), needs=("base",)))
            if cfg.tofu.seed_detectors:
                out.append(Stage(f"o3_seed{k}_detector_{t}", lambda ctx, t=t, k=k: train_detector(
                    seeded(ctx, k), t, forget_records(ctx.cfg, t), variants=False), needs=("base",)))
        out.append(Stage(f"o3_seed{k}_eval", lambda ctx, k=k: seed_eval(ctx, k),
                         needs=("base", *[f"o3_seed{k}_{kind}_{t}" for kind in kinds for t in range(1, T + 1)],
                                *[f"detector_{t}" for t in range(1, T + 1)])))
    return out


def seed_eval(ctx: StageContext, k: int) -> dict:
    cfg = ctx.cfg
    data, sets = world(cfg)
    T = cfg.data.requests
    prefix = f"o3_seed{k}_detector_" if cfg.tofu.seed_detectors else "detector_"
    scores = [str(ctx.stage_dir(f"{prefix}{s}") / "scores.safetensors") for s in range(1, T + 1)]
    dirs = adapters(ctx, f"o3_seed{k}_request_", T)
    return {"seed": cfg.run.seed + k, **evaluate_request(cfg, data, sets, T, base_dir(ctx), dirs, scores),
            "tofu": score_o3(cfg, base_dir(ctx), dirs, detectors(ctx, prefix, T))}


def tofu_stages(cfg, unlearn_request, train_detector) -> list[Stage]:
    """``unlearn_request`` / ``train_detector``: O3's stage functions (from ``stages``, passed in: no import cycle)."""
    if not cfg.tofu.enabled:
        return []
    T = cfg.data.requests
    out = [Stage("tofu_retain_only", train_retain_only, needs=("base",)),
           Stage("tofu_base", lambda ctx: {"tofu": score_plain(ctx.cfg, base_dir(ctx), T)}, needs=("base",)),
           Stage("tofu_retain_only_eval", lambda ctx: {"tofu": score_plain(
               ctx.cfg, ctx.results["tofu_retain_only"]["model_dir"], T)}, needs=("tofu_retain_only",))]
    out += [Stage(f"tofu_o3_{t}", lambda ctx, t=t: {"tofu": score_o3(
        ctx.cfg, base_dir(ctx), adapters(ctx, "request_", t), detectors(ctx, "detector_", t))},
        needs=("base", f"request_{t}", f"detector_{t}")) for t in range(1, T + 1)]
    out += [Stage(f"baseline_{m}_{t}", lambda ctx, m=m, t=t: baseline_request(ctx, m, t), needs=("base",))
            for m in cfg.baselines.names() for t in range(1, T + 1)]
    return out + seed_stages(cfg, unlearn_request, train_detector)
