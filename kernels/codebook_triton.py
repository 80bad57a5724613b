"""Triton kernel for ``codebook_topk``: tiled x . C_hat^T with a running top-k in registers.

Each program owns BLOCK_T tokens and walks the codebook in BLOCK_N-code tiles.  For a
tile it computes the (BLOCK_T, BLOCK_N) scores with ``tl.dot`` (looping over d in BLOCK_D
slices), then merges them into a per-row list of K best (value, index) pairs:

* the list is unsorted; ``K`` rounds each take the tile's largest remaining score per
  row and, if it beats the row's current minimum, overwrite that minimum slot.  Inserting
  candidates in descending order this way yields exactly top-K(list U tile);
* the list is padded to a power of two KP with +inf so padding is never the minimum;
* a tile that no row can improve (its best score <= every row's current minimum) is
  skipped after the GEMM, which is the common case once the list has filled up.

The K winners per row come back unsorted; the launcher sorts them (a (T, K) sort).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import interpreter_enabled, next_power_of_2


@triton.jit(do_not_specialize=["T"])  # token counts vary; no recompiles
def _topk_kernel(
    x_ptr, c_ptr, val_ptr, idx_ptr, T, N, D, stride_x, stride_c,
    K: tl.constexpr, KP: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    slots = tl.arange(0, KP)
    best_v = tl.where(slots[None, :] < K, float("-inf"), float("inf")) + tl.zeros((BLOCK_T, KP), tl.float32)
    best_i = tl.zeros((BLOCK_T, KP), dtype=tl.int32)

    for n0 in range(0, N, BLOCK_N):
        codes = n0 + tl.arange(0, BLOCK_N)
        nmask = codes < N
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dmask = dims < D
            a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + dims[None, :],
                        mask=rmask[:, None] & dmask[None, :], other=0.0)
            b = tl.load(c_ptr + codes[:, None].to(tl.int64) * stride_c + dims[None, :],
                        mask=nmask[:, None] & dmask[None, :], other=0.0)
            if UPCAST:  # fp32 inputs, or the interpreter (whose bf16 arithmetic is wrong)
                acc += tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
            else:  # bf16/fp16 tensor cores, fp32 accumulation
                acc += tl.dot(a, tl.trans(b))
        scores = tl.where(nmask[None, :], acc, float("-inf"))

        worst = tl.min(best_v, axis=1)
        if tl.max(tl.max(scores, axis=1) - worst, axis=0) > 0:
            for _ in range(K):
                top = tl.max(scores, axis=1)
                # lowest code index among the row's maxima (deterministic ties)
                arg = tl.min(tl.where(scores == top[:, None], codes[None, :], N), axis=1)
                worst = tl.min(best_v, axis=1)
                slot = tl.min(tl.where(best_v == worst[:, None], slots[None, :], KP), axis=1)
                put = (slots[None, :] == slot[:, None]) & (top > worst)[:, None]
                best_v = tl.where(put, top[:, None], best_v)
                best_i = tl.where(put, arg[:, None], best_i)
                scores = tl.where(codes[None, :] == arg[:, None], float("-inf"), scores)

    out = rows[:, None].to(tl.int64) * K + slots[None, :]
    omask = rmask[:, None] & (slots[None, :] < K)
    tl.store(val_ptr + out, best_v, mask=omask)
    tl.store(idx_ptr + out, best_i, mask=omask)


def topk_indices_triton(x: torch.Tensor, codebook: torch.Tensor, k: int, block_size: int) -> torch.Tensor:
    """(T, k) long indices of the most cosine-similar codes, best first."""
    cdtype = torch.promote_types(x.dtype, codebook.dtype)
    x = x.to(cdtype).contiguous()
    codes = F.normalize(codebook.float(), dim=-1).to(cdtype).contiguous()
    T, D = x.shape
    N = codes.shape[0]
    vals = torch.empty(T, k, dtype=torch.float32, device=x.device)
    idx = torch.empty(T, k, dtype=torch.int32, device=x.device)
    if T > 0:
        interp = interpreter_enabled()
        upcast = interp or cdtype == torch.float32
        block_t = 16 if interp else 64
        block_n = max(16, min(next_power_of_2(block_size), 64))
        # Tile sizes from sm80/sm90 register counts (cuobjdump, see
        # tests/test_kernels_triton_compile.py): 64x64 tiles, 8 warps and d-slices of 16
        # (one bf16 MMA deep) stay at 100-185 registers without spills; wider slices spill.
        block_d = 16
        _topk_kernel[(triton.cdiv(T, block_t),)](
            x, codes, vals, idx, T, N, D, x.stride(0), codes.stride(0),
            K=k, KP=next_power_of_2(k), UPCAST=upcast,
            BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4 if interp else 8,
        )
    order = vals.sort(dim=1, descending=True, stable=True).indices
    return idx.long().gather(1, order)
