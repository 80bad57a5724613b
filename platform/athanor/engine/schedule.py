"""Optimizers and LR schedules built from ``OptimConfig``."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig


def lr_multiplier(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """s_t in [0, 1]: linear warm-up, then constant / cosine / linear decay to ``min_lr_ratio``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def param_groups(model: nn.Module, cfg: OptimConfig, lr_scales: dict[str, float] | None = None) -> list[dict]:
    """Weight decay on matrices only (not norms, biases or gains). ``lr_scales`` maps a parameter
    name to an LR multiplier (used by µParam's per-layer scaling)."""
    lr_scales = lr_scales or {}
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (p.ndim >= 2, lr_scales.get(name, 1.0))
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": cfg.lr * scale,
             "initial_lr": cfg.lr * scale, "decay_base": cfg.weight_decay if decay else 0.0}
            for (decay, scale), ps in groups.items()]


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    # Independent decay is applied by ``Schedule.apply_independent_decay``, so the optimizer's own
    # (lr-coupled) decay must then be zero, for every group.
    wd = 0.0 if cfg.independent_weight_decay else cfg.weight_decay
    if cfg.independent_weight_decay and isinstance(params, list) and params and isinstance(params[0], dict):
        for group in params:
            group["weight_decay"] = 0.0
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.betas[0], weight_decay=wd)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=wd)


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR over ``lr_multiplier``; with independent weight decay it also applies
    ``θ ← θ − λ · s_t · θ`` after each optimizer step (Loshchilov & Hutter's decoupling, with λ
    not multiplied by the peak LR, as in Wortsman et al. 2023)."""

    def __init__(self, optimizer, cfg: OptimConfig, max_steps: int):
        self.cfg, self.max_steps = cfg, max_steps
        super().__init__(optimizer, lambda step: lr_multiplier(step, cfg, max_steps))

    @torch.no_grad()
    def apply_independent_decay(self) -> None:
        if not self.cfg.independent_weight_decay:
            return
        # Called after ``step()``: last_epoch already names the next step, so the step just taken
        # (whose LR used s_t) is last_epoch - 1.
        s_t = lr_multiplier(self.last_epoch - 1, self.cfg, self.max_steps)
        for group in self.optimizer.param_groups:
            decay = group.get("decay_base", self.cfg.weight_decay)
            if decay:
                for p in group["params"]:
                    p.mul_(1 - decay * s_t)

    def state_dict(self):
        return {k: v for k, v in super().state_dict().items() if k not in ("cfg", "max_steps")}
