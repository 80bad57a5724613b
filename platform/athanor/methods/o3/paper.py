"""O3 as a paper for the runner: its stages (each resumable; a finished one is skipped when the
recipe runs again) and its report.

    base -> base_eval -> for t in 1..T: request_t, detector_t, eval_t
         -> ablations (always-on, per-request gate, gate variants, λ = 0 adapters, gradient ascent,
                       detectors on the pretrained encoder)
         -> report (with the O3 folder OUTPUT/o3, reloaded as a user would load it)
"""
from __future__ import annotations

import time
from dataclasses import replace

from ...compat import plain_loading
from ...runner import Paper, Stage, StageContext
from .detector import check_backbone
from .model import O3Model
from .pipeline import (GATE_VARIANTS, O3Config, adapter_overlap, base_dir, evaluate_ablation, evaluate_base,
                       evaluate_request, gradient_ascent, load_scores, train_base, train_detector, unlearn_request,
                       world)
from .summary import checks, markdown, plot, plot_gate, samples, save_o3_folder


def check(cfg: O3Config) -> None:
    """Before any compute: a missing encoder, a missing data file, too few people for the requests."""
    check_backbone(cfg.detector.backbone)
    world(cfg)


def forget_records(cfg: O3Config, t: int):
    data, sets = world(cfg)
    return [data.records[i] for i in sets.forget_train[t - 1]]  # trained phrasings only


def adapters(ctx: StageContext, prefix: str, upto: int) -> list[str]:
    """Adapter folders of stages ``<prefix>1 .. <prefix>upto`` (relative to the output folder's parent)."""
    return [str(ctx.stage_dir(f"{prefix}{s}") / "adapter") for s in range(1, upto + 1)]


def score_files(ctx: StageContext, upto: int) -> list[str]:
    return [str(ctx.stage_dir(f"detector_{s}") / "scores.safetensors") for s in range(1, upto + 1)]


def stages(cfg: O3Config) -> list[Stage]:
    T = cfg.data.requests
    ab = cfg.ablations

    def evaluation(fn):  # an evaluation stage: the data and sets of this config, then fn
        return lambda ctx: fn(ctx, *world(ctx.cfg))

    out = [Stage("base", train_base),
           Stage("base_eval", evaluation(lambda ctx, data, sets: evaluate_base(ctx.cfg, data, sets, base_dir(ctx))),
                 needs=("base",))]
    for t in range(1, T + 1):
        out += [
            Stage(f"request_{t}", lambda ctx, t=t: unlearn_request(
                ctx, t, adapters(ctx, "request_", t - 1), forget_records(ctx.cfg, t), ctx.cfg.unlearn.orth_lambda),
                needs=("base",)),
            Stage(f"detector_{t}", lambda ctx, t=t: train_detector(ctx, t, forget_records(ctx.cfg, t)), needs=("base",)),
            Stage(f"eval_{t}", evaluation(lambda ctx, data, sets, t=t: evaluate_request(
                ctx.cfg, data, sets, t, base_dir(ctx), adapters(ctx, "request_", t), score_files(ctx, t))),
                needs=("base", f"request_{t}", f"detector_{t}")),
        ]
    last = (f"request_{T}", f"detector_{T}")

    def ablation(name: str, gate: str, with_scores: bool, key: str = "logit") -> Stage:
        return Stage(f"ablation_{name}", evaluation(lambda ctx, data, sets: evaluate_ablation(
            ctx.cfg, data, sets, base_dir(ctx), adapters(ctx, "request_", T), gate,
            score_files(ctx, T) if with_scores else [], key=key)), needs=("base", *last))

    if ab.always_on:
        out.append(ablation("always_on", "always_on", False))
    if ab.per_request_gate:
        out.append(ablation("per_request_gate", "per_request", True))
    if ab.gate_variants:
        out += [ablation(f"gate_{name}", cfg.unlearn.gate, True, key=f"logit_{name}")
                for name in GATE_VARIANTS(cfg.detector, [])]
    if ab.lambda0:  # the same adapters retrained with λ = 0
        out += [Stage(f"ablation_lambda0_request_{t}", lambda ctx, t=t: unlearn_request(
            ctx, t, adapters(ctx, "ablation_lambda0_request_", t - 1), forget_records(ctx.cfg, t), orth_lambda=0.0),
            needs=("base",)) for t in range(1, T + 1)]
        def lambda0_eval(ctx, data, sets):
            dirs = adapters(ctx, "ablation_lambda0_request_", T)
            ungated = evaluate_ablation(ctx.cfg, data, sets, base_dir(ctx), dirs, "always_on", [])
            return {**evaluate_ablation(ctx.cfg, data, sets, base_dir(ctx), dirs, ctx.cfg.unlearn.gate,
                                        score_files(ctx, T)),
                    "adapter_overlap": adapter_overlap(dirs),  # and the λ=0 adapters composed without the gate:
                    "ungated_composed_target_rate": ungated.get("composed_target_rate")}

        out.append(Stage("ablation_lambda0_eval", evaluation(lambda0_eval),
                         needs=("base", *last, *[f"ablation_lambda0_request_{t}" for t in range(1, T + 1)])))
    if ab.detector_untrained and cfg.detector.train_steps:  # the same detectors on the pretrained encoder
        untrained = replace(cfg.detector, train_steps=0)
        out += [Stage(f"ablation_detector0_{t}", lambda ctx, t=t: train_detector(
            ctx, t, forget_records(ctx.cfg, t), untrained, variants=False), needs=("base",)) for t in range(1, T + 1)]
        out.append(Stage("ablation_detector0_eval", evaluation(lambda ctx, data, sets: evaluate_ablation(
            ctx.cfg, data, sets, base_dir(ctx), adapters(ctx, "request_", T), ctx.cfg.unlearn.gate,
            [str(ctx.stage_dir(f"ablation_detector0_{t}") / "scores.safetensors") for t in range(1, T + 1)])),
            needs=("base", *last, *[f"ablation_detector0_{t}" for t in range(1, T + 1)])))
    if ab.gradient_ascent:  # each request ascends from the previous request's model
        def ga_model(ctx: StageContext, t: int) -> str:
            return base_dir(ctx) if t == 0 else str(ctx.stage_dir(f"ablation_ga_request_{t}") / "model")

        out += [Stage(f"ablation_ga_request_{t}", lambda ctx, t=t: gradient_ascent(
            ctx, ga_model(ctx, t - 1), t, forget_records(ctx.cfg, t)), needs=("base",)) for t in range(1, T + 1)]
        out.append(Stage("ablation_ga_eval", evaluation(lambda ctx, data, sets: evaluate_ablation(
            ctx.cfg, data, sets, ga_model(ctx, T), [], "off", [])), needs=("base", f"ablation_ga_request_{T}")))
    return out


ABLATIONS = {"ablation_always_on": "always_on", "ablation_per_request_gate": "per_request_gate",
             **{f"ablation_gate_{name}": f"gate_{name}" for name in ("cosine_only", "mahalanobis_only", "random_folds")},
             "ablation_lambda0_eval": "lambda0", "ablation_ga_eval": "gradient_ascent",
             "ablation_detector0_eval": "detector_train_steps_0"}


def report(ctx: StageContext, results: dict) -> dict:
    """report.json/md, plots, the O3 folder (OUTPUT/o3) and samples generated from it, reloaded."""
    from ...report import write_report
    from .tune import COMMAND as TUNE_COMMAND

    cfg: O3Config = ctx.cfg
    data, sets = world(cfg)
    T = cfg.data.requests
    base, base_eval = results["base"], results["base_eval"]
    requests = [{**results[f"eval_{t}"], "target_rate": results[f"request_{t}"]["target_rate"],
                 "detector_tau": results[f"detector_{t}"]["tau"],
                 "orth_penalty_last": results[f"request_{t}"]["orth_penalty_last"],
                 "paraphrase": {"base_accuracy": base_eval["forget_acc_paraphrase"][t - 1],
                                "forget_accuracy": results[f"eval_{t}"]["forget_acc_paraphrase"]}}
                for t in range(1, T + 1)]
    ablations = {label: {k: v for k, v in results[name].items() if k != "seconds"}
                 for name, label in ABLATIONS.items() if name in results}
    adapter_dirs = adapters(ctx, "request_", T)
    out = {"world": f"{len(data.groups)} groups, {len(data.records)} records, {T} requests of "
                    f"{cfg.data.groups_per_request}", "gate": cfg.unlearn.gate, "orth_lambda": cfg.unlearn.orth_lambda,
           "base": {**{k: v for k, v in base_eval.items() if k != "seconds"}, "steps": base["steps"]},
           "requests": [{k: v for k, v in r.items() if k != "seconds"} for r in requests], "ablations": ablations,
           "checks": checks(base_eval, requests, ablations), "adapter_overlap": adapter_overlap(adapter_dirs),
           "adapter_overlap_lambda0": ablations.get("lambda0", {}).get("adapter_overlap"),
           "detector_train_steps": cfg.detector.train_steps,
           "detector_parts": {k: v for k, v in requests[-1].items() if k.startswith("auroc")},
           "world_size": ctx.state.num_processes, "o3_dir": f"{cfg.run.output_dir}/o3",
           "tuning": {"dev_seed": cfg.data.dev_seed, "data_seed": cfg.data.seed, "command": TUNE_COMMAND,
                      "values": {k: getattr(cfg.detector, k) for k in ("gamma", "threshold_percentile", "sharpness")},
                      "evaluated_on_dev_world": cfg.data.seed == cfg.data.dev_seed}}
    detectors = [str(ctx.stage_dir(f"detector_{t}") / "detector") for t in range(1, T + 1)]
    folder = save_o3_folder(ctx.root, cfg, base_dir(ctx), bool(base["steps"]), adapter_dirs, detectors,
                            {k: v for k, v in requests[-1].items() if isinstance(v, float)})
    with plain_loading():  # main process only: no ZeRO-3 collectives
        reloaded = O3Model.from_pretrained(folder)  # the saved folder, as a user would load it
        out["samples"] = samples(reloaded, data, sets)
    plot(ctx.root, base_eval, requests, ablations)
    plot_gate(ctx.root, load_scores(score_files(ctx, T))["logit"], sets)
    out["seconds"] = time.time() - ctx.started  # this invocation (finished stages were skipped)
    write_report(ctx.root, out, "O3 continual unlearning", markdown(out))
    return out


def summary(out: dict) -> str:
    unmet = [name for name, check in out["checks"].items() if not check["met"]]
    return f"{len(out['checks']) - len(unmet)}/{len(out['checks'])} checks met" + \
        (f" (not met: {', '.join(unmet)})" if unmet else "")


PAPER = Paper(name="O3", config=O3Config, stages=stages, report=report, check=check, summary=summary)

