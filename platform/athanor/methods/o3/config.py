"""O3's typed config (the sections of its parts are beside them: ``UnlearnConfig`` in ``method``,
``DetectorConfig`` in ``detector``, the world's ``DataConfig`` in ``athanor.parts.fact_world``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...config import EngineConfig, OptimConfig, RunConfig, TrainConfig, positive
from ...hub import HubConfig
from ...parts.fact_world import DataConfig
from ...parts.lm import ModelConfig
from .detector import DetectorConfig
from .method import UnlearnConfig
from .baselines import BaselineConfig
from .tofu_data import TofuConfig

# How the detector's knobs were tuned on a dev world (``tune``); the report cites it.
TUNE_COMMAND = "python -m athanor.methods.o3.tune --run.output_dir DIR"


@dataclass
class AblationConfig:
    always_on: bool = True  # the same adapters with w = 1 for every input
    per_request_gate: bool = True  # adapter t scaled by w_t(x) only, instead of max_t w_t(x)
    gate_variants: bool = True  # detectors without Mahalanobis / without cosine / calibrated by random folds
    lambda0: bool = True  # adapters retrained with λ = 0
    gradient_ascent: bool = True  # full-model gradient ascent on each forget set, no gate
    detector_untrained: bool = True  # detectors on the pretrained encoder (detector.train_steps = 0)
    ga_steps: int = 10
    ga_lr: float = 1e-3

    def validate(self) -> None:
        positive(self.ga_steps, "ablations.ga_steps")
        positive(self.ga_lr, "ablations.ga_lr")


@dataclass
class O3Config(TrainConfig):
    # run.max_steps and optim: the base LM that memorises the facts (0 steps: use model.name_or_path as is)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/o3", max_steps=500, eval_every=250,
                                                             log_every=10))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=20, weight_decay=0.1))
    # every CPU (torch's default): the MiniLM detector's matmuls are wide enough to gain from threads
    # (a detector stage 26 -> 17 s, the tests' small run 105 -> 70 s on 2 idle cores; accelerate's
    # launcher sets OMP_NUM_THREADS=1 per process, which wins)
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(cpu_threads=0))
    model: ModelConfig = field(default_factory=ModelConfig)
    # the hard negatives on (fact_world's defaults keep them off for SeND): 60 people from 12 first x 12
    # last names; in each request of 10 people, 7 forget only 1-2 of their 4 attributes
    data: DataConfig = field(default_factory=lambda: DataConfig(name_words=12, partial_people=7,
                                                                partial_attributes=2))
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    ablations: AblationConfig = field(default_factory=AblationConfig)
    hub: HubConfig = field(default_factory=HubConfig)  # the upload's top: OUTPUT/o3 (O3Model)
    tofu: TofuConfig = field(default_factory=TofuConfig)  # TOFU's metrics, the retain-only model, seeds
    baselines: BaselineConfig = field(default_factory=BaselineConfig)  # open-unlearning's methods, sequential
