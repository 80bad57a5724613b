"""The Python pieces of ``benchmarks/gpu_check.sh``: each subcommand does one small thing and the
script strings them together (so that every piece can be checked on a CPU with tiny sizes).

    python benchmarks/gpu_parts.py corpus OUT.txt              # a local text corpus (no network)
    python benchmarks/gpu_parts.py median DIR KEY [--skip N]    # median of KEY over DIR/metrics.jsonl
    python benchmarks/gpu_parts.py same-losses DIR_A DIR_B      # exact resume: equal losses, step by step
    python benchmarks/gpu_parts.py cce --device cuda            # Apple's Cut Cross-Entropy vs athanor's fused CE
    python benchmarks/gpu_parts.py record FILE NAME STATUS SECONDS [FIGURE]
    python benchmarks/gpu_parts.py report FILE OUT.md           # the one table
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "platform"))


def corpus(out: str, max_mb: float = 8.0) -> None:
    """The repository's own text files, concatenated: a corpus that needs no download."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    chunks, size = [], 0
    for name in files:
        if not name.endswith((".py", ".md", ".yaml", ".sh", ".txt")):
            continue
        text = (ROOT / name).read_text(errors="replace")
        chunks.append(text)
        size += len(text)
    text = "\n".join(chunks)
    while len(text) < max_mb * 2**20 / 4:  # repeat to a few MB: enough blocks for any batch size
        text = text + "\n" + text
    Path(out).write_text(text[: int(max_mb * 2**20)])
    print(f"{out}: {len(text[: int(max_mb * 2**20)]) / 2**20:.1f} MB")


def _rows(folder: str) -> list[dict]:
    from athanor.engine import read_metrics

    return read_metrics(folder)


def median(folder: str, key: str, skip: int) -> None:
    values = [r[key] for r in _rows(folder) if key in r and isinstance(r[key], (int, float))][skip:]
    if not values:
        raise SystemExit(f"no {key} in {folder}/metrics.jsonl")
    print(f"{statistics.median(values):.6g}")


def same_losses(a: str, b: str, rel: float = 0.0) -> None:
    """Every step both runs logged has the same loss (within ``rel`` relative, for a resume on another
    world size, whose gradient mean is reduced in another order): the resumed run continued as the other."""
    la = {r["step"]: r["loss"] for r in _rows(a) if "loss" in r}
    lb = {r["step"]: r["loss"] for r in _rows(b) if "loss" in r}
    common = sorted(set(la) & set(lb))
    if not common:
        raise SystemExit(f"no common logged steps in {a} and {b}")
    bad = [(s, la[s], lb[s]) for s in common if abs(la[s] - lb[s]) > rel * abs(la[s])]
    if bad:
        raise SystemExit(f"resume not exact at {len(bad)} of {len(common)} steps, first: step {bad[0]}")
    print(f"equal losses{f' (rel {rel:g})' if rel else ''} at {len(common)} steps (last {common[-1]})")


def cce(device: str, tokens: int, vocab: int, hidden: int) -> None:
    """Fused linear-CE forward+backward: athanor's op against Apple's ``cut_cross_entropy`` when importable."""
    import torch

    from athanor.kernels import fused_linear_cross_entropy

    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        print("cut_cross_entropy not installed (pip install cut-cross-entropy): row skipped")
        return
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(tokens, hidden, generator=gen) * 0.1).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * 0.02).to(device, dtype).requires_grad_()
    y = torch.randint(vocab, (tokens,), generator=gen).to(device)
    impls = {"athanor fused": lambda: fused_linear_cross_entropy(h, w, y).loss,
             "apple cce": lambda: linear_cross_entropy(h, w, y)}
    for name, fn in impls.items():
        times = []
        for _ in range(4):
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            fn().backward()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            h.grad = w.grad = None
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
        print(f"{name}: {1e3 * statistics.median(times[1:]):.1f} ms, peak {peak:.0f} MiB "
              f"(T={tokens} V={vocab} d={hidden} {dtype})")


def record(file: str, name: str, status: str, seconds: str, figure: str) -> None:
    with open(file, "a") as f:
        f.write(json.dumps({"name": name, "status": status, "seconds": float(seconds), "figure": figure}) + "\n")


def report(file: str, out: str) -> None:
    rows = [json.loads(line) for line in Path(file).read_text().splitlines() if line.strip()]
    import platform as host

    lines = ["# GPU check (benchmarks/gpu_check.sh)", "",
             f"Host {host.node()}; written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "| part | status | seconds | figure |", "|---|---|---:|---|"]
    for r in rows:
        figure = r["figure"].replace("|", "/").replace("\n", "; ")
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | {figure} |")
    text = "\n".join(lines) + "\n"
    Path(out).write_text(text)
    print(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("corpus")
    p.add_argument("out")
    p.add_argument("--max-mb", type=float, default=8.0)
    p = sub.add_parser("median")
    p.add_argument("folder")
    p.add_argument("key")
    p.add_argument("--skip", type=int, default=1)
    p = sub.add_parser("same-losses")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--rel", type=float, default=0.0, help="relative tolerance (0: bit for bit)")
    p = sub.add_parser("cce")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--hidden", type=int, default=4096)
    p = sub.add_parser("record")
    p.add_argument("file")
    p.add_argument("name")
    p.add_argument("status")
    p.add_argument("seconds")
    p.add_argument("figure", nargs="?", default="")
    p = sub.add_parser("report")
    p.add_argument("file")
    p.add_argument("out")
    args = parser.parse_args(argv)
    if args.cmd == "corpus":
        corpus(args.out, args.max_mb)
    elif args.cmd == "median":
        median(args.folder, args.key, args.skip)
    elif args.cmd == "same-losses":
        same_losses(args.a, args.b, args.rel)
    elif args.cmd == "cce":
        cce(args.device, args.tokens, args.vocab, args.hidden)
    elif args.cmd == "record":
        record(args.file, args.name, args.status, args.seconds, args.figure)
    else:
        report(args.file, args.out)


if __name__ == "__main__":
    main()
