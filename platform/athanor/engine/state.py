"""State dicts as files that hold data, never code: tensors in safetensors, the rest in JSON.

A method's, an optimizer's or the RNGs' state is a nested structure of dicts, lists, tuples,
tensors and JSON scalars. ``split_state`` replaces every tensor by ``{"__tensor__": key}`` and
collects the tensors under those keys; ``join_state`` puts them back. Reading either file runs no
code from it (safetensors is a header plus raw bytes; JSON is JSON), which is what makes a
downloaded checkpoint safe to resume from. Anything else (a Python object, a dtype, a numpy
scalar) is refused when saving, with the path of the offending value.

Every file is flushed to disk (``fsync``) before the function returns: a checkpoint's manifest is
written only after its files are durable (see ``checkpoint.write_manifest``).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..jsonfile import write_json_durably  # noqa: F401  (the one atomic JSON writer; checkpoints import it here)

TENSOR, TUPLE, ITEMS = "__tensor__", "__tuple__", "__items__"
JSON_SCALARS = (bool, int, float, str, type(None))


def fsync_path(path: Path) -> None:
    """Flush a file (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def split_state(state, path: str = "") -> tuple[object, dict[str, torch.Tensor]]:
    """(JSON structure, {key: tensor}) for a nested state; the inverse of ``join_state``."""
    tensors: dict[str, torch.Tensor] = {}
    return _split(state, path or "state", tensors), tensors


def _split(value, path: str, tensors: dict):
    if torch.is_tensor(value):
        key = path if path not in tensors else f"{path}#{len(tensors)}"
        tensors[key] = value
        return {TENSOR: key}
    if isinstance(value, dict):
        plain = all(isinstance(k, str) and not k.startswith("__") for k in value)
        if plain:
            return {k: _split(v, f"{path}/{k}", tensors) for k, v in value.items()}
        # int (or other scalar) keys, e.g. an optimizer's parameter ids: kept as [key, value] pairs
        for k in value:
            if not isinstance(k, JSON_SCALARS):
                raise TypeError(f"{path}: key {k!r} ({type(k).__name__}) cannot be stored in a checkpoint")
        return {ITEMS: [[k, _split(v, f"{path}/{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {TUPLE: [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, JSON_SCALARS):
        return value
    if isinstance(value, np.generic) and isinstance(value.item(), JSON_SCALARS):  # np.float64(0.5) -> 0.5
        return value.item()
    raise TypeError(f"{path}: a {type(value).__name__} is neither a tensor nor a JSON value; checkpoint state "
                    f"must be tensors, numbers, strings, lists and dicts (no Python objects)")


def join_state(structure, tensors: dict[str, torch.Tensor]):
    if isinstance(structure, dict):
        if set(structure) == {TENSOR}:
            return tensors[structure[TENSOR]]
        if set(structure) == {TUPLE}:
            return tuple(join_state(v, tensors) for v in structure[TUPLE])
        if set(structure) == {ITEMS}:
            return {k: join_state(v, tensors) for k, v in structure[ITEMS]}
        return {k: join_state(v, tensors) for k, v in structure.items()}
    if isinstance(structure, list):
        return [join_state(v, tensors) for v in structure]
    return structure


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights, views) and non-contiguous ones:
    the first user of a storage is written as is, later ones as copies."""
    seen, out = set(), {}
    for key, t in tensors.items():
        t = t.detach()
        storage = (t.device, t.untyped_storage().data_ptr())
        if t.numel() and (storage in seen or not t.is_contiguous()):
            t = t.clone(memory_format=torch.contiguous_format)
        elif t.numel():
            seen.add(storage)
        out[key] = t
    return out


def save_state(state, folder: Path, stem: str) -> list[Path]:
    """``folder/stem.safetensors`` (the tensors) and ``folder/stem.json`` (the structure), fsynced."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    structure, tensors = split_state(state, stem)
    weights = folder / f"{stem}.safetensors"
    save_file(_storable(tensors), str(weights))
    fsync_path(weights)
    write_json_durably(folder / f"{stem}.json", structure)
    return [weights, folder / f"{stem}.json"]


def load_state(folder: Path, stem: str, device: str | torch.device = "cpu"):
    folder = Path(folder)
    structure = json.loads((folder / f"{stem}.json").read_text())
    return join_state(structure, load_file(str(folder / f"{stem}.safetensors"), device=str(device)))


# ------------------------------------------------------------------------------ RNG states
def rng_state(device: torch.device | None = None) -> dict:
    """This process's global RNGs: Python ``random``, numpy, torch CPU and (when used) this
    process's CUDA device. Methods' own ``torch.Generator``s are in their state dicts."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "internal": list(internal), "gauss_next": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda" and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
