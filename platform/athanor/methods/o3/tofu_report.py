"""O3's TOFU section of report.json/md: forget quality, model utility, truth ratio and ROUGE-L of
O3, the retain-only model, the base LM and the baselines, per request and final; the spread of O3
over seeds; checks whose thresholds are stated and set from the retain-only model."""
from __future__ import annotations

import statistics

from ...parts.tofu_metrics import aggregate, forget_quality, model_utility
from .baselines import TUNE_COMMAND

HEADLINE = ("forget_quality", "model_utility", "truth_ratio", "rouge_l")


def pooled(scores: dict, t: int) -> dict:
    """Requests 1..t's forget item scores as one set."""
    return {k: [v for r in scores["forget"][:t] for v in r[k]] for k in ("probability", "truth_ratio", "rouge_l")}


def summarize(scores: dict, reference: dict, t: int) -> dict:
    """The metrics after request t: forget set = requests 1..t (every fact forgotten so far)."""
    forget, ref = pooled(scores, t), pooled(reference, t)
    agg = aggregate(forget, forget=True)
    return {"request": t, "forget_quality": forget_quality(forget["truth_ratio"], ref["truth_ratio"]),
            "model_utility": model_utility([scores["retain"], *scores["utility"]]),
            "truth_ratio": agg["truth_ratio"], "rouge_l": agg["rouge_l"], "forget_probability": agg["probability"],
            "n_forget": len(forget["truth_ratio"]), "retain": scores["retain"], "utility": scores["utility"]}


def model_scores(results: dict, T: int, methods: list[str]) -> dict:
    """{row: [scores after request 1..T]} from the stage results."""
    rows = {"o3": [results[f"tofu_o3_{t}"]["tofu"] for t in range(1, T + 1)],
            "retain_only": [results["tofu_retain_only_eval"]["tofu"]] * T,
            "base": [results["tofu_base"]["tofu"]] * T}
    for m in methods:
        rows[m] = [results[f"baseline_{m}_{t}"]["tofu"] for t in range(1, T + 1)]
    return rows


def spread(values: list) -> dict:
    vals = [v for v in values if v is not None]
    return {"values": values, "mean": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0 if vals else None,
            "min": min(vals, default=None), "max": max(vals, default=None)}


SEED_KEYS = ("forget_acc_train", "forget_acc_heldout_templates", "forget_acc_paraphrase", "retain_acc", "utility",
             "earlier_requests_forget_acc", "auroc_heldout_templates", "auroc_paraphrase")


def seeds_section(cfg, results: dict, reference: dict, T: int) -> dict:
    """O3's headline figures after the last request for every seed (run.seed: the main stages)."""
    runs = [{"seed": cfg.run.seed, **results[f"eval_{T}"], "tofu": results[f"tofu_o3_{T}"]["tofu"]}]
    runs += [results[f"o3_seed{k}_eval"] for k in range(1, cfg.tofu.seeds)]
    what = "adapters and detectors" if cfg.tofu.seed_detectors else "adapters (the detectors are shared)"
    out = {"what": f"O3's {what} re-run with each seed on the same base LM and retain-only model "
                   "(the base LM is trained once)", "seeds": [r["seed"] for r in runs], "o3": {}}
    for key in SEED_KEYS:
        if any(key in r for r in runs):
            out["o3"][key] = spread([r.get(key) for r in runs])
    finals = [summarize(r["tofu"], reference, T) for r in runs]
    for key in HEADLINE:
        out["o3"][key] = spread([f[key] for f in finals])
    return out


def tofu_section(cfg, results: dict) -> dict:
    """report.json's ``tofu`` (and ``seeds``) plus the checks."""
    T, methods = cfg.data.requests, cfg.baselines.names()
    reference = results["tofu_retain_only_eval"]["tofu"]
    rows = {name: [summarize(s, reference, t) for t, s in enumerate(per, start=1)]
            for name, per in model_scores(results, T, methods).items()}
    tofu = {"thresholds": {"forget_quality_min": cfg.tofu.forget_quality_min,
                           "model_utility_min_ratio_to_retain_only": cfg.tofu.utility_ratio_min},
            "baselines_tuned_on_dev_seed": cfg.data.dev_seed, "baselines_tune_command": TUNE_COMMAND,
            "evaluated_on_dev_world": cfg.data.seed == cfg.data.dev_seed,
            "retain_only_steps": results["tofu_retain_only"].get("steps"),
            **{name: {"per_request": per, "final": per[-1]} for name, per in rows.items()}}
    seeds = seeds_section(cfg, results, reference, T)
    return {"tofu": tofu, "seeds": seeds, "checks": tofu_checks(cfg, tofu, seeds)}


def tofu_checks(cfg, tofu: dict, seeds: dict) -> dict:
    fq_min, ratio = cfg.tofu.forget_quality_min, cfg.tofu.utility_ratio_min
    o3, ref, base = tofu["o3"]["final"], tofu["retain_only"]["final"], tofu["base"]["final"]
    mu_min = ratio * ref["model_utility"] if ref["model_utility"] is not None else None
    fq_seeds = seeds["o3"]["forget_quality"]
    mu_seeds = seeds["o3"]["model_utility"]
    return {
        # the control: the base LM (never unlearned) must be distinguishable, or the test has no power
        "tofu_base_forget_quality_below_threshold": {
            "met": base["forget_quality"] is not None and base["forget_quality"] < fq_min,
            "base_forget_quality": base["forget_quality"], "threshold": fq_min},
        "tofu_o3_forget_quality_ge_threshold": {"met": fq_seeds["min"] is not None and fq_seeds["min"] >= fq_min,
                                                "o3_forget_quality": o3["forget_quality"],
                                                "min_over_seeds": fq_seeds["min"], "threshold": fq_min},
        "tofu_o3_model_utility_ge_ratio_of_retain_only": {
            "met": mu_min is not None and mu_seeds["min"] is not None and mu_seeds["min"] >= mu_min,
            "o3_model_utility": o3["model_utility"], "min_over_seeds": mu_seeds["min"],
            "retain_only_model_utility": ref["model_utility"], "threshold": mu_min},
    }


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def tofu_markdown(report: dict) -> list[str]:
    tofu, seeds = report["tofu"], report["seeds"]
    names = [n for n in tofu if isinstance(tofu[n], dict) and "final" in tofu[n]]
    cols = ("forget_quality", "model_utility", "truth_ratio", "rouge_l", "forget_probability")
    lines = ["", "## TOFU's metrics (forget = every request so far; reference: the retain-only model)", "",
             f"Retain-only model: the base LM's recipe on every record no request forgets "
             f"({tofu['retain_only_steps']} steps). Baselines tuned on the dev world (data seed "
             f"{tofu['baselines_tuned_on_dev_seed']}, `{tofu['baselines_tune_command']}`). Thresholds: forget quality "
             f"(KS p-value) >= {tofu['thresholds']['forget_quality_min']}, model utility >= "
             f"{tofu['thresholds']['model_utility_min_ratio_to_retain_only']} x retain-only's. truth_ratio: "
             "mean min(R, 1/R) on the forget set (1 = true and false answers equally likely); rouge_l: recall of "
             "the greedy answer on the forget set.", "",
             "| after the last request | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(_fmt(tofu[n]["final"][c]) for c in cols) + " |" for n in names]
    lines += ["", "Per request (forget quality / model utility):", "",
              "| model | " + " | ".join(f"after {r['request']}" for r in tofu["o3"]["per_request"]) + " |",
              "|---" * (len(tofu["o3"]["per_request"]) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(f"{_fmt(r['forget_quality'])} / {_fmt(r['model_utility'])}"
                                       for r in tofu[n]["per_request"]) + " |" for n in names]
    lines += ["", f"## O3 over seeds {seeds['seeds']} ({seeds['what']})", "",
              "| metric | mean | std | min | max |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {_fmt(v['mean'])} | {_fmt(v['std'])} | {_fmt(v['min'])} | {_fmt(v['max'])} |"
              for k, v in seeds["o3"].items()]
    return lines + claims_lines(tofu)


def claims_lines(tofu: dict) -> list[str]:
    """Which of the paper's claims this world reproduces, read off the numbers above."""
    o3 = tofu["o3"]["final"]
    baselines = {n: tofu[n]["final"] for n in tofu if isinstance(tofu[n], dict) and "final" in tofu[n]
                 and n not in ("o3", "retain_only", "base")}
    better_mu = [n for n, b in baselines.items() if (b["model_utility"] or 0) > (o3["model_utility"] or 0)]
    better_fq = [n for n, b in baselines.items() if (b["forget_quality"] or 0) > (o3["forget_quality"] or 0)]
    return ["", "## The paper's claims on this world", "",
            "- O3 keeps utility better than the fine-tuning baselines: "
            + ("reproduced (no baseline has a higher model utility)." if not better_mu
               else f"**not reproduced**: {', '.join(better_mu)} keep(s) more model utility."),
            "- O3 forgets as well as the baselines, by TOFU's forget quality: "
            + ("reproduced." if not better_fq else f"**not reproduced**: {', '.join(better_fq)} reach(es) a higher "
               "forget quality (O3's refusal makes the true and wrong answers about equally unlikely, while a model "
               "that never saw the facts guesses one value confidently: the KS test tells the two apart)."),
            "- Not measured here: the paper's TOFU scale (Llama-2-7b, 200 authors), real-authors / world-facts sets, "
            "and generated answers longer than one word (the world's answers are single words, so ROUGE-L recall "
            "is 0 or 1 per question and the paraphrased answer is the answer itself)."]
