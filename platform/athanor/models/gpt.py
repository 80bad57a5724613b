"""A compact GPT as a Hugging Face ``PreTrainedModel``, with the switches the stability paper studies.

Pre-LN decoder blocks (post-LN with ``pre_ln=False``); optional per-head qk-layernorm (Dehghani et al. 2023), z-loss
``w * mean(log Z^2)`` (Chowdhery et al. 2022), biases, tied embeddings, learned or rotary
positions. ``AutoModelForCausalLM.from_pretrained`` loads a saved folder after ``import athanor.models``
(the class is registered) or with ``trust_remote_code=True`` (the code is saved beside it).

µParam (``mup_base_width > 0``; Yang et al. 2022, Table 3 for Adam, in the simple form Wortsman
et al. 2023 use): hidden matrices (attention qkv/proj, MLP) are initialised N(0, 1/fan_in)
and trained at LR · base_width / d_model (``mup_lr_scales()``, fed to the optimizer's per-parameter
multipliers); the output logits are multiplied by base_width / d_model; embeddings and norms keep
the standard init and the full LR. At ``d_model == base_width`` only the hidden init differs.

Probes (``set_probes(True, sample_rows)``): on the next forward each layer records its max
attention logit and mean attention entropy over a sample of sequences (all heads, causal
positions), and the RMS of the residual stream after it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class AthanorGPTConfig(PretrainedConfig):
    model_type = "athanor_gpt"

    def __init__(self, vocab_size=260, d_model=128, n_layers=4, n_heads=4, d_ff=0, max_seq_len=256,
                 position="learned", qk_layernorm=False, z_loss_weight=0.0, bias=False,
                 tie_embeddings=True, dropout=0.0, layer_norm_eps=1e-5, init_std=0.02,
                 fused_loss=False, mup_base_width=0, pre_ln=True, **kwargs):
        self.vocab_size, self.d_model, self.n_layers, self.n_heads = vocab_size, d_model, n_layers, n_heads
        self.d_ff = d_ff or 4 * d_model
        self.max_seq_len, self.position = max_seq_len, position
        self.qk_layernorm, self.z_loss_weight, self.bias = qk_layernorm, z_loss_weight, bias
        self.tie_embeddings, self.dropout, self.layer_norm_eps = tie_embeddings, dropout, layer_norm_eps
        self.init_std, self.fused_loss = init_std, fused_loss
        self.mup_base_width = mup_base_width  # 0: standard parameterization
        self.pre_ln = pre_ln  # False: post-LN blocks, x = LN(x + f(x)) (the original Transformer)
        # HF reads these names (generation, resizing, DeepSpeed auto-config).
        kwargs.setdefault("hidden_size", d_model)
        kwargs.setdefault("num_hidden_layers", n_layers)
        kwargs.setdefault("num_attention_heads", n_heads)
        kwargs["tie_word_embeddings"] = False  # tying is done by reusing wte in the head, not by HF
        super().__init__(**kwargs)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: AthanorGPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = _hidden(nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias))
        self.proj = _hidden(nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias))
        self.q_norm = nn.LayerNorm(self.head_dim, eps=cfg.layer_norm_eps, bias=cfg.bias) if cfg.qk_layernorm else None
        self.k_norm = nn.LayerNorm(self.head_dim, eps=cfg.layer_norm_eps, bias=cfg.bias) if cfg.qk_layernorm else None
        self.dropout = cfg.dropout
        self.probe = False  # when True, forward records the max attention logit and entropy (probes)
        self.probe_rows = None  # sequences the probes look at (None: all)
        self.max_logit = self.entropy = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)
        if self.q_norm is not None and q.is_cuda:  # one fused Triton kernel per tensor on GPU
            from athanor.kernels import head_norm

            eps = self.q_norm.eps
            q = head_norm(q, self.q_norm.weight, self.q_norm.bias, eps=eps)
            k = head_norm(k, self.k_norm.weight, self.k_norm.bias, eps=eps)
        elif self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # B, H, T, hd
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        if self.probe:
            with torch.no_grad():  # the largest pre-softmax logit over causal positions, and the entropy
                rows = slice(0, self.probe_rows)
                logits = (q[rows] @ k[rows].transpose(-2, -1)).float().mul_(1 / math.sqrt(self.head_dim))
                # in place (no second rows x H x T x T tensor): the probes cost ~15% of a tiny model's step
                logits.masked_fill_(torch.ones(T, T, dtype=torch.bool, device=x.device).triu_(1), float("-inf"))
                self.max_logit = logits.amax()
                self.entropy = torch.special.entr(logits.softmax(-1)).sum(-1).mean()
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


def _hidden(linear: nn.Linear) -> nn.Linear:
    """Marks a hidden matrix (neither embedding nor readout): the one µParam re-scales."""
    linear.hidden_matrix = True
    return linear


class Block(nn.Module):
    def __init__(self, cfg: AthanorGPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = nn.Sequential(_hidden(nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)), nn.GELU(),
                                 _hidden(nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)))
        self.drop = nn.Dropout(cfg.dropout)
        self.pre_ln = cfg.pre_ln

    def forward(self, x, rope):
        if not self.pre_ln:
            x = self.ln1(x + self.drop(self.attn(x, rope)))
            return self.ln2(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.ln1(x), rope))
        return x + self.drop(self.mlp(self.ln2(x)))


class AthanorGPT(PreTrainedModel, GenerationMixin):
    config_class = AthanorGPTConfig
    base_model_prefix = "gpt"
    # Activation checkpointing per block: ``gradient_checkpointing_enable()`` (transformers) sets the
    # two attributes below; each block's activations are then recomputed in backward, not kept.
    supports_gradient_checkpointing = True
    gradient_checkpointing = False
    _no_split_modules = ["Block"]

    def __init__(self, config: AthanorGPTConfig):
        super().__init__(config)
        if config.d_model % config.n_heads:
            raise ValueError(f"d_model={config.d_model} is not divisible by n_heads={config.n_heads}")
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.max_seq_len, config.d_model) if config.position == "learned" else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        # µParam's readout multiplier; 1 in the standard parameterization.
        self.output_mult = config.mup_base_width / config.d_model if config.mup_base_width else 1.0
        self.probe_rows = None
        self.act_rms: list[torch.Tensor] = []
        self.post_init()

    def _init_weights(self, module):
        std = self.config.init_std
        if isinstance(module, nn.Linear) and getattr(module, "hidden_matrix", False) and self.config.mup_base_width:
            std = module.in_features ** -0.5
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def head_weight(self) -> torch.Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def _rope(self, T: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.config.position != "rotary":
            return None
        hd = self.config.d_model // self.config.n_heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=device).float() / hd))
        ang = torch.outer(torch.arange(T, device=device).float(), inv)
        return ang.cos(), ang.sin()

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
        x = self.wte(input_ids)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=input_ids.device))
        rope = self._rope(T, input_ids.device)
        probing = self.blocks[0].attn.probe
        self.act_rms = []
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = self._gradient_checkpointing_func(block.__call__, x, rope) if recompute else block(x, rope)
            if probing:
                self.act_rms.append(x[: self.probe_rows].detach().float().pow(2).mean().sqrt())
        return self.ln_f(x)

    def forward(self, input_ids, attention_mask=None, labels=None, return_dict=True, **_):
        """HF convention: ``labels`` are the inputs; the shift happens here; -100 is ignored."""
        h = self.hidden_states(input_ids)
        if self.output_mult != 1.0:
            h = h * self.output_mult
        loss = logits = None
        stats = {}
        if labels is not None and self.config.fused_loss:
            from athanor.kernels import fused_linear_cross_entropy

            out = fused_linear_cross_entropy(h[:, :-1].reshape(-1, h.shape[-1]), self.head_weight(),
                                             labels[:, 1:].reshape(-1), z_loss_weight=self.config.z_loss_weight)
            loss = out.loss
            stats = dict(ce_loss=out.ce_loss, z_loss=out.z_loss, log_z_mean=out.log_z_mean, log_z_max=out.log_z_max)
        else:
            logits = F.linear(h, self.head_weight())
            if labels is not None:
                shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
                targets = labels[:, 1:].reshape(-1)
                ce = F.cross_entropy(shift_logits, targets, ignore_index=-100)
                log_z = torch.logsumexp(shift_logits, dim=-1)[targets != -100]
                z_loss = (log_z**2).mean()
                loss = ce + self.config.z_loss_weight * z_loss if self.config.z_loss_weight else ce
                stats = dict(ce_loss=ce.detach(), z_loss=z_loss.detach(),
                             log_z_mean=log_z.detach().mean(), log_z_max=log_z.detach().max())
        out = CausalLMOutputWithPast(loss=loss, logits=logits)
        out.stats = stats  # ModelOutput drops unknown keys from its tuple view, not from attributes
        return out

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids[:, -self.config.max_seq_len:]}

    def set_probes(self, on: bool, sample_rows: int | None = None) -> None:
        """Probe the next forward passes; ``sample_rows`` limits them to the first sequences."""
        self.probe_rows = sample_rows
        for block in self.blocks:
            block.attn.probe, block.attn.probe_rows = on, sample_rows

    def max_attention_logits(self) -> list[float]:
        return [float(b.attn.max_logit) for b in self.blocks if b.attn.max_logit is not None]

    def attention_entropies(self) -> list[float]:
        """Mean softmax entropy (nats) of each layer's attention rows; collapse -> 0."""
        return [float(b.attn.entropy) for b in self.blocks if b.attn.entropy is not None]

    def activation_rms(self) -> list[float]:
        """RMS of the residual stream after each block, from the last probed forward."""
        return [float(v) for v in self.act_rms]

    def mup_lr_scales(self) -> dict[str, float]:
        """µParam's per-parameter LR multipliers (empty in the standard parameterization)."""
        if not self.config.mup_base_width:
            return {}
        scale = self.config.mup_base_width / self.config.d_model
        return {f"{module_name}.weight": scale for module_name, module in self.named_modules()
                if getattr(module, "hidden_matrix", False)}
