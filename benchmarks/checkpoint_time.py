"""Checkpoint save and verified-resume time against model size (a table of seconds and GB/s).

    python benchmarks/checkpoint_time.py [--sizes 10M,100M,500M] [--out DIR]

Each size runs in its own process (memory is given back between sizes): a built-in GPT of about
that many parameters is registered with the engine, takes one AdamW step (so the optimizer state
exists: a checkpoint is ~3x the weights' bytes), then the engine's Checkpointer is timed on

- **save**: ``Engine.save_checkpoint`` — safetensors weights and optimizer state, per-process
  states, each file fsynced and hashed by the process that wrote it, the manifest, the rename (the
  second save is timed; the first also pays a one-off import inside accelerate's ``unwrap_model``);
- **verify**: ``checkpoint.verify`` — every file's size and sha256 against the manifest (what a
  resume does first, on the main process);
- **resume**: ``Checkpointer.resume("auto")`` — verify, every tensor's dtype and shape checked
  against the model, then weights, optimizer and RNG states loaded.

One process on this machine (its disk, one CPU thread); the figures say what fraction of a save is
hashing (verify alone) and how the cost grows with size (it should be linear: GB/s roughly flat).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {"10M": (256, 12), "100M": (768, 12), "500M": (1280, 24)}  # (d_model, layers), vocab 8192


def child(out: Path, d_model: int, layers: int) -> dict:
    import torch

    from athanor.config import OptimConfig, RunConfig, TrainConfig
    from athanor.engine import Engine, Method
    from athanor.engine import checkpoint as ckpt
    from athanor.models import AthanorGPT, AthanorGPTConfig

    class Nothing(Method):  # the checkpoint's per-process method state: empty
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    torch.set_num_threads(1)
    engine = Engine(TrainConfig(run=RunConfig(output_dir=str(out), progress=False),
                                optim=OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant")))
    model = AthanorGPT(AthanorGPTConfig(vocab_size=8192, d_model=d_model, n_layers=layers, n_heads=d_model // 64,
                                        max_seq_len=32))
    params = sum(p.numel() for p in model.parameters())
    model = engine.register("model", model, batch_size=1)
    ids = torch.randint(0, 8192, (1, 32))
    engine.optimize("model", model(ids, labels=ids).loss)
    engine.step, method = 1, Nothing()
    start = time.perf_counter()
    engine.save_checkpoint(method, None)  # the first save also imports what unwrap_model needs (once per process)
    first = time.perf_counter() - start
    engine.step = 2
    start = time.perf_counter()
    folder = engine.save_checkpoint(method, None)
    save = time.perf_counter() - start
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    start = time.perf_counter()
    assert ckpt.verify(folder) is None
    verify = time.perf_counter() - start
    start = time.perf_counter()
    assert engine.checkpointer.resume("auto", method, None) is not None
    resume = time.perf_counter() - start
    return {"params": params, "gb": size / 1e9, "first_save_s": first, "save_s": save, "verify_s": verify, "resume_s": resume}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10M,100M,500M")
    parser.add_argument("--out", default=None, help="where checkpoints are written (default: a temporary folder)")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    if unknown := [s for s in sizes if s not in SHAPES]:
        sys.exit(f"--sizes: unknown {unknown}; choose from {list(SHAPES)}")
    root = Path(args.out or tempfile.mkdtemp(prefix="athanor-ckpt-time-"))
    rows = []
    for size in sizes:
        out = root / size
        shutil.rmtree(out, ignore_errors=True)
        d_model, layers = SHAPES[size]
        proc = subprocess.run([sys.executable, __file__, "--child", str(out), str(d_model), str(layers)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{size}: the child failed:\n{proc.stderr[-2000:]}")
        rows.append({"size": size, **json.loads(proc.stdout.strip().splitlines()[-1])})
        shutil.rmtree(out, ignore_errors=True)
    print("| model | parameters | checkpoint GB | first save s | save s | verify s | resume s | save GB/s | "
          "verify share of save |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['params'] / 1e6:.0f}M | {r['gb']:.2f} | {r['first_save_s']:.1f} | {r['save_s']:.1f} | {r['verify_s']:.1f} | "
              f"{r['resume_s']:.1f} | {r['gb'] / r['save_s']:.2f} | {r['verify_s'] / r['save_s']:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(child(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
    else:
        main()
