"""One process of ``benchmarks/scale.py`` (started by ``accelerate launch``): fixed part, then a
~90M-parameter GPT registered with the engine and trained a few steps; writes its rank's figures.

    scale_child.py OUT_DIR D_MODEL LAYERS STEPS
"""
import ctypes
import gc
import json
import resource
import sys
from pathlib import Path

import torch

from athanor.config import OptimConfig, RunConfig, TrainConfig
from athanor.engine import Engine
from athanor.models import AthanorGPT, AthanorGPTConfig


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def live_mb() -> float:
    """Resident memory now, after freed blocks go back to the OS (glibc keeps them otherwise): what
    the process holds between steps — parameters, gradients, optimizer state, the fixed part."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    out, d_model, layers, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    cfg = TrainConfig(run=RunConfig(output_dir=str(out / "run"), progress=False),
                      optim=OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant"))
    engine = Engine(cfg)  # imports, process group, accelerate: the part that does not scale
    ids = torch.randint(0, 8192, (2, 128), generator=torch.Generator().manual_seed(engine.rank))
    fixed, fixed_live = peak_mb(), live_mb()
    torch.manual_seed(0)
    model = AthanorGPT(AthanorGPTConfig(vocab_size=8192, d_model=d_model, n_layers=layers, n_heads=d_model // 64,
                                        max_seq_len=128))
    params = sum(p.numel() for p in model.parameters())
    model = engine.register("model", model, batch_size=2)
    model.train()
    for _ in range(steps):
        engine.optimize("model", model(ids, labels=ids).loss)
    (out / f"rank-{engine.rank}.json").write_text(json.dumps({
        "rank": engine.rank, "fixed_mb": fixed, "peak_mb": peak_mb(), "params": params,
        "state_mb": live_mb() - fixed_live,
        "parallelism": engine.parallelism.kind + (f"-{engine.parallelism.zero_stage}" if engine.parallelism.zero_stage else "")}))


if __name__ == "__main__":
    main()
