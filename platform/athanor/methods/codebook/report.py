"""The analysis stage and the report: tables in report.json/report.md, a code-state heat map,
steering bars, and the Hub-ready model folder."""
from __future__ import annotations

import shutil
import time

import torch

from athanor.hub import write_model_card
from athanor.report import plot_metrics, plt, write_report
from athanor.runner import StageContext

from . import analysis as A
from . import features as F
from .steering import steer
from .layers import CodebookModel
from .method import load_data


def analysis_stage(ctx: StageContext) -> dict:
    cfg, a = ctx.cfg, ctx.cfg.analysis
    cpu_started = time.process_time()
    data = load_data(cfg)
    baseline = CodebookModel.from_pretrained(ctx.results["baseline"]["model"])
    model = CodebookModel.from_pretrained(ctx.results["codebook"]["model"])
    no_replace = (CodebookModel.from_pretrained(ctx.results["codebook_no_replace"]["model"])
                  if "codebook_no_replace" in ctx.results else None)
    ids = data["held_out"]["input_ids"]
    out = {"eval_loss": {"baseline": ctx.results["baseline"]["eval_loss"], "codebook": ctx.results["codebook"]["eval_loss"]}}
    out["lm_loss_cost"] = out["eval_loss"]["codebook"] - out["eval_loss"]["baseline"]
    dead = {"with_replacement": _dead(model, ids, a.code_batch)}
    if no_replace is not None:
        dead["without_replacement"] = _dead(no_replace, ids, a.code_batch)
    out["dead_code_fraction"] = dead
    fsm = data["fsm"]
    if fsm is None:  # text: the LM-loss cost and dead codes are the whole story
        return out
    walks = data["walks"]
    out["transition_acc"] = {name: A.transition_accuracy(m, fsm, walks, a.prompt_states, a.new_states)
                             for name, m in (("baseline", baseline), ("codebook", model))}
    features, extra = F.state_features(model, baseline, fsm, ids, walks, a.code_batch)
    out["state_features"] = features
    prompts = walks[-a.steering_prompts:]  # measure half
    out["steering"] = steer(model, fsm, prompts, a.prompt_states, seed=cfg.run.seed)
    _heatmap(ctx, extra, model, fsm.cfg.states)
    out["cpu_seconds"] = time.process_time() - cpu_started
    return out


def _dead(model: CodebookModel, ids, batch: int) -> dict:
    codes = A.record_codes(model, ids, batch)
    per_site = {site: A.dead_fraction(c, model.codebooks[site].num_codes) for site, c in codes.items()}
    return {"mean": sum(per_site.values()) / max(1, len(per_site)), **per_site}


def _heatmap(ctx: StageContext, extra: dict, model: CodebookModel, S: int) -> None:
    """P(state | code) for the head whose single codes detect states best, codes ordered by
    their most likely state."""
    codes, at = extra["codes"], extra["at_state"]
    labels = extra["labels"][at]
    best = torch.bincount(extra["which"], minlength=len(extra["keys"])).argmax()
    site, g = extra["keys"][best].split("/")
    top1 = codes[site][..., int(g), 0].reshape(-1)[at]
    table = torch.zeros(model.codebooks[site].num_codes, S)
    table.index_put_((top1, labels), torch.ones(len(labels)), accumulate=True)
    used = table.sum(1) > 0
    p = table[used] / table[used].sum(1, keepdim=True)
    order = p.argmax(1).argsort()
    fig, ax = plt.subplots(figsize=(7, 5))
    im = ax.imshow(p[order].T, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel(f"code of codebook {site}/{g} (used codes, ordered by their most likely state)")
    ax.set_ylabel("FSM state")
    ax.set_title("P(state | code) at the last digit of each state (held-out walks)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(ctx.root / "code_state_heatmap.png", dpi=110)
    plt.close(fig)


def _steering_plot(ctx: StageContext, steering: dict) -> None:
    """JS divergence to the target's next-token distribution and valid-successor rate per condition."""
    rows = [(f"{g} (target codes)", v) for g, v in steering["state_positions_only"].items()]
    rows += [(f"{g} (other state's codes)", v) for g, v in steering["other_state_codes"].items()]
    rows += [("no patch", steering["no_patch"]), ("target run (ceiling)", steering["target_run"])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, label in zip(axes, ("js_divergence", "valid_successor"),
                              ("JS divergence to the target's next-token distribution", "successor valid for the target")):
        colors = ["tab:green" if "target codes" in n else "tab:gray" if "other" in n else "lightgray" for n, _ in rows]
        ax.bar([n for n, _ in rows], [v[key] for _, v in rows], color=colors)
        ax.set_ylim(0, 1)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(axis="x", labelrotation=35, labelsize=7)
    fig.suptitle("Steering: a target state's codes patched at the state's own positions only")
    fig.tight_layout()
    fig.savefig(ctx.root / "steering.png", dpi=110)
    plt.close(fig)


def fsm_checks(res: dict) -> dict:
    """Pass/fail lines of one TokFSM run (each against its control)."""
    ta, sf, st = res["transition_acc"], res["state_features"], res["steering"]
    main = "both" if "both" in st["state_positions_only"] else next(iter(st["state_positions_only"]))
    code, neuron = sf["code"]["precision_at_recall_0.5"], sf["neuron"]["at_code_recall"]
    return {"codebook_within_3_points": ta["baseline"] - ta["codebook"] <= 0.03,
            "code_precision_at_recall_0.5_at_least_0.9": code["precision"] >= 0.9,
            "code_beats_neuron_at_matched_recall": code["precision"] > neuron["precision"] + 0.01,
            f"steering_{main}_js_below_other_state_codes": (st["state_positions_only"][main]["js_divergence"]
                                                          < st["other_state_codes"][main]["js_divergence"] - 0.05),
            f"steering_{main}_valid_above_no_patch": (st["state_positions_only"][main]["valid_successor"]
                                                    > st["no_patch"]["valid_successor"] + 0.1)}


def report(ctx: StageContext, results: dict) -> dict:
    res = dict(results["analysis"])
    res.pop("seconds", None)
    steps = {name: results[name]["steps"] for name in results if "steps" in results[name]}
    s_per_step = {name: results[name]["train_seconds"] / max(1, results[name]["steps"]) for name in steps}
    cpu = {name: r.get("train_cpu_seconds", r.get("cpu_seconds")) for name, r in results.items()}
    cpu_total = sum(v for v in cpu.values() if v)
    lines = [f"Stages: {', '.join(results)}. Training wall seconds per step (incl. evals; load from other processes "
             "inflates these): " + ", ".join(f"{k} {v:.3f}" for k, v in s_per_step.items()) + ". Process CPU seconds "
             "(one thread: about the wall time on an idle core): " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items() if v)
             + f"; total {cpu_total:.0f} s.", ""]
    checks = {}
    if "transition_acc" in res:
        checks = fsm_checks(res)
        lines += _fsm_lines(res)
        _steering_plot(ctx, res["steering"])
    else:
        lines += [f"LM loss on held-out text: baseline {res['eval_loss']['baseline']:.4f}, with codebooks "
                  f"{res['eval_loss']['codebook']:.4f} (cost {res['lm_loss_cost']:+.4f} nats/token)."]
    dead = res["dead_code_fraction"]
    lines += ["", "Dead codes on held-out data (never chosen): with replacement "
              f"{dead['with_replacement']['mean']:.3f}" + (f", without {dead['without_replacement']['mean']:.3f}"
                                                          if "without_replacement" in dead else "") + "."]
    for stage in ("baseline", "codebook"):
        plot_metrics(ctx.stage_dir(stage), ["loss", "eval_loss"], "loss.png", title=f"{stage} training loss")
    out = {**res, "checks": checks, "steps": steps, "seconds_per_step": s_per_step, "cpu_seconds": cpu,
           "cpu_seconds_total": cpu_total, "run_seed": ctx.cfg.run.seed, "fsm_seed": ctx.cfg.data.fsm.seed, **_headline(res)}
    write_report(ctx.root, out, "Codebook Features", lines)
    publish_folder(ctx, out)
    return out


def _headline(res: dict) -> dict:
    if "transition_acc" not in res:
        return {"lm_loss_cost": res["lm_loss_cost"]}
    sf, st = res["state_features"], res["steering"]
    main = "both" if "both" in st["state_positions_only"] else next(iter(st["state_positions_only"]))
    return {"transition_acc_baseline": res["transition_acc"]["baseline"], "transition_acc_codebook": res["transition_acc"]["codebook"],
            "code_precision_at_recall_0.5": sf["code"]["precision_at_recall_0.5"]["precision"],
            "neuron_precision_at_code_recall": sf["neuron"]["at_code_recall"]["precision"],
            "steering_js": st["state_positions_only"][main]["js_divergence"],
            "steering_js_other_state_codes": st["other_state_codes"][main]["js_divergence"],
            "steering_js_no_patch": st["no_patch"]["js_divergence"]}


def _pr(d: dict) -> str:
    return f"{d['precision']:.3f} / {d['recall']:.3f} (F1 {d['f1']:.3f})"


def _fsm_lines(res: dict) -> list[str]:
    ta, sf, st = res["transition_acc"], res["state_features"], res["steering"]
    rows = [f"Transition accuracy: baseline {ta['baseline']:.4f}, codebook {ta['codebook']:.4f}.", "",
            "| feature kind | precision / recall at recall >= 0.5 (median over states) | best-F1 pick: precision / recall |",
            "|---|---|---|"]
    for kind in ("code", "tuple", "neuron"):
        if kind in sf:
            rows.append(f"| {kind} | {_pr(sf[kind]['precision_at_recall_0.5'])} | {_pr(sf[kind]['best_f1'])} |")
    vs = sf["code_vs_neuron_at_matched_recall"]
    rows += [f"| neuron at the code's recall | {_pr(sf['neuron']['at_code_recall'])} | |", "",
             f"Codes vs the baseline's best neuron at matched recall: code better on {vs['code_better_fraction']:.2f} of "
             f"states, neuron better on {vs['neuron_better_fraction']:.2f} (median precision difference "
             f"{vs['precision_difference_median']:+.3f}). Counting: {sf['counting']}.", "",
             "| steering (state positions only) | JS divergence to the target | successor valid for the target |",
             "|---|---|---|"]
    for name, block in (("target codes", st["state_positions_only"]), ("other state's codes", st["other_state_codes"])):
        rows += [f"| {g}: {name} | {v['js_divergence']:.3f} | {v['valid_successor']:.3f} |" for g, v in block.items()]
    rows += [f"| no patch | {st['no_patch']['js_divergence']:.3f} | {st['no_patch']['valid_successor']:.3f} |",
             f"| the model on the target's own prompt (ceiling) | {st['target_run']['js_divergence']:.3f} | "
             f"{st['target_run']['valid_successor']:.3f} |"]
    return rows


def means(tree):
    """A several-seed report's spreads -> their means (other values as they are)."""
    if isinstance(tree, dict) and "mean" in tree and "values" in tree:
        return tree["mean"]
    return {k: means(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def summary(report: dict) -> str:
    report = means(report)  # a several-seed report: the means
    if "transition_acc" in report:
        return (f"transition acc {report['transition_acc']['codebook']:.3f} (baseline {report['transition_acc']['baseline']:.3f}), "
                f"code precision@recall>=0.5 {report['code_precision_at_recall_0.5']:.3f} vs neuron "
                f"{report['neuron_precision_at_code_recall']:.3f}, steering JS {report['steering_js']:.2f} vs other "
                f"state's codes {report['steering_js_other_state_codes']:.2f}")
    return f"LM-loss cost of the codebooks {report['lm_loss_cost']:+.4f}"


def publish_folder(ctx: StageContext, report: dict) -> None:
    """OUTPUT/model: the codebook model (LM + codebooks), loadable with CodebookModel.from_pretrained."""
    target = ctx.root / "model"
    shutil.copytree(ctx.results["codebook"]["model"], target, dirs_exist_ok=True)
    metrics = {k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    write_model_card(target, title="Codebook Features model (athanor)", metrics=metrics, tags=["codebook-features"],
                     summary="A causal LM with codebook bottlenecks (Tamkin et al. 2024). Load with "
                             "`from athanor.methods.codebook import CodebookModel; "
                             "CodebookModel.from_pretrained(folder)` to keep the codebooks; "
                             "`AutoModelForCausalLM.from_pretrained(folder)` gives the LM without them.")
