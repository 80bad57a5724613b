"""A detector's per-layer statistics of the stored forget features: the bank for the cosine part
and the (low-rank Ledoit–Wolf) covariance for the Mahalanobis part (``LayerStats``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _precision(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Dense Σ⁻¹ of [n, d] features: the pseudo-inverse of the empirical covariance
    (``covariance=empirical``), or Ledoit–Wolf inverted by Cholesky (the reference the low-rank
    form in ``LayerStats`` is tested against)."""
    from sklearn.covariance import ledoit_wolf_shrinkage  # scikit-learn: a second of import, only when fitting

    x = x.double() - x.double().mean(0)
    cov = x.T @ x / len(x)
    if kind == "empirical":
        return torch.linalg.pinv(cov, hermitian=True).float()
    shrink = float(ledoit_wolf_shrinkage(x.numpy(), assume_centered=True))
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    shrunk = (1 - shrink) * cov + shrink * cov.trace() / cov.shape[0] * eye
    return torch.cholesky_inverse(torch.linalg.cholesky(shrunk)).float()


def _low_rank(x: torch.Tensor) -> tuple[float, float]:
    """Ledoit–Wolf Σ = (1-s)·XcᵀXc/n + s·tr(C)/d·I written as a·I + c·XcᵀXc: returns (a, c)."""
    from sklearn.covariance import ledoit_wolf_shrinkage  # scikit-learn: a second of import, only when fitting

    xc = x.double() - x.double().mean(0)
    shrink = float(ledoit_wolf_shrinkage(xc.numpy(), assume_centered=True))
    n, d = xc.shape
    trace = float(xc.pow(2).sum()) / n
    return max(shrink * trace / d, 1e-12 * max(trace, 1e-30)), (1 - shrink) / n


@dataclass
class LayerStats:
    """A detector's per-layer statistics. Ledoit–Wolf's Σ_l = a_l·I + c_l·Xcᵀ Xc (Xc: the n
    centred forget features, n < d) is kept low-rank instead of as a d x d precision: by
    Woodbury (Petersen & Pedersen, Matrix Cookbook eq. 156), with K = a·I_n + c·Xc Xcᵀ = R Rᵀ
    (Cholesky) and the whitened bank W = R⁻¹ Xc (n x d),

        (x-μ)ᵀ Σ⁻¹ (x-μ) = ( ‖x-μ‖² - c · ‖W (x-μ)‖² ) / a,

    so a detector holds bank + W: 2·n·d numbers per layer, not n·d + d² (MiniLM, n = 160 forget
    questions: 3.0 MiB instead of 5.0 MiB per request), and scoring is one n x d product per
    layer (~10x faster than the d x d quadratic form). W is computed in float64 and kept in
    float32; the squared norms are subtracted in float64 (relative error ~1e-4 against the dense
    float64 form on MiniLM features, where ‖x-μ‖²/a is ~170x the result). ``precision`` (dense)
    serves ``covariance=empirical`` and folders saved before this form existed."""
    bank: torch.Tensor  # [L, n, d] unit-norm stored features
    mean: torch.Tensor  # [L, d]
    precision: torch.Tensor | None = None  # [L, d, d] dense Σ⁻¹, or None for the low-rank form
    norms: torch.Tensor | None = None  # [L, n] norms of the stored features (bank · norms = features)
    ridge: torch.Tensor | None = None  # [L] a
    coef: torch.Tensor | None = None  # [L] c
    whitened: torch.Tensor | None = None  # [L, n, d] W = R⁻¹ Xc (saved: loading computes nothing)

    @classmethod
    def fit(cls, feats: torch.Tensor, covariance: str) -> "LayerStats":
        mean = feats.mean(1)
        if covariance == "empirical":
            precision = torch.stack([_precision(f, covariance) for f in feats])
            return cls(F.normalize(feats, dim=-1), mean, precision)
        ac = [_low_rank(f) for f in feats]
        return cls(F.normalize(feats, dim=-1), mean, norms=feats.norm(dim=-1),
                   ridge=torch.tensor([a for a, _ in ac], dtype=torch.float64),
                   coef=torch.tensor([c for _, c in ac], dtype=torch.float64)).factorise()

    def centred_bank(self) -> torch.Tensor:
        """Xc [L, n, d] float64: the stored features minus their mean."""
        return self.bank.double() * self.norms.double()[..., None] - self.mean.double()[:, None]

    def factorise(self) -> "LayerStats":
        if self.precision is None and self.whitened is None:
            eye = torch.eye(self.bank.shape[1], dtype=torch.float64)
            rows = []
            for a, c, xc in zip(self.ridge, self.coef, self.centred_bank()):
                chol = torch.linalg.cholesky(a * eye + c * xc @ xc.T)
                rows.append(torch.linalg.solve_triangular(chol, xc, upper=False).float())
            self.whitened = torch.stack(rows)
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """What ``save`` writes. W is saved too: computing it at load time left ~5 MiB of
        freed-but-held heap per detector (glibc fragmentation), which grew the gate's memory with T."""
        names = ("bank", "mean", "precision") if self.precision is not None else ("bank", "mean", "norms", "ridge",
                                                                                  "coef", "whitened")
        return {k: getattr(self, k).contiguous() for k in names}

    @classmethod
    def from_tensors(cls, state: dict[str, torch.Tensor]) -> "LayerStats":
        keys = ("bank", "mean", "precision", "norms", "ridge", "coef", "whitened")
        return cls(**{k: state[k] for k in keys if k in state}).factorise()

    def mahalanobis(self, feats: torch.Tensor) -> torch.Tensor:
        """(x-μ)ᵀ Σ⁻¹ (x-μ) for [L, n, d] features: [L, n]."""
        centred = feats - self.mean[:, None]
        if self.precision is not None:
            return torch.einsum("lnd,lde,lne->ln", centred, self.precision, centred)
        projected = torch.einsum("lmd,lnd->lnm", self.whitened, centred)  # W (x-μ): [L, n, n_stored]
        quad = centred.double().pow(2).sum(-1) - self.coef[:, None] * projected.double().pow(2).sum(-1)
        return (quad / self.ridge[:, None]).float()

    def parts(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - max cosine, Mahalanobis²), each [n, L]."""
        cos = torch.einsum("lnd,lmd->lnm", F.normalize(feats, dim=-1), self.bank).amax(-1)
        return (1 - cos).T, self.mahalanobis(feats).T
