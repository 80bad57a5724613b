"""Codebook Features' typed config: the model, its codebooks, the data (TokFSM or text), the analysis."""
from __future__ import annotations

from dataclasses import dataclass, field

from athanor.config import ConfigError, OptimConfig, RunConfig, TrainConfig, choice, positive
from athanor.data.text import TextDataConfig
from athanor.hub import HubConfig

from .layers import SITES
from .tokfsm import TokFSMConfig


@dataclass
class ModelConfig:
    name_or_path: str = ""  # any HF causal LM (hub id or local folder); empty: AthanorGPT built from the fields below
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4  # per-head codebooks have d_model / n_heads dims
    d_ff: int = 0  # 0: 4 * d_model
    position: str = "rotary"  # rotary | learned (learned absolute positions made codes position-dependent)

    def validate(self) -> None:
        choice(self.position, ("learned", "rotary"), "model.position")
        if not self.name_or_path and self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")


@dataclass
class CodebookConfig:
    # The paper's TokFSM setting (its fsm_main config): a codebook per attention head before the
    # output projection AND one on each MLP output, k=1. Heads alone carry only what attention
    # moves (at a state's last digit: the earlier digit), so no head tuple can name the state.
    sites: list[str] = field(default_factory=lambda: ["heads", "mlp"])  # heads | attn | mlp (any subset)
    layers: list[int] = field(default_factory=list)  # decoder layers with codebooks (empty: all)
    num_codes: int = 256  # codes per codebook (per head for the heads site)
    # Codes per codebook for some sites (others: num_codes). The MLP code is the whole MLP output, which
    # must name the next-token distribution (~100 states x digit positions): with 256 codes the
    # codebook model lost 4.4 points of transition accuracy, with 1024 2.8 (2 layers, 1000 steps).
    site_codes: dict[str, int] = field(default_factory=lambda: {"mlp": 1024})
    k: int = 1  # codes chosen per token
    reduce: str = "sum"  # sum | mean of the k codes
    recon_weight: float = 1.0  # weight of the reconstruction MSE next to the LM loss
    kmeans_iters: int = 10  # spherical k-means initialisation (0: random codes)
    replace_every: int = 100  # steps between dead-code replacements (0: never)
    replace_min_uses: float = 1.0  # a code chosen fewer times than this since the last check is dead
    # Also train without replacement (the dead-code comparison). Off by default: a third training per
    # seed would push three seeds past 15 minutes on 2 cores.
    compare_no_replacement: bool = False
    freeze_lm: bool = False  # train only the codebooks (probe a pretrained LM); the baseline is then untrained
    # Where the codebook model's LM weights start: "baseline" (the trained baseline, codebooks inserted
    # and k-means-initialised on its activations: how the paper builds its language-model codebooks)
    # or "scratch" (the baseline's initialisation). From scratch, 1000 steps left the 100-state
    # TokFSM codebook model unconverged (eval loss 1.42-1.54 vs the baseline's 1.21) and its
    # transition accuracy swung 0.81-0.97 with the reconstruction weight alone.
    init: str = "baseline"
    steps: int = 0  # training steps of the codebook models (0: run.max_steps, as the baseline)
    # LR multiplier of the codes. At 1, the 100-state TokFSM codes fell behind their inputs (recon MSE
    # 1.4-2.5 in LayerNorm units, most codes dead, LM loss flat at ~log 10 from step 200 to 575).
    code_lr_scale: float = 1.0

    def validate(self) -> None:
        if not self.sites:
            raise ConfigError("codebook.sites is empty; choose from " + ", ".join(SITES))
        for site in self.sites:
            choice(site, SITES, "codebook.sites[]")
        choice(self.reduce, ("sum", "mean"), "codebook.reduce")
        positive(self.num_codes, "codebook.num_codes")
        for site, n in self.site_codes.items():
            choice(site, SITES, "codebook.site_codes key")
            positive(n, f"codebook.site_codes.{site}")
        smallest = min([self.num_codes, *self.site_codes.values()])
        if not 1 <= self.k <= smallest:
            raise ConfigError(f"codebook.k={self.k} must be in [1, {smallest}] (the smallest codebook)")
        positive(self.recon_weight, "codebook.recon_weight", allow_zero=True)
        positive(self.kmeans_iters, "codebook.kmeans_iters", allow_zero=True)
        positive(self.replace_every, "codebook.replace_every", allow_zero=True)
        positive(self.code_lr_scale, "codebook.code_lr_scale")
        choice(self.init, ("baseline", "scratch"), "codebook.init")
        positive(self.steps, "codebook.steps", allow_zero=True)


@dataclass
class DataConfig:
    kind: str = "tokfsm"  # tokfsm | text
    fsm: TokFSMConfig = field(default_factory=TokFSMConfig)
    text: TextDataConfig = field(default_factory=lambda: TextDataConfig(block_size=64, batch_size=16, max_chars=400_000))

    def validate(self) -> None:
        choice(self.kind, ("tokfsm", "text"), "data.kind")


@dataclass
class AnalysisConfig:
    prompt_states: int = 16  # states in a held-out prompt before generation
    new_states: int = 4  # states generated per prompt for transition accuracy
    steering_prompts: int = 256  # held-out prompts (measure half), each steered to one target state
    code_batch: int = 128  # sequences per analysis forward
    # The FSM (data.fsm.seed) on which the knobs of this config were chosen; the default seeds run on
    # other FSMs (data.fsm.seed + run seed), so no headline figure comes from the FSM the knobs saw.
    dev_fsm_seed: int = 1234


@dataclass
class CodebookPaperConfig(TrainConfig):
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/codebook", max_steps=1000, log_every=25))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=50, schedule="cosine"))
    model: ModelConfig = field(default_factory=ModelConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    data: DataConfig = field(default_factory=DataConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    # Run seeds, each a whole pipeline in its own process (run.seed = k, FSM seed data.fsm.seed + k);
    # empty: one pipeline in this process with run.seed and data.fsm.seed as given.
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    seed_processes: int = 3  # seeds run at once

    def validate(self) -> None:
        positive(self.seed_processes, "seed_processes")
