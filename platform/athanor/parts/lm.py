"""Causal-LM helpers shared by the LM papers (O3, SeND, codebook): a target LM built from config (a
tiny GPT-NeoX) or any HF causal LM, trained to memorise QA facts with the loss on the answer tokens
only (``AnswerLM``), scored by answer accuracy (``answer_matches``, teacher forced), QA records
encoded for it (``encode_records``), and the decoder's block list (``decoder_layers``).

Accuracy of a record = every answer token is the model's argmax given the prompt (teacher forced),
so one-word answers of the tiny world and multi-token answers of real datasets are treated alike.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

from ..config import ConfigError, positive
from ..data import ShuffledBatches
from ..engine import Engine, Method
from .fact_world import QA, encode_qa


@dataclass
class ModelConfig:
    name_or_path: str = ""  # any HF causal LM (hub id or folder); empty: a GPT-NeoX built from the sizes below
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    dtype: str = "float32"  # float32 | bfloat16 (weights as loaded; engine.mixed_precision is separate)

    def validate(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            positive(getattr(self, key), f"model.{key}")
        if not self.name_or_path and self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} must be divisible by "
                              f"model.num_heads={self.num_heads}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"model.dtype={self.dtype!r} is not one of: float32, bfloat16")


def load_tokenizer(name_or_path: str):
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:
        raise ConfigError(f"cannot load a tokenizer from {name_or_path!r} ({str(e).splitlines()[0][:200]})") from None
    if tok.pad_token is None:  # Llama/GPT-2 have none; padding positions are masked or ignored anyway
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def build_lm(cfg: ModelConfig, vocab_size: int, max_length: int):
    if cfg.name_or_path:
        try:
            return AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=getattr(torch, cfg.dtype))
        except Exception as e:
            raise ConfigError(f"model.name_or_path={cfg.name_or_path!r}: {str(e).splitlines()[0][:200]}") from None
    config = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                           num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                           max_position_embeddings=max(64, max_length), rotary_pct=0.25,
                           hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=None, eos_token_id=2, pad_token_id=0)
    return GPTNeoXForCausalLM(config)


def load_lm(folder: str | Path, dtype: str = "float32"):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))


def encode_records(tokenizer, records: list[QA], prompt_template: str, max_length: int,
                   answers: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Encode ``records`` (optionally with replacement ``answers``: refusals, relabels) and add an
    ``answer_mask`` (answer tokens without the EOS) for accuracy."""
    prompts = [prompt_template.format(question=r.question) for r in records]
    batch = encode_qa(tokenizer, prompts, answers or [r.answer for r in records], max_length)
    mask = batch["labels"] != -100
    last = mask.long().cumsum(1) == mask.long().sum(1, keepdim=True)  # the EOS is the last label
    batch["answer_mask"] = mask & ~(last & mask)
    return batch


LAYER_LISTS = ("layers", "h", "blocks", "layer")  # what HF decoders call their block list


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer's block list (GPT-NeoX/Pythia, Llama/Mistral, GPT-2, athanor's GPT): the
    ModuleList with ``config.num_hidden_layers`` entries named one of ``LAYER_LISTS``; a DDP or
    DeepSpeed wrapper is looked through."""
    base = getattr(model, "module", model)
    n = base.config.num_hidden_layers
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and name.split(".")[-1] in LAYER_LISTS:
            return module
    raise ValueError(f"{type(base).__name__}: no decoder layer list named one of {LAYER_LISTS}")


def lm_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}


@torch.no_grad()
def answer_matches(model, batch: dict, batch_size: int = 256, weights: dict | None = None,
                   gate=None) -> torch.Tensor:
    """Bool per row: the argmax continuation equals ``labels`` on every answer token. ``gate`` is a
    context factory ``gate(rows) -> ctx`` that scales adapters per row (O3's w(x))."""
    out = []
    device = next(model.parameters()).device
    n = len(batch["input_ids"])
    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        ids = batch["input_ids"][rows].to(device)
        with gate(rows) if gate is not None else contextlib.nullcontext():
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"][rows].to(device)).logits
        pred = logits[:, :-1].argmax(-1).cpu()
        target = batch["labels"][rows][:, 1:]
        mask = batch["answer_mask"][rows][:, 1:]
        out.append(((pred == target) | ~mask).all(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


class AnswerLM(Method):
    """Memorise QA facts: cross-entropy on the answer tokens (and EOS) given the question."""

    def __init__(self, model, train: dict, evals: dict[str, dict], batch_size: int, seed: int = 0):
        self.model_unprepared, self.train, self.evals, self.batch_size = model, train, evals, batch_size
        self.seed = seed  # of the batch order

    def setup(self, engine: Engine) -> None:
        self.engine = engine
        self.model = engine.register("model", self.model_unprepared, batch_size=self.batch_size)
        self.n_params = sum(p.numel() for p in self.model_unprepared.parameters())

    def batches(self, engine: Engine) -> ShuffledBatches:
        return ShuffledBatches(self.train, self.batch_size, self.seed, engine.rank, engine.world_size)

    def train_step(self, batch: dict) -> dict:
        loss = self.model(**lm_inputs(batch)).loss
        self.engine.optimize("model", loss)
        return {"loss": loss.detach(), "samples": len(batch["input_ids"])}

    def evaluate(self) -> dict:
        return {f"acc_{name}": answer_matches(self.model, batch).float().mean().item()
                for name, batch in self.evals.items()}
