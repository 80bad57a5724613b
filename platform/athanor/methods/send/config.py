"""SeND's typed config: the LM (with a Hub ``revision``), the facts, the optional base run, SeND's schedule,
EigenScore, the experiment."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...config import ConfigError, OptimConfig, RunConfig, TrainConfig, positive
from ...hub import HubConfig
from ...parts.lm import ModelConfig
from .facts import FactsConfig
from .method import EigenScoreConfig, SendConfig


@dataclass
class SendModelConfig(ModelConfig):
    # a Hub branch, tag or commit of model.name_or_path (Pythia's intermediate checkpoints: "step1000" ...;
    # how the paper studies the oscillation phase); empty: the default branch. Passed to from_pretrained.
    revision: str = ""
    # the tiny default (from scratch): small enough for 5 seeds × 3 arms in minutes on 2 cores, big enough to
    # learn every fact and generalise to held-out phrasings
    hidden_size: int = 64
    num_layers: int = 3
    intermediate_size: int = 256


@dataclass
class BaseConfig:
    # training on data.old_people before the arms (only when data.old_people > 0: the continued-training variant;
    # 0 with model.name_or_path: use that checkpoint as is)
    max_steps: int = 400
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
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/send", max_steps=400,
                                                             eval_every=20, progress=False))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, schedule="constant"))
    model: SendModelConfig = field(default_factory=SendModelConfig)
    data: FactsConfig = field(default_factory=FactsConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    send: SendConfig = field(default_factory=SendConfig)
    eigenscore: EigenScoreConfig = field(default_factory=EigenScoreConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    hub: HubConfig = field(default_factory=HubConfig)
