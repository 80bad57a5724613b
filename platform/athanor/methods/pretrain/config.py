"""The pretrain paper's typed config: defaults are the tiny CPU run."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...config import OptimConfig, RunConfig, TrainConfig
from ...data import TextDataConfig
from ...hub import HubConfig
from ...parts.gpt import GPTModelConfig, ProbeConfig


@dataclass
class PretrainConfig(TrainConfig):
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/pretrain", max_steps=400,
                                                             eval_every=50, log_every=1))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=50, weight_decay=0.1))
    model: GPTModelConfig = field(default_factory=GPTModelConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    hub: HubConfig = field(default_factory=HubConfig)
