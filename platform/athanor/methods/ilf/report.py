"""ILF report: ``speedup_at_equal_quality`` (the paper's headline) with the spread over feedback seeds,
every placement tried, the curves, report.md and PNG plots."""
from __future__ import annotations

from pathlib import Path

from ...report import plot_metrics, plt, write_report
from .config import variant_stage_name
from .speedup import speedup, speedup_table, spread

METRICS = {"fd": "fd", "mse_to_converged": "mse"}  # FD is absent on a latent DiT (no Inception network here)
COSTS = {"blocks": "blocks", "wall_time": "seconds_per_batch"}
COLORS = {"plain": "black", "dpm++2m": "tab:green", "dpm++3m": "tab:cyan", "caching": "tab:gray",
          "ilf": "tab:red", "once": "tab:blue"}


def seed_group(name: str) -> str:
    """A feedback run's name without its seed: ``ilf``/``seed=1`` -> ilf, ``once+seed=2`` -> once."""
    return "+".join(p for p in name.split("+") if not p.startswith("seed=")) or "ilf"


def key_points(curves: dict, key: int, group: str) -> dict[str, dict]:
    """The key-step point of every feedback run of ``group`` (one per seed)."""
    return {name: next(p for p in pts if p["steps"] == key) for name, pts in curves.items()
            if name in _feedback_names(curves) and seed_group(name) == group}


def _feedback_names(curves: dict) -> list[str]:
    return [n for n in curves if n not in ("plain", "caching", "plain_ilf_grid") and not n.startswith("dpm++")]


def metrics_of(curves: dict) -> dict:
    return {k: v for k, v in METRICS.items() if curves["plain"][0].get(v) is not None}


def headline(curves: dict, key: int, group: str) -> dict:
    """Speed-up of ``group``@key (every seed) over plain and over the strongest DPM-Solver++ order,
    per quality metric and per cost (the strongest: the one ILF beats by the least, per metric and cost)."""
    points = key_points(curves, key, group)
    metrics = metrics_of(curves)
    solvers = {n: c for n, c in curves.items() if n.startswith("dpm++")}
    out = {"seeds": list(points)}
    for cost_name, cost in COSTS.items():
        plain = speedup_table(list(points.values()), {"plain": curves["plain"]}, metrics, cost)
        solver = speedup_table(list(points.values()), solvers, metrics, cost) if solvers else {}
        block = {"vs_plain": {m: plain[m]["plain"] for m in metrics}}
        if solvers:
            block["vs_strongest_scheduler"] = {}
            for m in metrics:
                name = min(solver[m], key=lambda n: solver[m][n]["mean"])
                block["vs_strongest_scheduler"][m] = {"scheduler": name, **solver[m][name]}
            block["vs_each_scheduler"] = {m: {n: {k: v for k, v in r.items() if k != "per_seed"}
                                              for n, r in solver[m].items()} for m in metrics}
        out[cost_name] = block
    return out


def placements(curves: dict, training: dict, key: int) -> list[dict]:
    """Every feedback run tried: where it sits, how it was trained, its key-step point and speed-ups."""
    rows = []
    for name in _feedback_names(curves):
        p = next(q for q in curves[name] if q["steps"] == key)
        t = training.get("ilf" if name == "ilf" else variant_stage_name(name), {})
        rows.append({"name": name, "loop": t.get("loop"), "mode": t.get("mode"), "seed": t.get("seed"),
                     "init_block": t.get("init_block"), "blocks": p["blocks"], "mse": p["mse"], "fd": p["fd"],
                     "class_acc": p["class_acc"], "dev_loss_over_backbone": t["dev_loss"] / t["dev_backbone_loss"]
                     if t else None, "scale": t.get("scale"),
                     **{f"speedup_vs_plain_{m}": speedup(p, curves["plain"], metric, "blocks")["speedup"]
                        for m, metric in metrics_of(curves).items()}})
    return rows


def plot_curves(curves: dict, metric: str, cost: str, path: Path, ylabel: str, xlabel: str) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, points in curves.items():
        pts = sorted(points, key=lambda p: p[cost])
        group = seed_group(name)
        style = dict(marker="o", ms=4, color=COLORS.get(group, None if len(pts) > 1 else "tab:purple"))
        if len(pts) == 1:
            ax.scatter([pts[0][cost]], [pts[0][metric]], s=18, zorder=3, label=name, **{"color": style["color"]})
            continue
        ax.plot([p[cost] for p in pts], [p[metric] for p in pts], label=name, **style)
        for p in pts:
            ax.annotate(str(p["steps"]), (p[cost], p[metric]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if metric == "mse":
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(ctx, results: dict) -> dict:
    cfg, ev = ctx.cfg, results["evaluate"]
    curves, key, ref = ev["curves"], cfg.evaluation.key_steps, f"teacher@{cfg.evaluation.converged_steps}"
    training = {name: {k: r.get(k) for k in ("feedback", "loop", "mode", "seed", "init_block", "steps", "dev_loss",
                                             "dev_backbone_loss", "scale", "seconds")}
                for name, r in results.items() if name.startswith("ilf")}
    head = {"ilf": f"ILF@{key}", "quality": {"fd": "FD to held-out images",
                                           "mse_to_converged": f"paired MSE to {ref} (same noise)"},
            "cost": {"blocks": "block evaluations per sample (counted)",
                     "wall_time": f"median wall seconds per batch of {ev['batch_size']} (shared, loaded machine)"},
            "samples": ev["samples"], **headline(curves, key, "ilf")}
    control = headline(curves, key, "once") if "once" in curves else None
    ilf_mse = [p["mse"] for p in key_points(curves, key, "ilf").values()]
    checks = _checks(head, control, curves, key)
    out = {"speedup_at_equal_quality": head, "no_loop_control_speedup": control,
           "placements": placements(curves, training, key),
           "paired_mse": {"reference": ref, "samples": ev["samples"], f"ilf@{key}_seeds": spread(ilf_mse),
                          **{f"{n}@{p['steps']}": {k: p[k] for k in ("mse", "mse_se", "blocks")}
                             for n, pts in curves.items() for p in pts}},
           "equal_cost": {"x": "block evaluations per sample (counted)", "curves": curves,
                          "converged": ev["converged"]},
           "fd": {"real_train_vs_held_out": ev["real_fd_floor"], ref: ev["converged"]["fd"]},
           "must_show": checks, "training": training, "teacher": results["teacher"],
           "stage_seconds": {name: r.get("seconds") for name, r in results.items()}}
    labels = {"mse": f"paired MSE to {ref}", "fd": "FD to held-out images"}
    for metric, label in ((m, labels[m]) for m in metrics_of(curves).values()):
        plot_curves(curves, metric, "blocks", ctx.root / f"{metric}_vs_blocks.png", label,
                    "block evaluations per sample (counted)")
        plot_curves(curves, metric, "seconds_per_batch", ctx.root / f"{metric}_vs_time.png", label,
                    f"wall s per batch of {ev['batch_size']} (shared machine)")
    for name in training:
        plot_metrics(ctx.stage_dir(name), ["loss"], "loss.png", title=f"{name}: jump loss")
    write_report(ctx.root, out, "ILF: inner-loop feedback on a frozen DiT", report_lines(out, key))
    return out


def _checks(head: dict, control: dict | None, curves: dict, key: int) -> dict:
    blocks = head["blocks"]
    checks = {f"ILF@{key} faster than plain at equal {m} (every seed, blocks)":
              all(s["speedup"] > 1 for s in blocks["vs_plain"][m]["per_seed"]) for m in blocks["vs_plain"]}
    if "vs_strongest_scheduler" in blocks:
        checks.update({f"ILF@{key} faster than the strongest scheduler at equal {m} (every seed, blocks)":
                       all(s["speedup"] > 1 for s in blocks["vs_strongest_scheduler"][m]["per_seed"])
                       for m in blocks["vs_strongest_scheduler"]})
    if control is not None:
        ilf_worst = max(p["mse"] for p in key_points(curves, key, "ilf").values())
        once_best = min(p["mse"] for p in key_points(curves, key, "once").values())
        checks[f"ILF@{key} beats the no-loop control (paired MSE, worst ILF seed vs best control seed)"] = \
            ilf_worst < once_best
    return checks


def _fmt(r: dict | None) -> str:
    if r is None:
        return "not measured"
    bounds = {s["bound"] for s in r["per_seed"]} - {None}
    return f"{r['mean']:.2f} ± {r['sd']:.2f} [{r['min']:.2f}, {r['max']:.2f}]" + (f" ({', '.join(bounds)})" if bounds else "")


def _num(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def report_lines(out: dict, key: int) -> list[str]:
    head = out["speedup_at_equal_quality"]
    lines = [f"Speed-up at equal quality of ILF@{key} (mean ± sd [min, max] over feedback seeds {head['seeds']}; "
             f"{head['samples']} samples from the same noise for every sampler).", "",
             "| cost | baseline | by FD | by paired MSE to the converged teacher |", "|---|---|---|---|"]
    for cost in COSTS:
        for against, rows in head[cost].items():
            if against == "vs_each_scheduler":
                continue
            name = " / ".join(r.get("scheduler", "plain") for r in rows.values())
            lines.append(f"| {cost} | {against} ({name}) | {_fmt(rows.get('fd'))} | {_fmt(rows['mse_to_converged'])} |")
    if out["no_loop_control_speedup"]:
        c = out["no_loop_control_speedup"]["blocks"]["vs_plain"]
        lines.append(f"| blocks | no-loop control vs plain | {_fmt(c.get('fd'))} | {_fmt(c['mse_to_converged'])} |")
    lines += ["", "Placements tried (key step; speed-up vs plain in blocks):", "",
              "| run | loop | mode | seed | init | blocks | MSE | FD | dev loss / backbone | speed-up FD | speed-up MSE |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["placements"]:
        lines.append(f"| {r['name']} | {r['loop']} | {r['mode']} | {r['seed']} | {r['init_block']} | {r['blocks']} | "
                     f"{r['mse']:.2e} | {_num(r['fd'], '.3f')} | {_num(r['dev_loss_over_backbone'], '.3f')} | "
                     f"{_num(r.get('speedup_vs_plain_fd'), '.2f')} | {r['speedup_vs_plain_mse_to_converged']:.2f} |")
    lines += ["", f"Real training vs held-out images: FD {_num(out['fd']['real_train_vs_held_out'], '.3f')}.", "",
              "Checks: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in out["must_show"].items()), "",
              "![MSE vs blocks](mse_vs_blocks.png) ![FD vs blocks](fd_vs_blocks.png) ![MSE vs time](mse_vs_time.png)"]
    return lines


def summary(out: dict) -> str:
    b = out["speedup_at_equal_quality"]["blocks"]["vs_plain"]
    return (f"ILF speed-up vs plain (blocks): FD {b['fd']['mean'] if 'fd' in b else float('nan'):.2f}x, "
            f"MSE {b['mse_to_converged']['mean']:.2f}x; "
            f"{sum(out['must_show'].values())}/{len(out['must_show'])} checks met")
