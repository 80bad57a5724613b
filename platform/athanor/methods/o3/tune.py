"""Tune the detector's γ, calibration percentile and gate sharpness on a dev world, never on the
world the report evaluates.

    .venv/bin/python -m athanor.methods.o3.tune --run.output_dir /tmp/o3-dev     # data.seed = data.dev_seed (1)

Runs the recipe on the dev world (``data.seed`` := ``data.dev_seed`` unless ``--data.seed`` is
given; ablations off; any other ``--section.key value`` is passed on), then, after the last
request, refits the T detectors on the cached encoder features for every γ in ``GAMMAS`` and
re-thresholds them for every (percentile, sharpness) pair, and measures the gated model (all T
adapters, ``max`` gate) on the dev world's forgotten facts (trained wordings, held-out templates,
paraphrases), retained facts and utility facts. The chosen point has the largest worst-case
margin to the report's checks (forget ≤ 0.10, paraphrase ≤ 10% of base, retain and utility ≥ 95%
of base); ties go to the widest gate separation (10th percentile of w on forget questions no
detector stored minus the 90th percentile of w on every question no request touches).
``tuning.json`` in the output folder holds every row; the winners are ``DetectorConfig``'s
defaults, and the report names the dev seed.
"""
from __future__ import annotations

import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from peft import PeftModel

from ...compat import plain_loading
from ...config import parse_or_exit
from ...parts.fact_world import DataConfig
from ...runner import run
from .config import TUNE_COMMAND
from .detector import Detector, calibrate, extract_features, load_backbone, resolve_backbone
from .evaluation import attribute_sets, forget_records, world
from .model import O3Model
from .stages import PAPER, calibration_keys, calibration_negatives

GAMMAS = (1e2, 1e3, 3e3, 1e4, 3e4, 1e5)
PERCENTILES = (1.0, 2.5, 5.0, 10.0)
SHARPNESS = (2.0, 4.0, 8.0, 16.0)
OFF = ["--ablations.always_on", "false", "--ablations.per_request_gate", "false", "--ablations.gate_variants",
       "false", "--ablations.lambda0", "false", "--ablations.gradient_ascent", "false",
       "--ablations.detector_untrained", "false"]


def features(root: Path, cfg, t: int, texts: list[str]) -> torch.Tensor:
    """[L, n, d] features of ``texts`` through request t's detector encoder (its saved LoRA)."""
    with plain_loading():
        encoder, tokenizer, _ = load_backbone(resolve_backbone(cfg.detector.backbone, root / "base" / "model"))
        encoder = PeftModel.from_pretrained(encoder, root / f"detector_{t}" / "detector" / "encoder_lora")
    return extract_features(encoder, tokenizer, texts, cfg.detector.max_length)


def margins(acc: dict, base: dict, w: torch.Tensor, sets) -> tuple[float, float]:
    """(worst-case margin to the checks, gate separation) of one grid point."""
    new = [i for group in sets.forget_heldout + sets.forget_paraphrase for i in group]
    negatives = sets.retain + sets.retain_paraphrase + sets.utility
    checks = [0.10 - acc["forget_train"], 0.10 - acc["forget_heldout"],
              0.10 * base["paraphrase"] - acc["forget_paraphrase"],
              acc["retain"] / base["retain"] - 0.95, acc["utility"] / base["utility"] - 0.95]
    if "attribute_forget_acc" in acc:  # attribute-level requests: forgotten facts vs the same people's kept ones
        checks += [0.10 * base["attribute_forget_acc"] - acc["attribute_forget_acc"],
                   acc["attribute_retain_acc_new_wordings"] / base["attribute_retain_acc_new_wordings"] - 0.90]
    separation = float(torch.quantile(w[new], 0.10) - torch.quantile(w[negatives], 0.90))
    return min(checks), separation


def tune(root: Path, cfg) -> dict:
    data, sets = world(cfg)
    T = cfg.data.requests
    texts = [r.question for r in data.records]
    with plain_loading():
        o3 = O3Model.from_parts(root / "base" / "model", [root / f"request_{t}" / "adapter" for t in range(1, T + 1)],
                                [], "max", cfg.data.prompt_template, cfg.data.max_length, cfg.model.dtype,
                                detectors=[])
    named = {"forget_train": [i for g in sets.forget_train for i in g],
             "forget_heldout": [i for g in sets.forget_heldout for i in g],
             "forget_paraphrase": [i for g in sets.forget_paraphrase for i in g],
             "retain": sets.retain, "utility": sets.utility,
             **{k: v for k, v in attribute_sets(data, sets, T).items() if v}}
    off = torch.zeros(len(texts), T)  # the base LM: w = 0 everywhere

    def accuracies(weights: torch.Tensor) -> dict:
        return {k: o3.answer_matches([data.records[i] for i in idx], weights[idx]).float().mean().item()
                for k, idx in named.items() if idx}

    base = accuracies(off)
    base["paraphrase"] = base.get("forget_paraphrase", 1.0)
    feats = {t: features(root, cfg, t, texts) for t in range(1, T + 1)}
    rows = []
    for gamma in GAMMAS:
        dcfg = replace(cfg.detector, gamma=gamma)
        fitted = []
        for t in range(1, T + 1):
            records = forget_records(cfg, t)
            own = feats[t][:, sets.forget_train[t - 1]]
            negatives = calibration_negatives(cfg, t, dcfg)
            detector = Detector(None, None, dcfg, dcfg.backbone)
            detector.fit(own, seed=cfg.run.seed + t, groups=calibration_keys(records, dcfg.calibration_folds),
                         negatives=feats[t][:, negatives] if negatives else None)
            fitted.append((detector.cv_decision, detector.neg_decision, detector.decision_from_features(feats[t])))
        for pct, sharp in itertools.product(PERCENTILES, SHARPNESS):
            logits = []
            for f_cv, f_neg, f in fitted:
                tau, spread = calibrate(f_cv.numpy(), None if f_neg is None else f_neg.numpy(),
                                        replace(dcfg, threshold_percentile=pct))
                logits.append(sharp * (f - tau) / spread)
            weights = o3.adapter_weights(torch.stack(logits, 1))
            acc = accuracies(weights)
            margin, separation = margins(acc, base, weights[:, 0], sets)
            rows.append({"gamma": gamma, "threshold_percentile": pct, "sharpness": sharp, **acc,
                         "margin": margin, "separation": separation})
            print(f"γ={gamma:g} pct={pct} sharpness={sharp}: margin {margin:.3f} separation {separation:.3f}",
                  flush=True)
    best = max(rows, key=lambda r: (round(r["margin"], 6), round(r["separation"], 6)))
    out = {"dev_seed": cfg.data.seed, "command": TUNE_COMMAND, "base": base, "rows": rows,
           "chosen": {k: best[k] for k in ("gamma", "threshold_percentile", "sharpness")},
           "chosen_row": best}
    (root / "tuning.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--data.seed" not in argv:
        argv = ["--data.seed", str(DataConfig().dev_seed)] + argv
    argv = OFF + argv  # later values win: ablations can still be switched back on
    run(PAPER, argv)
    cfg = parse_or_exit(PAPER.config, argv)
    out = tune(Path(cfg.run.output_dir), cfg)
    print(f"dev seed {out['dev_seed']}: chosen {out['chosen']} (margin {out['chosen_row']['margin']:.3f}, "
          f"separation {out['chosen_row']['separation']:.3f}); {cfg.run.output_dir}/tuning.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
