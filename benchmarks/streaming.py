"""Streamed text (data.streaming): peak RSS of a pretrain run on a small vs a large corpus, and the
loader's throughput alone against what the default pretrain consumes.

Writes synthetic ``.jsonl`` shards (random lines, repeated: fast to write) into a temporary folder
(deleted at the end): ~20 MB and ~2 GB (1 GB when the disk is short; said in the output). Every
measurement runs in its own process, measured as that process's peak RSS (``ru_maxrss`` of a
child, read by a wrapper process of its own so one run's peak cannot hide another's).

    python benchmarks/streaming.py [--large-gb 2 --steps 10 --loader-tokens 300000000]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARD_BYTES = 128 << 20  # large shards, as real corpora ship them
WORDS = [f"w{i}" for i in range(4000)]

# Runs argv[1:]; prints that child's peak RSS (KiB), wall time and last output line: one wrapper
# per measurement.
PEAK_OF_CHILD = """
import json, resource, subprocess, sys, time
start = time.time()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
if proc.returncode:
    sys.exit(proc.stderr[-3000:])
print(json.dumps({"kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "seconds": time.time() - start,
                  "last_line": (proc.stdout.strip().splitlines() or [""])[-1]}))
"""

# The loader alone on one core: this process's part of the corpus, tokenized and packed.
LOADER = """
import json, os, sys, time, torch
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
torch.set_num_threads(1)
from athanor.data import TextDataConfig, open_text_data
cfg = TextDataConfig(source=sys.argv[1], streaming=True)
cfg.validate()
stream = open_text_data(cfg).train_batches(cfg.batch_size, 0)
next(stream)  # opening the shards is not throughput
target, tokens, start = int(sys.argv[2]), 0, time.perf_counter()
while tokens < target:
    tokens += next(stream)[:, 1:].numel()
print(json.dumps({"tokens_per_s": tokens / (time.perf_counter() - start), "tokens": tokens}))
"""


def write_corpus(folder: Path, total_bytes: int, seed: int = 0) -> int:
    """Shards of JSON lines: a pool of random lines, a chunk of them written again and again."""
    rng = random.Random(seed)
    pool = [json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(20, 200)))}) + "\n" for _ in range(4096)]
    chunk = "".join(rng.choices(pool, k=1024)).encode()  # ~1 MB, written repeatedly
    folder.mkdir(parents=True)
    written, shard = 0, 0
    while written < total_bytes:
        with open(folder / f"part-{shard:04d}.jsonl", "wb") as f:
            size = 0
            while size < min(SHARD_BYTES, total_bytes - written):
                f.write(chunk)
                size += len(chunk)
        written, shard = written + size, shard + 1
    return written


def peak_rss(argv: list[str]) -> tuple[float, float, str]:
    """(peak RSS in MB, wall seconds, its last output line) of ``argv`` run in its own process."""
    proc = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, *argv], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv[:6])}...: {proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["kib"] / 1024, result["seconds"], result["last_line"]


def pretrain(corpus: Path, out: Path, steps: int, streaming: bool) -> tuple[float, float, float]:
    """Peak RSS (MB), wall seconds, and the training's tokens/s (median of its logged rows)."""
    mb, seconds, _ = peak_rss([sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--data.source", str(corpus),
                            "--data.streaming", str(streaming).lower(), "--run.output_dir", str(out),
                            "--run.max_steps", str(steps), "--run.progress", "false", "--run.eval_every", "0"])
    rates = sorted(r["tokens_per_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                   if "tokens_per_s" in r)
    return mb, seconds, rates[len(rates) // 2]


def loader(corpus: Path, tokens: int) -> dict:
    """The loader alone on one core: tokens/s and its process's peak RSS (MB)."""
    mb, _, last = peak_rss([sys.executable, "-c", LOADER, str(corpus), str(tokens)])
    return {**json.loads(last), "peak_mb": mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large-gb", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--loader-tokens", type=int, default=300_000_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="athanor-streaming-"))
    os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf-cache")  # the in-memory run's Arrow cache goes too
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        free_gb = shutil.disk_usage(tmp).free / 1e9
        large_gb = args.large_gb if free_gb > args.large_gb * 1.5 + 1 else 1.0
        if large_gb != args.large_gb:
            print(f"note: {free_gb:.1f} GB free in {tmp.parent}: the large corpus is {large_gb} GB, not {args.large_gb}")
        run_all(tmp, large_gb, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_all(tmp: Path, large_gb: float, args) -> None:
    start = time.time()
    small_bytes = write_corpus(tmp / "small", 20 << 20)
    large_bytes = write_corpus(tmp / "large", int(large_gb * (1 << 30)))
    print(f"wrote {small_bytes / 2**20:.0f} MiB and {large_bytes / 2**30:.2f} GiB of .jsonl shards "
          f"in {time.time() - start:.0f} s")
    rows = [("20 MB, in memory (streaming false)", *pretrain(tmp / "small", tmp / "o-mem", args.steps, False)),
            ("20 MB, streamed", *pretrain(tmp / "small", tmp / "o-small", args.steps, True)),
            (f"{large_bytes / 2**30:.1f} GB, streamed", *pretrain(tmp / "large", tmp / "o-large", args.steps, True))]
    streamed_small = rows[1][1]
    print(f"\npeak RSS of `recipes/pretrain.py --data.streaming ...`, default model, {args.steps} steps\n")
    print("| corpus | peak RSS MB | vs 20 MB streamed | wall s | training tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for name, mb, seconds, rate in rows:
        print(f"| {name} | {mb:.0f} | {mb / streamed_small:.2f}x | {seconds:.0f} | {rate:.0f} |")
    print_loader(tmp, rows[2][3], args.loader_tokens)


def print_loader(tmp: Path, training_rate: float, tokens: int) -> None:
    """The same number of tokens from each corpus (many epochs of the small one, a slice of the large)."""
    print(f"\nthe loader alone (`StreamedBatches`, byte tokens, one core), {tokens / 1e6:.0f}M tokens:\n")
    print("| corpus | tokens/s | peak RSS MB | vs what the default pretrain consumes |")
    print("|---|---:|---:|---:|")
    for name in ("small", "large"):
        alone = loader(tmp / name, tokens)
        print(f"| {name} | {alone['tokens_per_s']:.0f} | {alone['peak_mb']:.0f} | "
              f"{alone['tokens_per_s'] / training_rate:.0f}x |")
    print(f"\nthe default pretrain (16 x 128 tokens a step) trains at {training_rate:.0f} tokens/s")

if __name__ == "__main__":
    main()
