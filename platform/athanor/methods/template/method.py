"""The template's data and method: noisy linear data y = x·w* + ε and one step of least squares."""
from __future__ import annotations

import torch
from huggingface_hub import PyTorchModelHubMixin

from ...engine import Method
from .config import LinearDataConfig


def make_data(cfg: LinearDataConfig, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(cfg.features, generator=gen)
    x = torch.randn(2 * cfg.rows, cfg.features, generator=gen)
    y = x @ w + cfg.noise * torch.randn(2 * cfg.rows, generator=gen)
    return {"w": w, "train": {"x": x[:cfg.rows], "y": y[:cfg.rows]}, "held_out": {"x": x[cfg.rows:], "y": y[cfg.rows:]}}


class LinearModel(torch.nn.Module, PyTorchModelHubMixin):
    """ŷ = x·w. The Hub mixin gives it ``save_pretrained``/``from_pretrained`` (config.json +
    model.safetensors), so the saved folder is what ``athanor publish`` uploads."""

    def __init__(self, features: int = 8):
        super().__init__()
        self.linear = torch.nn.Linear(features, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


class LinearRegression(Method):
    """One step: mean squared error of a bias-free linear model on a batch."""

    def __init__(self, features: int):
        self.features = features

    def setup(self, engine) -> None:
        """Models are built here, after the engine has seeded every process: the same run gives the
        same initial weights however many runs this process made before."""
        self.engine = engine
        self.model = engine.register("model", LinearModel(self.features))

    def train_step(self, batch: dict) -> dict:
        loss = torch.nn.functional.mse_loss(self.model(batch["x"]), batch["y"])
        self.engine.optimize("model", loss)
        return {"loss": loss, "samples": len(batch["y"])}
