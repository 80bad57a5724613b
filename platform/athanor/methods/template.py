"""The smallest complete paper: the template to copy when adding one (README, "Adding a paper").

Two stages on noisy linear data y = x·w* + ε: ``fit`` trains a linear model (a ``Method`` run by the
engine: checkpoints, exact resume, metrics) and saves it; ``evaluate`` reloads the saved model and
measures it on held-out rows. The report compares the fitted weights with w*.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from huggingface_hub import PyTorchModelHubMixin

from ..config import ConfigError, OptimConfig, RunConfig, TrainConfig, positive
from ..data.batches import ShuffledBatches
from ..engine import Method
from ..hub import HubConfig
from ..report import plot_metrics, write_report
from ..runner import Paper, Stage, StageContext


@dataclass
class LinearDataConfig:
    features: int = 8  # dimension of x
    rows: int = 512  # training rows (as many again are held out)
    noise: float = 0.1  # std of ε
    batch_size: int = 32

    def validate(self) -> None:
        positive(self.features, "data.features")
        positive(self.batch_size, "data.batch_size")
        if self.batch_size > self.rows:
            raise ConfigError(f"data.batch_size={self.batch_size} is larger than data.rows={self.rows}")
        positive(self.noise, "data.noise", allow_zero=True)


@dataclass
class TemplateConfig(TrainConfig):
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/template", max_steps=200))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.05, schedule="constant"))
    data: LinearDataConfig = field(default_factory=LinearDataConfig)
    hub: HubConfig = field(default_factory=HubConfig)


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


def fit_stage(ctx: StageContext) -> dict:
    data = make_data(ctx.cfg.data, ctx.cfg.run.seed)
    method = LinearRegression(ctx.cfg.data.features)
    engine = ctx.engine()
    batches = ShuffledBatches(data["train"], ctx.cfg.data.batch_size, ctx.cfg.run.seed, engine.rank, engine.world_size)
    ctx.fit(method, batches, engine=engine)
    folder = engine.save_pretrained("model", ctx.dir / "model")  # every process calls it (ZeRO-3 gathers)
    return {"model": str(folder), "steps": engine.step}


def evaluate_stage(ctx: StageContext) -> dict:
    data = make_data(ctx.cfg.data, ctx.cfg.run.seed)
    model = LinearModel.from_pretrained(ctx.results["fit"]["model"])
    held = data["held_out"]
    with torch.no_grad():
        mse = torch.nn.functional.mse_loss(model(held["x"]), held["y"]).item()
    return {"held_out_mse": mse, "weight_error": (model.linear.weight[0] - data["w"]).norm().item()}


def report(ctx: StageContext, results: dict) -> dict:
    out = {"held_out_mse": results["evaluate"]["held_out_mse"], "weight_error": results["evaluate"]["weight_error"],
           "noise_floor": ctx.cfg.data.noise ** 2, "steps": results["fit"]["steps"]}
    plot_metrics(ctx.stage_dir("fit"), ["loss"], "loss.png", title="training loss")
    write_report(ctx.root, out, "Template: linear regression",
                 [f"Held-out MSE {out['held_out_mse']:.4f} (noise floor {out['noise_floor']:.4f})."])
    return out


PAPER = Paper(
    name="template",
    config=TemplateConfig,
    stages=lambda cfg: [Stage("fit", fit_stage), Stage("evaluate", evaluate_stage, needs=("fit",))],
    report=report,
    summary=lambda r: f"held-out MSE {r['held_out_mse']:.4f}",
)
