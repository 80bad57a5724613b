"""EigenScore log-determinants: error and time of Gram-exact, float64 Cholesky, float64 eigvalsh and the
paper's Efficient EigenScore (EES: Chebyshev/KPM with Hutchinson probes) against the matrix size n.

    python benchmarks/eigenscore.py                       # CPU, one thread, n = 512, 2048, 8192 (~6 min of CPU)
    python benchmarks/eigenscore.py --device cuda --sizes 2048 8192 32768

Two matrices per n (athanor.methods.send.eigenscore has the formulas):
- ``eigenscore``: A = Zcᵀ Zc + α I (n×n), Z = K = 10 sampled answers' embeddings of dimension n,
  α = 1e-3: the EigenScore case (rank K − 1 plus α; λ_max/α ~ 1e6–1e7).
- ``wigner``: A = 3 I + W/(2√n), W a symmetric Gaussian matrix (spectrum ≈ [2, 4], well conditioned).

Reference: the float64 Cholesky log det. Times are seconds from the method's natural input: on CPU
the process's CPU time (one thread, so it is what an idle machine's wall clock shows, and a shared
machine's load does not inflate it); on GPU wall-clock after a synchronize. Inputs:
Gram-exact from Z; Cholesky and eigvalsh from Z for ``eigenscore`` (forming A included) and from A
for ``wigner``; EES (float32) from A (dense mat-vecs, as the paper applies it), including power
iteration. One recurrence per (kind, n, probes, λ_min bound) is timed up to each listed degree M:
the time to reach degree M is what a degree-M run costs, since c_m does not depend on M.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # run from a checkout too
from athanor.methods.send.eigenscore import (chebyshev_coefficients, cholesky_logdet,  # noqa: E402
                                             dense_covariance, eigvalsh_logdet, gram_logdet, power_iteration)


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def ees_degrees(a: torch.Tensor, degrees: list[int], probes: int, lambda_min: float | None, seed: int = 0,
                margin: float = 1.05, time_budget: float = 1e9) -> list[tuple[int, float, float]]:
    """(M, estimate, seconds to reach M) for each M in ``degrees`` from one float32 recurrence."""
    n = a.shape[0]
    gen = torch.Generator().manual_seed(seed)
    t0 = clock(a.device)
    def matvec(v):
        return a @ v
    b = margin * power_iteration(matvec, n, 30, dtype=a.dtype, device=a.device, generator=gen)
    lo = 0.0 if lambda_min is None else lambda_min
    half, mid = (b - lo) / 2, (b + lo) / 2
    coeffs = chebyshev_coefficients(lambda x: torch.log(half * x + mid), max(degrees)).tolist()
    v = (torch.randint(0, 2, (n, probes), generator=gen).to(a.dtype) * 2 - 1).to(a.device)
    def scaled(x):
        return (matvec(x) - mid * x) / half
    t_prev, t_cur = v, scaled(v)
    acc = coeffs[0] * (v * t_prev).sum(0) + coeffs[1] * (v * t_cur).sum(0)
    out = []
    for m in range(2, max(degrees) + 1):
        t_prev, t_cur = t_cur, 2 * scaled(t_cur) - t_prev
        acc = acc + coeffs[m] * (v * t_cur).sum(0)
        if m in degrees:
            out.append((m, float(acc.double().mean()), clock(a.device) - t0))
            if clock(a.device) - t0 > time_budget:
                break
    return out


def timed(fn, device: torch.device):
    t0 = clock(device)
    value = fn()
    return value, clock(device) - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--degrees", type=int, nargs="+", default=[25, 100, 400])
    p.add_argument("--probes", type=int, nargs="+", default=[10, 100])
    p.add_argument("--samples", type=int, default=10, help="K sampled answers (eigenscore kind)")
    p.add_argument("--alpha", type=float, default=1e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ees-budget", type=float, default=20.0, help="stop one EES recurrence after this many s")
    p.add_argument("--max-eigvalsh-wigner", type=int, default=4096, help="eigvalsh on the wigner matrix up to this n")
    p.add_argument("--max-eigvalsh", type=int, default=1 << 30, help="eigvalsh (both matrices) up to this n")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    started, cpu_started = time.perf_counter(), time.process_time()
    for n in args.sizes:
        z = torch.randn(args.samples, n, generator=gen, dtype=torch.float64).to(dev)
        g = torch.randn(n, n, generator=gen, dtype=torch.float64)
        wig = (3 * torch.eye(n, dtype=torch.float64) + (g + g.T) / math.sqrt(2) / (2 * math.sqrt(n))).to(dev)
        del g
        for kind in ("eigenscore", "wigner"):
            if kind == "eigenscore":
                a = dense_covariance(z, args.alpha)
                ref, _ = timed(lambda: cholesky_logdet(a), dev)
                _, t_chol = timed(lambda: cholesky_logdet(dense_covariance(z, args.alpha)), dev)
                eig, t_eig = (timed(lambda: eigvalsh_logdet(dense_covariance(z, args.alpha)), dev)
                              if n <= args.max_eigvalsh else (None, None))
                gram, t_gram = timed(lambda: gram_logdet(z, args.alpha), dev)
                rows.append((kind, n, "Gram-exact (K×K, float64)", "", "", t_gram, abs(gram - ref) / abs(ref)))
                if eig is not None:
                    rows.append((kind, n, "eigvalsh (float64)", "", "", t_eig, abs(eig - ref) / abs(ref)))
                bounds = [("none", None), ("α", args.alpha)]
            else:
                a = wig
                ref, t_chol = timed(lambda: cholesky_logdet(a), dev)
                eig, t_eig = (timed(lambda: eigvalsh_logdet(a), dev)
                              if n <= min(args.max_eigvalsh, args.max_eigvalsh_wigner) else (None, None))
                bounds = [("none", None)]
            rows.append((kind, n, "Cholesky (float64)", "", "", t_chol, 0.0))
            if kind == "wigner" and eig is not None:  # same cost as on eigenscore at one n: measured up to a size
                rows.append((kind, n, "eigvalsh (float64)", "", "", t_eig, abs(eig - ref) / abs(ref)))
            a32 = a.to(torch.float32)
            for label, lam in bounds:
                for probes in args.probes:
                    for m, est, secs in ees_degrees(a32, args.degrees, probes, lam, time_budget=args.ees_budget):
                        rows.append((kind, n, f"EES float32, λ_min bound {label}", m, probes, secs,
                                     abs(est - ref) / abs(ref)))
            del a, a32
            print(f"n={n} {kind} done at {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    total, cpu_total = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"| matrix | n | method | M | probes | {'CPU s' if dev.type == 'cpu' else 'seconds'} | rel. error of log det |")
    print("|---|---|---|---|---|---|---|")
    for kind, n, method, m, probes, secs, err in rows:
        print(f"| {kind} | {n} | {method} | {m} | {probes} | {secs:.3g} | {err:.2e} |")
    print(f"\n{args.device}, {args.threads} thread(s), total {total:.0f} s wall, {cpu_total:.0f} s CPU")


if __name__ == "__main__":
    main()
