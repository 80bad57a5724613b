"""What O3's detector encoder LoRA buys: the same detectors fitted on features of the trained LoRA
encoder and of the pretrained encoder (the same model with the adapter disabled).

    .venv/bin/python benchmarks/o3_encoder_lora.py --seeds 0 1     # ~2-4 min on the loaded machine

For each request t of the default tiny world the encoder LoRA is trained exactly as the recipe's
``detector_t`` stage trains it (``detector.train_steps`` steps of the contrastive + masked-token
loss); then a detector is fitted on each feature set (cross-fitted by fact) and scored on every
record. Printed per seed: AUROC of the max-over-requests gate (forget of requests 1..T vs retain),
the share of forget questions in held-out phrasings that the gate catches (w > ½), and the share of
retain questions it lets through (w < ½).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile

import torch


def gate_metrics(logits: torch.Tensor, sets, T: int) -> dict:
    from athanor.methods.o3.evaluation import auroc

    gate = logits[:, :T].amax(1)
    forget = [i for s in sets.forget_all[:T] for i in s]
    heldout = [i for s in sets.forget_heldout[:T] for i in s]
    return {"auroc": auroc(gate[forget], gate[sets.retain]),
            "heldout_caught": (gate[heldout] > 0).float().mean().item(),
            "retain_passed": (gate[sets.retain] < 0).float().mean().item()}


def run_seed(seed: int, train_steps: int | None) -> dict:
    from athanor.config import OptimConfig
    from athanor.engine import Engine
    from athanor.methods.o3.detector import Detector, DetectorTraining, extract_features, resolve_backbone
    from athanor.methods.o3.evaluation import forget_records
    from athanor.methods.o3 import O3Config, world

    cfg = O3Config()
    cfg.run.seed, cfg.run.progress, cfg.run.eval_every = seed, False, 0
    if train_steps is not None:
        cfg.detector.train_steps = train_steps
    dcfg = cfg.detector
    data, sets = world(cfg)
    T = len(sets.forget_train)
    questions = [r.question for r in data.records]
    logits = {"lora": [], "pretrained": []}
    for t in range(1, T + 1):
        records = forget_records(cfg, t)
        texts, facts = [r.question for r in records], [r.fact for r in records]
        run = dataclasses.replace(cfg.run, output_dir=tempfile.mkdtemp(prefix="o3-lora-"),
                                  max_steps=dcfg.train_steps, resume="none")
        optim = OptimConfig(lr=dcfg.lr, schedule="constant", weight_decay=0.0, grad_clip=1.0)
        engine = Engine(dataclasses.replace(cfg, run=run, optim=optim))
        method = DetectorTraining(resolve_backbone(dcfg.backbone, None), dcfg, texts, seed=seed + t)
        method.setup(engine)
        engine.fit(method, method.batches(engine))
        model = engine.unwrap("encoder")
        for kind in logits:
            if kind == "lora":
                feats, every = (extract_features(model, method.tokenizer, x, dcfg.max_length) for x in (texts, questions))
            else:
                with model.disable_adapter():
                    feats, every = (extract_features(model, method.tokenizer, x, dcfg.max_length)
                                    for x in (texts, questions))
            detector = Detector(model, method.tokenizer, dcfg, dcfg.backbone)
            detector.fit(feats, seed=seed + t, groups=facts)
            logits[kind].append(detector.logit_from_features(every))
    return {kind: gate_metrics(torch.stack(v, dim=1), sets, T) for kind, v in logits.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train-steps", type=int, default=None, help="default: the recipe's detector.train_steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = {seed: run_seed(seed, args.train_steps) for seed in args.seeds}
    print("| seed | features | gate AUROC | held-out forget caught | retain passed |")
    print("|---|---|---:|---:|---:|")
    for seed, result in rows.items():
        for kind, m in result.items():
            print(f"| {seed} | {kind} | {m['auroc']:.4f} | {m['heldout_caught']:.3f} | {m['retain_passed']:.3f} |")
    for kind in ("lora", "pretrained"):
        for key in ("auroc", "heldout_caught", "retain_passed"):
            values = [r[kind][key] for r in rows.values()]
            print(f"{kind} {key}: mean {statistics.mean(values):.4f} (min {min(values):.4f}, max {max(values):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
