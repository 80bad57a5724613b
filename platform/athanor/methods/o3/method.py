"""Orthogonal LoRA: one adapter per unlearning request, trained on that request's forget data only.

O3 (Gao et al., "On Large Language Model Continual Unlearning", ICLR 2025), Sec. 3.2: request t
adds a LoRA ``ΔW_t = B_t A_t`` (A_t: r x d_in, B_t: d_out x r) to every adapted projection of the
frozen LM and minimises

    L_t = CE(model_t(x), y~)  +  λ · Σ_{modules} Σ_{s<t} ‖A_s A_tᵀ‖²_F

on the forget set D_t, where y~ removes the knowledge (a refusal such as "unknown", or a random
other answer: "random relabelling"), and the second term keeps request t's input subspace
orthogonal to the earlier requests' (A_s frozen). No retained data is used. At inference every
adapter is active and scaled by the OOD detector's weight w(x) (see ``model.py``).

The penalty is accumulated by forward hooks on the current adapter's ``lora_A`` modules, i.e.
while the layer runs, which is also when DeepSpeed ZeRO-3 has gathered the layer's weights.
The gradient-ascent baseline (full model, ``-CE`` on the true answers) is here too.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from ...compat import full_numel
from ...config import ConfigError, OptimConfig, choice, positive
from ...data import ShuffledBatches
from ...engine import Engine, Method
from ...parts.fact_world import QA, QAData
from ...parts.lm import answer_matches, lm_inputs


@dataclass
class UnlearnConfig:
    target: str = "refusal"  # refusal (answer with `refusal`) | relabel (a random other answer)
    refusal: str = "unknown"
    orth_lambda: float = 0.1  # λ of the orthogonality penalty
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str = "all-linear"  # peft: every linear layer but the output head (attention + MLP)
    max_steps: int = 40  # per request (full batch: 20-30 steps reach >= 99.9% refusal on the tiny world)
    lr: float = 3e-3
    batch_size: int = 0  # forget records per process (README: batch sizes); 0: all, split over the processes
    gate: str = "max"  # inference: every adapter scaled by max_t w_t(x) (paper) | per_request: adapter t by w_t(x)

    def validate(self) -> None:
        choice(self.target, ("refusal", "relabel"), "unlearn.target")
        choice(self.gate, ("max", "per_request"), "unlearn.gate")
        positive(self.orth_lambda, "unlearn.orth_lambda", allow_zero=True)
        for key in ("r", "alpha", "max_steps", "lr"):
            positive(getattr(self, key), f"unlearn.{key}")
        positive(self.batch_size, "unlearn.batch_size", allow_zero=True)

    def optim(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, schedule="constant", weight_decay=0.0, grad_clip=1.0)


def adapter_name(request: int) -> str:
    return f"request_{request}"


def unlearning_answers(records: list[QA], cfg: UnlearnConfig, data: QAData, seed: int) -> list[str]:
    """The targets that remove the knowledge: a refusal, or a random other answer of the same
    attribute (of the dataset when attributes are unknown)."""
    if cfg.target == "refusal":
        return [cfg.refusal] * len(records)
    rng = random.Random(seed)
    pool = sorted({r.answer for r in data.records})
    out = []
    for r in records:
        options = [a for a in data.answer_choices.get(r.attribute, pool) if a != r.answer]
        out.append(rng.choice(options))
    return out


def lora_config(cfg: UnlearnConfig):
    targets = (cfg.target_modules if cfg.target_modules == "all-linear"
               else [t.strip() for t in cfg.target_modules.split(",")])
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")


def earlier_lora_A(adapter_dirs: list[Path]) -> dict[str, torch.Tensor]:
    """``module path -> [A_1; ...; A_{t-1}]`` (stacked rows) from saved adapters."""
    stacked: dict[str, list[torch.Tensor]] = {}
    for folder in adapter_dirs:
        for key, value in load_file(str(Path(folder) / "adapter_model.safetensors")).items():
            if ".lora_A." in key:
                stacked.setdefault(key.split(".lora_A.")[0], []).append(value.float())
    return {k: torch.cat(v) for k, v in stacked.items()}


class OrthogonalPenalty:
    """Σ_modules Σ_{s<t} ‖A_s A_tᵀ‖²_F, summed over the forward pass that just ran."""

    def __init__(self, model, adapter: str, earlier: dict[str, torch.Tensor]):
        self.terms: list[torch.Tensor] = []
        self.handles = []
        self.matched = 0
        for name, module in model.named_modules():
            if not name.endswith(f".lora_A.{adapter}"):
                continue
            path = name[: -len(f".lora_A.{adapter}")]
            if path in earlier:
                self.handles.append(module.register_forward_hook(self._hook(earlier[path])))
                self.matched += 1
        if earlier and self.matched != len(earlier):
            raise ConfigError(f"earlier adapters adapt {len(earlier)} modules, this one {self.matched}: "
                              f"unlearn.target_modules must stay the same across requests")

    def _hook(self, previous: torch.Tensor):
        def hook(module, _inputs, _output):
            weight = module.weight  # r x d_in; gathered here under ZeRO-3
            self.terms.append((previous.to(weight) @ weight.T).pow(2).sum())
        return hook

    def pop(self) -> torch.Tensor | None:
        """The penalty of the last forward pass (None when there are no earlier requests)."""
        if not self.terms:
            return None
        total = torch.stack(self.terms).sum()
        self.terms = []
        return total


class UnlearnRequest(Method):
    """Request t: a fresh LoRA on the frozen LM, CE on the unlearning targets + λ · orthogonality."""

    def __init__(self, base_model, request: int, cfg: UnlearnConfig, train: dict, earlier_dirs: list[Path],
                 seed: int = 0):
        self.base_model, self.request, self.cfg, self.train = base_model, request, cfg, train
        self.earlier_dirs, self.seed = earlier_dirs, seed

    def setup(self, engine: Engine) -> None:
        self.engine = engine
        name = "default"  # peft saves other names into a subfolder; O3Model names them request_t on loading
        peft_model = get_peft_model(self.base_model, lora_config(self.cfg), adapter_name=name)
        # hooks go on before prepare so they run before DeepSpeed's release-after-forward hooks
        self.penalty = OrthogonalPenalty(peft_model, name, earlier_lora_A(self.earlier_dirs))
        n = len(self.train["input_ids"])
        self.batch_size = self.cfg.batch_size or n // engine.world_size  # per process, as every batch_size
        if self.batch_size < 1:
            raise ConfigError(f"{n} forget records cannot be split over {engine.world_size} processes")
        self.model = engine.register("model", peft_model, optim=self.cfg.optim(), max_steps=self.cfg.max_steps,
                                     batch_size=self.batch_size)
        self.n_trainable = sum(full_numel(p) for p in peft_model.parameters() if p.requires_grad)

    def batches(self, engine: Engine) -> ShuffledBatches:
        return ShuffledBatches(self.train, self.batch_size, self.seed, engine.rank, engine.world_size)

    def train_step(self, batch: dict) -> dict:
        ce = self.model(**lm_inputs(batch)).loss
        orth = self.penalty.pop()
        loss = ce if orth is None or self.cfg.orth_lambda == 0 else ce + self.cfg.orth_lambda * orth
        self.engine.optimize("model", loss)
        metrics = {"loss": loss.detach(), "ce": ce.detach(), "samples": len(batch["input_ids"])}
        if orth is not None:
            metrics["orth_penalty"] = orth.detach()
        return metrics

    def evaluate(self) -> dict:
        """Share of forget records answered with the unlearning target (refusal / relabel)."""
        rate = answer_matches(self.model, self.train).float().mean().item()
        self.penalty.pop()  # eval forwards also ran the hooks
        return {"target_rate": rate}


class GradientAscent(Method):
    """Baseline: the full model ascends the CE of the true answers of the forget set."""

    def __init__(self, model, train: dict, batch_size: int, optim: OptimConfig, max_steps: int, seed: int = 0):
        self.model_unprepared, self.train, self.requested_batch = model, train, batch_size
        self.optim, self.max_steps, self.seed = optim, max_steps, seed

    def setup(self, engine: Engine) -> None:
        self.engine = engine
        n = len(self.train["input_ids"])
        self.batch_size = self.requested_batch or n // engine.world_size  # per process, as every batch_size
        self.model = engine.register("model", self.model_unprepared, optim=self.optim, max_steps=self.max_steps,
                                     batch_size=self.batch_size)

    def batches(self, engine: Engine) -> ShuffledBatches:
        return ShuffledBatches(self.train, self.batch_size, self.seed, engine.rank, engine.world_size)

    def train_step(self, batch: dict) -> dict:
        ce = self.model(**lm_inputs(batch)).loss
        self.engine.optimize("model", -ce)
        return {"ce": ce.detach(), "samples": len(batch["input_ids"])}

    def evaluate(self) -> dict:
        return {"forget_acc": answer_matches(self.model, self.train).float().mean().item()}


# ---------------------------------------------------------------------------- inference
class StackedLoRA:
    """Every request's adapter as one low-rank update per projection, for gates that give all
    adapters the same weight (``max``: w(x) = max_t w_t(x); ``always_on``: w = 1):

        h' = W h + w(x) · Σ_t s_t B_t A_t h = W h + w(x) · ΔW h

    ΔW is kept factored, [s_1 B_1 … s_T B_T] @ [A_1; …; A_T] (rank T·r), while that is cheaper than
    the dense d_out × d_in matrix, and dense otherwise; either way one extra product per projection
    and one forward hook, whatever the number of requests (peft's path runs T LoRA modules, each
    behind its own hook). ``s_t`` is peft's scaling, lora_alpha / r (/ √r with rsLoRA). Row weights
    are set with ``weights(w)`` ([n] per batch row) and read by the hooks."""

    def __init__(self, lm, adapter_dirs: list[Path]):
        factors: dict[str, tuple[list, list]] = {}
        for folder in adapter_dirs:
            meta = json.loads((Path(folder) / "adapter_config.json").read_text())
            scale = meta["lora_alpha"] / (math.sqrt(meta["r"]) if meta.get("use_rslora") else meta["r"])
            state = load_file(str(Path(folder) / "adapter_model.safetensors"))
            for key, a in state.items():
                if ".lora_A." not in key:
                    continue
                path = key.split(".lora_A.")[0].removeprefix("base_model.model.")
                b = state[key.replace(".lora_A.", ".lora_B.")]
                pair = factors.setdefault(path, ([], []))
                pair[0].append(a.float())
                pair[1].append(b.float() * scale)
        self.row_weight: torch.Tensor | None = None
        self.handles = []
        self.updates: dict[str, tuple] = {}
        for path, (a_list, b_list) in factors.items():
            module = lm.get_submodule(path)
            if not isinstance(module, torch.nn.Linear):
                raise TypeError(f"{path}: stacking supports nn.Linear projections, not {type(module).__name__}")
            a, b = torch.cat(a_list), torch.cat(b_list, dim=1)  # [T·r, d_in], [d_out, T·r]
            dtype = module.weight.dtype
            if a.shape[0] * (a.shape[1] + b.shape[0]) < a.shape[1] * b.shape[0]:
                update = (a.to(dtype), b.to(dtype))
            else:
                update = ((b @ a).to(dtype),)
            self.updates[path] = update
            self.handles.append(module.register_forward_hook(self._hook(path)))

    def _hook(self, path: str):
        def hook(_module, inputs, out):
            w = self.row_weight
            if w is None:
                return out
            x = inputs[0]
            update = self.updates[path]
            if update[0].device != x.device:  # the LM moved after loading: follow it, once
                update = self.updates[path] = tuple(u.to(x.device) for u in update)
            delta = F.linear(F.linear(x, update[0]), update[1]) if len(update) == 2 else F.linear(x, update[0])
            w = w.to(out)
            if out.shape[0] != len(w):  # beam search / sampling expand the batch row-wise
                w = w.repeat_interleave(out.shape[0] // len(w))
            return out + delta * w.view(-1, *([1] * (out.dim() - 1)))
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
