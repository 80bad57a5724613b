r"""Triton step of the fused linear cross-entropy: one chunk of fp32 logits -> log Z, CE, dL/dz.

The GEMMs stay in cuBLAS (see ``linear_ce.py``); this kernel replaces the softmax
bookkeeping, which in eager torch costs several full passes over the chunk.  One program
per token row makes two passes over the vocabulary:

1. online log-sum-exp: :math:`m \leftarrow \max(m, \max_j z_j)`,
   :math:`s \leftarrow s\,e^{m_\text{old}-m} + \sum_j e^{z_j - m}`, :math:`\log Z = m + \log s`;
2. :math:`g_j = \frac{[y\ne\text{ignore}]}{n}\big(e^{z_j-\log Z}(1+2w_z\log Z) - [j=y]\big)`,
   written in the GEMM dtype straight into the buffer the backward GEMMs read.

Only imported when the Triton backend is used, so CPU-only installs never import triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import interpreter_enabled, next_power_of_2

# Upper bound on the vocabulary tile; tests lower it to exercise the multi-tile loop.
MAX_BLOCK_V = 4096


@triton.jit
def _ce_chunk_kernel(
    logits_ptr, grad_ptr, targets_ptr, log_z_ptr, ce_ptr, inv_n_ptr,
    V, stride_logits, stride_grad, ignore_index, z_loss_weight,
    NEED_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits
    y = tl.load(targets_ptr + row)
    valid = y != ignore_index
    safe_y = tl.where(valid, y, 0)

    # Pass 1: running max m and rescaled sum s of exp(z - m) over vocabulary tiles.
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(logits_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    log_z = m + tl.log(s)
    z_y = tl.load(logits_row + safe_y).to(tl.float32)
    tl.store(log_z_ptr + row, log_z)
    tl.store(ce_ptr + row, tl.where(valid, log_z - z_y, 0.0))

    if NEED_GRAD:
        # Pass 2: the closed-form gradient; ignored rows get exact zeros.
        scale = tl.where(valid, tl.load(inv_n_ptr), 0.0)
        coef = scale * (1.0 + 2.0 * z_loss_weight * log_z)
        grad_row = grad_ptr + row * stride_grad
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = tl.load(logits_row + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.where(valid, tl.exp(z - log_z) * coef, 0.0)
            g = tl.where(cols == safe_y, g - scale, g)
            tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


def ce_chunk_triton(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, z_loss_weight: float,
    inv_n: torch.Tensor, need_grad: bool, grad_dtype: torch.dtype,
):
    """Same contract as ``linear_ce.ce_chunk_torch`` but the gradient comes back in ``grad_dtype``.

    For fp32 the gradient overwrites ``logits`` (each element is read before it is written
    by the same program); for half dtypes it goes to a new half buffer.
    """
    C, V = logits.shape
    logits = logits.contiguous()
    targets = targets.contiguous()
    log_z = torch.empty(C, dtype=torch.float32, device=logits.device)
    ce = torch.empty_like(log_z)
    if need_grad:
        grad = logits if grad_dtype == torch.float32 else torch.empty(C, V, dtype=grad_dtype, device=logits.device)
    else:
        grad = logits  # never written (NEED_GRAD=False)
    block_v = min(MAX_BLOCK_V, next_power_of_2(V))
    num_warps = 4 if interpreter_enabled() else min(32, max(4, block_v // 256))
    _ce_chunk_kernel[(C,)](
        logits, grad, targets, log_z, ce, inv_n.to(torch.float32).reshape(1),
        V, logits.stride(0), grad.stride(0), ignore_index, float(z_loss_weight),
        NEED_GRAD=need_grad, BLOCK_V=block_v, num_warps=num_warps,
    )
    return log_z, ce, (grad if need_grad else None)
