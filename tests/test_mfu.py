"""MFU is measured against the peak of the precision in use, and absent where no peak is known."""
import pytest
import torch

from athanor.engine import mfu


@pytest.fixture
def h100(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")


def test_peak_follows_the_precision_in_use(h100, monkeypatch):
    cuda = torch.device("cuda", 0)
    assert mfu.peak_flops(cuda, "bf16") == 989e12
    assert mfu.peak_flops(cuda, "no") == 67e12  # fp32 matmuls: not the bf16 peak (15x lower)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert mfu.peak_flops(cuda, "no") == 495e12  # fp32 on tensor cores as TF32


def test_no_peak_no_mfu(monkeypatch):
    assert mfu.peak_flops(torch.device("cpu"), "no") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert mfu.peak_flops(torch.device("cuda", 0), "bf16") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert mfu.peak_flops(torch.device("cuda", 0), "bf16") == 756e12  # PCIe matched before SXM
