"""ILF report: report.json (``paired_mse``, ``equal_cost``, FD, checks), report.md and PNG plots."""
from __future__ import annotations

from pathlib import Path

from ...report import plot_metrics, plt, write_report
from .evaluation import equal_cost_plain, interpolated_mse

COLORS = {"plain": "black", "plain_ilf_grid": "tab:olive", "caching": "tab:gray", "ilf": "tab:red", "once": "tab:blue"}


def plot_curves(curve: dict, x_key: str, xlabel: str, path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, points in curve.items():
        pts = sorted((p for p in points if p["mse"] > 0), key=lambda p: p[x_key])  # the reference itself: off a log axis
        label = {"plain": "plain teacher@N", "plain_ilf_grid": "plain on ILF's levels (s = 0)",
                 "caching": "block caching", "ilf": "ILF (loop + feedback)",
                 "once": "no-loop control"}.get(name, name)
        ax.errorbar([p[x_key] for p in pts], [p["mse"] for p in pts], yerr=[p["mse_se"] for p in pts],
                    marker="o", ms=4, capsize=2, label=label, color=COLORS.get(name),
                    linestyle=":" if name == "plain_ilf_grid" else "-")
        for p in pts:
            ax.annotate(str(p["steps"]), (p[x_key], p["mse"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("paired MSE to the full-step teacher")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(ctx, results: dict) -> dict:
    cfg = ctx.cfg
    ev = results["evaluate"]
    curve, table, key = ev["curve"], ev["key"], cfg.evaluation.key_steps
    ref = f"teacher@{cfg.evaluation.reference_steps}"
    ilf, teacher = table[f"ilf@{key}"], table[f"teacher@{key}"]
    plain_match = equal_cost_plain(curve, ev["ilf_blocks"])
    paired = {"reference": ref, "samples": ilf["samples"],
              "converged_reference": f"teacher@{cfg.evaluation.converged_steps}",
              **{name: {k: row[k] for k in ("mse", "mse_se", "mse_converged", "mse_converged_se", "blocks")}
                 for name, row in table.items()},
              f"ilf@{key}_over_teacher@{key}": ilf["mse"] / teacher["mse"],
              f"ilf@{key}_over_teacher@{key}_vs_converged": ilf["mse_converged"] / teacher["mse_converged"]}
    once = table.get(f"once@{key}")
    equal = {"x": "block evaluations per sample (counted)", "y": f"paired MSE to {ref}",
             "curve_samples": cfg.evaluation.curve_samples, "curves": curve, "ilf_blocks": ev["ilf_blocks"]}
    checks = {f"ilf@{key} <= 0.3 x teacher@{key} (paired MSE)": ilf["mse"] <= 0.3 * teacher["mse"]}
    if plain_match is not None:
        match_row = table.get(f"teacher@{plain_match['steps']}", plain_match)
        equal.update({"plain_at_equal_cost": f"teacher@{plain_match['steps']}",
                      "plain_at_equal_cost_blocks": plain_match["blocks"],
                      "plain_over_ilf_at_equal_cost": match_row["mse"] / ilf["mse"]})
        checks["ILF beats plain sampling at equal block cost"] = ilf["mse"] < match_row["mse"]
    else:
        equal["plain_at_equal_cost"] = None  # evaluation.plain_steps has no point as costly as ILF@key
    plain_interpolated = interpolated_mse(curve["plain"], ev["ilf_blocks"])
    equal["plain_over_ilf_interpolated"] = plain_interpolated / ilf["mse"] if plain_interpolated else None
    for name, row in table.items():
        if name.startswith("caching@"):
            equal["caching_at_equal_cost"] = name
            equal["caching_over_ilf_at_equal_cost"] = row["mse"] / ilf["mse"]
    for name, points in curve.items():
        if name == "plain":
            continue
        for p in points:  # every curve point against plain sampling at the same counted cost
            plain_mse = interpolated_mse(curve["plain"], p["blocks"])
            p["plain_over_this_at_equal_cost"] = plain_mse / p["mse"] if plain_mse is not None and p["mse"] > 0 else None
    if once is not None:
        equal["once_over_ilf_same_steps"] = once["mse"] / ilf["mse"]
        once_at = interpolated_mse(curve["once"], ev["ilf_blocks"])
        equal["once_over_ilf_at_equal_cost"] = once_at / ilf["mse"] if once_at else None
        checks["ILF beats the no-loop control by >= 1.5x (paired MSE, same steps)"] = once["mse"] >= 1.5 * ilf["mse"]
    training = {name: {k: r[k] for k in ("loop", "mode", "steps", "dev_loss", "dev_backbone_loss", "scale", "seconds")}
                for name, r in results.items() if name.startswith("ilf")}
    out = {"paired_mse": paired, "equal_cost": equal,
           "fd": {**table, "real_train_vs_held_out": ev["real_fd_floor"]},
           "must_show": checks, "training": training, "teacher": results["teacher"],
           "stage_seconds": {name: r.get("seconds") for name, r in results.items()}}
    plot_curves(curve, "blocks", "block evaluations per sample (counted)", ctx.root / "quality_vs_blocks.png",
                f"paired MSE to {ref} vs cost ({cfg.evaluation.curve_samples} samples; numbers = steps)")
    plot_curves(curve, "seconds_per_1000", "wall seconds per 1000 samples (1 thread, shared machine)",
                ctx.root / "quality_vs_time.png", "paired MSE vs wall time")
    for name in training:
        plot_metrics(ctx.stage_dir(name), ["loss"], "loss.png", title=f"{name}: jump loss")
    write_report(ctx.root, out, "ILF: inner-loop feedback on a frozen DiT", report_lines(out, table, ref, key))
    return out


def report_lines(out: dict, table: dict, ref: str, key: int) -> list[str]:
    eq = out["equal_cost"]
    lines = [f"Paired MSE to {ref} from the same noise ({out['paired_mse']['samples']} samples) and FD against "
             "held-out images; cost = counted block evaluations per sample.", "",
             f"| sampler | blocks/sample | paired MSE to {ref} (± s.e.) | paired MSE to "
             f"{out['paired_mse']['converged_reference']} | FD pooled | FD per seed (mean ± sd) | class acc |",
             "|---|---|---|---|---|---|---|"]
    for name, r in sorted(table.items(), key=lambda kv: kv[1]["blocks"]):
        lines.append(f"| {name} | {r['blocks']} | {r['mse']:.2e} ± {r['mse_se']:.1e} | {r['mse_converged']:.2e} | "
                     f"{r['fd']:.2f} | "
                     f"{r['fd_per_seed_mean']:.2f} ± {r['fd_per_seed_std']:.2f} | {r['class_acc']:.3f} |")
    lines += ["", f"Real training images vs held-out: FD {out['fd']['real_train_vs_held_out']:.2f}.", "",
              f"ILF@{key} / teacher@{key} paired MSE: {out['paired_mse'][f'ilf@{key}_over_teacher@{key}']:.3f} "
              f"(to the converged teacher: {out['paired_mse'][f'ilf@{key}_over_teacher@{key}_vs_converged']:.3f})."]
    if "plain_over_ilf_at_equal_cost" in eq:
        lines.append(f"At equal cost ({eq['ilf_blocks']} vs {eq['plain_at_equal_cost_blocks']} blocks), "
                     f"{eq['plain_at_equal_cost']} / ILF@{key} paired MSE: {eq['plain_over_ilf_at_equal_cost']:.2f}.")
    if "caching_at_equal_cost" in eq:
        lines.append(f"Block caching near ILF's cost: {eq['caching_at_equal_cost']} / ILF@{key} paired MSE: "
                     f"{eq['caching_over_ilf_at_equal_cost']:.2f}.")
    if "once_over_ilf_same_steps" in eq:
        lines.append(f"No-loop control / ILF at {key} steps: {eq['once_over_ilf_same_steps']:.2f}" +
                     (f"; at ILF's cost (interpolated): {eq['once_over_ilf_at_equal_cost']:.2f}."
                      if eq.get("once_over_ilf_at_equal_cost") else "."))
    lines += ["", "Checks: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in out["must_show"].items()),
              "", "![quality vs blocks](quality_vs_blocks.png) ![quality vs time](quality_vs_time.png)"]
    return lines


def summary(out: dict) -> str:
    met = sum(out["must_show"].values())
    return f"{met}/{len(out['must_show'])} checks met"
