"""Stateful batch streams: resume continues at the very next sample.

A stream is sharded by rank but its global order does not depend on the world size: global batch
``i`` of epoch ``e`` is the same set of rows for 1 or 8 processes, each process taking its slice.
A run resumed on another number of processes keeps its global batch (``keep_global_order``), so
step k still sees the same rows and the losses continue as the uninterrupted run's would.
"""
from __future__ import annotations

import torch


class ShuffledBatches:
    """Endless shuffled micro-batches of rows of ``data`` (any tensor or dict of tensors)."""

    keeps_global_order = True  # its position resumes on another world size (keep_global_order)

    def __init__(self, data, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.data = data
        self.n = len(next(iter(data.values()))) if isinstance(data, dict) else len(data)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.global_batch = batch_size * world_size
        if self.n < self.global_batch:  # a config mistake (batch size too large): one line, exit 2
            from ..config import ConfigError

            raise ConfigError(f"{self.n} samples cannot fill one global batch of {self.global_batch} "
                              f"({batch_size} per process x {world_size}): lower the batch size or add data")
        self.epoch, self.index = 0, 0
        self._order = None

    def _permutation(self) -> torch.Tensor:
        if self._order is None:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            self._order = torch.randperm(self.n, generator=gen)
        return self._order

    def __iter__(self):
        return self

    def __next__(self):
        if (self.index + 1) * self.global_batch > self.n:  # drop the ragged tail of each epoch
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        start = self.index * self.global_batch + self.rank * self.batch_size
        rows = self._permutation()[start:start + self.batch_size]
        self.index += 1
        if isinstance(self.data, dict):
            return {k: v[rows] for k, v in self.data.items()}
        return self.data[rows]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "world_size": self.world_size,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        keep_global_order(self, state)
        self._order = None


def keep_global_order(stream, state: dict) -> None:
    """Load a stream's position ``(epoch, index)``, keeping the global batch it was saved with.

    On the world size that saved it nothing changes. On another one (a resume with more or fewer
    processes) each process now takes ``global_batch / world_size`` rows of global batch ``index``:
    the same global rows per step as before, so the optimizer sees the same batches (a ValueError
    when the global batch does not split evenly over the new processes)."""
    if "global_batch" not in state and int(state.get("world_size", stream.world_size)) != stream.world_size:
        raise ValueError("the position records no global batch, so it cannot continue on another world size")
    saved = int(state.get("global_batch", stream.global_batch))
    if saved != stream.global_batch:
        if saved % stream.world_size:
            raise ValueError(f"its global batch of {saved} rows cannot be split evenly over {stream.world_size} "
                             f"processes")
        stream.batch_size, stream.global_batch = saved // stream.world_size, saved
    stream.epoch, stream.index = int(state["epoch"]), int(state["index"])


def sharded_batches(data, batch_size: int, num_batches: int, rank: int = 0, world_size: int = 1):
    """Fixed eval batches: the first ``num_batches`` global batches, this rank's slices. Every rank
    gets the same number of batches (a global batch in which the last rank's slice would be empty is
    not used): under FSDP2 each forward is a collective, and a rank with one batch fewer would hang."""
    n = len(next(iter(data.values()))) if isinstance(data, dict) else len(data)
    for i in range(num_batches):
        start = i * batch_size * world_size + rank * batch_size
        if i * batch_size * world_size + (world_size - 1) * batch_size >= n:
            break
        sl = slice(start, min(start + batch_size, n))
        yield {k: v[sl] for k, v in data.items()} if isinstance(data, dict) else data[sl]
