#!/usr/bin/env bash
# GPU acceptance check for athanor.kernels (issue 4), one command on a CUDA machine:
#
#   bash benchmarks/gpu_check.sh            # ~5-8 min on one H100; writes benchmarks/gpu_results.md
#
# 1. the kernel tests with CUDA present: every op on "cpu" and "cuda" (the compiled Triton
#    kernels) against the torch references, opcheck on CUDA, plus the interpreter and
#    ahead-of-time compile tests;
# 2. the benchmark table (bf16): fused linear-CE + z-loss vs torch eager (and Liger-Kernel
#    when installed) at T=16k, V=50257, d=4096; codebook top-k vs dense torch at T=64k,
#    N=16k, d=512, k=8; head norm.  Goals are printed as MET / NOT MET under the table.
# Each step has its own time limit so the whole script stays under 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"  # a CUDA build of torch; the CPU-only .venv of a laptop will not do

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'EOF'
import torch, triton
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device"
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
EOF
unset ATHANOR_KERNELS TRITON_INTERPRET  # auto: Triton on CUDA

echo "== tests (limit 300 s)"
status=0
timeout 300 "$PY" -m pytest tests/test_kernels.py tests/test_kernels_triton_interpret.py \
    tests/test_kernels_triton_compile.py -q -p no:cacheprovider || status=$?

echo "== benchmark (limit 170 s)"  # runs even when a test failed: the numbers still help
timeout 170 "$PY" benchmarks/kernels.py --device cuda | tee benchmarks/gpu_results.md || status=$?
exit "$status"
