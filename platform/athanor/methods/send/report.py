"""SeND's report: per arm and seed, final accuracy, the hallucination rate's oscillation across
checkpoints and EigenScore's AUROC; paired normal-vs-SeND differences with their seed spread; plots.

Definitions (each evaluation checkpoint t, every ``run.eval_every`` steps):
- hallucination rate h_t: the fraction of wrong answers (greedy, teacher-forced) among the trained
  phrasings of the facts taught so far (old facts + the additions opened by step t);
- ``oscillation_std``: the standard deviation of h_t across the checkpoints after step 0 (the
  paper's variance across checkpoints; it includes the jumps when an addition opens);
- ``oscillation_diff_std``: the standard deviation of h_t − h_{t−1} over consecutive checkpoints
  with the same open facts (trend-free swings);
- ``flip_rate``: mean fraction of taught answers whose correctness changed between checkpoints.
A difference counts as beyond seed noise when the paired 95% t-interval of the per-seed differences
(SeND − normal, same seed, same batch stream) excludes zero (|mean| > t_{0.975, n−1}·SE).
"""
from __future__ import annotations

import math
import statistics

import matplotlib
import scipy.stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ...engine.metrics import read_metrics  # noqa: E402
from ...report import write_report  # noqa: E402
from ...runner import StageContext  # noqa: E402

METRICS = [("acc_old", "final accuracy, old facts", +1), ("acc_new", "final accuracy, new facts", +1),
           ("acc_taught", "final accuracy, all taught facts", +1),
           ("oscillation_std", "hallucination-rate std across checkpoints", -1),
           ("oscillation_diff_std", "std of checkpoint-to-checkpoint changes", -1),
           ("flip_rate", "answer flip rate between checkpoints", -1),
           ("eigenscore_auroc", "EigenScore AUROC at flagging wrong answers", +1)]


def _std(xs: list[float]) -> float:
    return statistics.pstdev(xs) if len(xs) > 1 else 0.0


def arm_entry(ctx: StageContext, stage: str, result: dict) -> tuple[dict, list[dict]]:
    rows = [r for r in read_metrics(ctx.stage_dir(stage)) if "eval_halluc" in r]
    rows = sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])
    after = [r for r in rows if r["step"] > 0]
    h = [r["eval_halluc"] for r in after]
    phase = [r["eval_open"] for r in after]
    diffs = [b - a for a, b, pa, pb in zip(h, h[1:], phase, phase[1:]) if pa == pb]
    final = result["final"]
    entry = {"seed": result["seed"], "acc_old": final["acc_old"], "acc_new": final["acc_new_all"],
             "acc_taught": 1 - final["halluc"], "oscillation_std": _std(h), "oscillation_diff_std": _std(diffs),
             "flip_rate": statistics.fmean([r["eval_flips"] for r in after if "eval_flips" in r] or [0.0]),
             "eigenscore_auroc": result["eigenscore_auroc"], "wrong_answers": result["wrong"],
             "stopped_at": result["stopped_at"], "checkpoints": len(h)}
    return entry, rows


def paired(normal: list[dict], send: list[dict], key: str) -> dict | None:
    by_seed = {e["seed"]: e for e in normal}
    diffs = [s[key] - by_seed[s["seed"]][key] for s in send
             if s["seed"] in by_seed and s[key] is not None and by_seed[s["seed"]][key] is not None]
    if not diffs:
        return None
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("inf")
    t = float(scipy.stats.t.ppf(0.975, len(diffs) - 1)) if len(diffs) > 1 else float("inf")
    return {"mean": mean, "se": se, "diffs": diffs, "beyond_noise": abs(mean) > t * se}


def comparison_table(lines: list[str], arms: dict, a: str, b: str, header: bool = True) -> dict:
    """Append a metric table of arm ``a`` vs arm ``b`` (paired by seed) to ``lines``; verdict per metric."""
    if header:
        lines += [f"| metric | {b} (mean ± std over seeds) | {a} | paired {a} − {b} (± SE) | beyond seed noise |",
                  "|---|---|---|---|---|"]
    else:
        lines += ["", f"| metric | {b} | {a} | paired {a} − {b} (± SE) | beyond seed noise |", "|---|---|---|---|---|"]
    verdicts = {}
    for key, label, sign in METRICS:
        p = paired(arms[b], arms[a], key)
        verdicts[key] = None if p is None else ("better" if p["beyond_noise"] and p["mean"] * sign > 0 else
                                                "worse" if p["beyond_noise"] else "no difference")
        pair = "n/a" if p is None else f"{p['mean']:+.3f} ± {p['se']:.3f}"
        lines.append(f"| {label} | {_summary(arms[b], key)} | {_summary(arms[a], key)} | {pair} | "
                     f"{verdicts[key] or 'n/a'} |")
    return verdicts


def _summary(entries: list[dict], key: str) -> str:
    xs = [e[key] for e in entries if e[key] is not None]
    if not xs:
        return "n/a"
    return f"{statistics.fmean(xs):.3f} ± {_std(xs):.3f}"


def plot_curves(ctx: StageContext, curves: dict) -> None:
    colours = {"normal": "tab:blue", "send": "tab:red", "random": "tab:green"}
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for (arm, seed_i), rows in curves.items():
        for ax, key, title in ((axes[0], "eval_acc_old", "old facts"), (axes[1], "eval_acc_new_all", "new facts (all additions)")):
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], styles[seed_i % 4], color=colours[arm],
                    label=f"{arm} seed #{seed_i}", linewidth=1.2)
            ax.set_title(f"accuracy, {title}")
            ax.set_xlabel("continued-training step")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ctx.root / "accuracy.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (arm, seed_i), rows in curves.items():
        ax.plot([r["step"] for r in rows], [r["eval_halluc"] for r in rows], styles[seed_i % 4], color=colours[arm],
                label=f"{arm} seed #{seed_i}", linewidth=1.2)
    ax.set_title("hallucination rate on the facts taught so far")
    ax.set_xlabel("continued-training step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ctx.root / "hallucination.png", dpi=110)
    plt.close(fig)


def report(ctx: StageContext, results: dict) -> dict:
    cfg = ctx.cfg
    arms: dict[str, list[dict]] = {arm: [] for arm in cfg.experiment.arms}
    curves = {}
    for i, seed in enumerate(cfg.experiment.seeds):
        for arm in cfg.experiment.arms:
            entry, rows = arm_entry(ctx, f"{arm}_s{seed}", results[f"{arm}_s{seed}"])
            arms[arm].append(entry)
            curves[(arm, i)] = rows
    plot_curves(ctx, curves)
    es = results["eigenscore_check"]
    out = {"eigenscore": {"max_rel_error": es["max_rel_error"], "samples": es["samples"], "alpha": es["alpha"],
                          "dims": sorted({t["d"] for t in es["trials"]}), "method": "Gram-exact vs float64 Cholesky"},
           **arms, "base": results["base"]}
    lines = [f"EigenScore (K={es['samples']}, α={es['alpha']}): Gram-exact vs float64 Cholesky log det on random "
             f"embeddings, max relative error {es['max_rel_error']:.1e} (required ≤ 1e-6).", ""]
    verdicts = {}
    if "normal" in arms and "send" in arms:
        verdicts = comparison_table(lines, arms, "send", "normal")
        core = [verdicts[k] for k in ("acc_taught", "oscillation_std", "flip_rate")]
        helped = "better" in core and "worse" not in core
        out["send_helped"] = helped
        out["verdicts"] = verdicts
        lines += ["", f"**Did SeND help here? {'Yes' if helped else 'No'}.** Over {len(cfg.experiment.seeds)} seeds "
                  f"(paired by seed, same base model and batch stream), SeND vs normal: final accuracy on taught facts "
                  f"{verdicts['acc_taught']}, hallucination-rate oscillation {verdicts['oscillation_std']}, flip rate "
                  f"{verdicts['flip_rate']} (beyond noise = the paired 95% t-interval excludes 0)."]
    if "random" in arms and "send" in arms:
        lines += ["", "Control: the same dropout schedule and fraction with randomly chosen neurons "
                  "(is it the *sensitive* neurons, or dropout as such?).", ""]
        out["verdicts_vs_random"] = control = comparison_table(lines, arms, "send", "random")
        if "normal" in arms:
            out["verdicts_random_vs_normal"] = comparison_table(lines, arms, "random", "normal", header=False)
        specific = [control[k] for k in ("acc_taught", "oscillation_std", "flip_rate")]
        lines += ["", f"SeND vs random dropout: {'better' if 'better' in specific and 'worse' not in specific else 'not better'} "
                  f"(final accuracy {control['acc_taught']}, oscillation {control['oscillation_std']}, flip rate "
                  f"{control['flip_rate']})."]
    lines += ["", "Per seed (final accuracy old / new, hallucination-rate std, flip rate, EigenScore AUROC):", "",
              "| arm | seed | acc old | acc new | oscillation std | diff std | flip rate | AUROC |",
              "|---|---|---|---|---|---|---|---|"]
    for arm, entries in arms.items():
        for e in entries:
            au = "n/a" if e["eigenscore_auroc"] is None else f"{e['eigenscore_auroc']:.3f}"
            lines.append(f"| {arm} | {e['seed']} | {e['acc_old']:.3f} | {e['acc_new']:.3f} | {e['oscillation_std']:.4f} "
                         f"| {e['oscillation_diff_std']:.4f} | {e['flip_rate']:.4f} | {au} |")
    d, s_ = cfg.data, cfg.send
    lines += ["", f"Setting: a GPT-NeoX (hidden {cfg.model.hidden_size}, {cfg.model.num_layers} layers) trained to "
              f"convergence on {d.old_people} people's facts ({d.attributes} attributes, {d.templates - d.tracking_templates} "
              f"trained phrasings each), then continued for {cfg.run.max_steps} steps at lr {cfg.optim.lr} on "
              f"{d.new_people} new people arriving in {d.additions} additions plus {d.replay_fraction:.0%} of the old "
              f"facts replayed. SeND: layer {s_.layer}, top {s_.fraction:.0%} neurons, embeddings recorded every "
              f"{s_.record_every} steps, re-estimated every {s_.reestimate_every} steps from {s_.points} points, "
              f"dropped for {s_.drop_window} steps. SeND's knobs were set from the paper, not tuned here.",
              "", f"Base: {results['base'].get('steps')} steps, accuracy on old facts {results['base'].get('acc_old')}.",
              "Plots: accuracy.png (old / new facts over checkpoints), hallucination.png (per arm and seed)."]
    write_report(ctx.root, out, "SeND: sensitive-neuron dropout vs normal continued training", lines)
    return out


def summary(report: dict) -> str:
    helped = report.get("send_helped")
    return (f"EigenScore exact (rel. err {report['eigenscore']['max_rel_error']:.1e}); SeND helped: "
            f"{'n/a' if helped is None else 'yes' if helped else 'no'}")
