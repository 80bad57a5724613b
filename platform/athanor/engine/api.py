"""What methods learn from the engine besides ``Method``: what ``Engine.optimize`` did (``Update``)
and how the run's models are distributed (``Parallelism``), so that no method reads accelerate's or
DeepSpeed's state; a new parallelism (FSDP2) extends this, nothing above the engine."""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field

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

    kind: str  # single | ddp | deepspeed | fsdp2 (the engine's own fully_shard, engine/fsdp.py)
    zero_stage: int = 0  # DeepSpeed's ZeRO stage (0: not DeepSpeed)
    world_size: int = field(default=1, compare=False)  # processes the models are spread over

    @property
    def shards_parameters(self) -> bool:
        """Each process holds only a shard of every parameter (ZeRO-3, FSDP2): whole weights must be gathered."""
        return self.zero_stage == 3 or self.kind == "fsdp2"


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


@atexit.register
def _leave_process_group() -> None:
    """Destroy the process group before the interpreter tears down: a gloo group left for the C++
    destructors at exit once aborted a finished process ("terminate called without an active
    exception", exit -6) in a 2-process DeepSpeed test. Destroying it is local, no collective."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def launch_parallelism() -> Parallelism:
    """The parallelism accelerate's launcher asks for, read before any engine exists (a paper's
    ``check``); ``Engine.parallelism`` says the same once one does."""
    from .fsdp import requested

    _, deepspeed, distributed = launch_settings(False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if deepspeed:
        return Parallelism("deepspeed", int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") or 0), world)
    if requested():
        return Parallelism("fsdp2", world_size=world)
    return Parallelism("ddp" if distributed else "single", world_size=world)


def accelerator_parallelism(accelerator) -> Parallelism:
    """The parallelism of a prepared ``accelerate.Accelerator``."""
    kind, world = accelerator.distributed_type, accelerator.num_processes
    if kind == DistributedType.DEEPSPEED:
        return Parallelism("deepspeed", accelerator.state.deepspeed_plugin.zero_stage, world)
    return Parallelism("fsdp" if kind == DistributedType.FSDP else "ddp" if world > 1 else "single", world_size=world)
