"""The Triton kernels themselves, on CPU, under Triton's interpreter (TRITON_INTERPRET=1).

``triton.jit`` reads TRITON_INTERPRET when a kernel is *defined*, so it cannot be switched
on inside an ordinary pytest process that may already have defined kernels.  In a normal
run only ``test_kernels_in_interpreter`` runs: it re-runs this file in a child process with
TRITON_INTERPRET=1 and ATHANOR_KERNELS=triton, where the other tests run (and this one
skips).  ``TRITON_INTERPRET=1 ATHANOR_KERNELS=triton pytest <this file>`` runs them directly.

Shapes are tiny (the interpreter costs ~ms per program) but chosen to hit every masked
edge: vocabularies spanning several tiles with a ragged last tile, head_dim that is not a
power of two, row counts that need the strided backward loop, k that is not a power of two.
bf16 cases check the kernels' upcast-after-load (the interpreter's bf16 math is wrong).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from athanor.kernels import (
    codebook_topk,
    fused_linear_cross_entropy,
    head_norm,
    reference_codebook_topk,
    reference_head_norm,
    reference_linear_cross_entropy,
    resolve_backend,
    triton_available,
)

IN_CHILD = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("ATHANOR_KERNELS") == "triton"
pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
child_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the TRITON_INTERPRET=1 child process")
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.mark.skipif(IN_CHILD, reason="this is the child process")
def test_kernels_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "ATHANOR_KERNELS": "triton", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    # Everything ran in the child: the only skip there is this launcher test itself.
    last_line = res.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"[1-9]\d* passed, 1 skipped in .*", last_line), res.stdout[-2000:]


def assert_close(actual, expected, dtype, what):
    actual, expected = actual.detach().float(), expected.detach().float()
    assert torch.isfinite(actual).all(), f"{what}: non-finite"
    err = (actual - expected).abs().max().item()
    bound = TOL[dtype] * max(1.0, expected.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


@child_only
def test_child_really_uses_triton():
    assert resolve_backend(torch.device("cpu")) == "triton"
    head_norm(torch.randn(2, 2, 8))
    assert "athanor.kernels.headnorm_triton" in sys.modules


@child_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,V,chunk", [(1, 7, None), (13, 300, 5)], ids=["single-token", "multi-tile"])
def test_linear_ce_kernel(monkeypatch, dtype, T, V, chunk):
    from athanor.kernels import linear_ce_triton

    monkeypatch.setattr(linear_ce_triton, "MAX_BLOCK_V", 128)  # V=300 -> 3 tiles, last one ragged
    g = torch.Generator().manual_seed(T + V)
    h = torch.randn(T, 16, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, 16, generator=g) / 4).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) / 10).to(dtype).requires_grad_()
    y = torch.randint(0, V, (T,), generator=g)
    y[1::3] = -100
    kw = dict(bias=b, z_loss_weight=1e-2)
    out = fused_linear_cross_entropy(h, w, y, chunk_size=chunk, **kw)
    ref = reference_linear_cross_entropy(h, w, y, **kw)
    for name in ref._fields:
        assert_close(getattr(out, name), getattr(ref, name), dtype, name)
    for name, got, want in zip("hwb", torch.autograd.grad(out.loss, (h, w, b)), torch.autograd.grad(ref.loss, (h, w, b))):
        assert_close(got, want, dtype, f"d{name}")


@child_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("shape,per_head", [((130, 2, 24), True), ((3, 1, 3, 8), False)], ids=["strided-bwd", "small"])
def test_head_norm_kernels(dtype, kind, shape, per_head):
    g = torch.Generator().manual_seed(len(kind) + shape[0])
    H, D = shape[-2:]
    pshape = (H, D) if per_head else (D,)
    x = (torch.randn(shape, generator=g) * 2 - 1).to(dtype).requires_grad_()
    w = (torch.randn(pshape, generator=g) * 0.3 + 1).to(dtype).requires_grad_()
    b = (torch.randn(pshape, generator=g) * 0.3).to(dtype).requires_grad_()
    y, ref = head_norm(x, w, b, kind=kind), reference_head_norm(x, w, b, kind=kind)
    assert_close(y, ref, dtype, "y")
    dy = torch.randn(shape, generator=g).to(dtype)
    for name, got, want in zip("xwb", torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(ref, (x, w, b), dy)):
        assert_close(got, want, dtype, f"d{name}")
    assert_close(head_norm(x, kind=kind), reference_head_norm(x, kind=kind), dtype, "no affine")


@child_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 5])
def test_codebook_kernel(dtype, k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(37, 40, generator=g).to(dtype).requires_grad_()  # 3 token tiles, d masked
    codes = (torch.randn(100, 40, generator=g) * torch.rand(100, 1, generator=g)).to(dtype).requires_grad_()
    out, idx = codebook_topk(x, codes, k, reduce="mean", block_size=16)  # 7 code tiles, last ragged
    ref_out, ref_idx = reference_codebook_topk(x, codes, k, reduce="mean")
    if dtype == torch.float32:
        assert torch.equal(idx, ref_idx)
        assert_close(out, ref_out, dtype, "out")
    else:  # compare the cosine similarity of what was chosen: bf16 may swap near-ties
        xn = torch.nn.functional.normalize(x.detach().float(), dim=-1)
        cn = torch.nn.functional.normalize(codes.detach().float(), dim=-1)
        sims = lambda i: torch.einsum("td,tkd->tk", xn, cn[i])  # noqa: E731
        assert_close(sims(idx), sims(ref_idx), dtype, "similarities")
    g_out = torch.randn_like(out)
    gx, gc = torch.autograd.grad(out, (x, codes), g_out)
    assert torch.equal(gx, g_out)
    want = torch.zeros(100, 40).index_add_(0, idx.flatten(), g_out.float().repeat_interleave(k, 0) / k)
    assert_close(gc, want.to(dtype), dtype, "dcodebook")
