"""Benchmark athanor.kernels against torch eager (and Liger-Kernel when installed).

    python benchmarks/kernels.py                 # CPU: peak memory and wall time, ~2-3 min
    python benchmarks/kernels.py --quick         # smaller token counts
    python benchmarks/kernels.py --device cuda   # GPU: median time (CUDA events), peak memory

Every row is one forward + backward.  "base" is the eager torch formulation an HF model
would run in the same dtype (for fp32 it is numerically the op's reference).

Memory, CPU: each variant runs in a fresh child process; the number is the growth of the
peak resident set size (VmHWM, reset through /proc/self/clear_refs) over the resident size
just before the step, so inputs and imports are not counted but every temporary and the
gradients are.  Memory, CUDA: ``max_memory_allocated`` minus the allocation before the step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from athanor.kernels import codebook_topk, fused_linear_cross_entropy, head_norm

Z_W = 1e-4  # z-loss weight used by the linear-CE rows (the PaLM value)


# --------------------------------------------------------------------------- eager baselines
def eager_linear_ce(h, w, y):
    """What an HF model does: logits in the input dtype, upcast, CE, plus z-loss from logsumexp."""
    logits = (h @ w.T).float()
    valid = y != -100
    lse = torch.logsumexp(logits, dim=-1)
    ce = F.cross_entropy(logits, y, ignore_index=-100)
    return ce + Z_W * torch.where(valid, lse.square(), 0.0).sum() / valid.sum().clamp_min(1)


def dense_codebook(x, codes, k):
    """T x N similarities, topk, gather (T, k, d), straight-through."""
    sims = F.normalize(x, dim=-1) @ F.normalize(codes, dim=-1).T
    idx = sims.topk(k, dim=-1).indices
    return codes[idx].sum(1) + (x - x.detach()), idx


def eager_head_norm(x, w, b):
    return F.layer_norm(x, x.shape[-1:]) * w + b


def liger_linear_ce():
    """Liger-Kernel's fused linear CE with the same z-loss, or None when it is unavailable."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:
        return None
    try:  # fp32 weight-grad accumulation, like ours
        loss = LigerFusedLinearCrossEntropyLoss(lse_square_scale=Z_W, accum_dtype=torch.float32)
    except TypeError:
        loss = LigerFusedLinearCrossEntropyLoss(lse_square_scale=Z_W)
    return lambda h, w, y: loss(w, h, y)


# --------------------------------------------------------------------------- cases
def cases(device: str, quick: bool) -> list[dict]:
    cuda = device == "cuda"
    dtype = "bfloat16" if cuda else "float32"
    T_lce = (4096 if quick else 16384) if cuda else (2048 if quick else 8192)
    T_cb = (16384 if quick else 65536) if cuda else (2048 if quick else 8192)
    hn = (8, 2048, 32, 128) if cuda else ((2, 512, 16, 64) if quick else (8, 512, 16, 64))
    lce = dict(op="linear_ce+z", T=T_lce, V=50257, d=4096 if cuda else 1024, dtype=dtype)
    cb = dict(op="codebook_topk", T=T_cb, N=16384, d=512, k=8, dtype=dtype)
    norm = dict(op="head_norm", shape=hn, dtype=dtype)
    impls = ["base", "fused"] + (["liger"] if cuda and liger_linear_ce() is not None else [])
    return [dict(lce, impl=i) for i in impls] + [dict(cb, impl=i) for i in ("base", "fused")] + [
        dict(norm, impl=i) for i in ("base", "fused")
    ]


def shape_str(case: dict) -> str:
    if case["op"] == "head_norm":
        return "x".join(map(str, case["shape"]))
    if case["op"] == "codebook_topk":
        return f"T={case['T']} N={case['N']} d={case['d']} k={case['k']}"
    return f"T={case['T']} V={case['V']} d={case['d']}"


def make_step(case: dict, device: str):
    """Inputs for the case and a closure running one forward + backward."""
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    leaf = lambda t: t.to(device, dtype).requires_grad_()  # noqa: E731
    op, impl = case["op"], case["impl"]
    if op == "linear_ce+z":
        T, V, d = case["T"], case["V"], case["d"]
        h, w = leaf(torch.randn(T, d, generator=g)), leaf(torch.randn(V, d, generator=g) / math.sqrt(d))
        y = torch.randint(0, V, (T,), generator=g).to(device)
        fn = {
            "base": eager_linear_ce,
            "fused": lambda h, w, y: fused_linear_cross_entropy(h, w, y, z_loss_weight=Z_W).loss,
            "liger": liger_linear_ce(),
        }[impl]
        leaves, run = (h, w), lambda: fn(h, w, y).backward()
    elif op == "codebook_topk":
        x, c = leaf(torch.randn(case["T"], case["d"], generator=g)), leaf(torch.randn(case["N"], case["d"], generator=g))
        fn = dense_codebook if impl == "base" else lambda x, c, k: codebook_topk(x, c, k)
        leaves, run = (x, c), lambda: fn(x, c, case["k"])[0].sum().backward()
    else:
        shape = case["shape"]
        x = leaf(torch.randn(shape, generator=g))
        w, b = leaf(torch.ones(shape[-2:])), leaf(torch.zeros(shape[-2:]))
        fn = eager_head_norm if impl == "base" else head_norm
        leaves, run = (x, w, b), lambda: fn(x, w, b).float().sum().backward()

    def step():
        for t in leaves:
            t.grad = None
        run()

    return step


# --------------------------------------------------------------------------- measurement
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure_cpu_child(case: dict, repeats: int) -> dict:
    """Runs in a fresh process: peak-RSS growth of the first step, median wall time of all."""
    torch.manual_seed(0)
    make_step({**case, **_tiny(case)}, "cpu")()  # warm up kernels/allocator outside the measurement
    step = make_step(case, "cpu")
    rss_before = _status_kib("VmRSS") * 1024
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS (Linux >= 4.0)
        peak = lambda: _status_kib("VmHWM") * 1024  # noqa: E731
    except OSError:  # fall back to the lifetime peak: an upper bound on the step's peak
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if len(times) == 1:
            peak_bytes = peak() - rss_before
    return dict(ms=1e3 * statistics.median(times), peak=max(peak_bytes, 0))


def _tiny(case: dict) -> dict:
    if case["op"] == "head_norm":
        return dict(shape=(1, 4) + tuple(case["shape"][-2:]))
    return dict(T=8)


def measure_cpu(case: dict, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(case), "--repeats", str(repeats)]
    env = {**os.environ, "ATHANOR_KERNELS": "torch" if case["impl"] == "fused" else "auto"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark child failed for {case}:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure_cuda(case: dict, repeats: int) -> dict:
    step = make_step(case, "cuda")
    step()  # compile / autotune / cuBLAS heuristics
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    del step
    torch.cuda.empty_cache()
    return dict(ms=statistics.median(times), peak=peak)


# --------------------------------------------------------------------------- report
GOALS = {  # (op, device): (max fused/base memory, min base/fused speed-up or None)
    ("linear_ce+z", "cpu"): (0.25, None),
    ("linear_ce+z", "cuda"): (0.25, 2.0),
    ("codebook_topk", "cuda"): (None, 3.0),
}


def table(rows: list[dict], device: str) -> str:
    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    lines = [
        f"device: {dev_name}; torch {torch.__version__}; one forward+backward per row",
        "",
        "| op | shape | dtype | device | impl | time ms | peak MiB | speed-up vs base | memory vs base |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    base = {r["op"]: r for r in rows if r["impl"] == "base"}
    for r in rows:
        b = base[r["op"]]
        speed = b["ms"] / r["ms"] if r["ms"] > 0 else float("nan")
        mem = r["peak"] / b["peak"] if b["peak"] > 0 else float("nan")
        lines.append(
            f"| {r['op']} | {shape_str(r)} | {r['dtype']} | {device} | {r['impl']} | {r['ms']:.1f} | "
            f"{r['peak'] / 2**20:.0f} | {speed:.2f}x | {mem:.3f} |"
        )
    lines.append("")
    for (op, dev), (mem_goal, speed_goal) in GOALS.items():
        fused = [r for r in rows if r["op"] == op and r["impl"] == "fused"]
        if dev != device or not fused or op not in base:
            continue
        r, b = fused[0], base[op]
        if mem_goal is not None:
            ratio = r["peak"] / max(b["peak"], 1)
            lines.append(f"goal {op} memory fused/base <= {mem_goal}: {ratio:.3f} -> {'MET' if ratio <= mem_goal else 'NOT MET'}")
        if speed_goal is not None:
            speed = b["ms"] / r["ms"]
            lines.append(f"goal {op} speed-up >= {speed_goal}x: {speed:.2f}x -> {'MET' if speed >= speed_goal else 'NOT MET'}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="smaller token counts")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per row (median)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one CPU measurement
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure_cpu_child(json.loads(args.child), args.repeats or 1)))
        return
    rows = []
    for case in cases(args.device, args.quick):
        if args.device == "cuda":
            result = measure_cuda(case, args.repeats or 10)
        else:  # the big linear-CE step takes tens of seconds on CPU: time it once
            result = measure_cpu(case, args.repeats or (1 if case["op"] == "linear_ce+z" else 3))
        rows.append({**case, **result})
        print(f"  measured {case['op']:<14} {case['impl']:<6} {result['ms']:9.1f} ms {result['peak'] / 2**20:9.0f} MiB",
              file=sys.stderr, flush=True)
    print(table(rows, args.device))


if __name__ == "__main__":
    main()
