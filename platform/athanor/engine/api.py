"""What methods learn from the engine besides ``Method``: what ``Engine.optimize`` did (``Update``)
and how the run's models are distributed (``Parallelism``), so that no method reads accelerate's or
DeepSpeed's state; a new parallelism (FSDP2) extends this, nothing above the engine."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType


@dataclass
class Update:
    """What ``Engine.optimize`` did. ``stepped``: this call ended a step (the last micro-batch of the
    accumulation: gradients clipped, the optimizer stepped, or under ``run.on_nonfinite=skip`` the
    update dropped); ``grad_norm``: the norm before clipping (None between boundaries, under
    DeepSpeed, and under fp16 without clipping)."""

    stepped: bool
    grad_norm: torch.Tensor | None = None


@dataclass(frozen=True)
class Parallelism:
    """How a run's models are distributed (``Engine.parallelism``; ``launch_parallelism`` before one exists)."""

    kind: str  # single | ddp | deepspeed | fsdp
    zero_stage: int = 0  # DeepSpeed's ZeRO stage (0: not DeepSpeed)

    @property
    def shards_parameters(self) -> bool:
        """Each process holds only a shard of every parameter (ZeRO-3): whole weights must be gathered."""
        return self.zero_stage == 3


def launch_settings(cpu_requested: bool) -> tuple[bool, bool, bool]:
    """(cpu, deepspeed, distributed) for this process, from the config and accelerate's launcher."""
    cpu = cpu_requested or not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return cpu, deepspeed, int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state(cpu: bool = False) -> PartialState:
    """accelerate's per-process state, set up exactly as ``Engine`` sets it up. Code that runs
    before any engine exists (a stage that only evaluates, a resumed recipe whose stages are all
    done) must use this rather than a bare ``PartialState()``: under DeepSpeed on CPU that comes
    up as a single process, and every later engine inherits it."""
    cpu, deepspeed, distributed = launch_settings(cpu)
    return PartialState(cpu=cpu and not deepspeed, **({"backend": "gloo"} if cpu and distributed else {}))


def launch_parallelism() -> Parallelism:
    """The parallelism accelerate's launcher asks for, read before any engine exists (a paper's
    ``check``); ``Engine.parallelism`` says the same once one does."""
    _, deepspeed, distributed = launch_settings(False)
    if deepspeed:
        return Parallelism("deepspeed", int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") or 0))
    return Parallelism("ddp" if distributed else "single")


def accelerator_parallelism(accelerator) -> Parallelism:
    """The parallelism of a prepared ``accelerate.Accelerator``."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return Parallelism("deepspeed", accelerator.state.deepspeed_plugin.zero_stage)
    return Parallelism("fsdp" if kind == DistributedType.FSDP else "ddp" if accelerator.num_processes > 1 else "single")
