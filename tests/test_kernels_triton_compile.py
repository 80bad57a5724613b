"""Compile each Triton kernel to a cubin for sm90 (H100) and sm80 (A100), without a GPU.

The interpreter tests check what the kernels compute, but the interpreter accepts code the
real compiler rejects (loop-carried type changes, layout or dtype errors in ``tl.dot``).
Triton ships ``ptxas``, so lowering all the way to machine code works on a CPU-only box;
no kernel runs here.  One representative configuration per kernel keeps this to seconds.
Also asserts the tile choices compile without register spills (local-memory stack).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":  # kernels are InterpretedFunctions then
    pytest.skip("compile checks need TRITON_INTERPRET unset", allow_module_level=True)

from athanor.kernels import codebook_triton, headnorm_triton, linear_ce_triton  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _sig(spec: str, **constexprs) -> tuple[dict, dict]:
    """'name:type name:type ...' -> Triton signature dict (constexprs marked as such)."""
    sig = dict(item.split(":") for item in spec.split())
    sig.update({name: "constexpr" for name in constexprs})
    return sig, constexprs


CE = "logits_ptr:*fp32 grad_ptr:*bf16 targets_ptr:*i64 log_z_ptr:*fp32 ce_ptr:*fp32 inv_n_ptr:*fp32 " \
     "V:i32 stride_logits:i32 stride_grad:i32 ignore_index:i32 z_loss_weight:fp32"
HN_FWD = "x_ptr:*bf16 w_ptr:*bf16 b_ptr:*bf16 y_ptr:*bf16 mean_ptr:*fp32 rstd_ptr:*fp32 " \
         "M:i32 H:i32 D:i32 stride_wh:i32 stride_bh:i32 eps:fp32"
HN_BWD = "dy_ptr:*bf16 x_ptr:*bf16 w_ptr:*bf16 mean_ptr:*fp32 rstd_ptr:*fp32 dx_ptr:*bf16 dw_ptr:*fp32 db_ptr:*fp32 " \
         "M:i32 H:i32 D:i32 stride_wh:i32"
TOPK = "x_ptr:*{dt} c_ptr:*{dt} val_ptr:*fp32 idx_ptr:*i32 T:i32 N:i32 D:i32 stride_x:i32 stride_c:i32"

CASES = {
    "ce_chunk": (linear_ce_triton._ce_chunk_kernel, _sig(CE, NEED_GRAD=True, BLOCK_V=4096), 16),
    "head_norm_fwd": (headnorm_triton._fwd_kernel, _sig(HN_FWD, HAS_W=True, HAS_B=True, RMS=False, BLOCK_M=8, BLOCK_D=128), 4),
    "head_norm_bwd": (
        headnorm_triton._bwd_kernel,
        _sig(HN_BWD, HAS_W=True, RMS=False, NEED_DW=True, NEED_DB=True, BLOCK_M=8, BLOCK_D=128),
        4,
    ),
    "topk_bf16": (
        codebook_triton._topk_kernel,
        _sig(TOPK.format(dt="bf16"), K=8, KP=8, UPCAST=False, BLOCK_T=64, BLOCK_N=64, BLOCK_D=16),
        8,
    ),
    "topk_fp32": (
        codebook_triton._topk_kernel,
        _sig(TOPK.format(dt="fp32"), K=8, KP=8, UPCAST=True, BLOCK_T=64, BLOCK_N=64, BLOCK_D=16),
        8,
    ),
}


@pytest.mark.skipif(not os.path.exists(os.path.join(NVIDIA_BIN, "ptxas")), reason="triton's ptxas is missing")
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_compiles_without_spills(name, arch):
    fn, (signature, constexprs), num_warps = CASES[name]
    kernel = triton.compile(
        ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}
    )
    cubin = kernel.asm["cubin"]
    assert len(cubin) > 0
    cuobjdump = os.path.join(NVIDIA_BIN, "cuobjdump")
    if not shutil.which(cuobjdump):
        return
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    stack = [int(tok.split(":")[1]) for tok in usage.split() if tok.startswith("STACK:")]
    assert stack and max(stack) == 0, f"{name} spills registers on sm{arch}: {usage}"
