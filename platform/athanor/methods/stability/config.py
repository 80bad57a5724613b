"""The stability paper's typed config: the base pretrain run of every point, the sweep's axes,
the analysis and the log Z demonstration; ``VARIANTS``, the interventions as config overrides."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...cluster import register_sweep_executor
from ...config import ConfigError, OptimConfig, RunConfig, TrainConfig, choice, positive
from ...data import TextDataConfig
from ...parts.gpt import GPTModelConfig, ProbeConfig
from ...sweep import EXECUTORS


# Config overrides (dotted keys of the pretrain config) per intervention. The base run is the
# paper's setting with every fix off: pre-LN, no biases, no qk-layernorm, no z-loss, standard
# parameterization. "mup" takes its base width from the sweep (resolved in ``variant_overrides``).
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "qk_layernorm": {"model.qk_layernorm": True},
    "z_loss": {"model.z_loss_weight": 1e-4},
    "mup": {"model.mup_base_width": "sweep"},
    "no_warmup": {"optim.warmup_steps": 0},
    "long_warmup": {"optim.warmup_steps": "x4"},  # four times the base warm-up
    "independent_wd": {"optim.independent_weight_decay": True, "optim.weight_decay": 1e-4},  # = the base run
    "coupled_wd": {"optim.independent_weight_decay": False, "optim.weight_decay": 0.1},  # η·λ = 1e-4 at η = 1e-3
    "no_wd": {"optim.weight_decay": 0.0},
    "eps_1e-15": {"optim.eps": 1e-15},
    "bias": {"model.bias": True},
    "post_ln": {"model.pre_ln": False},
}


DEFAULT_VARIANTS = ["baseline", "qk_layernorm", "z_loss", "coupled_wd", "no_warmup", "long_warmup", "mup", "eps_1e-15"]


@dataclass
class SweepConfig:
    # The LR-sensitivity table: every variant over every LR and seed at ``table_width``; the
    # ``width_variants`` also at every width (at ``width_lrs``), for the probe-vs-width fit.
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))  # VARIANTS, or a+b
    widths: list[int] = field(default_factory=lambda: [32, 64, 96, 128])  # model.d_model
    depths: list[int] = field(default_factory=lambda: [2])  # model.n_layers
    pair_depths: bool = False  # true: widths[i] goes with depths[i] (a model family), not the product
    lrs: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 3e-1, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # run.seed (init and data order) of every point
    table_width: int = 64  # width of the variants not in width_variants (0: every variant at every width)
    width_variants: list[str] = field(default_factory=lambda: ["baseline", "qk_layernorm"])  # those in variants: every width
    width_lrs: list[float] = field(default_factory=lambda: [1e-2, 3e-1])  # their LRs off table_width ([]: lrs;
    # table_width 0: lrs everywhere)
    head_dim: int = 32  # heads = width // head_dim
    mup_base_width: int = 0  # µParam's base width (0: the smallest width)
    custom_variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {dotted key: value}
    executor: str = "local"  # local (worker processes) | inline (this process) | slurm (a job array) | ...
    workers: int = 2  # local worker processes (each with engine.cpu_threads torch threads)
    devices: list[str] = field(default_factory=list)  # CUDA devices, one per worker in turn ([] = inherit)
    keep_checkpoints: bool = False  # false: delete a finished point's checkpoints (its model/ stays)

    def validate(self) -> None:
        register_sweep_executor()  # --sweep.executor slurm: the sweep as one SLURM job array
        for name in ("variants", "widths", "depths", "lrs", "seeds"):
            if not getattr(self, name):
                raise ConfigError(f"sweep.{name} is empty")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"sweep.seeds has repeats: {self.seeds}")
        known = [*VARIANTS, *self.custom_variants]
        for part in (p for v in self.variants for p in v.split("+")):
            choice(part, known, "sweep.variants entry")
        if self.pair_depths and len(self.depths) != len(self.widths):
            raise ConfigError("sweep.pair_depths needs as many depths as widths")
        choice(self.executor, list(EXECUTORS), "sweep.executor")
        for w in [*self.widths, *self.depths, *self.lrs, self.head_dim, self.workers]:
            positive(w, "sweep.widths/depths/lrs/head_dim/workers")
        for w in self.widths:
            if w > self.head_dim and w % self.head_dim:
                raise ConfigError(f"sweep.widths: {w} is not a multiple of sweep.head_dim={self.head_dim}")
        if self.table_width and self.table_width not in self.widths:
            raise ConfigError(f"sweep.table_width={self.table_width} is not one of sweep.widths {self.widths}")
        for lr in self.width_lrs:
            positive(lr, "sweep.width_lrs")


@dataclass
class AnalysisConfig:
    high_lr: float = 0.3  # LR of the attention-logit-vs-step plot (the grid LR nearest to it)
    extrapolate_lr: float = 0.01  # fixed LR at which probes are fitted against width
    attn_logit_threshold: float = 1e3  # max attention logit taken as the onset of instability
    log_z_threshold: float = 20.0  # max log Z taken as the onset of output-logit divergence
    predict_widths: list[int] = field(default_factory=lambda: [1024, 4096])


@dataclass
class LogZDemoConfig:
    """Long runs at the smallest width without weight decay: does log Z drift without z-loss?"""
    enabled: bool = True
    # 0, the paper's 1e-4, and 1e-2: our batches hold 1k tokens, the paper's 131k, so z-loss's
    # steady pull on log Z competes with far noisier gradients here (see the report)
    z_loss_weights: list[float] = field(default_factory=lambda: [0.0, 1e-4, 1e-2])
    # LR 1 with an untied output layer. Without z-loss log Z drifted once at 10k steps (5.5 -> 8.5) and
    # not in the next 10k-step default run (+0.43 over the second half); z-loss 1e-2 had brought it to
    # ~0.5 by step 5000 there. 5000 steps keep the whole default within 15 minutes on 2 cores (the
    # 10k-step demo was 28% of the sweep's time); 2000-4000 steps at LR 0.3 showed no drift either.
    steps: int = 5000
    lr: float = 1.0
    schedule: str = "constant"  # no decay: the drift has the whole run at full LR
    qk_layernorm: bool = True  # keeps the attention-logit instability out of the picture
    tie_embeddings: bool = False  # an untied output layer, as in the paper's models
    width: int = 0  # 0: the sweep's smallest width

    def validate(self) -> None:
        positive(self.steps, "logz_demo.steps")
        positive(self.lr, "logz_demo.lr")
        choice(self.schedule, ("constant", "cosine", "linear"), "logz_demo.schedule")


@dataclass
class StabilityConfig(TrainConfig):
    # run/optim/engine/model/data: the base pretrain config of every point (the paper's defaults,
    # with every fix off); run.output_dir holds the sweep, one folder per point.
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/stability", max_steps=400,
                                                             log_every=10, keep_last=1, progress=False))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4, independent_weight_decay=True, warmup_steps=20,
        schedule="cosine", min_lr_ratio=0.01, grad_clip=1.0))
    model: GPTModelConfig = field(default_factory=lambda: GPTModelConfig(bias=False, qk_layernorm=False))
    data: TextDataConfig = field(default_factory=lambda: TextDataConfig(block_size=64, batch_size=16,
                                                                        eval_batches=16))
    sweep: SweepConfig = field(default_factory=SweepConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    logz_demo: LogZDemoConfig = field(default_factory=LogZDemoConfig)
    probes: ProbeConfig = field(default_factory=lambda: ProbeConfig(every=10))  # the probes' extremes need them often
