"""Peak resident memory per process for DDP, ZeRO-2, ZeRO-3 and FSDP2 at 1, 2 and 4 processes.

Each (launcher, world size) pair is one ``accelerate launch`` of ``benchmarks/scale_child.py``: it
builds the engine (imports, process group: the fixed part, measured first), registers a ~90M
parameter GPT through ``engine.register`` as a recipe does, and takes a few optimizer steps. The
table gives, per world size, the largest process's peak RSS and its part above the fixed part
(the model as built, parameters + gradients + optimizer state + activations), and what the largest
process holds between steps once freed memory is returned to the OS (parameters + gradients +
optimizer state), each with its ratio to the smallest world size, beside the ideal 1/N that
sharding parameters, gradients and optimizer state would give.

    python benchmarks/scale.py [--sizes 1 2 4] [--launchers ddp-cpu zero2-cpu zero3-cpu fsdp2-cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(launcher: str, world: int, args) -> list[dict]:
    """Per-rank figures of one launch (a failed launch is reported, not fatal: the table says so)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / f"{launcher}.yaml"),
               "--num_processes", str(world), "--main_process_port", str(free_port()),
               str(ROOT / "benchmarks" / "scale_child.py"), tmp, str(args.d_model), str(args.layers), str(args.steps)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
        rows = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank-*.json"))]
        if proc.returncode != 0 or len(rows) != world:
            print(f"{launcher} x{world} failed:\n{proc.stderr[-1500:]}", file=sys.stderr)
            return []
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--launchers", nargs="+", default=["ddp-cpu", "zero2-cpu", "zero3-cpu", "fsdp2-cpu"])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print("| launcher | N | params (M) | parallelism | fixed (GB) | peak (GB) | peak above fixed (GB) | ratio to N=1 "
          "| held between steps (GB) | ratio to N=1 | ideal 1/N |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for launcher in args.launchers:
        base = state_base = None
        for world in args.sizes:
            rows = measure(launcher, world, args)
            if not rows:
                print(f"| {launcher} | {world} | - | failed | - | - | - | - | - | - | {1 / world:.2f} |", flush=True)
                continue
            top = max(rows, key=lambda r: r["peak_mb"])
            above = top["peak_mb"] - top["fixed_mb"]
            state = max(r["state_mb"] for r in rows)
            base = above if base is None else base
            state_base = state if state_base is None else state_base
            print(f"| {launcher} | {world} | {top['params'] / 1e6:.0f} | {top['parallelism']} | {top['fixed_mb'] / 1024:.2f} "
                  f"| {top['peak_mb'] / 1024:.2f} | {above / 1024:.2f} | {above / base:.2f} | {state / 1024:.2f} "
                  f"| {state / state_base:.2f} | {1 / world:.2f} |", flush=True)


if __name__ == "__main__":
    main()
