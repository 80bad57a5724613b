"""Triton kernels for ``head_norm`` (formulas in ``headnorm.py``).

``x`` is viewed as (M, H, D) with M = prod(leading dims).  The grid is (row blocks, H):
each program works on BLOCK_M rows of one head, so it loads that head's weight/bias row
once, and in backward it can sum its rows' contribution to dW/dB for that head in
registers.  Backward programs stride over row blocks and write one (D,) partial per
(program, head); torch sums the (G, H, D) partials, which keeps the reduction
deterministic (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import interpreter_enabled, next_power_of_2


@triton.jit(do_not_specialize=["M"])  # token counts vary; no recompiles
def _fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
    M, H, D, stride_wh, stride_bh, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, RMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask, cmask = rows < M, cols < D
    mask = rmask[:, None] & cmask[None, :]
    stat = rows.to(tl.int64) * H + head  # index of (row, head) in the (M, H) statistics
    offs = stat[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        centred = x
    else:
        mean = tl.sum(x, axis=1) / D
        centred = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(mean_ptr + stat, mean, mask=rmask)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / D + eps)
    tl.store(rstd_ptr + stat, rstd, mask=rmask)
    y = centred * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + head * stride_wh + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + head * stride_bh + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])  # token counts vary; no recompiles
def _bwd_kernel(
    dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr,
    M, H, D, stride_wh,
    HAS_W: tl.constexpr, RMS: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid, head, n_prog = tl.program_id(0), tl.program_id(1), tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    if HAS_W:
        w = tl.load(w_ptr + head * stride_wh + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for block in range(pid, tl.cdiv(M, BLOCK_M), n_prog):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        stat = rows.to(tl.int64) * H + head
        offs = stat[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + stat, mask=rmask, other=0.0)
        if RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(mean_ptr + stat, mask=rmask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        gw = g
        if HAS_W:
            gw = g * w[None, :]
        dx = gw - xhat * (tl.sum(gw * xhat, axis=1) / D)[:, None]
        if not RMS:
            dx = dx - (tl.sum(gw, axis=1) / D)[:, None]
        tl.store(dx_ptr + offs, (dx * rstd[:, None]).to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw_acc += tl.sum(g * xhat, axis=0)
        if NEED_DB:
            db_acc += tl.sum(g, axis=0)
    part = (pid * H + head) * D + cols
    if NEED_DW:
        tl.store(dw_ptr + part, dw_acc, mask=cmask)
    if NEED_DB:
        tl.store(db_ptr + part, db_acc, mask=cmask)


def _tiles(D: int) -> tuple[int, int, int]:
    block_d = next_power_of_2(D)
    # ~1k elements per 4-warp program: the backward kernel then needs ~80-140 registers
    # for head_dim 64-256 on sm80/sm90 (4k elements spilled, per cuobjdump).
    block_m = max(1, min(64, 1024 // block_d))
    num_warps = 1 if interpreter_enabled() else (4 if block_d <= 1024 else 8)
    return block_d, block_m, num_warps


def _head_stride(p):
    """Row stride of a (D,) or (H, D) parameter; 0 broadcasts one row to every head."""
    return 0 if p is None or p.dim() == 1 else p.stride(0)


def head_norm_fwd_triton(x, weight, bias, eps, rms):
    H, D = x.shape[-2], x.shape[-1]
    M = x.numel() // max(H * D, 1)
    x = x.contiguous()
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = torch.empty_like(x)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    mean = torch.empty(0, dtype=torch.float32, device=x.device) if rms else torch.empty_like(rstd)
    if x.numel() == 0:
        return y, mean, rstd
    block_d, block_m, num_warps = _tiles(D)
    _fwd_kernel[(triton.cdiv(M, block_m), H)](
        x, weight if weight is not None else x, bias if bias is not None else x, y,
        mean if not rms else rstd, rstd,
        M, H, D, _head_stride(weight), _head_stride(bias), float(eps),
        HAS_W=weight is not None, HAS_B=bias is not None, RMS=rms,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )
    return y, mean, rstd


def head_norm_bwd_triton(dy, x, weight, mean, rstd, rms, need_dw, need_db):
    H, D = x.shape[-2], x.shape[-1]
    M = x.numel() // max(H * D, 1)
    dy, x = dy.contiguous(), x.contiguous()
    weight = None if weight is None else weight.contiguous()
    dx = torch.empty_like(x)
    block_d, block_m, num_warps = _tiles(D)
    n_blocks = triton.cdiv(M, block_m)
    if x.is_cuda:
        # About four programs per SM in total, so the partial buffers stay small.
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        grid_m = max(1, min(n_blocks, 4 * sms // max(H, 1)))
    else:
        grid_m = min(n_blocks, 2)  # interpreter: still exercise the strided loop and the partial sum
    f32 = dict(dtype=torch.float32, device=x.device)
    dw_part = torch.zeros(grid_m, H, D, **f32) if need_dw else torch.empty(0, **f32)
    db_part = torch.zeros(grid_m, H, D, **f32) if need_db else torch.empty(0, **f32)
    if x.numel() > 0:
        _bwd_kernel[(grid_m, H)](
            dy, x, weight if weight is not None else x, mean if not rms else rstd, rstd,
            dx, dw_part if need_dw else dx, db_part if need_db else dx,
            M, H, D, _head_stride(weight),
            HAS_W=weight is not None, RMS=rms, NEED_DW=need_dw, NEED_DB=need_db,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        )
    dw = dw_part.sum(0) if need_dw else dw_part
    db = db_part.sum(0) if need_db else db_part
    return dx, dw, db
