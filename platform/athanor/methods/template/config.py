"""The template's typed config: every section a recipe exposes, with its tiny default."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...config import ConfigError, OptimConfig, RunConfig, TrainConfig, positive
from ...hub import HubConfig


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
