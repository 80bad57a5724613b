"""athanor.kernels against their torch references: outputs, gradients, memory, registration.

Runs on CPU (the chunked torch path) and, when CUDA is present, also on CUDA (the Triton
kernels, compiled).  The Triton kernels are covered on CPU by
tests/test_kernels_triton_interpret.py under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from athanor.kernels import (
    CodebookTopK,
    HeadNorm,
    codebook_topk,
    fused_linear_cross_entropy,
    head_norm,
    reference_codebook_topk,
    reference_head_norm,
    reference_linear_cross_entropy,
    requested_backend,
    resolve_backend,
    use_backend,
)
from athanor.kernels import codebook as codebook_mod
from athanor.kernels import linear_ce as linear_ce_mod

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Max-abs error allowed, relative to the largest magnitude of the reference tensor.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors here are tiny: OpenMP hand-offs cost more than they save (3-4x on a busy
    2-core machine), so run single-threaded and restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_close(actual, expected, dtype, what=""):
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    bound = TOL[dtype] * max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def backend_for(device: str) -> str:
    return resolve_backend(torch.device(device))


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op produces while active."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


# =========================================================================== linear + CE
def lce_inputs(T, V, d, dtype, device, *, bias, seed, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, d, generator=g)
    weight = torch.randn(V, d, generator=g) / d**0.5
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    targets = torch.randint(0, V, (T,), generator=g)
    targets[1::4] = ignore_index  # every 4th row from the 2nd is ignored
    leaf = lambda t: None if t is None else t.to(device, dtype).requires_grad_()  # noqa: E731
    return leaf(hidden), leaf(weight), leaf(b), targets.to(device)


def grads_of(loss, tensors, scale):
    present = [t for t in tensors if t is not None]
    grads = iter(torch.autograd.grad(loss, present, torch.tensor(scale, device=loss.device)))
    return [None if t is None else next(grads) for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "T,V,d,chunk",
    [(1, 7, 5, None), (37, 53, 16, 8), (64, 301, 32, None)],
    ids=["single-token", "ragged-chunks", "odd-vocab"],
)
@pytest.mark.parametrize("bias,z_w,ignore_index", [(False, 0.0, -100), (True, 1e-2, -1)], ids=["plain", "bias-zloss"])
def test_linear_ce_matches_reference(device, dtype, T, V, d, chunk, bias, z_w, ignore_index):
    h, w, b, y = lce_inputs(T, V, d, dtype, device, bias=bias, seed=T * V + d, ignore_index=ignore_index)
    kw = dict(bias=b, ignore_index=ignore_index, z_loss_weight=z_w)
    out = fused_linear_cross_entropy(h, w, y, chunk_size=chunk, **kw)
    ref = reference_linear_cross_entropy(h, w, y, **kw)
    for name in ref._fields:
        assert_close(getattr(out, name), getattr(ref, name), dtype, name)
    for name in ("ce_loss", "z_loss", "log_z_mean", "log_z_max"):
        stat = getattr(out, name)
        assert stat.dtype == torch.float32 and stat.dim() == 0 and not stat.requires_grad, name
    assert out.loss.requires_grad
    # A non-unit upstream gradient checks that backward scales the stored gradients.
    got, want = grads_of(out.loss, (h, w, b), 0.7), grads_of(ref.loss, (h, w, b), 0.7)
    for name, g, r in zip(("hidden", "weight", "bias"), got, want):
        if r is not None:
            assert g.dtype == r.dtype, name
            assert_close(g, r, dtype, f"d{name}")
    # Ignored rows must receive exactly zero gradient.
    assert (got[0][y == ignore_index] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_linear_ce_chunk_size_does_not_change_result(device):
    h, w, b, y = lce_inputs(29, 41, 8, torch.float32, device, bias=True, seed=1)
    results = []
    for chunk in (1, 7, 29, 1000):
        out = fused_linear_cross_entropy(h, w, y, bias=b, z_loss_weight=1e-3, chunk_size=chunk)
        results.append([out.loss, *grads_of(out.loss, (h, w, b), 1.0)])
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert_close(c, a, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [0, 5])
def test_linear_ce_all_ignored_is_zero_not_nan(device, T):
    h, w, b, _ = lce_inputs(max(T, 1), 11, 4, torch.float32, device, bias=True, seed=2)
    h = h.detach()[:T].requires_grad_()
    y = torch.full((T,), -100, device=device)
    out = fused_linear_cross_entropy(h, w, y, bias=b, z_loss_weight=0.1)
    assert all(v.item() == 0.0 for v in out), out
    for g in grads_of(out.loss, (h, w, b), 1.0):
        assert torch.isfinite(g).all() and (g == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_linear_ce_frozen_weight_and_no_grad(device):
    h, w, _, y = lce_inputs(19, 23, 8, torch.float32, device, bias=False, seed=3)
    w = w.detach()  # a frozen head: only the hidden states get a gradient
    out = fused_linear_cross_entropy(h, w, y, z_loss_weight=1e-2)
    ref = reference_linear_cross_entropy(h, w, y, z_loss_weight=1e-2)
    (gh,) = torch.autograd.grad(out.loss, h)
    assert_close(gh, torch.autograd.grad(ref.loss, h)[0], torch.float32)
    with torch.no_grad():
        evaluated = fused_linear_cross_entropy(h, w, y, z_loss_weight=1e-2)
    assert not evaluated.loss.requires_grad
    assert_close(evaluated.loss, ref.loss, torch.float32)


def test_linear_ce_never_builds_full_logits():
    """The chunked path's largest tensor is one chunk of logits, not T x V."""
    T, V, d, chunk = 256, 1000, 16, 32
    h, w, b, y = lce_inputs(T, V, d, torch.float32, "cpu", bias=True, seed=4)
    with torch.no_grad(), MaxNumel() as mode:
        loss, *_ = linear_ce_mod.linear_ce_forward(h, w, b, y, -100, 1e-3, chunk, True, True, True, "torch")
    assert loss.isfinite()
    assert mode.max_numel <= chunk * V < T * V // 4


# =========================================================================== head norm
HN_SHAPES = [(1, 1, 8), (2, 5, 3, 24), (7, 4, 64)]  # (..., H, D): single row, odd D, plain


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", HN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("affine", ["none", "shared", "per-head"])
def test_head_norm_matches_reference(device, dtype, shape, kind, affine):
    g = torch.Generator().manual_seed(sum(shape) + len(kind) + len(affine))
    H, D = shape[-2:]
    pshape = {"none": None, "shared": (D,), "per-head": (H, D)}[affine]
    x = (torch.randn(shape, generator=g) * 3 + 1).to(device, dtype).requires_grad_()
    params = []
    for offset in (1.0, 0.0):
        p = None if pshape is None else (torch.randn(pshape, generator=g) * 0.5 + offset)
        params.append(None if p is None else p.to(device, dtype).requires_grad_())
    w, b = params
    y = head_norm(x, w, b, eps=1e-5, kind=kind)
    ref = reference_head_norm(x, w, b, eps=1e-5, kind=kind)
    assert y.dtype == x.dtype
    assert_close(y, ref, dtype, "y")
    dy = torch.randn(shape, generator=g).to(device, dtype)
    leaves = [t for t in (x, w, b) if t is not None]
    for name, got, want in zip("xwb", torch.autograd.grad(y, leaves, dy), torch.autograd.grad(ref, leaves, dy)):
        assert got.dtype == want.dtype
        assert_close(got, want, dtype, f"d{name}")


def test_head_norm_module_and_validation():
    q = torch.randn(2, 3, 4, 16)
    norm = HeadNorm(16, 4, kind="rmsnorm", per_head=True)
    assert norm.weight.shape == (4, 16) and norm.bias is None
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    torch.testing.assert_close(norm(q), reference_head_norm(q, norm.weight, kind="rmsnorm"))
    assert HeadNorm(16).bias.shape == (16,)  # LayerNorm defaults to a bias
    with pytest.raises(ValueError, match="shape"):
        head_norm(q, torch.ones(3, 16))
    with pytest.raises(ValueError, match="kind"):
        head_norm(q, kind="batchnorm")


# =========================================================================== codebook top-k
def codebook_inputs(T, N, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(device, dtype).requires_grad_()
    codes = (torch.randn(N, d, generator=g) * torch.rand(N, 1, generator=g) * 2).to(device, dtype).requires_grad_()
    return x, codes


def cosine(x, codes, indices):
    xn = torch.nn.functional.normalize(x.detach().float(), dim=-1)
    cn = torch.nn.functional.normalize(codes.detach().float(), dim=-1)
    return torch.einsum("td,tkd->tk", xn, cn[indices])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "T,N,d,k,block", [(1, 5, 3, 1, None), (37, 100, 24, 3, 16), (50, 257, 40, 8, 5)],
    ids=["single-token", "ragged-blocks", "block-smaller-than-k"],
)
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_codebook_topk_matches_reference(device, dtype, T, N, d, k, block, reduce):
    x, codes = codebook_inputs(T, N, d, dtype, device, seed=T + N + k)
    out, idx = codebook_topk(x, codes, k, reduce=reduce, block_size=block)
    ref_out, ref_idx = reference_codebook_topk(x, codes, k, reduce=reduce)
    assert idx.shape == (T, k) and idx.dtype == torch.long and out.dtype == codes.dtype
    sims, ref_sims = cosine(x, codes, idx), cosine(x, codes, ref_idx)
    slack = 0.0 if dtype == torch.float32 else TOL[dtype]  # bf16 scores may reorder near-ties
    assert (sims[:, :-1] >= sims[:, 1:] - slack).all(), "indices must be best first"
    if dtype == torch.float32:
        assert torch.equal(idx, ref_idx)
        assert_close(out, ref_out, dtype, "out")
    else:  # low precision may swap near-ties: the chosen codes must be as similar as the best
        assert_close(sims, ref_sims, torch.bfloat16, "similarity of chosen codes")
    # Output is exactly the sum/mean of the selected raw rows.
    expected = codes.detach().float()[idx].sum(1) / (k if reduce == "mean" else 1)
    assert_close(out, expected.to(dtype), dtype, "gathered codes")
    # Straight-through backward: x gets grad_out; each selected row gets grad_out (/k).
    g_out = torch.randn_like(out)
    gx, gc = torch.autograd.grad(out, (x, codes), g_out)
    assert torch.equal(gx, g_out.to(x.dtype))
    scale = 1.0 / k if reduce == "mean" else 1.0
    want = torch.zeros(N, d, device=device).index_add_(0, idx.flatten(), (g_out.float() * scale).repeat_interleave(k, 0))
    assert_close(gc, want.to(dtype), dtype, "dcodebook")
    if dtype == torch.float32:
        ref_gc = torch.autograd.grad(ref_out, codes, g_out)[0]
        assert_close(gc, ref_gc, dtype, "dcodebook vs reference")


def test_codebook_never_builds_dense_similarities(monkeypatch):
    T, N, d, block = 200, 500, 16, 128
    monkeypatch.setattr(codebook_mod, "_TORCH_TILE_ELEMS", 2048)  # 16 tokens x 128 codes per step
    x, codes = codebook_inputs(T, N, d, torch.float32, "cpu", seed=5)
    with torch.no_grad(), MaxNumel() as mode:
        idx = codebook_mod.topk_indices_torch(x, codes, 4, block)
    assert torch.equal(idx, reference_codebook_topk(x, codes, 4)[1])
    assert mode.max_numel <= max(2048, N * d) < T * N // 10


def test_codebook_module_shapes():
    layer = CodebookTopK(num_codes=32, dim=8, k=2, reduce="mean")
    out, idx = layer(torch.randn(3, 5, 8))
    assert out.shape == (3, 5, 8) and idx.shape == (3, 5, 2)
    torch.testing.assert_close(out, layer.codebook.detach()[idx].mean(-2))
    with pytest.raises(ValueError, match="k must be"):
        codebook_topk(torch.randn(3, 8), layer.codebook, k=33)


# =========================================================================== registration
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    backend = backend_for(device)
    opcheck = torch.library.opcheck
    h, w, b, y = lce_inputs(13, 17, 8, torch.float32, device, bias=True, seed=6)
    opcheck(torch.ops.athanor.linear_cross_entropy.default, (h, w, b, y, -100, 1e-2, 4, True, True, True, backend))
    opcheck(torch.ops.athanor.linear_cross_entropy.default, (h, w.detach(), None, y, -100, 0.0, 16, True, False, False, backend))
    x = torch.randn(3, 4, 2, 8, device=device, requires_grad=True)
    wn = torch.randn(2, 8, device=device, requires_grad=True)
    bn = torch.randn(8, device=device, requires_grad=True)
    for rms in (False, True):
        opcheck(torch.ops.athanor.head_norm_fwd.default, (x, wn, bn, 1e-5, rms, backend))
        y_, mean, rstd = torch.ops.athanor.head_norm_fwd(x, wn, bn, 1e-5, rms, backend)
        dy = torch.randn_like(x)
        opcheck(torch.ops.athanor.head_norm_bwd.default, (dy, x.detach(), wn.detach(), mean, rstd, rms, True, True, backend))
    xc, codes = codebook_inputs(11, 19, 8, torch.float32, device, seed=7)
    opcheck(torch.ops.athanor.codebook_topk.default, (xc, codes, 3, True, 8, backend))


def test_backend_switch(monkeypatch):
    monkeypatch.delenv("ATHANOR_KERNELS", raising=False)
    assert resolve_backend(torch.device("cpu")) == "torch"
    h, w, _, y = lce_inputs(6, 9, 4, torch.float32, "cpu", bias=False, seed=8)
    fused_fn = fused_linear_cross_entropy(h, w, y).loss.grad_fn
    assert "athanor" in type(fused_fn).__name__
    monkeypatch.setenv("ATHANOR_KERNELS", "reference")
    assert "athanor" not in type(fused_linear_cross_entropy(h, w, y).loss.grad_fn).__name__
    with use_backend("torch"):  # code beats the environment
        assert requested_backend() == "torch"
    assert requested_backend() == "reference"
    monkeypatch.setenv("ATHANOR_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="auto, triton, torch, reference"):
        head_norm(torch.randn(2, 3, 4))
    if os.environ.get("TRITON_INTERPRET") != "1":
        monkeypatch.setenv("ATHANOR_KERNELS", "triton")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET|triton"):
            codebook_topk(torch.randn(3, 4), torch.randn(5, 4))


def test_import_and_run_without_triton():
    """`import athanor.kernels` must work where triton is missing (CPU-only installs)."""
    script = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, athanor.kernels as K\n"
        "assert not K.triton_available()\n"
        "x = torch.randn(4, 8)\n"
        "K.fused_linear_cross_entropy(x, torch.randn(5, 8), torch.tensor([0, 1, 2, -100]))\n"
        "K.head_norm(x.view(4, 2, 4)); K.codebook_topk(x, torch.randn(6, 8), 2)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ATHANOR_KERNELS"} | {"OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


# =========================================================================== convergence
class TinyLM(torch.nn.Module):
    """embedding -> linear -> qk-style head norm -> fused linear-CE head."""

    def __init__(self, vocab=211, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.norm = HeadNorm(dim // heads, heads, per_head=True)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens, targets, fused: bool):
        hidden = torch.tanh(self.proj(self.embed(tokens)))
        hidden = self.norm(hidden.view(*hidden.shape[:-1], self.heads, -1)).flatten(-2)
        loss_fn = fused_linear_cross_entropy if fused else reference_linear_cross_entropy
        kw = dict(bias=self.head.bias, z_loss_weight=1e-3)
        return loss_fn(hidden, self.head.weight, targets, **kw, **({"chunk_size": 16} if fused else {})).loss


def test_convergence_fused_matches_reference():
    vocab, steps = 211, 50
    torch.manual_seed(0)
    models = {fused: TinyLM(vocab) for fused in (True, False)}
    models[False].load_state_dict(models[True].state_dict())
    opts = {f: torch.optim.AdamW(m.parameters(), lr=1e-2) for f, m in models.items()}
    losses = {True: [], False: []}
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (64,), generator=g)
        targets = (5 * tokens + 3) % vocab  # a learnable bijection
        targets[::7] = -100
        for fused, model in models.items():
            with use_backend("reference") if not fused else contextlib.nullcontext():
                loss = model(tokens, targets, fused)
            opts[fused].zero_grad()
            loss.backward()
            opts[fused].step()
            losses[fused].append(loss.item())
    fused_l, ref_l = torch.tensor(losses[True]), torch.tensor(losses[False])
    assert ((fused_l - ref_l).abs() <= 1e-4 * ref_l.abs() + 1e-5).all(), (fused_l - ref_l).abs().max()
    assert ref_l[-5:].mean() < 0.5 * ref_l[:5].mean(), "the tiny model should learn the mapping"
