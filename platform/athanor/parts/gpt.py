"""athanor's GPT (``athanor.models.gpt``) as a recipe config section, the schedule of its
instability probes, and the typed config of one pretraining run (``PretrainConfig``): shared by the
pretrain paper and the stability paper, whose sweep points are pretrain runs (stability checks each
point against this class before it starts any).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoModelForCausalLM

from ..config import ConfigError, OptimConfig, RunConfig, TrainConfig, choice, positive
from ..data import TextDataConfig
from ..hub import HubConfig
from ..models import AthanorGPT, AthanorGPTConfig


@dataclass
class GPTModelConfig:
    name_or_path: str = ""  # any HF causal LM (hub id or local folder) instead of the built-in GPT
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 0  # 0: 4 * d_model
    position: str = "learned"  # learned | rotary
    qk_layernorm: bool = False  # LayerNorm on q and k per head before the logits
    z_loss_weight: float = 0.0  # weight of mean(log Z^2) added to the loss
    bias: bool = False  # biases in linear layers and LayerNorms
    tie_embeddings: bool = True  # output head reuses the input embedding
    dropout: float = 0.0
    init_std: float = 0.02
    fused_loss: bool = False  # athanor.kernels fused linear+CE+z-loss (never builds full logits)
    mup_base_width: int = 0  # µParam: > 0 scales hidden init/LR and the readout relative to this width
    pre_ln: bool = True  # false: post-LN blocks (LayerNorm after each residual add)

    def validate(self) -> None:
        choice(self.position, ("learned", "rotary"), "model.position")
        positive(self.z_loss_weight, "model.z_loss_weight", allow_zero=True)
        positive(self.mup_base_width, "model.mup_base_width", allow_zero=True)
        if not 0 <= self.dropout < 1:  # 1 would zero every activation; > 1 is no probability
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.name_or_path:  # a Hub model brings its own shape
            return
        for key in ("d_model", "n_layers", "n_heads"):
            positive(getattr(self, key), f"model.{key}")
        positive(self.d_ff, "model.d_ff", allow_zero=True)
        positive(self.init_std, "model.init_std")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")


def build_model(cfg: GPTModelConfig, vocab_size: int, seq_len: int):
    if cfg.name_or_path:
        return AutoModelForCausalLM.from_pretrained(cfg.name_or_path)
    fields = {k: v for k, v in vars(cfg).items() if k != "name_or_path"}
    return AthanorGPT(AthanorGPTConfig(vocab_size=vocab_size, max_seq_len=seq_len, **fields))


@dataclass
class ProbeConfig:
    # Steps between the instability probes (max attention logit, attention entropy, activation and
    # gradient RMS), never more often than run.log_every; 0: never. A probe step costs ~50% more than
    # a plain one at the default size (it materialises the attention of PROBE_ROWS sequences): every
    # 10 steps that was 5% of the pretrain recipe's throughput (benchmarks/overhead.py). The
    # stability sweep, which reads the probes' extremes over training, probes every 10.
    every: int = 100

    def validate(self) -> None:
        positive(self.every, "probes.every", allow_zero=True)


@dataclass
class PretrainConfig(TrainConfig):
    """One causal-LM pretraining run (the pretrain paper's config; a stability sweep point)."""

    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/pretrain", max_steps=400,
                                                             eval_every=50, log_every=1))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=50, weight_decay=0.1))
    model: GPTModelConfig = field(default_factory=GPTModelConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    hub: HubConfig = field(default_factory=HubConfig)
