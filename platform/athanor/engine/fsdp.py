"""FSDP2 done by the engine itself: ``fully_shard`` on a 1-D device mesh, DCP checkpoints.

One code path for CPU and GPU. accelerate ignores its FSDP plugin on CPU (it runs DDP there), so a
launch config with ``distributed_type: FSDP`` + ``fsdp_version: 2`` (``launch/fsdp.yaml``,
``launch/fsdp2-cpu.yaml``) is read here (``requested``) and hidden from accelerate; the engine then

- shards every registered model with ``torch.distributed.fsdp.fully_shard`` per transformer block
  (the classes its ``_no_split_modules`` names: the built-in GPT's ``Block``, an HF model's decoder
  layers) and once at the root, on ``init_device_mesh(device_type, (world,))`` (gloo on CPU, NCCL
  on GPU): parameters, gradients and optimizer state are each split across the processes;
- hands accelerate only the optimizer (accumulation, ``backward``'s loss scaling), never the model
  (accelerate would wrap it in DDP);
- clips with the global norm of the sharded gradients (``clip_grad_norm_``);
- checkpoints with ``torch.distributed.checkpoint`` (``save_sharded``/``load_sharded``): model and
  optimizer tensors from ``get_state_dict`` go through DCP's Hugging Face safetensors writer, each
  process writing the shards it holds into ``dcp-<name>/shard-0000<r+1>-model-00001-of-00001.safetensors``
  (the shard offsets in each file's safetensors header; no ``.metadata`` pickle is written, and the
  reader rebuilds the layout from those headers, so a checkpoint is pickle-free and can be read
  back on another number of processes by DCP);
- gathers the full state dict on the main process for ``save_pretrained`` (one loadable HF folder).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ..config import ConfigError

HIDDEN = "ATHANOR_FSDP2"  # set once accelerate's own FSDP switch is taken away (later engines still see it)


def requested() -> bool:
    """Whether the launcher asks for FSDP2 (accelerate's ``ACCELERATE_USE_FSDP`` + ``FSDP_VERSION=2``)."""
    if os.environ.get(HIDDEN) == "1":
        return True
    return (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            and os.environ.get("FSDP_VERSION", "1") == "2")


def take_over() -> bool:
    """Whether FSDP2 is asked for; if so, accelerate's own FSDP switch is taken away (the engine
    shards the models itself, the same way on CPU and GPU), remembered for later engines."""
    if not requested():
        return False
    if os.environ.pop("ACCELERATE_USE_FSDP", None) is not None:
        os.environ[HIDDEN] = "1"
    return True


def announce(engine_cfg, accelerator) -> None:
    """Refuse what FSDP2 here does not support; then say on one line how the run is distributed."""
    world = accelerator.num_processes
    if engine_cfg.mixed_precision == "fp16":
        raise ConfigError("FSDP2: engine.mixed_precision=fp16 is not supported (its loss scaler is DDP's); use bf16")
    if engine_cfg.compile:
        raise ConfigError("FSDP2: engine.compile is not supported yet; run without it")
    if not torch.distributed.is_initialized():
        raise ConfigError("FSDP2 needs a process group: start it with accelerate launch (launch/fsdp2-cpu.yaml, "
                          "launch/fsdp.yaml)")
    accelerator.print(f"parallelism: fsdp2, world size {world} (fully_shard per block and root on a "
                      f"{accelerator.device.type} mesh: parameters, gradients and optimizer state sharded)")


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if m is not model and type(m).__name__ in names]


def shard(model: torch.nn.Module, device: torch.device, mixed_precision: str) -> torch.nn.Module:
    """``fully_shard`` every transformer block of ``model``, then the root, on a 1-D mesh of all
    processes; the model is modified in place (its parameters become DTensor shards) and returned."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard}
    if mixed_precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model.to(device)
    for block in _blocks(model):
        fully_shard(block, **kwargs)
    return fully_shard(model, **kwargs)


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """The global 2-norm of the sharded gradients (a plain tensor, the same on every process), and
    the gradients scaled to at most ``max_norm``."""
    from torch.distributed.tensor import DTensor

    parameters = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters], 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


# ------------------------------------------------------------------------------ checkpoints
def _raw(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def _flat(model_sd: dict, optim_sd: dict) -> dict[str, torch.Tensor]:
    """One flat table of tensors: ``model/<fqn>`` and ``optim/<fqn>/<key>`` (safetensors holds only tensors)."""
    flat = {f"model/{k}": v for k, v in model_sd.items()}
    for fqn, state in optim_sd["state"].items():
        for key, value in state.items():
            if not torch.is_tensor(value):
                raise ConfigError(f"FSDP2 checkpoints hold tensors only; optimizer state {fqn}/{key} is "
                                  f"{type(value).__name__}")
            flat[f"optim/{fqn}/{key}"] = value
    return flat


def dcp_dir(folder: Path, name: str) -> Path:
    return Path(folder) / f"dcp-{name}"


def own_files(folder: Path, rank: int) -> list[Path]:
    """The DCP files this process wrote into ``folder`` (hashed by it for the manifest)."""
    return sorted(Path(folder).glob(f"dcp-*/shard-{rank + 1:05d}-*.safetensors"))


def save_sharded(folder: Path, name: str, model, optimizer) -> None:
    """A collective: every process writes its shards of ``name``'s model and optimizer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, _raw(optimizer))
    writer = dcp.HuggingFaceStorageWriter(str(dcp_dir(folder, name)), save_distributed=True)
    dcp.save(_flat(model_sd, optim_sd), storage_writer=writer)


def saved_specs(folder: Path, name: str) -> dict[str, tuple[tuple, torch.dtype]]:
    """Every saved tensor's global shape and dtype, read from the safetensors headers (nothing loaded)."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.HuggingFaceStorageReader(str(dcp_dir(folder, name))).read_metadata()
    return {k: (tuple(m.size), m.properties.dtype) for k, m in metadata.state_dict_metadata.items()}


def check_saved(folder: Path, name: str, model, rejected) -> None:
    """Raise ``rejected(reason)`` unless the checkpoint holds exactly ``model``'s tensors (global shape
    and dtype each) and optimizer state only for its trainable parameters, each of its shape or a scalar."""
    saved = saved_specs(folder, name)
    expected = {f"model/{k}": (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    shapes = {k: tuple(p.shape) for k, p in model.named_parameters() if p.requires_grad}
    for key in sorted(set(saved) | set(expected)):
        if key.startswith("optim/"):
            fqn = key[len("optim/"):].rsplit("/", 1)[0]
            if fqn not in shapes or saved[key][0] not in (shapes[fqn], ()):
                raise rejected(f"dcp-{name} holds optimizer state {key[6:]} that fits no parameter of {name!r}")
        elif key not in saved:
            raise rejected(f"dcp-{name} lacks {key[6:]}")
        elif key not in expected:
            raise rejected(f"dcp-{name} holds {key[6:]}, which {name!r} does not have")
        elif saved[key] != expected[key]:
            raise rejected(f"dcp-{name}: {key[6:]} is {list(saved[key][0])} {saved[key][1]}, the model's "
                           f"{list(expected[key][0])} {expected[key][1]}")


def load_sharded(folder: Path, name: str, model, optimizer) -> None:
    """Load ``name``'s model and optimizer state (a collective when a process group is up): DCP reads,
    from every saved process's files, the parts this process holds — re-split for another number of
    processes, or whole for an unsharded model (a run resumed without FSDP2)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, _raw(optimizer))  # a fresh optimizer's state is made here
    with warnings.catch_warnings():  # an unsharded 1-process run reading the shards whole: DCP warns it has no group
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(_flat(model_sd, optim_sd), storage_reader=dcp.HuggingFaceStorageReader(str(dcp_dir(folder, name))))
    set_state_dict(model, _raw(optimizer), model_state_dict=model_sd, optim_state_dict=optim_sd)


# ------------------------------------------------------------------------------ save_pretrained
def save_pretrained(model, folder: Path, is_main: bool, **kwargs) -> None:
    """A collective: the full state dict gathered on the main process (on CPU), which writes one
    ordinary Hugging Face folder (``from_pretrained`` loads it without FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return
    # fully_shard swapped the class for FSDP<Name>; the folder (its config's architectures, the custom
    # code saved beside a registered model) must name the model's own class: swapped back meanwhile
    fsdp_class = type(model)
    model.__class__ = next(c for c in fsdp_class.__mro__ if not issubclass(c, FSDPModule))
    try:
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True, **kwargs)
    finally:
        model.__class__ = fsdp_class
