"""The analysis stage and the report: tables in report.json/report.md, a code-state heat map,
steering bars, and the Hub-ready model folder."""
from __future__ import annotations

import math
import shutil
import time

import torch

from athanor.hub import write_model_card
from athanor.report import plot_metrics, plt, write_report
from athanor.runner import StageContext

from . import analysis as A
from .layers import CodebookModel
from .method import load_data


def _median(t: torch.Tensor) -> float:
    return float(t.median()) if t.numel() else float("nan")


def _state_features(model: CodebookModel, baseline: CodebookModel, fsm, ids, walks, batch: int) -> tuple[dict, dict]:
    """Best single code / code tuple / baseline neuron per state (see ``analysis``), purity and
    what the heat map and steering need."""
    ends = fsm.state_end_positions()
    labels = walks.reshape(-1)  # (n * S,) the state at each state-end position
    n = len(ids)
    select = (torch.arange(n) < n // 2)[:, None].expand(n, len(ends)).reshape(-1)  # first half selects
    codes = A.record_codes(model, ids, batch)
    S = fsm.cfg.states
    singles, tuples, per_layer, purity = [], [], {}, {}
    head_keys, head_best = [], []
    layer_columns: dict[str, list[torch.Tensor]] = {}
    for site, c in codes.items():
        top1 = c[:, ends, :, 0].reshape(-1, c.shape[2])  # (n*S, G)
        for g in range(top1.shape[1]):
            r = A.best_discrete(top1[:, g], labels, select, S)
            singles.append(r)
            head_keys.append(f"{site}/{g}")
            head_best.append(r)
        layer_columns.setdefault(A.site_layer(site), []).append(top1)
        purity[site] = {"code": sum(A.purity(top1[:, g], labels, S) for g in range(top1.shape[1])) / top1.shape[1]}
        per_layer[site] = {"single_code_precision_median": _median(
            torch.stack([h["precision"] for h in head_best[-top1.shape[1]:]]).max(0).values)}
    # A layer's code tuple: the codes of ALL its codebooks (every head, and the attention/MLP
    # codebooks when present) at once, as one discrete feature.
    for layer, columns in layer_columns.items():
        tup = A.tuple_ids(torch.cat(columns, dim=1))
        r = A.best_discrete(tup, labels, select, S)
        tuples.append(r)
        per_layer[f"layer{layer}"] = {"tuple_precision_median": _median(r["precision"]),
                                      "tuple_recall_median": _median(r["recall"]),
                                      "tuple_purity": A.purity(tup, labels, S),
                                      "distinct_tuples": int(tup.unique().numel())}

    def best_of(results):  # per state, the feature (over heads or layers) with the best F1 on the
        sp = torch.stack([r["select_precision"] for r in results])  # select half; its precision and
        sr = torch.stack([r["select_recall"] for r in results])  # recall as measured on the other half
        pick = (2 * sp * sr / (sp + sr).clamp(min=1e-9)).argmax(0)
        cols = torch.arange(sp.shape[1])
        return (torch.stack([r["precision"] for r in results])[pick, cols],
                torch.stack([r["recall"] for r in results])[pick, cols], pick)

    single_p, single_r, single_pick = best_of(singles)
    tuple_p, tuple_r, _ = best_of(tuples)
    acts = A.record_neurons(baseline, ids, ends, batch)
    neuron_single = A.best_neuron(acts, labels, select, single_r, S)
    neuron_tuple = A.best_neuron(acts, labels, select, tuple_r, S)
    features = {
        "code_tuple_precision_median": _median(tuple_p), "code_tuple_recall_median": _median(tuple_r),
        "single_code_precision_median": _median(single_p), "single_code_recall_median": _median(single_r),
        "neuron_precision_median": _median(neuron_single["precision"]),  # at the single codes' recall
        "neuron_precision_at_tuple_recall_median": _median(neuron_tuple["precision"]),
        "single_code_beats_neuron_fraction": float((single_p > neuron_single["precision"]).float().mean()),
        "per_layer": per_layer, "purity": purity,
    }
    extra = {"codes": codes, "labels": labels, "ends": ends,
             "head_keys": head_keys, "one_head": single_pick}
    return features, extra


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
    features, extra = _state_features(model, baseline, fsm, ids, walks, a.code_batch)
    out["state_features"] = features
    S = fsm.cfg.states
    targets = torch.arange(S) if not a.steering_targets else torch.randperm(
        S, generator=torch.Generator().manual_seed(cfg.run.seed))[: a.steering_targets]
    prompts = walks[-a.steering_prompts:]  # measure half
    out["steering"] = A.steer(model, fsm, prompts, a.prompt_states, targets, extra["one_head"], seed=cfg.run.seed)
    _heatmap(ctx, extra, model, S)
    out["cpu_seconds"] = time.process_time() - cpu_started
    return out


def _dead(model: CodebookModel, ids, batch: int) -> dict:
    codes = A.record_codes(model, ids, batch)
    per_site = {site: A.dead_fraction(c, model.codebooks[site].num_codes) for site, c in codes.items()}
    return {"mean": sum(per_site.values()) / max(1, len(per_site)), **per_site}


def _heatmap(ctx: StageContext, extra: dict, model: CodebookModel, S: int) -> None:
    """P(state | code) for the head whose single codes detect states best, codes ordered by
    their most likely state."""
    codes, labels, ends = extra["codes"], extra["labels"], extra["ends"]
    best = torch.bincount(extra["one_head"], minlength=len(extra["head_keys"])).argmax()
    site, g = extra["head_keys"][best].split("/")
    top1 = codes[site][:, ends, int(g), 0].reshape(-1)
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
    names = [n for n, v in steering.items() if isinstance(v, float)]
    colors = {"random": "tab:gray", "none": "lightgray", "all_heads": "tab:green", "one_head": "tab:olive"}
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(names), 3.8))
    ax.bar(names, [steering[n] for n in names], color=[colors.get(n, "tab:cyan") for n in names])
    ax.set_ylabel("next state valid for the target")
    ax.set_ylim(0, 1)
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_title("Steering by forcing a target state's codes")
    fig.tight_layout()
    fig.savefig(ctx.root / "steering.png", dpi=110)
    plt.close(fig)


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
        ta, sf, st = res["transition_acc"], res["state_features"], res["steering"]
        checks = {"codebook_within_3_points": ta["baseline"] - ta["codebook"] <= 0.03,
                  "code_tuple_precision_at_least_0.9": sf["code_tuple_precision_median"] >= 0.9,
                  "all_heads_steering_at_least_0.5": st["all_heads"] >= 0.5,
                  "all_heads_steering_0.25_above_random": st["all_heads"] - st["random"] >= 0.25,
                  "single_code_precision_at_least_0.9_and_beats_neuron":
                      sf["single_code_precision_median"] >= 0.9 and sf["single_code_precision_median"] > sf["neuron_precision_median"]}
        lines += _fsm_lines(res)
        _steering_plot(ctx, st)
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
           "cpu_seconds_total": cpu_total, **_headline(res)}
    write_report(ctx.root, out, "Codebook Features", lines)
    publish_folder(ctx, out)
    return out


def _headline(res: dict) -> dict:
    if "transition_acc" not in res:
        return {"lm_loss_cost": res["lm_loss_cost"]}
    return {"transition_acc_baseline": res["transition_acc"]["baseline"], "transition_acc_codebook": res["transition_acc"]["codebook"],
            "code_tuple_precision": res["state_features"]["code_tuple_precision_median"],
            "single_code_precision": res["state_features"]["single_code_precision_median"],
            "neuron_precision": res["state_features"]["neuron_precision_median"],
            "steering_all_heads": res["steering"]["all_heads"], "steering_random": res["steering"]["random"]}


def _fsm_lines(res: dict) -> list[str]:
    ta, sf, st = res["transition_acc"], res["state_features"], res["steering"]
    rows = ["| | value |", "|---|---|",
            f"| transition accuracy, baseline | {ta['baseline']:.4f} |", f"| transition accuracy, codebook | {ta['codebook']:.4f} |",
            f"| best code tuple per state: precision / recall (median) | {sf['code_tuple_precision_median']:.3f} / {sf['code_tuple_recall_median']:.3f} |",
            f"| best single code per state: precision / recall (median) | {sf['single_code_precision_median']:.3f} / {sf['single_code_recall_median']:.3f} |",
            f"| best baseline neuron at the single code's recall: precision (median) | {sf['neuron_precision_median']:.3f} |",
            f"| best baseline neuron at the tuple's recall: precision (median) | {sf['neuron_precision_at_tuple_recall_median']:.3f} |",
            f"| states where the single code beats the neuron | {sf['single_code_beats_neuron_fraction']:.2f} |"]
    for key, v in sf["per_layer"].items():
        if "tuple_precision_median" in v:
            rows.append(f"| {key} (all its codebooks): tuple precision / recall (median), purity, distinct tuples | "
                        f"{v['tuple_precision_median']:.3f} / {v['tuple_recall_median']:.3f}, {v['tuple_purity']:.3f}, "
                        f"{v['distinct_tuples']} |")
        else:
            rows.append(f"| {key}: best single-code precision (median), code purity | "
                        f"{v['single_code_precision_median']:.3f}, {sf['purity'][key]['code']:.3f} |")
    rows += ["", "Steering (next generated state valid for the target state): "
             + ", ".join(f"{k} {v:.3f}" for k, v in st.items()) + ". The source run's codes at the last "
             "prompt state's digits and at the successor's digits generated so far are replaced by those of the same "
             "prompt with the target state in its place (only codes move; `*_state_only` forces the state's own "
             "digits alone). Random: random codes at the same places.",
             "Features are chosen on the first half of the held-out walks and measured on the second half."]
    if any(isinstance(v, float) and math.isnan(v) for v in st.values()):
        rows.append("(nan: no head was chosen for any target)")
    return rows


def summary(report: dict) -> str:
    if "transition_acc" in report:
        return (f"transition acc {report['transition_acc']['codebook']:.3f} (baseline {report['transition_acc']['baseline']:.3f}), "
                f"code-tuple precision {report['state_features']['code_tuple_precision_median']:.3f}, "
                f"steering {report['steering']['all_heads']:.2f} vs random {report['steering']['random']:.2f}")
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
