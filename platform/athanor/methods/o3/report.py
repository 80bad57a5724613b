"""O3's outputs: the publishable folder (adapters, detectors, model card), report.json/md, plots,
and the issue's "must show" checks computed from the measured numbers."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ...compat import plain_loading
from ...hub import write_model_card
from ...parts.fact_world import QAData
from ...report import plt, write_report
from ...runner import StageContext
from .config import TUNE_COMMAND, O3Config
from .evaluation import adapter_overlap, adapters, base_dir, load_scores, score_files, world
from .model import O3Model
from .tofu_report import tofu_markdown, tofu_section

METRICS = ["forget_acc_train", "forget_acc_heldout_templates", "forget_acc_paraphrase", "earlier_requests_forget_acc",
           "retain_acc", "utility"]


def checks(base: dict, requests: list[dict], ablations: dict, baselines: dict | None = None) -> dict:
    """The issue's acceptance points as {name: {"met": bool, ...numbers}}."""
    out = _checks(base, requests, ablations)
    out.update(attribute_checks(base, requests))
    if baselines:
        out["detector_baselines_below_0_9_o3_above"] = baseline_check(baselines)
    return out


ATTRIBUTE_FORGET_MAX, ATTRIBUTE_RETAIN_MIN, BASELINE_AUROC_MAX = 0.10, 0.90, 0.90


def attribute_checks(base: dict, requests: list[dict]) -> dict:
    """Attribute-level requests (requests 1..t's partly forgotten people, every wording): forgotten
    facts <= 10% of the base's accuracy on them, the same people's retained facts >= 90% of base
    (all wordings, and the new wordings the calibration never saw). Absent without such requests."""
    rows = [(r, t) for t, r in enumerate(requests) if r.get("attribute_forget_acc") is not None]
    if not rows or "attribute_forget_acc" not in base:
        return {}
    ratio = lambda key: min(r[key] / base[key][t] if base[key][t] else 0.0 for r, t in rows)  # noqa: E731
    forget = max(r["attribute_forget_acc"] / base["attribute_forget_acc"][t] if base["attribute_forget_acc"][t]
                 else 1.0 for r, t in rows)
    kept, kept_new = ratio("attribute_retain_acc"), ratio("attribute_retain_acc_new_wordings")
    return {"attribute_forget_le_10pct_of_base": {
                "met": forget <= ATTRIBUTE_FORGET_MAX, "threshold": ATTRIBUTE_FORGET_MAX,
                "max_ratio_to_base": forget,
                "max_attribute_forget_acc": max(r["attribute_forget_acc"] for r, _ in rows)},
            "attribute_retain_ge_90pct_of_base": {
                "met": min(kept, kept_new) >= ATTRIBUTE_RETAIN_MIN, "threshold": ATTRIBUTE_RETAIN_MIN,
                "min_ratio_to_base": kept, "min_ratio_to_base_new_wordings": kept_new,
                "min_attribute_retain_acc": min(r["attribute_retain_acc"] for r, _ in rows)}}


def baseline_check(rows: dict) -> dict:
    """name_lookup and bag_of_words below 0.9 on held-out templates and attribute-level requests, O3 above both."""
    keys = [k for k in ("auroc_heldout_templates", "auroc_attribute_level") if rows["o3"].get(k) is not None]
    worst = {k: max(rows[b][k] for b in rows if b != "o3") for k in keys}
    met = bool(keys) and all(worst[k] < BASELINE_AUROC_MAX and rows["o3"][k] > worst[k] for k in keys)
    return {"met": met, "threshold": BASELINE_AUROC_MAX, **{f"best_baseline_{k}": v for k, v in worst.items()},
            **{f"o3_{k}": rows["o3"][k] for k in keys}}


def _checks(base: dict, requests: list[dict], ablations: dict) -> dict:
    last = requests[-1]
    known = lambda values: [v for v in values if v is not None]  # noqa: E731  (no held-out phrasings: None)
    base_forget = min(known(base["forget_acc_train"] + base["forget_acc_heldout_templates"]))
    forget_after = max(known([r[k] for r in requests for k in ("forget_acc_train", "forget_acc_heldout_templates")]))
    earlier = [r["earlier_requests_forget_acc"] for r in requests if r["earlier_requests_forget_acc"] is not None]
    retain_ratio = last["retain_acc"] / base["retain_acc"] if base["retain_acc"] else 0.0
    out = {
        "forget_acc_le_10pct": {"met": forget_after <= 0.10 and base_forget >= 0.90,
                                "max_forget_acc_any_request": forget_after,
                                "min_base_acc_on_forget_facts": base_forget},
        "retain_ge_95pct_of_base": {"met": retain_ratio >= 0.95, "retain_acc": last["retain_acc"],
                                    "base_retain_acc": base["retain_acc"], "ratio": retain_ratio},
        # on questions no detector stored (the pooled ``auroc`` counts stored ones, scored 1 by max-cosine)
        "auroc_heldout_templates_ge_0_95": {
            "met": bool(known([r["auroc_heldout_templates"] for r in requests]))
            and min(known([r["auroc_heldout_templates"] for r in requests])) >= 0.95,
            "min_auroc_heldout_templates": min(known([r["auroc_heldout_templates"] for r in requests]), default=None)},
        "earlier_requests_stay_forgotten": {"met": bool(earlier) and max(earlier) <= 0.10,
                                            "max_earlier_requests_forget_acc": max(earlier) if earlier else None},
    }
    para = [r["paraphrase"] for r in requests if r["paraphrase"]["base_accuracy"] is not None]
    if para:  # wordings that are no trained template (world.PARAPHRASES)
        out["paraphrase_base_ge_0_5"] = {"met": min(p["base_accuracy"] for p in para) >= 0.5,
                                         "min_base_accuracy": min(p["base_accuracy"] for p in para)}
        out["paraphrase_forget_le_10pct_of_base"] = {
            "met": all(p["forget_accuracy"] <= 0.10 * p["base_accuracy"] for p in para),
            "max_forget_accuracy": max(p["forget_accuracy"] for p in para),
            "max_ratio_to_base": max(p["forget_accuracy"] / p["base_accuracy"] if p["base_accuracy"] else 1.0
                                     for p in para)}
    if "always_on" in ablations:
        out["always_on_lower_retain"] = {"met": ablations["always_on"]["retain_acc"] < last["retain_acc"],
                                         "always_on_retain_acc": ablations["always_on"]["retain_acc"],
                                         "o3_retain_acc": last["retain_acc"]}
    return out


def save_o3_folder(out: Path, cfg: O3Config, base_dir: str, trained_base: bool, adapters: list[str], detectors: list[str],
                   summary_metrics: dict) -> Path:
    """``out/o3``: the loadable O3 model (base, adapters, detectors) with its model card."""
    folder = O3Model.assemble(out / "o3", base_dir, [Path(a) for a in adapters], [Path(d) for d in detectors],
                              cfg.unlearn.gate, cfg.data.prompt_template, cfg.data.max_length, cfg.model.dtype,
                              copy_base=trained_base)
    write_model_card(folder, title=f"O3 continual unlearning: {len(adapters)} requests",
                     summary=("One orthogonal LoRA adapter per unlearning request (`adapters/request_t`, peft) and "
                              "one OOD detector per request (`detectors/request_t`: safetensors + JSON) that gates "
                              "the adapters per input: h' = W h + w(x) B A h. Load with "
                              "`athanor.methods.o3.O3Model.from_pretrained(folder)`; `generate` applies the gate."),
                     metrics=summary_metrics, library="peft",
                     base_model=None if trained_base else base_dir, tags=["unlearning", "o3", "lora"])
    return folder


def samples(o3: O3Model, data: QAData, sets, per_set: int = 2) -> list[dict]:
    """A few gated generations from the reloaded folder, with their gate weights."""
    picks = []
    for name, idx in (("forget (trained phrasing)", sets.forget_train[0]), ("forget (held-out phrasing)",
                      sets.forget_heldout[0]), ("retain", sets.retain), ("utility", sets.utility)):
        picks += [(name, data.records[i]) for i in idx[:per_set]]
    questions = [r.question for _, r in picks]
    weights = o3.weights_for(questions)
    answers = o3.generate(questions, max_new_tokens=4, weights=weights)
    return [{"set": name, "question": r.question, "truth": r.answer, "o3_answer": a, "w": round(w.max().item(), 4)}
            for (name, r), a, w in zip(picks, answers, weights)]


def plot(out: Path, base: dict, requests: list[dict], ablations: dict) -> Path:
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    xs = [0] + [r["request"] for r in requests]
    nan = float("nan")
    series = {  # forget: the facts of the request just made (base: before any request)
        "forget (trained phrasings)": [base["forget_acc_train"][0]] + [r["forget_acc_train"] for r in requests],
        "forget (held-out phrasings)": [base["forget_acc_heldout_templates"][0]]
        + [r["forget_acc_heldout_templates"] for r in requests],
        "earlier requests' facts": [None] + [r["earlier_requests_forget_acc"] for r in requests],
        "retain": [base["retain_acc"]] + [r["retain_acc"] for r in requests],
        "utility": [base["utility"]] + [r["utility"] for r in requests],
    }
    for label, ys in series.items():
        ax.plot(xs, [nan if y is None else y for y in ys], marker="o", label=label)
    markers = {"always_on": "x", "lambda0": "s", "gradient_ascent": "^", "per_request_gate": "d"}
    for i, (name, res) in enumerate(ablations.items()):  # spread out so equal values stay visible
        ax.scatter([xs[-1] + 0.12 + 0.06 * i], [res["retain_acc"]], marker=markers.get(name, "*"), s=50,
                   label=f"ablation {name}: retain", zorder=3)
    ax.set_xticks(xs, ["base"] + [f"after {x}" for x in xs[1:]])
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("O3: accuracy after each unlearning request (forget = current request)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = out / "o3_requests.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gate(out: Path, logits: torch.Tensor, sets) -> Path:
    """Histogram of the gate (max over detectors of w's logit) for forget vs retain vs utility."""
    gate = logits.amax(1)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    forget = [i for s in sets.forget_all for i in s]
    for label, idx in (("forget", forget), ("retain", sets.retain), ("utility", sets.utility)):
        ax.hist(gate[idx].clamp(-40, 40).numpy(), bins=60, alpha=0.55, label=label)
    ax.axvline(0.0, color="k", lw=1, ls="--", label="w = 0.5")
    ax.set_xlabel("gate logit (clipped to ±40); w = sigmoid(logit)")
    ax.set_title("OOD detector after the last request")
    ax.legend()
    fig.tight_layout()
    path = out / "gate_scores.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def hard_negatives(data: QAData, sets) -> dict:
    """How hard the world is for a name lookup: people who keep some facts although a request names
    them, and retained people sharing a name word with a forgotten person."""
    forgotten = {data.records[i].group for s in sets.forget_all for i in s}
    partly = {data.records[i].group for s in sets.partial_retain for i in s}
    words = {w for g in forgotten for w in g.split()}
    untouched = [g for g in data.groups if g not in forgotten]
    return {"partly_forgotten_people": len(partly), "retained_people": len(untouched),
            "retained_people_sharing_a_name_word": sum(bool(set(g.split()) & words) for g in untouched)}


def _baseline_lines(report: dict) -> list[str]:
    rows = report.get("detector_baselines") or {}
    if not rows:
        return []
    keys = ["auroc_heldout_templates", "auroc_paraphrase", "auroc_attribute_level", "forget_acc_heldout_templates",
            "forget_acc_paraphrase", "attribute_forget_acc", "attribute_retain_acc",
            "attribute_retain_acc_new_wordings",
            "retain_acc", "utility"]
    h = report.get("hard_negatives", {})
    lines = ["", "## Detector baselines (same calibration, max gate, O3's adapters, after the last request)", "",
            f"World: {h.get('partly_forgotten_people')} people forget only some attributes; "
            f"{h.get('retained_people_sharing_a_name_word')} of {h.get('retained_people')} retained people share a "
            "first or last name with a forgotten one. name_lookup: share of a stored name's words in the question; "
            "bag_of_words: max cosine of binary word counts to the stored questions. auroc_attribute_level: the "
            "partly forgotten people's forgotten facts vs their retained facts, new wordings only.", "",
            "| detector | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    return lines + [f"| {name} | " + " | ".join(_fmt(row.get(k)) for k in keys) + " |" for name, row in rows.items()]


def markdown(report: dict) -> list[str]:
    return [*_overview_lines(report), *_request_lines(report), *_baseline_lines(report), *_ablation_lines(report),
            *_encoder_lines(report),
            *_interference_lines(report), *_gate_lines(report)]


def _overview_lines(report: dict) -> list[str]:
    """The world, the tuning and the must-show checks."""
    lines = [f"World: {report['world']}. {report['world_size']} process(es); this invocation took "
             f"{report['seconds']:.0f} s (stages finished by an earlier invocation are skipped).", ""]
    tuning = report.get("tuning")
    if tuning:
        values = ", ".join(f"{k} {v:g}" for k, v in tuning["values"].items())
        lines += [f"Detector knobs ({values}) tuned on the dev world, data seed {tuning['dev_seed']} "
                  f"(`{tuning['command']}`); this report's world: data seed {tuning['data_seed']}"
                  + (" — **the dev world itself: not a held-out evaluation**." if tuning["evaluated_on_dev_world"]
                     else "."), ""]
    lines += ["## Must show", "", "| check | met | numbers |", "|---|---|---|"]
    for name, c in report["checks"].items():
        nums = ", ".join(f"{k}={_fmt(v)}" for k, v in c.items() if k != "met")
        lines.append(f"| {name} | {'yes' if c['met'] else '**NO**'} | {nums} |")
    failed = [n for n, c in report["checks"].items() if not c["met"]]
    lines += ["", f"Not met: {', '.join(failed)} (numbers above)." if failed else "All checks met.", ""]
    return lines


def _request_lines(report: dict) -> list[str]:
    """The metrics after each request."""
    base, requests = report["base"], report["requests"]
    lines: list[str] = []
    per_request = METRICS + ["auroc", "auroc_heldout_templates", "auroc_paraphrase", "mean_w_forget", "mean_w_retain"]
    lines += ["## After each request (O3, gate = " + report["gate"] + ")", "",
              "forget_* and earlier_*: accuracy on forgotten facts (trained wordings, held-out templates, "
              "paraphrases that are no trained template); auroc: pooled over stored and new questions "
              "(unchecked); auroc_heldout_templates / auroc_paraphrase: only questions no detector stored, "
              "against every retained and utility question (checked).", "",
              "| after | " + " | ".join(per_request) + " |",
              "|---" * (len(per_request) + 1) + "|"]
    mean = lambda v: sum(v) / len(v) if v and None not in v else None  # noqa: E731
    base_row = [_fmt(mean(base["forget_acc_train"])), _fmt(mean(base["forget_acc_heldout_templates"])),
                _fmt(mean(base.get("forget_acc_paraphrase", []))), "–", _fmt(base["retain_acc"]),
                _fmt(base["utility"])] + ["–"] * 5
    lines.append("| base (mean over requests' facts) | " + " | ".join(base_row) + " |")
    for r in requests:
        lines.append(f"| request {r['request']} | " + " | ".join(_fmt(r.get(k)) for k in per_request) + " |")
    return lines


def _ablation_lines(report: dict) -> list[str]:
    """The ablations after the last request."""
    requests, ablations = report["requests"], report["ablations"]
    lines: list[str] = []
    columns = METRICS + ["auroc", "auroc_heldout_templates", "auroc_paraphrase", "mean_w_forget", "mean_w_retain",
                         "mean_w_utility", "composed_target_rate"]
    lines += ["", "## Ablations after the last request", "",
              "always_on: w = 1; per_request_gate: adapter t scaled by w_t only; gate_*: detectors refitted on the "
              "same features without the Mahalanobis part (cosine_only), without the cosine part (mahalanobis_only), "
              "calibrated on random question folds instead of folds by wording (random_folds), or calibrated as "
              "the paper does (every layer, forget data only, folds by fact: paper_calibration); lambda0: adapters "
              "retrained with λ = 0; gradient_ascent: full-model GA on each forget set, no gate; "
              "detector_train_steps_0: detectors on the pretrained encoder (no InfoNCE/masked-token training). "
              "composed_target_rate: share of every request's trained questions the composed adapters answer with "
              "that request's own unlearning target (each adapter was trained alone: lower = interference).", "",
              "| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines.append("| O3 | " + " | ".join(_fmt(requests[-1].get(k)) for k in columns) + " |")
    for name, res in ablations.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(res.get(k)) for k in columns) + " |")
    return lines


def _encoder_lines(report: dict) -> list[str]:
    """Whether the detector encoder's training matters."""
    requests, ablations = report["requests"], report["ablations"]
    lines: list[str] = []
    untrained = ablations.get("detector_train_steps_0")
    if untrained:
        keys = ("auroc_heldout_templates", "auroc_paraphrase", "caught_new_forget", "passed_untouched",
                "forget_acc_heldout_templates", "forget_acc_paraphrase", "retain_acc")
        same = all(_fmt(requests[-1].get(k)) == _fmt(untrained.get(k)) for k in keys)
        lines += ["", "## Does the detector encoder's training matter?", "",
                  "InfoNCE (masked view vs its own clean view) + masked-token LoRA training "
                  f"(detector.train_steps {report.get('detector_train_steps')}) against the pretrained encoder "
                  "(detector_train_steps_0), after the last request:", "",
                  "| detector | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|",
                  "| trained encoder | " + " | ".join(_fmt(requests[-1].get(k)) for k in keys) + " |",
                  "| pretrained encoder | " + " | ".join(_fmt(untrained.get(k)) for k in keys) + " |", "",
                  "No difference at three decimals on this world: the training does not matter here."
                  if same else "The rows differ (numbers above)."]
    return lines


def _interference_lines(report: dict) -> list[str]:
    """Interference between requests, with and without λ."""
    requests, ablations = report["requests"], report["ablations"]
    lines: list[str] = []
    lam0 = ablations.get("lambda0")
    if lam0:
        always = ablations.get("always_on", {})
        rows = [("gated (max)", requests[-1].get("composed_target_rate"), lam0.get("composed_target_rate")),
                ("ungated (w = 1)", always.get("composed_target_rate"), lam0.get("ungated_composed_target_rate")),
                ("earlier requests' forget acc (gated)", requests[-1].get("earlier_requests_forget_acc"),
                 lam0.get("earlier_requests_forget_acc")),
                ("adapter overlap", report.get("adapter_overlap"), report.get("adapter_overlap_lambda0"))]
        lines += ["", "## Interference between requests and λ", "",
                  "composed_target_rate: share of every request's trained questions answered with that request's "
                  "own unlearning target once all adapters are composed (each adapter was trained alone on the base "
                  "LM; a drop is interference). recipes/configs/o3/interference.yaml is the setting built to show it.",
                  "", f"| after the last request | λ = {report['orth_lambda']} | λ = 0 |", "|---|---|---|"]
        lines += [f"| {name} | {_fmt(a)} | {_fmt(b)} |" for name, a, b in rows]
    return lines


def _gate_lines(report: dict) -> list[str]:
    """What carries the gate; samples from the published folder."""
    lines: list[str] = []
    d = report["detector_parts"]
    lines += ["", "## What carries the gate", "",
              "AUROC forget vs retain after the last request: gate (SVM over layers of −γ·cos-distance "
              f"− ½·Mahalanobis) {_fmt(d['auroc'])}; averaged over layers, the max-cosine part alone "
              f"{_fmt(d['auroc_max_cosine_only'])}, "
              f"the Mahalanobis part alone {_fmt(d['auroc_mahalanobis_only'])}. Ranking is not the whole story: "
              "the gate_* rows above show what each part does to w(x) once calibrated.",
              f"Adapter subspace overlap (mean ‖A_s A_tᵀ‖/(‖A_s‖‖A_t‖)): λ={report['orth_lambda']} "
              f"{_fmt(report['adapter_overlap'])}, λ=0 {_fmt(report.get('adapter_overlap_lambda0'))}.", "",
              "## Samples (reloaded from the published folder, gated generation)", "",
              "| set | question | truth | O3 answer | w(x) |", "|---|---|---|---|---|"]
    lines += [f"| {s['set']} | {s['question']} | {s['truth']} | {s['o3_answer']} | {s['w']} |"
              for s in report["samples"]]
    lines += ["", "Plots: o3_requests.png (accuracies per request), gate_scores.png (detector scores)."]
    return lines


ABLATIONS = {"ablation_always_on": "always_on", "ablation_per_request_gate": "per_request_gate",
             **{f"ablation_gate_{name}": f"gate_{name}" for name in ("cosine_only", "mahalanobis_only", "random_folds",
                                                                      "paper_calibration")},
             "ablation_lambda0_eval": "lambda0", "ablation_ga_eval": "gradient_ascent",
             "ablation_detector0_eval": "detector_train_steps_0"}


def report(ctx: StageContext, results: dict) -> dict:
    """report.json/md, plots, the O3 folder (OUTPUT/o3) and samples generated from it, reloaded."""
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
    baselines = {k: v for k, v in results.get("detector_baselines", {}).items() if k != "seconds"}
    adapter_dirs = adapters(ctx, "request_", T)
    out = {"world": f"{len(data.groups)} groups, {len(data.records)} records, {T} requests of "
                    f"{cfg.data.groups_per_request}", "gate": cfg.unlearn.gate, "orth_lambda": cfg.unlearn.orth_lambda,
           "base": {**{k: v for k, v in base_eval.items() if k != "seconds"}, "steps": base["steps"]},
           "requests": [{k: v for k, v in r.items() if k != "seconds"} for r in requests], "ablations": ablations,
           "checks": checks(base_eval, requests, ablations, baselines), "detector_baselines": baselines,
           "hard_negatives": hard_negatives(data, sets), "adapter_overlap": adapter_overlap(adapter_dirs),
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
    if cfg.tofu.enabled:  # TOFU's metrics, the retain-only reference, the baselines, the seeds
        tofu = tofu_section(cfg, results)
        out.update(tofu=tofu["tofu"], seeds=tofu["seeds"])
        out["checks"].update(tofu["checks"])
    out["seconds"] = time.time() - ctx.started  # this invocation (finished stages were skipped)
    lines = markdown(out) + (tofu_markdown(out) if cfg.tofu.enabled else [])
    write_report(ctx.root, out, "O3 continual unlearning", lines)
    return out


def summary(out: dict) -> str:
    unmet = [name for name, check in out["checks"].items() if not check["met"]]
    return f"{len(out['checks']) - len(unmet)}/{len(out['checks'])} checks met" + \
        (f" (not met: {', '.join(unmet)})" if unmet else "")
