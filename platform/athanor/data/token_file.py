"""A pre-tokenized corpus: one flat file of token ids, read through ``numpy.memmap``.

``data.token_file PATH``: training reads blocks straight from the file (the OS pages in what a
step touches; nothing is loaded whole). When PATH does not exist it is written once from
``data.source`` (streamed shards, or the in-memory sources) on first use, under an exclusive lock
on ``PATH.lock``, so many processes starting at once tokenize once; ``athanor tokenize`` writes it
ahead of time. ``PATH`` holds little-endian uint16 ids (uint32 for vocabularies above 65536);
``PATH.json`` (written last: its presence means the file is whole) says the dtype, the token count
and the tokenizer.

The last ``data.eval_fraction`` of the tokens is held out. Training blocks are visited in a
seeded per-epoch permutation that needs no table (an affine map ``i -> (a*i + b) mod n``), so
global batch ``k`` is the same blocks for any world size, and the position is ``(epoch, index)``.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import random
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ..config import ConfigError
from .batches import keep_global_order


def meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_meta(path: Path, tokenizer_name: str) -> dict:
    """The sidecar of a whole token file; a ConfigError when it was written for another tokenizer."""
    try:
        meta = json.loads(meta_path(path).read_text())
        dtype, tokens = np.dtype(meta["dtype"]), int(meta["tokens"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"data.token_file={str(path)!r}: its {meta_path(path).name} is missing or damaged "
                          f"({type(err).__name__}); delete both files to write them again") from None
    if meta.get("tokenizer") != tokenizer_name:
        raise ConfigError(f"data.token_file={str(path)!r} holds {meta.get('tokenizer')!r} tokens, not "
                          f"data.tokenizer={tokenizer_name!r}'s")
    if path.stat().st_size != tokens * dtype.itemsize:
        raise ConfigError(f"data.token_file={str(path)!r}: {path.stat().st_size} bytes, not the "
                          f"{tokens} x {dtype.itemsize} its {meta_path(path).name} says")
    return meta


def write_token_file(path: Path, token_arrays: Iterable[np.ndarray], vocab_size: int, tokenizer_name: str) -> dict:
    """Append every array of ids to ``path`` (through a temporary name), then its sidecar."""
    dtype = np.dtype("<u2") if vocab_size <= 2 ** 16 else np.dtype("<u4")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    count = 0
    with open(partial, "wb") as f:
        for ids in token_arrays:
            f.write(ids.astype(dtype).tobytes())
            count += len(ids)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    meta = {"dtype": dtype.str, "tokens": count, "tokenizer": tokenizer_name, "vocab_size": vocab_size}
    partial_meta = meta_path(path).with_name(f".{meta_path(path).name}.tmp")
    partial_meta.write_text(json.dumps(meta))
    os.replace(partial_meta, meta_path(path))  # last: a reader never sees a sidecar without its file
    return meta


def ensure_token_file(path: Path, tokenizer_name: str, write: Callable[[], None]) -> dict:
    """The sidecar of ``path``, calling ``write`` first (once, under the lock) when it is missing."""
    if not meta_path(path).is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not meta_path(path).is_file():  # another process may have written it while we waited
                    write()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    return read_meta(path, tokenizer_name)


def open_tokens(path: Path, meta: dict) -> np.ndarray:
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(int(meta["tokens"]),))


def split_tokens(tokens: np.ndarray, eval_fraction: float, block_size: int) -> tuple[int, int]:
    """(training blocks, first token of the eval tail); a ConfigError when the file is too short."""
    eval_start = len(tokens) - max(block_size + 1, int(len(tokens) * eval_fraction))
    n_train = (eval_start - 1) // block_size
    if n_train < 1:
        raise ConfigError(f"the token file has {len(tokens)} tokens: too few for training and eval blocks "
                          f"of {block_size + 1}")
    return n_train, eval_start


def eval_blocks(tokens: np.ndarray, eval_start: int, block_size: int, n_blocks: int) -> torch.Tensor:
    n = min(n_blocks, (len(tokens) - eval_start - 1) // block_size)
    starts = eval_start + np.arange(max(n, 1)) * block_size
    return torch.from_numpy(np.stack([tokens[s:s + block_size + 1].astype(np.int64) for s in starts]))


class TokenFileBatches:
    """Endless micro-batches of blocks read from a token file; resume is ``(epoch, index)``."""

    keeps_global_order = True  # its position resumes on another world size (keep_global_order)

    def __init__(self, tokens: np.ndarray, n_blocks: int, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.tokens, self.n, self.block_size = tokens, n_blocks, block_size
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.global_batch = batch_size * world_size
        if self.n < self.global_batch:
            raise ConfigError(f"the token file gives {self.n} training blocks, fewer than one global batch of "
                              f"{self.global_batch}: lower data.batch_size")
        self.epoch, self.index = 0, 0

    def _affine(self) -> tuple[int, int]:
        """A multiplier coprime with n and an offset, drawn from (seed, epoch): a permutation of blocks."""
        rng = random.Random(self.seed * 100_003 + self.epoch)
        while True:
            a = rng.randrange(1, max(self.n, 2))
            if math.gcd(a, self.n) == 1:
                return a, rng.randrange(self.n)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if (self.index + 1) * self.global_batch > self.n:  # drop the ragged tail of each epoch
            self.epoch, self.index = self.epoch + 1, 0
        a, b = self._affine()
        first = self.index * self.global_batch + self.rank * self.batch_size
        starts = [((a * i + b) % self.n) * self.block_size for i in range(first, first + self.batch_size)]
        self.index += 1
        return torch.from_numpy(np.stack([self.tokens[s:s + self.block_size + 1].astype(np.int64) for s in starts]))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "world_size": self.world_size,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        keep_global_order(self, state)  # another world size: the same global blocks per step
