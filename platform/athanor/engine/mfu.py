"""Peak dense FLOP/s of the precision a run actually computes in, for MFU.

MFU = achieved FLOP/s / peak FLOP/s, and the peak depends on the precision of the matmuls: an fp32
run measured against the bf16 peak reads 15x too low on an H100. The precision in force is the
engine's mixed precision (bf16 / fp16) or, without it, fp32 matmuls — on tensor cores as TF32 when
torch allows it (``torch.set_float32_matmul_precision('high')``). Dense figures (no 2:4 sparsity) from the vendors'
data sheets; a device or precision not in the table has no MFU (None), never a guessed one.
"""
from __future__ import annotations

import torch

TFLOPS = 1e12
# device name fragment -> {precision: dense peak FLOP/s}; first match wins, so "H100 PCIe" comes first
PEAK_FLOPS = {
    "H100 PCIe": {"bf16": 756 * TFLOPS, "fp16": 756 * TFLOPS, "tf32": 378 * TFLOPS, "fp32": 51 * TFLOPS},
    "H100": {"bf16": 989 * TFLOPS, "fp16": 989 * TFLOPS, "tf32": 495 * TFLOPS, "fp32": 67 * TFLOPS},
    "H200": {"bf16": 989 * TFLOPS, "fp16": 989 * TFLOPS, "tf32": 495 * TFLOPS, "fp32": 67 * TFLOPS},
    "A100": {"bf16": 312 * TFLOPS, "fp16": 312 * TFLOPS, "tf32": 156 * TFLOPS, "fp32": 19.5 * TFLOPS},
    "L40S": {"bf16": 362 * TFLOPS, "fp16": 362 * TFLOPS, "tf32": 183 * TFLOPS, "fp32": 91.6 * TFLOPS},
    "A10G": {"bf16": 125 * TFLOPS, "fp16": 125 * TFLOPS, "tf32": 62.5 * TFLOPS, "fp32": 31.2 * TFLOPS},
}


def compute_precision(mixed_precision: str) -> str:
    """The matmul precision in force: the engine's mixed precision, else fp32 or TF32."""
    if mixed_precision in ("bf16", "fp16"):
        return mixed_precision
    # allow_tf32 = True and set_float32_matmul_precision("high") are one setting in torch
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def peak_flops(device: torch.device, mixed_precision: str) -> float | None:
    """Dense peak FLOP/s of one ``device`` at the run's precision; None where it is not known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peaks = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return None if peaks is None else peaks.get(compute_precision(mixed_precision))
