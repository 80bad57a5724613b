r"""Codebook top-k lookup for Codebook Features, with a straight-through backward.

For activations :math:`x \in R^{T\times d}` and a codebook :math:`C \in R^{N\times d}`:

.. math::
    \operatorname{sim}(x_t, C_j) = \frac{x_t \cdot C_j}{\lVert x_t\rVert\,\lVert C_j\rVert},\qquad
    I_t = \operatorname{top-k}_j\ \operatorname{sim}(x_t, C_j)\ \text{(best first)}

    \text{out}_t = \sum_{j\in I_t} C_j \quad(\text{or } \tfrac1k\sum_{j\in I_t} C_j)

The output is built from the raw codebook rows.  Backward is straight-through:
:math:`\partial x = \partial\text{out}` and row :math:`C_j` receives
:math:`\sum_{t: j\in I_t}\partial\text{out}_t` (divided by k for the mean).

Dividing by :math:`\lVert x_t\rVert` does not change the ranking within a row, so the fast
paths only normalise the codebook.  They never hold T x N similarities: the torch path
scores (token chunk) x (code block) tiles and merges each block's top-k into a running
top-k; the Triton kernel keeps the running top-k of a token tile in registers.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._backend import resolve_backend

REDUCES = ("sum", "mean")
# Similarity scores per torch step (fp32): 4M scores = 16 MiB, whatever T and N are.
_TORCH_TILE_ELEMS = 1 << 22


# --------------------------------------------------------------------------- reference
def reference_codebook_topk(x: Tensor, codebook: Tensor, k: int = 1, *, reduce: str = "sum") -> tuple[Tensor, Tensor]:
    """The truth: dense fp32 cosine similarities, ``topk``, gather; STE via ``x - x.detach()``.
    Grouped form: x (G, T, d) with one codebook per group (G, N, d)."""
    sims = F.normalize(x.float(), dim=-1) @ F.normalize(codebook.float(), dim=-1).transpose(-1, -2)
    indices = sims.topk(k, dim=-1).indices
    if codebook.dim() == 3:  # (G, T, k, d): group g reads its own codebook
        codes = codebook[torch.arange(codebook.shape[0], device=codebook.device)[:, None, None], indices]
    else:
        codes = codebook[indices]  # (T, k, d)
    codes = codes.sum(-2) if reduce == "sum" else codes.mean(-2)
    # Value is exactly `codes` (x - x.detach() == 0); the gradient reaches x unchanged.
    return codes + (x - x.detach()).to(codes.dtype), indices


# --------------------------------------------------------------------------- torch path
def _normalised_codes(codebook: Tensor, dtype: torch.dtype) -> Tensor:
    return F.normalize(codebook.float(), dim=-1).to(dtype)


def topk_indices_torch(x: Tensor, codebook: Tensor, k: int, block_size: int) -> Tensor:
    """(..., T, k) indices of the best codes, best first, scoring at most ~4M pairs at a time.
    Leading dims of x (..., T, d) and codebook (..., N, d) are groups, batched in each matmul."""
    cdtype = torch.promote_types(x.dtype, codebook.dtype)
    x, codes = x.to(cdtype), _normalised_codes(codebook, cdtype)
    T, N = x.shape[-2], codes.shape[-2]
    groups = x[..., :1, :1].numel()
    block = max(1, min(block_size, N))
    token_chunk = max(1, _TORCH_TILE_ELEMS // (block * groups))
    out = torch.empty(*x.shape[:-1], k, dtype=torch.long, device=x.device)
    for t0 in range(0, T, token_chunk):
        xt = x[..., t0 : t0 + token_chunk, :]
        best_v = best_i = None
        for n0 in range(0, N, block):
            scores = (xt @ codes[..., n0 : n0 + block, :].transpose(-1, -2)).float()
            # k=1: a max reduction (vectorised) instead of topk's selection (~5x slower on CPU)
            v, i = scores.max(-1, keepdim=True) if k == 1 else scores.topk(min(k, scores.shape[-1]), dim=-1)
            i += n0
            if best_v is not None:  # merge: top-k of (running top-k U this block's top-k)
                v, order = torch.cat([best_v, v], -1).topk(min(k, best_v.shape[-1] + v.shape[-1]), dim=-1)
                i = torch.cat([best_i, i], -1).gather(-1, order)
            best_v, best_i = v, i
        out[..., t0 : t0 + token_chunk, :] = best_i
    return out


def gather_codes(codebook: Tensor, indices: Tensor, mean: bool) -> Tensor:
    """Sum (or mean) of the selected rows, accumulated in fp32 without a (T, k, d) temporary."""
    out = torch.zeros(indices.shape[0], codebook.shape[1], dtype=torch.float32, device=codebook.device)
    for j in range(indices.shape[1]):
        out += codebook.index_select(0, indices[:, j])
    if mean:
        out /= indices.shape[1]
    return out.to(codebook.dtype)


def scatter_code_grads(grad_out: Tensor, indices: Tensor, num_codes: int, mean: bool) -> Tensor:
    """Straight-through codebook gradient: each selected row gets grad_out (/k for mean), fp32."""
    g = grad_out.float() / indices.shape[1] if mean else grad_out.float()
    grad = torch.zeros(num_codes, grad_out.shape[1], dtype=torch.float32, device=grad_out.device)
    for j in range(indices.shape[1]):
        grad.index_add_(0, indices[:, j], g)
    return grad


# --------------------------------------------------------------------------- op
@torch.library.custom_op("athanor::codebook_topk", mutates_args=())
def _codebook_topk_op(
    x: Tensor, codebook: Tensor, k: int, mean: bool, block_size: int, backend: str, groups: int = 1
) -> tuple[Tensor, Tensor]:
    """(out (T, d) in codebook dtype, indices (T, k) long, best first).

    ``groups`` > 1: x is G stacked (T/G, d) blocks and codebook G stacked (N/G, d) codebooks;
    block g is scored against codebook g only, and indices point into the stacked codebook
    (so gather and the straight-through scatter below need no change)."""
    xg, cg = x.view(groups, -1, x.shape[-1]), codebook.view(groups, -1, codebook.shape[-1])
    if backend == "triton":
        from .codebook_triton import topk_indices_triton

        indices = torch.stack([topk_indices_triton(xg[g], cg[g], k, block_size) for g in range(groups)])
    else:
        indices = topk_indices_torch(xg, cg, k, block_size)
    offsets = torch.arange(groups, device=x.device).view(groups, 1, 1) * cg.shape[1]
    indices = (indices + offsets).view(-1, k)
    return gather_codes(codebook, indices, mean), indices


@_codebook_topk_op.register_fake
def _(x, codebook, k, mean, block_size, backend, groups=1):
    T, d = x.shape
    return x.new_empty((T, d), dtype=codebook.dtype), x.new_empty((T, k), dtype=torch.long)


def _setup(ctx, inputs, output):
    x, codebook, k, mean = inputs[:4]
    _, indices = output
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(indices)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the indices
    ctx.save_for_backward(indices)
    ctx.mean, ctx.num_codes = mean, codebook.shape[0]
    ctx.x_dtype, ctx.code_dtype = x.dtype, codebook.dtype


def _backward(ctx, grad_out, _grad_indices):
    (indices,) = ctx.saved_tensors
    need = ctx.needs_input_grad
    rest = (None,) * (ctx.n_inputs - 2)
    if grad_out is None:
        return (None, None) + rest
    grad_x = grad_out.to(ctx.x_dtype) if need[0] else None
    grad_c = scatter_code_grads(grad_out, indices, ctx.num_codes, ctx.mean).to(ctx.code_dtype) if need[1] else None
    return (grad_x, grad_c) + rest


_codebook_topk_op.register_autograd(_backward, setup_context=_setup)


# --------------------------------------------------------------------------- public API
def codebook_topk(
    x: Tensor, codebook: Tensor, k: int = 1, *, reduce: str = "sum", block_size: Optional[int] = None
) -> tuple[Tensor, Tensor]:
    """k most cosine-similar codes per row of ``x`` and their sum/mean; see module docstring.

    Grouped form (all heads of a layer in one call): x (G, T, d) and one codebook per group
    (G, N, d) give out (G, T, d) and indices (G, T, k) into each group's own codebook.
    ``block_size``: codes scored per step (default 4096 for torch, 64 for Triton).
    """
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    grouped = x.dim() == 3 and codebook.dim() == 3 and x.shape[0] == codebook.shape[0]
    if not (grouped or (x.dim() == 2 and codebook.dim() == 2)) or x.shape[-1] != codebook.shape[-1]:
        raise ValueError(f"need x (T, d) and codebook (N, d), or x (G, T, d) and codebook (G, N, d), "
                         f"got {tuple(x.shape)} and {tuple(codebook.shape)}")
    if not 1 <= k <= codebook.shape[-2]:
        raise ValueError(f"k must be in [1, {codebook.shape[-2]}], got {k}")
    backend = resolve_backend(x.device)
    if backend == "reference":
        return reference_codebook_topk(x, codebook, k, reduce=reduce)
    if block_size is None:
        block_size = 64 if backend == "triton" else 4096
    if not grouped:
        return _codebook_topk_op(x.contiguous(), codebook.contiguous(), int(k), reduce == "mean", int(block_size), backend)
    G, T, d = x.shape
    out, indices = _codebook_topk_op(x.reshape(G * T, d).contiguous(), codebook.reshape(-1, d).contiguous(), int(k),
                                     reduce == "mean", int(block_size), backend, G)
    offsets = torch.arange(G, device=x.device).view(G, 1, 1) * codebook.shape[1]
    return out.view(G, T, d), indices.view(G, T, k) - offsets


class CodebookTopK(nn.Module):
    """A codebook (N, d) parameter; ``forward(x)`` returns (codes, indices) for x (..., d)."""

    def __init__(self, num_codes: int, dim: int, k: int = 1, *, reduce: str = "sum", device=None, dtype=None):
        super().__init__()
        self.k, self.reduce = k, reduce
        self.codebook = nn.Parameter(torch.randn(num_codes, dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out, indices = codebook_topk(x.reshape(-1, x.shape[-1]), self.codebook, self.k, reduce=self.reduce)
        return out.reshape(x.shape[:-1] + out.shape[-1:]), indices.reshape(*x.shape[:-1], self.k)

    def extra_repr(self) -> str:
        return f"num_codes={self.codebook.shape[0]}, dim={self.codebook.shape[1]}, k={self.k}, reduce={self.reduce}"
