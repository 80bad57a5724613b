"""EigenScore of K sampled answers: exact through the K×K Gram matrix, and the paper's Efficient
EigenScore (EES, a Chebyshev/KPM stochastic log-determinant) for when only mat-vecs are affordable.

EigenScore (Chen et al. 2024, "INSIDE", Sec. 3.1; the SeND paper's Eq. for EES' target). ``Z`` holds
the K answers' embeddings as rows (K×d). Two centrings are offered (``centring``):

- ``features`` (the default, aligned with INSIDE's reference ``getEigenIndicator_v0``, which calls
  ``torch.cov`` on the K×d matrix, and with notarobot-hub/SEND, which forms Zᵀ J_d Z with
  J_d = I_d − 11ᵀ/d): every embedding is centred over its own d dimensions and
  Σ = Z J_d Zᵀ / (d − 1) is the K×K covariance of the K answers. Then

      EigenScore(Z) = (1/K) · log det(Σ + α I_K) = (1/K) · Σ_{k=1..K} log(λ_k(Σ) + α).

  (INSIDE takes log10; this module uses the natural log, a constant factor 1/ln 10 apart, so
  rankings, AUROCs and relative spreads are the same.)
- ``samples`` (this module's earlier definition, kept for comparison): rows centred over the K samples,
  ``Zc = Z − mean_k Z``, ``C = Zcᵀ Zc`` (d×d) and EigenScore = (1/d)·log det(C + α I_d). C and the
  K×K Gram matrix G = Zc Zcᵀ share their non-zero eigenvalues σ_i², and C has d − K further zeros, so

      log det(C + α I_d) = (d − K)·log α + Σ_{i=1..K} log(σ_i² + α)        (K ≤ d)

  at O(dK²) (``gram_logdet``, float64). The two differ in what is removed (the mean answer vs each
  answer's mean activation), the normaliser (d − 1 vs none) and the averaging (over K vs over d).

EES (the SeND paper, after Lin et al. 2016 "Approximating spectral densities of large matrices"):
log det A = tr log A for symmetric positive definite A with spectrum in [a, b]. With
B = (2A − (a+b)I)/(b − a) (spectrum in [−1, 1]) and f(x) = log((b−a)x/2 + (a+b)/2),
f(x) ≈ Σ_{m=0..M} c_m T_m(x) (Chebyshev coefficients by Chebyshev–Gauss quadrature), and
tr f(B) ≈ (1/P) Σ_p v_pᵀ (Σ_m c_m T_m(B)) v_p over P Rademacher probes (Hutchinson), where
T_m(B)V follows the three-term recurrence T_0 = V, T_1 = BV, T_{m+1} = 2B T_m − T_{m−1} (not
cos(m·x), which the reference code used). b comes from power iteration (times a safety margin);
a is a known lower bound on λ_min when given (α for C + αI), else 0: then log's singularity sits
at the interval's end and the expansion converges slowly — the truncation bias the benchmark
(benchmarks/eigenscore.py) measures.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def centred(z: torch.Tensor) -> torch.Tensor:
    """Rows of ``z`` (K×d) minus their mean over the K samples."""
    return z - z.mean(dim=0, keepdim=True)


def gram_logdet(z: torch.Tensor, alpha: float) -> float:
    """log det(Zcᵀ Zc + α I_d) exactly via the K×K Gram matrix (float64)."""
    zc = centred(z.detach().to(torch.float64))
    k, d = zc.shape
    eig = torch.linalg.eigvalsh(zc @ zc.T).clamp_min(0.0)  # σ_i² (rank ≤ K − 1 after centring)
    if k > d:  # then C has no extra zero eigenvalues; the K − d surplus Gram eigenvalues are zeros
        eig = eig.sort(descending=True).values[:d]
    return float(max(d - k, 0) * math.log(alpha) + torch.log(eig + alpha).sum())


CENTRINGS = ("features", "samples")


def feature_covariance(z: torch.Tensor) -> torch.Tensor:
    """Σ = Z J_d Zᵀ / (d − 1) (K×K, float64): each embedding centred over its d dimensions (torch.cov)."""
    return torch.cov(z.detach().to(torch.float64))


def eigenscore(z: torch.Tensor, alpha: float = 1e-3, centring: str = "features") -> float:
    """EigenScore of K answers' embeddings ``z`` (K×d), exact. ``features``: (1/K)·log det(Σ + α I_K)
    (INSIDE / the SeND reference); ``samples``: (1/d)·log det(Zcᵀ Zc + α I_d)."""
    if centring == "samples":
        return gram_logdet(z, alpha) / z.shape[1]
    if centring != "features":
        raise ValueError(f"centring={centring!r} is not one of {CENTRINGS}")
    eig = torch.linalg.eigvalsh(feature_covariance(z)).clamp_min(0.0)
    return float(torch.log(eig + alpha).mean())


def dense_covariance(z: torch.Tensor, alpha: float, dtype=torch.float64) -> torch.Tensor:
    zc = centred(z.to(dtype))
    return zc.T @ zc + alpha * torch.eye(zc.shape[1], dtype=dtype, device=zc.device)


def cholesky_logdet(a: torch.Tensor) -> float:
    """log det of a symmetric positive definite matrix: 2 Σ log diag(L), A = L Lᵀ."""
    return float(2 * torch.log(torch.diagonal(torch.linalg.cholesky(a))).sum())


def eigvalsh_logdet(a: torch.Tensor) -> float:
    return float(torch.log(torch.linalg.eigvalsh(a)).sum())


def power_iteration(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, iters: int = 30,
                    dtype=torch.float32, device=None, generator: torch.Generator | None = None) -> float:
    """Largest eigenvalue of a symmetric PSD operator (a Rayleigh quotient; an underestimate)."""
    v = torch.randn(n, 1, dtype=dtype, device=device, generator=generator)
    v /= v.norm()
    lam = 0.0
    for _ in range(iters):
        w = matvec(v)
        lam = float((v * w).sum())
        v = w / w.norm().clamp_min(1e-30)
    return lam


def chebyshev_coefficients(f: Callable[[torch.Tensor], torch.Tensor], degree: int, nodes: int | None = None,
                           jackson: bool = False) -> torch.Tensor:
    """c_0..c_M of f on [−1, 1] by Chebyshev–Gauss quadrature at N ≥ M + 1 nodes
    (c_m = (2 − δ_m0)/N Σ_k f(cos θ_k) cos(m θ_k), θ_k = π(k + ½)/N), optionally Jackson-damped."""
    n = nodes or max(2 * (degree + 1), 64)
    theta = math.pi * (torch.arange(n, dtype=torch.float64) + 0.5) / n
    m = torch.arange(degree + 1, dtype=torch.float64)
    c = (f(torch.cos(theta))[None, :] * torch.cos(m[:, None] * theta[None, :])).sum(1) * 2 / n
    c[0] /= 2
    if jackson:  # Jackson kernel g_m (Weiße et al. 2006): damps Gibbs oscillations
        big = degree + 2
        g = ((big - m) * torch.cos(math.pi * m / big) + torch.sin(math.pi * m / big) / math.tan(math.pi / big)) / big
        c = c * g
    return c


def ees_logdet(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, degree: int = 100, probes: int = 30,
               lambda_min: float | None = None, lambda_max: float | None = None, power_iters: int = 30,
               margin: float = 1.05, dtype=torch.float32, device=None, seed: int = 0,
               jackson: bool = False, exact_trace: bool = False) -> float:
    """Stochastic Chebyshev (KPM) estimate of log det A from mat-vecs ``matvec(V)`` (V: n×P).

    ``lambda_min``: a lower bound on A's spectrum (α for C + αI); None uses 0. ``lambda_max``:
    None estimates it by power iteration and multiplies by ``margin`` (power iteration
    underestimates; a spectrum outside [a, b] makes the expansion diverge). ``exact_trace`` probes
    with the n unit vectors instead (no Hutchinson noise: the truncation error alone, for tests)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    b = lambda_max if lambda_max is not None else margin * power_iteration(
        matvec, n, power_iters, dtype=dtype, device=device, generator=gen)
    a = 0.0 if lambda_min is None else float(lambda_min)
    if not b > a:
        raise ValueError(f"spectrum bounds [{a}, {b}] are empty")
    half, mid = (b - a) / 2, (b + a) / 2
    coeffs = chebyshev_coefficients(lambda x: torch.log(half * x + mid), degree, jackson=jackson).tolist()

    def scaled(v):  # B v = (A v − mid·v) / half
        return (matvec(v) - mid * v) / half

    if exact_trace:
        probes_v = torch.eye(n, dtype=dtype, device=device)
    else:
        probes_v = (torch.randint(0, 2, (n, probes), generator=gen).to(dtype) * 2 - 1).to(device)
    t_prev, t_cur = probes_v, scaled(probes_v)
    acc = coeffs[0] * (probes_v * t_prev).sum(0) + coeffs[1] * (probes_v * t_cur).sum(0)
    for m in range(2, degree + 1):
        t_prev, t_cur = t_cur, 2 * scaled(t_cur) - t_prev
        acc = acc + coeffs[m] * (probes_v * t_cur).sum(0)
    return float(acc.double().sum() if exact_trace else acc.double().mean())


def ees_eigenscore(z: torch.Tensor, alpha: float = 1e-3, degree: int = 100, probes: int = 30,
                   use_lambda_min: bool = True, dtype=torch.float32, seed: int = 0, centring: str = "features") -> float:
    """EES of K answers' embeddings, matrix-free. ``features``: A = Σ + α I_K (K×K, formed: it is
    small); ``samples``: A v = Zcᵀ(Zc v) + α v (d×d, never formed). The estimate of log det A over K or d."""
    if centring == "features":
        sigma = feature_covariance(z).to(dtype) + alpha * torch.eye(z.shape[0], dtype=dtype, device=z.device)
        return ees_logdet(lambda v: sigma @ v, z.shape[0], degree, probes, lambda_min=alpha if use_lambda_min else None,
                          dtype=dtype, device=z.device, seed=seed) / z.shape[0]
    zc = centred(z.detach().to(dtype))
    d = zc.shape[1]
    return ees_logdet(lambda v: zc.T @ (zc @ v) + alpha * v, d, degree, probes,
                      lambda_min=alpha if use_lambda_min else None, dtype=dtype, device=zc.device,
                      seed=seed) / d


def random_eigenscore_check(trials: int = 5, samples: int = 10, dims=(64, 512, 2048), alpha: float = 1e-3,
                            seed: int = 0) -> dict:
    """Gram-exact log det vs a float64 dense Cholesky log det on random embeddings: max relative error."""
    gen = torch.Generator().manual_seed(seed)
    worst, rows = 0.0, []
    for d in dims:
        for _ in range(trials):
            z = torch.randn(samples, d, generator=gen, dtype=torch.float64) * torch.rand(1, generator=gen,
                                                                                         dtype=torch.float64)
            exact, dense = gram_logdet(z, alpha), cholesky_logdet(dense_covariance(z, alpha))
            err = abs(exact - dense) / abs(dense)
            worst = max(worst, err)
            rows.append({"d": d, "gram": exact, "cholesky": dense, "rel_error": err})
    return {"max_rel_error": worst, "samples": samples, "alpha": alpha, "trials": rows}
