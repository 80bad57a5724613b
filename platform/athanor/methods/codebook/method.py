"""The training step of a (codebook) language model: LM loss + w * reconstruction MSE, dead-code
replacement every ``replace_every`` steps, k-means initialisation of the codebooks; the data and
the LM it trains (TokFSM or text; AthanorGPT or any HF causal LM) with its codebooks attached."""
from __future__ import annotations

import torch
from accelerate.utils import broadcast
from transformers import AutoModelForCausalLM

from athanor.config import ConfigError
from athanor.data import ShuffledBatches, sharded_batches
from athanor.data.text import load_text_data
from athanor.engine import Engine, Method
from athanor.models import AthanorGPT, AthanorGPTConfig  # also registers AthanorGPT with the Auto classes

from .config import CodebookPaperConfig, ModelConfig
from .layers import CodebookModel
from .tokfsm import TokFSM


class CodebookLM(Method):
    """One step on a batch of token ids (labels = inputs, shifted inside the LM)."""

    def __init__(self, model: CodebookModel, train: dict, held_out: dict, batch_size: int, *, seed: int,
                 recon_weight: float = 1.0, replace_every: int = 0, replace_min_uses: float = 1.0,
                 kmeans_iters: int = 10, kmeans_tokens: int = 4096, eval_batches: int = 4, freeze_lm: bool = False,
                 code_lr_scale: float = 1.0):
        self.model, self.train, self.held_out = model, train, held_out
        self.batch_size, self.seed, self.recon_weight = batch_size, seed, recon_weight
        self.replace_every, self.replace_min_uses = replace_every, replace_min_uses
        self.kmeans_iters, self.kmeans_tokens = kmeans_iters, kmeans_tokens
        self.eval_batches, self.freeze_lm = eval_batches, freeze_lm
        self.code_lr_scale = code_lr_scale
        self.replaced_total = 0

    def setup(self, engine: Engine) -> None:
        self.engine = engine
        if self.model.codebooks and self.kmeans_iters:
            self.kmeans_init()
        if self.freeze_lm:  # only the codebooks train (a pretrained LM probed with a bottleneck)
            self.model.lm.requires_grad_(False)
        self.model.train()  # from_pretrained returns eval mode; a resumed run skips the eval that resets it
        n_params = sum(p.numel() for p in self.model.parameters())
        self.flops_per_token = 6 * n_params
        # The codes chase LayerNorm-ed activations whose directions move fast early in training
        # (tiny weights, rescaled to unit size): a larger LR lets them keep up (see CodebookConfig).
        scales = {f"codebooks.{name}.codebook": self.code_lr_scale for name in self.model.codebooks}
        self.model = engine.register("model", self.model, batch_size=self.batch_size, lr_scales=scales)

    def batches(self, engine: Engine):
        return ShuffledBatches(self.train, self.batch_size, self.seed, engine.rank, engine.world_size)

    @torch.no_grad()
    def kmeans_init(self) -> None:
        """Layer by layer (a later site's inputs depend on the earlier codebooks): capture the
        site's inputs on a fixed sample of training sequences, then spherical k-means."""
        rows = max(1, self.kmeans_tokens // self.train["input_ids"].shape[1])
        ids = self.train["input_ids"][:rows]
        layers = list(self.model.codebooks.values())
        captured = {}
        for i, layer in enumerate(layers):
            for later in layers[i:]:
                later.passthrough = True
            layer.capture = captured
            self.model.lm(input_ids=ids)
            layer.kmeans_init(captured.pop("x"), self.kmeans_iters, seed=self.seed + i)
            layer.capture = None
            for later in layers[i:]:
                later.passthrough = False

    def train_step(self, batch: dict) -> dict:
        ids = batch["input_ids"]
        lm_loss = self.model(input_ids=ids, labels=ids).loss
        model = self.engine.unwrap("model")
        recon = model.recon_loss()
        loss = lm_loss + self.recon_weight * recon if model.codebooks else lm_loss
        self.engine.optimize("model", loss)
        out = {"loss": loss.detach(), "lm_loss": lm_loss.detach(), "tokens": ids.numel()}
        if model.codebooks:
            out["recon"] = recon.detach()
        if model.codebooks and self.replace_every and self.engine.step % self.replace_every == 0:
            out["replaced"] = self.replace_dead(model)
        return out

    def replace_dead(self, model: CodebookModel) -> int:
        """Deterministic in (seed, step), so a resumed run replaces exactly as an unbroken one."""
        gen = torch.Generator().manual_seed(self.seed * 7919 + self.engine.step)
        n = sum(layer.replace_dead(self.replace_min_uses, gen) for layer in model.codebooks.values())
        if self.engine.world_size > 1:  # every process keeps rank 0's codes
            for layer in model.codebooks.values():
                layer.codebook.data = broadcast(layer.codebook.data.contiguous(), from_process=0)
        self.replaced_total += n
        return n

    def evaluate(self) -> dict:
        losses = []
        for batch in sharded_batches(self.held_out, self.batch_size, self.eval_batches,
                                     self.engine.rank, self.engine.world_size):
            ids = batch["input_ids"].to(self.engine.device)
            losses.append(self.model(input_ids=ids, labels=ids).loss.float())
        loss = torch.stack(losses).mean()
        return {"loss": self.engine.reduce(loss, reduction="mean")}

    def state_dict(self) -> dict:
        model = self.engine.unwrap("model")
        return {"usage": {name: layer.usage.clone() for name, layer in model.codebooks.items()},
                "replaced_total": self.replaced_total}

    def load_state_dict(self, state: dict) -> None:
        model = self.engine.unwrap("model")
        for name, usage in state.get("usage", {}).items():
            model.codebooks[name].usage.copy_(usage)
        self.replaced_total = int(state.get("replaced_total", 0))


def load_data(cfg: CodebookPaperConfig) -> dict:
    """{'train', 'held_out': {'input_ids'}, 'vocab_size', 'seq_len', 'fsm' (TokFSM or None)}."""
    if cfg.data.kind == "tokfsm":
        fsm = TokFSM(cfg.data.fsm)
        sets = fsm.datasets()
        return {"train": sets["train"], "held_out": {"input_ids": sets["eval"]["input_ids"]}, "walks": sets["eval"]["states"],
                "vocab_size": fsm.vocab_size, "seq_len": fsm.seq_len, "fsm": fsm, "batch_size": cfg.data.fsm.batch_size}
    text = load_text_data(cfg.data.text)
    return {"train": {"input_ids": text.train_blocks}, "held_out": {"input_ids": text.eval_blocks}, "fsm": None,
            "vocab_size": len(text.tokenizer), "seq_len": text.train_blocks.shape[1], "batch_size": cfg.data.text.batch_size}


def build_lm(cfg: ModelConfig, vocab_size: int, seq_len: int):
    if cfg.name_or_path:
        lm = AutoModelForCausalLM.from_pretrained(cfg.name_or_path)
        if lm.config.vocab_size < vocab_size:
            raise ConfigError(f"model.name_or_path has a vocabulary of {lm.config.vocab_size}, the tokenizer {vocab_size}")
        return lm
    # max_seq_len leaves room for the tokens generated after a full-length prompt
    return AthanorGPT(AthanorGPTConfig(vocab_size=vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                                       d_ff=cfg.d_ff, max_seq_len=seq_len + 16, position=cfg.position))


def attach(cfg: CodebookPaperConfig, lm, with_codebooks: bool) -> CodebookModel:
    cb = cfg.codebook
    if not with_codebooks:
        return CodebookModel(lm, sites=())
    return CodebookModel(lm, sites=cb.sites, layers=cb.layers, num_codes=cb.num_codes, k=cb.k, reduce=cb.reduce,
                         site_codes=cb.site_codes)
