"""Several run seeds, each a whole TokFSM pipeline (baseline, codebook models, analysis) in its own
process, and the report of their spread.

Seed ``k`` trains with ``run.seed = k`` on the FSM ``data.fsm.seed + k`` (a new machine and new walks per
seed, so the spread covers the FSM as well as the initialisation), writing ``OUTPUT/seeds/seed<k>``.
The report gives every figure of a one-seed report as {mean, sd, min, max, values} over the seeds.
"""
from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from athanor.report import write_report
from athanor.runner import StageContext

from .report import _fsm_lines, _steering_plot, means


def _command(ctx: StageContext, config: Path, k: int) -> list[str]:
    cfg = ctx.cfg
    return [sys.executable, "-m", "athanor.runner", "athanor.methods.codebook", "--config", str(config),
            "--seeds", "[]", "--run.seed", str(k), "--data.fsm.seed", str(cfg.data.fsm.seed + k),
            "--run.output_dir", str(ctx.dir / f"seed{k}"), "--run.progress", "false"]


def seeds_stage(ctx: StageContext) -> dict:
    """Runs the seeds, at most ``seed_processes`` at a time; a failed seed stops the stage with its log's tail."""
    cfg = ctx.cfg
    ctx.dir.mkdir(parents=True, exist_ok=True)
    config = ctx.dir / "seed_config.yaml"
    config.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    pending, running, started = list(cfg.seeds), {}, time.perf_counter()
    while pending or running:
        while pending and len(running) < cfg.seed_processes:
            k = pending.pop(0)
            log = open(ctx.dir / f"seed{k}.log", "w")
            running[k] = (subprocess.Popen(_command(ctx, config, k), stdout=log, stderr=subprocess.STDOUT), log)
        time.sleep(1)
        for k, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[k]
            if proc.returncode:
                for other, _ in running.values():
                    other.terminate()
                tail = (ctx.dir / f"seed{k}.log").read_text().strip().splitlines()[-15:]
                raise RuntimeError(f"seed {k} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    runs = {str(k): json.loads((ctx.dir / f"seed{k}" / "report.json").read_text()) for k in cfg.seeds}
    return {"runs": runs, "wall_seconds": time.perf_counter() - started}


def spread(values: list) -> dict:
    out = {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
           "min": min(values), "max": max(values), "values": values}
    return out


def aggregate(trees: list) -> object:
    """Numeric leaves -> their spread over the runs; booleans -> how many passed; others: the first."""
    first = trees[0]
    if isinstance(first, dict):
        keys = [k for k in first if all(isinstance(t, dict) and k in t for t in trees)]
        return {k: aggregate([t[k] for t in trees]) for k in keys}
    if isinstance(first, bool):
        return {"passed": sum(bool(t) for t in trees), "of": len(trees)}
    if isinstance(first, (int, float)) and all(isinstance(t, (int, float)) for t in trees):
        return spread([float(t) for t in trees])
    return first


KEYS = ("transition_acc", "state_features", "steering", "dead_code_fraction", "eval_loss", "lm_loss_cost", "checks",
        "transition_acc_baseline", "transition_acc_codebook", "code_precision_at_recall_0.5",
        "neuron_precision_at_code_recall", "steering_js", "steering_js_other_state_codes", "steering_js_no_patch")


def seeds_report(ctx: StageContext, result: dict) -> dict:
    runs = result["runs"]
    reports = list(runs.values())
    out = {key: aggregate([r[key] for r in reports]) for key in KEYS if all(key in r for r in reports)}
    out["seeds"] = {"n": len(runs), "run_seeds": [int(k) for k in runs], "fsm_seeds": [r["fsm_seed"] for r in reports],
                    "dev_fsm_seed": ctx.cfg.analysis.dev_fsm_seed, "folders": [str(ctx.stage_dir("seeds") / f"seed{k}") for k in runs],
                    "per_seed": {k: {"transition_acc": r["transition_acc"], "code_precision_at_recall_0.5": r["code_precision_at_recall_0.5"],
                                     "neuron_precision_at_code_recall": r["neuron_precision_at_code_recall"],
                                     "steering_js": r["steering_js"], "steering_js_other_state_codes": r["steering_js_other_state_codes"]}
                                 for k, r in runs.items()},
                    "wall_seconds": result["wall_seconds"]}
    out["cpu_seconds_total"] = sum(r["cpu_seconds_total"] for r in reports)
    lines = [f"{len(runs)} run seeds {out['seeds']['run_seeds']} on FSM seeds {out['seeds']['fsm_seeds']} (knobs chosen on "
             f"the dev FSM seed {ctx.cfg.analysis.dev_fsm_seed}, not among them), one process each; wall "
             f"{result['wall_seconds']:.0f} s, process CPU {out['cpu_seconds_total']:.0f} s. Means over the seeds below; "
             "report.json gives every figure with its sd, min, max and per-seed values.", ""]
    lines += _fsm_lines(means(out))
    lines += ["", "Checks passed (of the seeds): " + ", ".join(f"{k} {v['passed']}/{v['of']}" for k, v in out["checks"].items())]
    _steering_plot(ctx, means(out)["steering"])
    first = Path(out["seeds"]["folders"][0])
    for name in ("code_state_heatmap.png",):
        if (first / name).exists():
            shutil.copy(first / name, ctx.root / name)
    if (first / "model").exists():
        shutil.copytree(first / "model", ctx.root / "model", dirs_exist_ok=True)
    write_report(ctx.root, out, "Codebook Features (over run seeds)", lines)
    return out
