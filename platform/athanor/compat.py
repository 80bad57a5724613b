"""Every private or undocumented attribute of accelerate, DeepSpeed and transformers that athanor
touches, in one place, each behind a function that says what it is for.

These are not public API: a new release may move them. pyproject.toml bounds the three packages
to the releases these were checked against (accelerate 1.x, deepspeed 0.x from 0.15, transformers
4.45 to 5.x); when a bound is raised, this module is what to re-check (tests/test_engine.py,
tests/test_o3_e2e.py and the DeepSpeed tests of tests/test_pretrain.py exercise every function).
"""
from __future__ import annotations

import contextlib

import torch

from .config import ConfigError


def reset_accelerator_state_if_precision_changes(mixed_precision: str) -> None:
    """accelerate keeps one process-wide ``AcceleratorState`` (a Borg singleton in
    ``AcceleratorState._shared_state``) and refuses a second ``Accelerator`` with another mixed
    precision; a multi-stage recipe may change precision between stages. Resetting the state
    (``_reset_state``) keeps the process group (``reset_partial_state=False``)."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed_precision):
        AcceleratorState._reset_state(reset_partial_state=False)


def first_deepspeed_engine(accelerator):
    """The DeepSpeed engine that ``accelerator.backward`` drives: only the first prepared model's
    (``Accelerator.deepspeed_engine_wrapped``, set by ``prepare``, undocumented)."""
    return accelerator.deepspeed_engine_wrapped.engine


def full_numel(param: torch.Tensor) -> int:
    """Elements of a parameter as the model defines it: under ZeRO-3 the local tensor is an empty
    placeholder and DeepSpeed keeps the full size in ``param.ds_numel``."""
    return param.ds_numel if hasattr(param, "ds_numel") else param.numel()


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this process holds: under ZeRO-3 DeepSpeed keeps it in
    ``param.ds_tensor`` (the parameter itself is an empty placeholder outside a forward); under
    FSDP2 the parameter is a DTensor whose local part is ``to_local()``."""
    shard = param.ds_tensor if hasattr(param, "ds_tensor") else None
    if shard is None and hasattr(param, "to_local"):
        return param.detach().to_local()
    return shard if shard is not None else param.detach()


@contextlib.contextmanager
def plain_loading():
    """Load models unsharded on one process (evaluation, publishing) even after a ZeRO-3 stage:
    once DeepSpeed is set up, transformers' ``from_pretrained`` builds models under ``zero.Init``
    (it sees the config through ``transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref``),
    a collective the other processes would not join. The config is unset meanwhile, then restored."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if ref is not None and ref() is not None:
            hf_deepspeed.set_hf_deepspeed_config(ref())


def quiet_hub_mixin_loading() -> None:
    """huggingface_hub's ``ModelHubMixin.from_pretrained`` ``print``s "Loading weights from local
    directory" on every local load (4x a run, 8x under DDP), with no logger or switch to stop it: the
    module's ``print`` is replaced by one that drops that line and passes anything else on."""
    import builtins

    from huggingface_hub import hub_mixin

    def print_(*args, **kwargs):
        if args != ("Loading weights from local directory",):
            builtins.print(*args, **kwargs)

    hub_mixin.print = print_


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute ``model``'s per-layer activations in backward instead of keeping them.

    transformers 5 renamed ``gradient_checkpointing_enable(gradient_checkpointing_kwargs=)`` to
    ``activation_checkpointing_enable(activation_checkpointing_kwargs=)`` (the old name warns and
    goes in v6). Non-reentrant checkpointing: no input has to require grad.
    """
    kwargs = {"use_reentrant": False}
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"engine.activation_checkpointing: {type(model).__name__} cannot recompute its layers "
                          f"(not a model with gradient checkpointing)")
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def set_scheduler_last_lr(schedule: torch.optim.lr_scheduler.LRScheduler, lrs: list[float]) -> None:
    """What ``get_last_lr()`` returns: torch keeps it in the private ``_last_lr`` (checked on 2.13)."""
    schedule._last_lr = list(lrs)
