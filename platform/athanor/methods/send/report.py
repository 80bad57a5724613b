"""SeND's report: per arm and seed, the held-out hallucination rate and EigenScore at every checkpoint,
their spread across checkpoints (the paper's quantity), and paired SeND − normal (and − random)
intervals over seeds; plots.

Definitions (each evaluation checkpoint t, every ``run.eval_every`` steps, up to the stopping rule's step):
- ``heldout_hallucination_rate`` h_t: the fraction of wrong greedy answers on the held-out *test*
  phrasings (never trained, never tracked) of the facts taught so far; ``halluc``: the same on the
  trained phrasings;
- ``eigenscore_heldout`` e_t: the mean EigenScore (K sampled answers, ``eigenscore.centring``) of a fixed
  set of held-out test prompts, sampled with the same seed at every checkpoint;
- spreads across checkpoints (after step 0): ``*_std`` = std of the series, ``*_diff_std`` = std of
  checkpoint-to-checkpoint changes with the same open facts (trend-free swings); ``heldout_flip_rate``:
  mean fraction of held-out answers whose correctness changed between checkpoints.
Paired intervals: per seed, arm − normal (same seed = same initialisation and batch stream); the 95%
t-interval of the mean difference (``scipy.stats.t.interval``); "beyond seed noise" = it excludes 0.
"""
from __future__ import annotations

import statistics

import matplotlib
import scipy.stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ...engine.metrics import read_metrics  # noqa: E402
from ...report import write_report  # noqa: E402
from ...runner import StageContext  # noqa: E402

# (key, label, sign: +1 higher is better, -1 lower is better)
METRICS = [("final_heldout_halluc", "final held-out hallucination rate", -1),
           ("heldout_halluc_mean", "mean held-out hallucination rate over checkpoints", -1),
           ("heldout_halluc_std", "held-out hallucination rate: std across checkpoints", -1),
           ("heldout_halluc_diff_std", "held-out hallucination rate: std of changes", -1),
           ("heldout_flip_rate", "held-out answer flip rate between checkpoints", -1),
           ("eigenscore_heldout_std", "held-out EigenScore: std across checkpoints (the paper's)", -1),
           ("eigenscore_heldout_diff_std", "held-out EigenScore: std of changes", -1),
           ("eigenscore_heldout_final", "final held-out EigenScore", -1),
           ("acc_taught", "final accuracy, trained phrasings", +1),
           ("oscillation_std", "trained-phrasing hallucination rate: std across checkpoints", -1),
           ("flip_rate", "trained-phrasing flip rate", -1),
           ("eigenscore_auroc", "EigenScore AUROC at flagging wrong held-out answers", +1)]
HEADLINE = ("final_heldout_halluc", "heldout_halluc_std", "eigenscore_heldout_std")


def _std(xs: list[float]) -> float:
    return statistics.pstdev(xs) if len(xs) > 1 else 0.0


def _diffs(xs: list[float], phase: list[float]) -> list[float]:
    return [b - a for a, b, pa, pb in zip(xs, xs[1:], phase, phase[1:]) if pa == pb]


def arm_entry(ctx: StageContext, stage: str, result: dict) -> dict:
    rows = [r for r in read_metrics(ctx.stage_dir(stage)) if "eval_heldout_halluc" in r]
    rows = sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])
    stop = result["stopped_at"]
    rows = [r for r in rows if stop < 0 or r["step"] <= stop]  # later checkpoints repeat the stopped model
    after = [r for r in rows if r["step"] > 0]
    h = [r["eval_heldout_halluc"] for r in after]
    e = [r["eval_eigenscore_heldout"] for r in after]
    phase = [r["eval_open"] for r in after]
    last = rows[-1]
    return {"seed": result["seed"], "stopped_at": stop, "checkpoints": len(after),
            "per_checkpoint": {"step": [r["step"] for r in rows],
                               "heldout_hallucination_rate": [r["eval_heldout_halluc"] for r in rows],
                               "eigenscore_heldout": [r["eval_eigenscore_heldout"] for r in rows],
                               "train_hallucination_rate": [r["eval_halluc"] for r in rows]},
            "final_heldout_halluc": last["eval_heldout_halluc"], "heldout_halluc_mean": statistics.fmean(h or [0.0]),
            "heldout_halluc_std": _std(h), "heldout_halluc_diff_std": _std(_diffs(h, phase)),
            "heldout_flip_rate": statistics.fmean([r["eval_heldout_flips"] for r in after
                                                   if "eval_heldout_flips" in r] or [0.0]),
            "eigenscore_heldout_std": _std(e), "eigenscore_heldout_diff_std": _std(_diffs(e, phase)),
            "eigenscore_heldout_final": last["eval_eigenscore_heldout"],
            "acc_taught": 1 - last["eval_halluc"], "acc_old": last.get("eval_acc_old"),
            "acc_new": last.get("eval_acc_new_all"),
            "oscillation_std": _std([r["eval_halluc"] for r in after]),
            "flip_rate": statistics.fmean([r["eval_flips"] for r in after if "eval_flips" in r] or [0.0]),
            "eigenscore_auroc": result["eigenscore_auroc"], "wrong_answers": result["wrong"],
            "seconds": result.get("seconds")}


def paired(base: list[dict], arm: list[dict], key: str) -> dict | None:
    """Per-seed differences arm − base and their 95% t-interval."""
    by_seed = {e["seed"]: e for e in base}
    diffs = [s[key] - by_seed[s["seed"]][key] for s in arm
             if s["seed"] in by_seed and s[key] is not None and by_seed[s["seed"]][key] is not None]
    if not diffs:
        return None
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "ci95": [float("-inf"), float("inf")], "diffs": diffs, "beyond_noise": False}
    se = statistics.stdev(diffs) / len(diffs) ** 0.5
    lo, hi = (mean, mean) if se == 0 else scipy.stats.t.interval(0.95, len(diffs) - 1, loc=mean, scale=se)
    return {"mean": mean, "se": se, "ci95": [float(lo), float(hi)], "diffs": diffs,
            "beyond_noise": bool(lo > 0 or hi < 0)}


def comparison(lines: list[str], arms: dict, a: str, b: str) -> dict:
    """Paired a − b for every metric, as a table appended to ``lines``; returns {metric: paired + verdict}."""
    lines += [f"| metric | {b} (mean ± std over seeds) | {a} | paired {a} − {b} [95% CI] | verdict |",
              "|---|---|---|---|---|"]
    out = {}
    for key, label, sign in METRICS:
        p = paired(arms[b], arms[a], key)
        if p is not None:
            p["verdict"] = ("better" if p["beyond_noise"] and p["mean"] * sign > 0 else
                            "worse" if p["beyond_noise"] else "no difference")
            out[key] = p
        pair = "n/a" if p is None else f"{p['mean']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]"
        lines.append(f"| {label} | {_summary(arms[b], key)} | {_summary(arms[a], key)} | {pair} | "
                     f"{'n/a' if p is None else p['verdict']} |")
    return out


def _summary(entries: list[dict], key: str) -> str:
    xs = [e[key] for e in entries if e[key] is not None]
    return "n/a" if not xs else f"{statistics.fmean(xs):.4f} ± {_std(xs):.4f}"


def plot_curves(ctx: StageContext, arms: dict) -> None:
    colours = {"normal": "tab:blue", "send": "tab:red", "random": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm, entries in arms.items():
        for i, e in enumerate(entries):
            pc = e["per_checkpoint"]
            for ax, key in ((axes[0], "heldout_hallucination_rate"), (axes[1], "eigenscore_heldout")):
                ax.plot(pc["step"], pc[key], color=colours.get(arm, "k"), alpha=0.7, linewidth=1.0,
                        label=arm if i == 0 else None)
    for ax, title in ((axes[0], "held-out hallucination rate"), (axes[1], "held-out EigenScore (mean)")):
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.root / "hallucination.png", dpi=110)
    plt.close(fig)


def report(ctx: StageContext, results: dict) -> dict:
    cfg = ctx.cfg
    arms = {arm: [arm_entry(ctx, f"{arm}_s{seed}", results[f"{arm}_s{seed}"]) for seed in cfg.experiment.seeds]
            for arm in cfg.experiment.arms}
    plot_curves(ctx, arms)
    es = results["eigenscore_check"]
    out = {"eigenscore": {"max_rel_error": es["max_rel_error"], "samples": es["samples"], "alpha": es["alpha"],
                          "dims": sorted({t["d"] for t in es["trials"]}), "method": "Gram-exact vs float64 Cholesky",
                          "centring": cfg.eigenscore.centring},
           **arms, "base": results["base"], "seeds": list(cfg.experiment.seeds), "data_seed": cfg.data.seed,
           "spread_across_checkpoints": {arm: {k: {"mean": statistics.fmean([e[k] for e in entries]),
                                                   "std_over_seeds": _std([e[k] for e in entries])}
                                               for k in ("heldout_halluc_std", "eigenscore_heldout_std")}
                                         for arm, entries in arms.items()},
           "paired": {}}
    lines = [f"EigenScore (K={es['samples']}, α={es['alpha']}, centring {cfg.eigenscore.centring}); the "
             f"Gram identity vs float64 Cholesky: max relative error {es['max_rel_error']:.1e}.", ""]
    for a, b in (("send", "normal"), ("random", "normal"), ("send", "random")):
        if a in arms and b in arms:
            lines += ["", f"**{a} − {b}**, paired over {len(cfg.experiment.seeds)} seeds:", ""]
            out["paired"][f"{a}_minus_{b}"] = comparison(lines, arms, a, b)
    if "send_minus_normal" in out["paired"]:
        p = out["paired"]["send_minus_normal"]
        verdicts = [p[k]["verdict"] for k in HEADLINE if k in p]
        out["send_helped"] = "better" in verdicts and "worse" not in verdicts
        lines += ["", f"**Did SeND help here? {'Yes' if out['send_helped'] else 'No'}.** SeND − normal: " + "; ".join(
            f"{k} {p[k]['mean']:+.4f} [{p[k]['ci95'][0]:+.4f}, {p[k]['ci95'][1]:+.4f}] ({p[k]['verdict']})"
            for k in HEADLINE if k in p) + "."]
    d, s_ = cfg.data, cfg.send
    lines += ["", f"Setting: a GPT-NeoX (hidden {cfg.model.hidden_size}, {cfg.model.num_layers} layers) "
              f"{'from scratch' if results['base'].get('from_scratch') else 'from ' + str(results['base'])} on "
              f"{d.old_people + d.new_people} people × {d.attributes} attributes (world seed {d.seed}), "
              f"{d.templates - d.tracking_templates - d.test_templates} trained phrasings, {d.tracking_templates} "
              f"tracking, {d.test_templates} held-out test; {cfg.run.max_steps} steps at lr {cfg.optim.lr}, "
              f"checkpoints every {cfg.run.eval_every}. SeND from step 0: layer {s_.layer}, top {s_.fraction:.0%}, "
              f"recorded every {s_.record_every}, re-estimated every {s_.reestimate_every} from {s_.points} points, "
              f"dropped for {s_.drop_window} steps; stopping rule (every arm) loss ≤ {s_.stop_loss} and tracking "
              f"EigenScore ≤ {s_.stop_eigenscore}. The defaults of fraction, drop_window and the stopping thresholds "
              f"were tuned on the dev world (data.seed 1, `python -m athanor.methods.send.tune`), not on this one.",
              "", "Plot: hallucination.png (per arm and seed)."]
    write_report(ctx.root, out, "SeND: sensitive-neuron dropout vs normal training, held-out phrasings", lines)
    return out


def summary(report: dict) -> str:
    helped = report.get("send_helped")
    return (f"EigenScore exact (rel. err {report['eigenscore']['max_rel_error']:.1e}); SeND helped: "
            f"{'n/a' if helped is None else 'yes' if helped else 'no'}")
