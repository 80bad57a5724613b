"""SeND's typed config: the LM, the facts, the base run, SeND's schedule, EigenScore, the experiment."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...config import ConfigError, OptimConfig, RunConfig, TrainConfig, positive
from ...hub import HubConfig
from ...parts.lm import ModelConfig
from .facts import FactsConfig
from .method import EigenScoreConfig, SendConfig


@dataclass
class BaseConfig:
    max_steps: int = 400  # base LM training on the old facts (0 with model.name_or_path: use it as is)
    lr: float = 2e-3
    min_accuracy: float = 0.98  # the base must reach this on the old facts (a converged start), else error

    def validate(self) -> None:
        positive(self.max_steps, "base.max_steps", allow_zero=True)
        positive(self.lr, "base.lr")


@dataclass
class ExperimentConfig:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # continued-training seeds (each arm)
    # normal | send | random (SeND's schedule with randomly chosen neurons: the dropout-as-such control)
    arms: list[str] = field(default_factory=lambda: ["normal", "send", "random"])
    save_models: bool = False  # save each arm's final model (paper-scale runs)

    def validate(self) -> None:
        if not self.seeds:
            raise ConfigError("experiment.seeds must name at least one seed")
        for arm in self.arms:
            if arm not in ("normal", "send", "random"):
                raise ConfigError(f"experiment.arms has {arm!r}; choose from: normal, send, random")


@dataclass
class SendPaperConfig(TrainConfig):
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/send", max_steps=300,
                                                             eval_every=10, progress=False))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, schedule="constant"))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: FactsConfig = field(default_factory=FactsConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    send: SendConfig = field(default_factory=SendConfig)
    eigenscore: EigenScoreConfig = field(default_factory=EigenScoreConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    hub: HubConfig = field(default_factory=HubConfig)
