"""A checkpoint's state files read as untrusted input: checked before anything is loaded.

``checkpoint.check_folder`` has made sure the folder holds exactly its manifest's regular files.
What those files say is checked here, from their headers, before a single tensor is read into
memory or into a model: every safetensors header is parsed by bounds-checked code (a 2^62 header
length or an offset past the end of the file is refused, not allocated), every tensor a JSON
structure names must be in its safetensors file, and every tensor's dtype and shape must be those
of what will receive it — the model's weights, the optimizer's per-parameter state, the RNGs. LR
schedules, the loss scaler and the data stream's position must have the fields, and the kinds of
value, the current ones have. A method's own state is only parsed here (its shape may change as it
trains: SeND's records grow); the method's ``load_state_dict`` is its check (see ``Checkpointer``).
Each failure is a ``Rejected`` naming the file and what is wrong.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import NamedTuple

import torch

from .checkpoint import Rejected
from .state import TENSOR, join_state

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("BOOL", "bool"), ("U8", "uint8"), ("I8", "int8"), ("I16", "int16"), ("U16", "uint16"), ("F16", "float16"),
    ("BF16", "bfloat16"), ("I32", "int32"), ("U32", "uint32"), ("F32", "float32"), ("F64", "float64"),
    ("I64", "int64"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
    if hasattr(torch, attr)}


class TensorSpec(NamedTuple):
    """What a header says of a tensor: checked before the tensor itself is read."""
    dtype: torch.dtype
    shape: tuple[int, ...]


def _spec(value) -> TensorSpec | None:
    if isinstance(value, TensorSpec):
        return value
    if torch.is_tensor(value):
        return TensorSpec(value.dtype, tuple(value.shape))
    return None


# ------------------------------------------------------------------------------ files
def tensor_header(path: Path) -> dict[str, TensorSpec]:
    """{name: (dtype, shape)} of a safetensors file, every entry's byte range inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > min(MAX_HEADER_BYTES, size - 8):
            raise Rejected(f"{path.name}: its header length ({length} bytes) does not fit its {size}-byte file")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError):
            raise Rejected(f"{path.name}: its header is not JSON") from None
    if not isinstance(header, dict):
        raise Rejected(f"{path.name}: its header is not a table of tensors")
    data_bytes, specs = size - 8 - length, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        entry = entry if isinstance(entry, dict) else {}
        dtype, shape, offsets = DTYPES.get(entry.get("dtype")), entry.get("shape"), entry.get("data_offsets")
        if (dtype is None or not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(n) is int for n in offsets) or not 0 <= offsets[0] <= offsets[1] <= data_bytes
                or offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize):
            raise Rejected(f"{path.name}: tensor {name[:80]!r} has a bad dtype, shape or byte range "
                           f"(a truncated or altered file)")
        specs[name] = TensorSpec(dtype, tuple(shape))
    return specs


def _tensor_keys(structure):
    if isinstance(structure, dict):
        if set(structure) == {TENSOR}:
            yield structure[TENSOR]
            return
        for value in structure.values():
            yield from _tensor_keys(value)
    elif isinstance(structure, list):
        for value in structure:
            yield from _tensor_keys(value)


def state_specs(folder: Path, stem: str, label: str | None = None):
    """``stem.json`` joined with ``stem.safetensors``'s header: the state with a ``TensorSpec`` in
    place of every tensor, read without loading one. ``label`` names the files in messages."""
    label = label or stem
    try:
        structure = json.loads((folder / f"{stem}.json").read_text())
    except (ValueError, RecursionError):
        raise Rejected(f"{label}.json is not JSON") from None
    specs = tensor_header(folder / f"{stem}.safetensors")
    for key in _tensor_keys(structure):
        if not isinstance(key, str) or key not in specs:
            raise Rejected(f"{label}.json names tensor {str(key)[:80]!r}, which {label}.safetensors does not hold")
    try:
        return join_state(structure, specs)
    except (KeyError, TypeError, ValueError, RecursionError) as err:
        raise Rejected(f"{label}.json is not a state structure ({type(err).__name__})") from None


# ------------------------------------------------------------------------------ against what receives them
def check_model(specs: dict[str, TensorSpec], model: torch.nn.Module, filename: str) -> None:
    """The file's tensors are the model's, by name, dtype and shape. A weight the file lacks is
    allowed only when it shares storage with one it holds (tied weights are saved once)."""
    expected = model.state_dict()
    unexpected = sorted(set(specs) - set(expected))
    if unexpected:
        raise Rejected(f"{filename} holds {unexpected[0][:80]!r}, which the model does not have")
    present_storages = {expected[k].untyped_storage().data_ptr() for k in specs if expected[k].numel()}
    for key, tensor in expected.items():
        spec = specs.get(key)
        if spec is None:
            if tensor.numel() and tensor.untyped_storage().data_ptr() in present_storages:
                continue
            raise Rejected(f"{filename} lacks the model's {key[:80]!r}")
        if spec != _spec(tensor):
            raise Rejected(f"{filename}: {key[:80]!r} is {spec.dtype} {list(spec.shape)}, "
                           f"the model's is {tensor.dtype} {list(tensor.shape)}")


def check_optimizer(state, optimizer, stem: str) -> None:
    """An optimizer state dict for this optimizer: its groups hold the same parameter ids, and
    every per-parameter tensor is a scalar (a step count) or has its parameter's dtype and shape."""
    current = optimizer.state_dict()
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) or not isinstance(
            state.get("param_groups"), list) or len(state["param_groups"]) != len(current["param_groups"]):
        raise Rejected(f"{stem}: not a state of this optimizer (its parameter groups differ)")
    for saved, group in zip(state["param_groups"], current["param_groups"]):
        if not isinstance(saved, dict) or saved.get("params") != group["params"]:
            raise Rejected(f"{stem}: its parameter groups hold other parameters than this optimizer's")
    params = {i: p for i, p in zip((i for g in current["param_groups"] for i in g["params"]),
                                   (p for g in optimizer.param_groups for p in g["params"]))}
    for index, entry in state["state"].items():
        if index not in params or not isinstance(entry, dict):
            raise Rejected(f"{stem}: state for parameter {str(index)[:20]!r}, which this optimizer lacks")
        param = params[index]
        for name, value in entry.items():
            spec = _spec(value)
            if spec is None and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
                raise Rejected(f"{stem}: parameter {index}'s {str(name)[:40]!r} is neither a tensor nor a number")
            if spec is not None and spec.shape and spec != (param.dtype, tuple(param.shape)):
                raise Rejected(f"{stem}: parameter {index}'s {str(name)[:40]!r} is {spec.dtype} {list(spec.shape)}, "
                               f"the parameter is {param.dtype} {list(param.shape)}")


def same_kind(saved, current, what: str, lists_as_now: bool = True) -> None:
    """``saved`` has ``current``'s fields (no others) and kinds of value, recursively; numbers are
    one kind (an LR may be an int in one and a float in the other), None matches anything. With
    ``lists_as_now`` a list must have the current one's length and kinds (an LR per group), else it
    need only be a list (a data stream's buffer may grow)."""
    if saved is None or current is None:
        return
    if isinstance(current, dict):
        if not isinstance(saved, dict) or not set(saved) <= set(current):
            raise Rejected(f"{what} has other fields than this run's")
        for key in saved:
            same_kind(saved[key], current[key], f"{what}.{key}", lists_as_now)
        return
    if isinstance(current, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or (lists_as_now and len(saved) != len(current)):
            raise Rejected(f"{what} is not a list{f' of {len(current)}' if lists_as_now else ''}")
        for i, (a, b) in enumerate(zip(saved, current) if lists_as_now else ()):
            same_kind(a, b, f"{what}[{i}]")
        return
    kinds = {"a boolean": (bool,), "a number": (int, float), "a string": (str,)}
    for kind, types in kinds.items():
        if isinstance(current, types) and (kind == "a boolean" or not isinstance(current, bool)):
            if not isinstance(saved, types) or (kind != "a boolean" and isinstance(saved, bool)):
                raise Rejected(f"{what} is {str(saved)[:40]!r}, not {kind}")


def check_rng(state, stem: str) -> None:
    """A state ``state.set_rng_state`` can set: Python's version-3 Mersenne Twister, numpy's
    MT19937, torch's generator state (CUDA's when present), nothing else."""
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state) <= {"python", "numpy",
                                                                                          "torch", "cuda"}:
        raise Rejected(f"{stem}: not the RNG states this version writes")
    py, npy = state["python"], state["numpy"]
    version, internal = random.getstate()[:2]
    if not isinstance(py, dict) or py.get("version") != version or not isinstance(py.get("internal"), list) \
            or len(py["internal"]) != len(internal) or not all(type(n) is int and 0 <= n < 2 ** 32 for n in py["internal"]) \
            or not isinstance(py.get("gauss_next"), (float, type(None))):
        raise Rejected(f"{stem}: Python's RNG state is not a version-{version} state")
    if not isinstance(npy, dict) or npy.get("kind") != "MT19937" or _spec(npy.get("keys")) != (torch.int64, (624,)) \
            or type(npy.get("pos")) is not int or not 0 <= npy["pos"] <= 624 or npy.get("has_gauss") not in (0, 1) \
            or not isinstance(npy.get("cached_gaussian"), float):
        raise Rejected(f"{stem}: numpy's RNG state is not an MT19937 state")
    if _spec(state["torch"]) != (torch.uint8, tuple(torch.get_rng_state().shape)):
        raise Rejected(f"{stem}: torch's RNG state is not this torch's generator state")
    if "cuda" in state and (_spec(state["cuda"]) is None or _spec(state["cuda"]).dtype != torch.uint8
                            or len(_spec(state["cuda"]).shape) != 1):
        raise Rejected(f"{stem}: the CUDA RNG state is not a generator state")
