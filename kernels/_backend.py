"""Which implementation an op runs: Triton, the chunked torch path, or the plain reference.

Selection (first match wins):

1. ``use_backend(name)`` / ``set_backend(name)`` from code (tests, benchmarks);
2. the environment variable ``ATHANOR_KERNELS`` = ``auto|triton|torch|reference``;
3. ``auto``: Triton for CUDA tensors when Triton imports, otherwise the torch path.

``triton`` on CPU tensors is only allowed under ``TRITON_INTERPRET=1`` (Triton's
interpreter), which is how the kernels are tested without a GPU.  Triton itself is
imported lazily, so ``import athanor.kernels`` works on machines without it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

ENV_VAR = "ATHANOR_KERNELS"
BACKENDS = ("auto", "triton", "torch", "reference")

_override: str | None = None


def _check(name: str) -> str:
    name = name.strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; valid choices: {', '.join(BACKENDS)}")
    return name


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when ``import triton`` succeeds (cached: a failing import is slow to retry)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else
        return False
    return True


def interpreter_enabled() -> bool:
    """Triton's CPU interpreter; it must be set before the first kernel is defined."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend() -> str:
    """The backend asked for by code or environment, before looking at the device."""
    if _override is not None:
        return _override
    return _check(os.environ.get(ENV_VAR, "auto"))


def set_backend(name: str | None) -> None:
    """Force a backend for the whole process (``None`` goes back to the environment)."""
    global _override
    _override = None if name is None else _check(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily force a backend, e.g. ``with use_backend("reference"): ...``."""
    global _override
    previous, _override = _override, _check(name)
    try:
        yield
    finally:
        _override = previous


def resolve_backend(device: torch.device) -> str:
    """Concrete backend (``triton``, ``torch`` or ``reference``) for tensors on ``device``."""
    name = requested_backend()
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but triton cannot be imported")
        if device.type != "cuda" and not interpreter_enabled():
            raise RuntimeError(
                f"{ENV_VAR}=triton with {device.type} tensors needs TRITON_INTERPRET=1 "
                "(Triton's CPU interpreter); use 'torch' or 'auto' otherwise"
            )
    return name


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
