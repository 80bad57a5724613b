r"""Fused linear + cross-entropy + z-loss, never holding the full tokens x vocab logits.

For hidden states :math:`h \in R^{T\times d}`, an output projection :math:`W \in R^{V\times d}`
(optional bias :math:`b`) and targets :math:`y`, with :math:`\mathcal V` the tokens whose
target is not ``ignore_index`` and :math:`n = |\mathcal V|`:

.. math::
    z_i = W h_i + b,\qquad \log Z_i = \operatorname{logsumexp}_j z_{ij}

    \text{ce} = \frac1n \sum_{i\in\mathcal V} (\log Z_i - z_{i,y_i}),\qquad
    \text{z\_loss} = \frac1n \sum_{i\in\mathcal V} (\log Z_i)^2

    \text{loss} = \text{ce} + w_z\,\text{z\_loss}

The gradient w.r.t. the logits is known in closed form,

.. math::
    \frac{\partial\,\text{loss}}{\partial z_{ij}} = \frac{[i\in\mathcal V]}{n}
    \Big(p_{ij}\,(1 + 2 w_z \log Z_i) - [j = y_i]\Big),\qquad p_{ij} = e^{z_{ij} - \log Z_i}

so the forward pass walks over chunks of tokens, builds that chunk's logits, turns them
into :math:`\partial\text{loss}/\partial z` in place, and immediately folds them into
:math:`\partial h = G W` and :math:`\partial W \mathrel{+}= G^\top h` (the design of
Liger-Kernel's fused linear cross-entropy).  Backward only scales the stored gradients by
the incoming scalar gradient.  Peak extra memory is one chunk of logits plus the gradient
buffers, instead of several T x V tensors.

Precision: logits, the softmax statistics and the ``dW`` accumulator are fp32 for every
input dtype; the GEMMs take bf16/fp16 operands as they are (fp32 accumulation inside the
GEMM), so bf16 training pays no fp32-GEMM cost.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._backend import next_power_of_2, resolve_backend


class LinearCEOutput(NamedTuple):
    """``loss`` is differentiable; the rest are detached fp32 scalars for logging/probes."""

    loss: Tensor
    ce_loss: Tensor
    z_loss: Tensor
    log_z_mean: Tensor
    log_z_max: Tensor


# --------------------------------------------------------------------------- reference
def reference_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    z_loss_weight: float = 0.0,
) -> LinearCEOutput:
    """The truth: full fp32 logits, ``F.cross_entropy`` and ``logsumexp``, plain autograd."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    valid = targets != ignore_index
    n = valid.sum().clamp_min(1)
    log_z = torch.logsumexp(logits, dim=-1)
    ce = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum") / n
    z_loss = torch.where(valid, log_z.square(), 0.0).sum() / n
    loss = ce + z_loss_weight * z_loss
    return LinearCEOutput(loss, *_log_z_stats(ce, z_loss, log_z, valid, n))


def _log_z_stats(ce: Tensor, z_loss: Tensor, log_z: Tensor, valid: Tensor, n: Tensor):
    """Detached (ce, z_loss, mean log Z, max log Z) over valid tokens; zeros if none are."""
    log_z = log_z.detach()
    mean = torch.where(valid, log_z, 0.0).sum() / n
    masked = torch.where(valid, log_z, float("-inf"))
    top = masked.max() if masked.numel() else masked.new_tensor(float("-inf"))
    top = torch.where(valid.any(), top, 0.0)
    return ce.detach(), z_loss.detach(), mean, top


# --------------------------------------------------------------------------- GEMM helpers
# Whether torch's out_dtype GEMMs (half inputs -> fp32 result) work on a device type;
# they exist for CUDA (sm80+) but not for CPU, so we probe once and remember.
_OUT_DTYPE_OK: dict[str, bool] = {}


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` as fp32, without rounding half-precision results to 16 bits first when possible."""
    if a.dtype == torch.float32:
        return a @ b
    dev = a.device.type
    if _OUT_DTYPE_OK.get(dev, dev == "cuda"):
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _OUT_DTYPE_OK[dev] = True
            return out
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_OK[dev] = False
    return (a @ b).float()


def _addmm_fp32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` into an fp32 accumulator, in place (no parameter-sized temporary on CUDA)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    dev = a.device.type
    if _OUT_DTYPE_OK.get(dev, dev == "cuda"):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_OK[dev] = False
    acc += (a @ b).float()


def default_chunk_size(num_tokens: int, vocab: int, dim: int) -> int:
    """Tokens per chunk so one chunk of logits is about as big as ``hidden`` itself.

    chunk * V ~= T * d, rounded to a power of two, clamped to [1, T].
    """
    ratio = max(1, math.ceil(vocab / max(dim, 1)))
    return max(1, min(num_tokens, next_power_of_2(math.ceil(num_tokens / ratio))))


# --------------------------------------------------------------------------- chunk step (torch)
def ce_chunk_torch(
    logits: Tensor, targets: Tensor, ignore_index: int, z_loss_weight: float, inv_n: Tensor,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Per-row log Z and CE of an fp32 logits chunk; overwrites ``logits`` with d loss/d logits."""
    valid = targets != ignore_index
    safe_y = torch.where(valid, targets, 0).unsqueeze(1)
    log_z = torch.logsumexp(logits, dim=-1)
    ce = torch.where(valid, log_z - logits.gather(1, safe_y).squeeze(1), 0.0)
    if not need_grad:
        return log_z, ce, None
    scale = torch.where(valid, inv_n, 0.0)
    coef = scale * (1.0 + 2.0 * z_loss_weight * log_z)
    # p * coef - [j = y] * scale, in place so the chunk needs no second buffer.
    grad = logits.sub_(log_z.unsqueeze(1)).exp_().mul_(coef.unsqueeze(1))
    grad.scatter_add_(1, safe_y, -scale.unsqueeze(1))
    return log_z, ce, grad


# --------------------------------------------------------------------------- the op
def _outputs(h: Tensor, weight: Tensor, grad_hidden: bool, grad_weight: bool, grad_bias: bool):
    """Per-token log Z and CE (fp32), and the gradients asked for: dL/dhidden in the compute dtype,
    dL/dweight and dL/dbias as fp32 accumulators over the chunks (None when not asked for)."""
    T, V = h.shape[0], weight.shape[0]
    log_z = torch.empty(T, dtype=torch.float32, device=h.device)
    ce = torch.empty(T, dtype=torch.float32, device=h.device)
    gh = torch.empty_like(h) if grad_hidden else h.new_empty(0)
    gw = torch.zeros(V, weight.shape[1], dtype=torch.float32, device=weight.device) if grad_weight else None
    gb = torch.zeros(V, dtype=torch.float32, device=weight.device) if grad_bias else None
    return log_z, ce, gh, gw, gb


def linear_ce_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
    ignore_index: int, z_loss_weight: float, chunk_size: int,
    grad_hidden: bool, grad_weight: bool, grad_bias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Body of ``athanor::linear_cross_entropy`` (plain function, so tests can trace its memory).

    Returns (loss, stats = [ce, z_loss, mean log Z, max log Z], dL/dhidden, dL/dweight,
    dL/dbias); gradients that were not asked for are empty tensors.
    """
    if backend == "triton":
        from .linear_ce_triton import ce_chunk_triton as chunk_step
    else:
        chunk_step = None
    T = hidden.shape[0]
    # One compute dtype for the GEMMs (mixed inputs such as fp32 hidden + bf16 weight
    # are promoted once here, not once per chunk).
    cdtype = torch.promote_types(hidden.dtype, weight.dtype)
    h = hidden.to(cdtype).contiguous()
    w = weight.to(cdtype).contiguous()
    valid = targets != ignore_index
    n = valid.sum().clamp_min(1)
    inv_n = 1.0 / n.to(torch.float32)  # a device tensor: no host sync per step
    need_grad = grad_hidden or grad_weight or grad_bias

    log_z, ce, gh, gw, gb = _outputs(h, weight, grad_hidden, grad_weight, grad_bias)

    b32 = None if bias is None else bias.float()
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        hc = h[s:e]
        logits = _mm_fp32(hc, w.T)
        if b32 is not None:
            logits += b32
        if chunk_step is None:
            lz, c, g = ce_chunk_torch(logits, targets[s:e], ignore_index, z_loss_weight, inv_n, need_grad)
            g = None if g is None else g.to(cdtype)
        else:
            lz, c, g = chunk_step(logits, targets[s:e], ignore_index, z_loss_weight, inv_n, need_grad, cdtype)
        log_z[s:e] = lz
        ce[s:e] = c
        if grad_hidden:
            torch.mm(g, w, out=gh[s:e])
        if gw is not None:
            _addmm_fp32_(gw, g.T, hc)
        if gb is not None:
            gb += g.sum(0, dtype=torch.float32)
        del logits, g  # free this chunk before the next one is allocated

    ce_loss = ce.sum() * inv_n
    z_loss = torch.where(valid, log_z.square(), 0.0).sum() * inv_n
    loss = ce_loss + z_loss_weight * z_loss
    stats = torch.stack(_log_z_stats(ce_loss, z_loss, log_z, valid, n.to(torch.float32)))
    return (
        loss,
        stats,
        gh.to(hidden.dtype) if grad_hidden else hidden.new_empty(0),
        gw.to(weight.dtype) if gw is not None else hidden.new_empty(0),
        gb.to(bias.dtype) if gb is not None else hidden.new_empty(0),
    )


_linear_ce_op = torch.library.custom_op("athanor::linear_cross_entropy", linear_ce_forward, mutates_args=())


@_linear_ce_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, z_loss_weight, chunk_size,
      grad_hidden, grad_weight, grad_bias, backend):
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty(4, dtype=torch.float32),
        torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if grad_weight else hidden.new_empty(0),
        torch.empty_like(bias) if grad_bias else hidden.new_empty(0),
    )


def _setup(ctx, inputs, output):
    _, stats, gh, gw, gb = output
    ctx.mark_non_differentiable(stats, gh, gw, gb)
    # Otherwise autograd hands backward zero-filled "gradients" for these outputs: a
    # weight-sized allocation at the backward peak, for nothing.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(gh, gw, gb)
    hidden, weight, bias = inputs[:3]
    ctx.saved_shapes = {"hidden": hidden.shape, "weight": weight.shape, "bias": None if bias is None else bias.shape}


def _backward(ctx, g_loss, *_unused):
    gh, gw, gb = ctx.saved_tensors
    need = ctx.needs_input_grad
    if g_loss is None:
        return (None,) * 11
    for name, wanted, grad in (("hidden", need[0], gh), ("weight", need[1], gw), ("bias", need[2], gb)):
        if wanted and grad.shape != ctx.saved_shapes[name]:  # it was never computed
            raise RuntimeError(f"linear_cross_entropy: forward ran with grad_{name}=False, cannot backward into {name}")
    return (
        _scale(gh, g_loss) if need[0] else None,
        _scale(gw, g_loss) if need[1] else None,
        _scale(gb, g_loss) if need[2] else None,
        *([None] * 8),
    )


def _scale(grad: Tensor, g_loss: Tensor) -> Tensor:
    """grad * g_loss; in place for plain eager tensors.

    In place avoids a second weight-sized tensor at the backward peak (a second backward
    through the same graph then fails autograd's saved-tensor version check instead of
    double-scaling).  Traced graphs (torch.compile, AOT tracing with Fake/Functional tensor
    subclasses) must not mutate saved outputs, so they get a product.
    """
    if type(grad) is torch.Tensor and not torch.compiler.is_compiling():
        return grad.mul_(g_loss)
    return grad * g_loss


_linear_ce_op.register_autograd(_backward, setup_context=_setup)


# --------------------------------------------------------------------------- public API
def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    z_loss_weight: float = 0.0,
    chunk_size: Optional[int] = None,
) -> LinearCEOutput:
    """``CE(hidden @ weight.T + bias, targets) + z_loss_weight * mean(logZ^2)``, fused.

    hidden (T, d) or (..., d); weight (V, d); targets (T,) or (...) long.  Mean over tokens
    whose target is not ``ignore_index``; all-ignored input gives loss 0 and zero grads.
    """
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden dim {hidden.shape[-1]} != weight dim {weight.shape[-1]}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden rows but {targets.shape[0]} targets")
    backend = resolve_backend(hidden.device)
    if backend == "reference":
        return reference_linear_cross_entropy(
            hidden, weight, targets, bias=bias, ignore_index=ignore_index, z_loss_weight=z_loss_weight
        )
    T, V, d = hidden.shape[0], weight.shape[0], weight.shape[1]
    chunk = int(chunk_size) if chunk_size else default_chunk_size(T, V, d)
    grad_on = torch.is_grad_enabled()
    loss, stats, *_ = _linear_ce_op(
        hidden, weight, bias, targets, int(ignore_index), float(z_loss_weight), max(1, chunk),
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
        backend,
    )
    return LinearCEOutput(loss, *stats.detach().unbind(0))


class FusedLinearCrossEntropyLoss(nn.Module):
    """Module form: ``loss_fn(hidden, lm_head.weight, targets, bias=lm_head.bias)``."""

    def __init__(self, ignore_index: int = -100, z_loss_weight: float = 0.0, chunk_size: Optional[int] = None):
        super().__init__()
        self.ignore_index, self.z_loss_weight, self.chunk_size = ignore_index, z_loss_weight, chunk_size

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None) -> LinearCEOutput:
        return fused_linear_cross_entropy(
            hidden, weight, targets, bias=bias, ignore_index=self.ignore_index,
            z_loss_weight=self.z_loss_weight, chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, z_loss_weight={self.z_loss_weight}"
