r"""LayerNorm / RMSNorm over the head dimension, for qk-layernorm.

``x`` has shape (..., H, D); every (.., head) row of length D is normalised on its own,
with an optional affine ``weight``/``bias`` shared by all heads (shape (D,)) or per head
(shape (H, D)).  Statistics are fp32 for every input dtype.

LayerNorm: :math:`\mu = \tfrac1D\sum_j x_j,\ r = (\tfrac1D\sum_j (x_j-\mu)^2 + \epsilon)^{-1/2},\
\hat x = (x-\mu)\,r`.  RMSNorm: :math:`\mu = 0,\ r = (\tfrac1D\sum_j x_j^2 + \epsilon)^{-1/2}`.
Output :math:`y = \hat x \odot w + b`.

Backward, with :math:`\hat g = g \odot w` (:math:`g = \partial L/\partial y`):

.. math::
    \partial x = r\Big(\hat g - \hat x\,\overline{\hat g \hat x} - [\text{LN}]\,\overline{\hat g}\Big),\qquad
    \partial w = \sum_\text{rows} g \odot \hat x,\qquad \partial b = \sum_\text{rows} g

(overline = mean over D).  Only :math:`\mu` and :math:`r` are saved for backward, not
:math:`\hat x`, so the op keeps one activation-sized tensor less than eager autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._backend import resolve_backend

KINDS = ("layernorm", "rmsnorm")


# --------------------------------------------------------------------------- reference
def reference_head_norm(
    x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, *,
    eps: float = 1e-5, kind: str = "layernorm",
) -> Tensor:
    """The truth: ``F.layer_norm`` / ``F.rms_norm`` in fp32 over the last dimension, plain autograd."""
    xf = x.float()
    if kind == "layernorm":
        y = F.layer_norm(xf, xf.shape[-1:], eps=eps)
    elif kind == "rmsnorm":
        y = F.rms_norm(xf, xf.shape[-1:], eps=eps)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# --------------------------------------------------------------------------- torch path
# fp32 throughout, with in-place updates so the path holds ~2 activation-sized temporaries.
def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """sum_j a_j b_j over the last dim, without an a*b temporary."""
    return torch.einsum("...d,...d->...", a, b)


def _fwd_torch(x, weight, bias, eps, rms):
    xf = x.float()
    D = x.shape[-1]
    if rms:
        mean = xf.new_empty(0)
        rstd = torch.rsqrt(_rowdot(xf, xf).div_(D).add_(eps))
        y = xf * rstd.unsqueeze(-1)
    else:  # aten's fused kernel returns the statistics we need for backward
        y, mean, rstd = torch.native_layer_norm(xf, (D,), None, None, eps)
        mean, rstd = mean.squeeze(-1), rstd.squeeze(-1)
    if weight is not None:
        y.mul_(weight)
    if bias is not None:
        y.add_(bias)
    return y.to(x.dtype), mean, rstd


def _bwd_torch(dy, x, weight, mean, rstd, rms, need_dw, need_db):
    H, D = x.shape[-2], x.shape[-1]
    r = rstd.unsqueeze(-1)
    g, xf = dy.float(), x.float()
    gw = g * weight if weight is not None else g
    if rms:
        xhat = xf * r
        dx = (gw - xhat * _rowdot(gw, xhat).div_(D).unsqueeze(-1)).mul_(r)
    else:  # aten's fused LayerNorm backward, fed the affine-scaled gradient
        dx = torch.ops.aten.native_layer_norm_backward(
            gw, xf, (D,), mean.unsqueeze(-1), r, None, None, [True, False, False]
        )[0]
        xhat = (xf - mean.unsqueeze(-1)).mul_(r) if need_dw else None
    dw = xhat.mul_(g).reshape(-1, H, D).sum(0) if need_dw else x.new_empty(0)
    db = g.reshape(-1, H, D).sum(0) if need_db else x.new_empty(0)
    return dx.to(x.dtype), dw, db


# --------------------------------------------------------------------------- ops
@torch.library.custom_op("athanor::head_norm_fwd", mutates_args=())
def _head_norm_fwd(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, rms: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd); mean and rstd are fp32 with shape x.shape[:-1] (mean is empty for RMSNorm)."""
    if backend == "triton":
        from .headnorm_triton import head_norm_fwd_triton

        return head_norm_fwd_triton(x, weight, bias, eps, rms)
    return _fwd_torch(x, weight, bias, eps, rms)


@_head_norm_fwd.register_fake
def _(x, weight, bias, eps, rms, backend):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    mean = x.new_empty(0, dtype=torch.float32) if rms else torch.empty_like(stats)
    return torch.empty_like(x), mean, stats


@torch.library.custom_op("athanor::head_norm_bwd", mutates_args=())
def _head_norm_bwd(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
    rms: bool, need_dw: bool, need_db: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw, db) with dw/db per head, shape (H, D) fp32 (empty when not needed)."""
    if backend == "triton":
        from .headnorm_triton import head_norm_bwd_triton

        return head_norm_bwd_triton(dy, x, weight, mean, rstd, rms, need_dw, need_db)
    return _bwd_torch(dy, x, weight, mean, rstd, rms, need_dw, need_db)


@_head_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, rms, need_dw, need_db, backend):
    hd = x.shape[-2:]
    return (
        torch.empty_like(x),
        x.new_empty(hd if need_dw else 0, dtype=torch.float32),
        x.new_empty(hd if need_db else 0, dtype=torch.float32),
    )


def _setup(ctx, inputs, output):
    x, weight, bias, _eps, rms, backend = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.rms, ctx.backend = rms, backend
    ctx.has_bias = bias is not None
    ctx.weight_shape = None if weight is None else weight.shape
    ctx.bias_shape = None if bias is None else bias.shape
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _reduce_param_grad(g_hd: Tensor, shape, dtype) -> Tensor:
    """Per-head (H, D) fp32 gradient -> the parameter's own shape and dtype."""
    return (g_hd if len(shape) == 2 else g_hd.sum(0)).to(dtype)


def _backward(ctx, dy, *_unused):
    x, weight, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    if dy is None:
        return None, None, None, None, None, None
    need_dw = weight is not None and need[1]
    need_db = ctx.has_bias and need[2]
    dx, dw, db = _head_norm_bwd(dy, x, weight, mean, rstd, ctx.rms, need_dw, need_db, ctx.backend)
    return (
        dx if need[0] else None,
        _reduce_param_grad(dw, ctx.weight_shape, ctx.weight_dtype) if need_dw else None,
        _reduce_param_grad(db, ctx.bias_shape, ctx.bias_dtype) if need_db else None,
        None, None, None,
    )


_head_norm_fwd.register_autograd(_backward, setup_context=_setup)


# --------------------------------------------------------------------------- public API
def _check_param(p: Optional[Tensor], name: str, H: int, D: int) -> None:
    if p is not None and tuple(p.shape) not in ((D,), (H, D)):
        raise ValueError(f"{name} must have shape ({D},) or ({H}, {D}), got {tuple(p.shape)}")


def head_norm(
    x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, *,
    eps: float = 1e-5, kind: str = "layernorm",
) -> Tensor:
    """Normalise each head of ``x`` (..., n_heads, head_dim) over head_dim; see module docstring."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if x.dim() < 2:
        raise ValueError(f"x must be (..., n_heads, head_dim), got shape {tuple(x.shape)}")
    H, D = x.shape[-2], x.shape[-1]
    _check_param(weight, "weight", H, D)
    _check_param(bias, "bias", H, D)
    backend = resolve_backend(x.device)
    if backend == "reference":
        return reference_head_norm(x, weight, bias, eps=eps, kind=kind)
    return _head_norm_fwd(x.contiguous(), weight, bias, float(eps), kind == "rmsnorm", backend)[0]


class HeadNorm(nn.Module):
    """qk-norm layer: ``HeadNorm(head_dim, n_heads, per_head=True)(q)`` for q (B, S, H, D).

    ``bias`` defaults to True for LayerNorm and False for RMSNorm; ``per_head`` gives each
    head its own affine parameters (shape (H, D)) instead of sharing one (D,) pair.
    """

    def __init__(
        self, head_dim: int, n_heads: Optional[int] = None, *, kind: str = "layernorm",
        eps: float = 1e-5, elementwise_affine: bool = True, bias: Optional[bool] = None,
        per_head: bool = False, device=None, dtype=None,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if per_head and n_heads is None:
            raise ValueError("per_head=True needs n_heads")
        self.kind, self.eps = kind, eps
        shape = (n_heads, head_dim) if per_head else (head_dim,)
        factory = dict(device=device, dtype=dtype)
        use_bias = (kind == "layernorm") if bias is None else bias
        self.weight = nn.Parameter(torch.ones(shape, **factory)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(shape, **factory)) if elementwise_affine and use_bias else None

    def forward(self, x: Tensor) -> Tensor:
        return head_norm(x, self.weight, self.bias, eps=self.eps, kind=self.kind)

    def extra_repr(self) -> str:
        shape = None if self.weight is None else tuple(self.weight.shape)
        return f"kind={self.kind}, eps={self.eps}, weight={shape}, bias={self.bias is not None}"
