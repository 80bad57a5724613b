"""Activation checkpointing: peak memory and step time with and without, on a 12-layer GPT.

Each variant runs in its own process (peak RSS is a process's high-water mark), through the
engine's ``register`` with ``engine.activation_checkpointing`` as a recipe sets it, and the table
gives the ratios measured in this one run.

    python benchmarks/activation_checkpointing.py [--d-model 256 --seq 256 --batch 16 --steps 4]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = """
import json, resource, sys, tempfile, time, torch
from athanor.config import EngineConfig, OptimConfig, RunConfig, TrainConfig
from athanor.engine import Engine
from athanor.models import AthanorGPT, AthanorGPTConfig
d, seq, batch, steps, on = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
torch.set_num_threads(1)
torch.manual_seed(0)
cfg = TrainConfig(run=RunConfig(output_dir=tempfile.mkdtemp(), progress=False),
                  optim=OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant"),
                  engine=EngineConfig(activation_checkpointing=on))
engine = Engine(cfg)
model = AthanorGPT(AthanorGPTConfig(vocab_size=512, d_model=d, n_layers=12, n_heads=d // 64, max_seq_len=seq))
model = engine.register("model", model)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ids = torch.randint(0, 512, (batch, seq))
times = []
for _ in range(steps):
    start = time.perf_counter()
    engine.optimize("model", model(ids, labels=ids).loss)
    times.append(time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mb": peak / 1024, "above_model_mb": (peak - base) / 1024,
                  "step_s": sorted(times[1:])[len(times[1:]) // 2]}))
"""


def measure(args, on: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(args.d_model), str(args.seq), str(args.batch),
                           str(args.steps), "1" if on else "0"], capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    off, on = measure(args, False), measure(args, True)
    print(f"12-layer GPT, d_model {args.d_model}, batch {args.batch} x seq {args.seq}, one thread\n")
    print("| | peak RSS (MB) | above the built model (MB) | step (s) |\n|---|---|---|---|")
    for name, row in (("without", off), ("activation checkpointing", on)):
        print(f"| {name} | {row['peak_mb']:.0f} | {row['above_model_mb']:.0f} | {row['step_s']:.2f} |")
    print(f"| ratio (with / without) | {on['peak_mb'] / off['peak_mb']:.2f} | "
          f"{on['above_model_mb'] / off['above_model_mb']:.2f} | {on['step_s'] / off['step_s']:.2f} |")


if __name__ == "__main__":
    main()
