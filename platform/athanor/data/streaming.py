"""Streamed text: a corpus of local shards read lazily, tokenized on the fly, packed into blocks.

``data.streaming true`` with ``data.source`` naming a folder (or glob) of ``.jsonl``/``.json``,
``.parquet`` or ``.arrow`` shards, a ``datasets`` folder written by ``save_to_disk``, or
``hf:<name>[:<config>]``. The shards are opened with ``datasets.load_dataset(..., streaming=True)``
and ``split_dataset_by_node`` gives each process its part (whole shards when their number divides
by the world size; otherwise every process reads all and keeps every N-th document). Nothing holds
the corpus in memory: a process keeps one record batch of its current shard and the tokens of the
block it is filling.

Held-out eval documents are chosen by content (a CRC32 bucket of size ``data.eval_fraction``), so
the eval set does not depend on shard order, world size or position, and training skips exactly
those documents. Resume continues at the same sample: the position is the ``IterableDataset``'s
``state_dict()`` plus the tokens not yet packed into a block (kept in the checkpoint's
``rank<r>/data.json``).
"""
from __future__ import annotations

import glob
import json
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import ConfigError

STREAM_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
HELD_OUT_BUCKETS = 1_000_000  # resolution of data.eval_fraction in the CRC32 bucketing


def one_kind(files: list[Path], source: str, kinds: dict[str, str], noun: str, expected: str) -> str:
    """The one kind (``kinds``: suffix -> kind) of the files a ``data.source`` names (in memory or
    streamed); a ConfigError naming the unknown suffixes (then ``expected``) or the mix of kinds."""
    unknown = sorted({p.suffix or "(no suffix)" for p in files if p.suffix not in kinds})
    if unknown:
        raise ConfigError(f"data.source={source!r}: holds {', '.join(unknown)} files{expected}")
    found = {kinds[p.suffix] for p in files}
    if len(found) > 1:
        raise ConfigError(f"data.source={source!r}: mixes kinds of {noun} ({', '.join(sorted(found))}); use one kind")
    return found.pop()


def shard_files(source: str, split: str = "train") -> tuple[list[Path], str]:
    """The shard files ``source`` names and their one ``datasets`` builder; a ConfigError otherwise.

    A ``save_to_disk`` folder (``state.json``; a dataset dict's ``dataset_dict.json`` + ``<split>/``)
    is read through its own Arrow files, so it streams like any folder of ``.arrow`` shards."""
    path = Path(source)
    if any(c in source for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        where = "the glob matches"
    elif path.is_dir() and (path / "dataset_dict.json").is_file():
        if not (path / split / "state.json").is_file():
            raise ConfigError(f"data.source={source!r}: a saved dataset dict without the split "
                              f"data.split={split!r}")
        return sorted((path / split).glob("data-*.arrow")), "arrow"
    elif path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return sorted(path.glob("data-*.arrow")), "arrow"
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        where = "the folder holds"
    elif path.is_file():
        files, where = [path], "the file is"
    else:
        raise ConfigError(f"data.source={source!r}: no such file, folder or glob match")
    if not files:
        raise ConfigError(f"data.source={source!r}: {where} no shards (expected .jsonl/.json, .parquet, .arrow)")
    return files, one_kind(files, source, STREAM_KINDS, "shards", "; data.streaming reads .jsonl/.json, .parquet "
                           "or .arrow shards, or a save_to_disk folder")


def check_shards(files: list[Path], builder: str, text_field: str, source: str) -> None:
    """Every shard has a ``text_field`` column (its schema, or its first JSON line): a missing
    field is one line before any compute, not a KeyError after the model is built."""
    for path in files:
        try:
            fields = _shard_fields(path, builder)
        except (OSError, ValueError) as err:  # pyarrow's errors are ValueErrors; JSON's too
            raise ConfigError(f"data.source={source!r}: cannot read shard {path} "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})") from None
        if fields is not None and text_field not in fields:
            raise ConfigError(f"data.source={source!r}: shard {path} has no {text_field!r} field "
                              f"(it has: {', '.join(sorted(fields)[:8]) or 'none'}); set data.text_field")


def _shard_fields(path: Path, builder: str) -> set[str] | None:
    """The fields of a shard's records; None for an empty JSON shard (nothing to check)."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        return set(pq.read_schema(path).names)
    if builder == "arrow":
        import pyarrow as pa

        with pa.memory_map(str(path)) as source:
            try:
                return set(pa.ipc.open_stream(source).schema.names)
            except pa.ArrowInvalid:  # the random-access file format rather than the stream format
                return set(pa.ipc.open_file(source).schema.names)
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        return None
    if path.suffix == ".json" and first.lstrip().startswith("["):  # a JSON array file: no cheap peek
        return None
    record = json.loads(first)
    return set(record) if isinstance(record, dict) else set()


def check_streamed_source(source: str, split: str, text_field: str) -> None:
    """Before any compute: the shards exist, are of one known kind, and carry the text field."""
    if source == "shakespeare":
        raise ConfigError("data.streaming=true needs data.source to name shards (a folder or glob of "
                          ".jsonl/.parquet/.arrow, a save_to_disk folder) or hf:<name>; "
                          "the shakespeare default is read in memory")
    if source.startswith("hf:"):
        return
    files, builder = shard_files(source, split)
    check_shards(files, builder, text_field, source)


def open_corpus(source: str, split: str):
    """The whole corpus as one ``datasets.IterableDataset`` (nothing read yet)."""
    import datasets

    if source.startswith("hf:"):
        name, _, subset = source[3:].partition(":")
        return datasets.load_dataset(name, subset or None, split=split, streaming=True)
    files, builder = shard_files(source, split)
    return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", streaming=True)


def is_held_out(text: str, fraction: float) -> bool:
    """Whether a document belongs to the eval set: by its content, the same in every process."""
    return zlib.crc32(text.encode("utf-8", "surrogatepass")) % HELD_OUT_BUCKETS < fraction * HELD_OUT_BUCKETS


def token_encoder(tokenizer, is_bytes: bool) -> Callable[[str], np.ndarray]:
    """Text -> int64 token ids followed by the end-of-document token (as ``text.tokenize`` does)."""
    eos = np.asarray([tokenizer.eos_token_id], dtype=np.int64)
    if is_bytes:
        return lambda text: np.concatenate([np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64), eos])
    return lambda text: np.concatenate(
        [np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64), eos])


class BlockPacker:
    """Tokens in, windows of ``block_size + 1`` out (stride ``block_size``, as ``text.pack``)."""

    def __init__(self, block_size: int, pending: np.ndarray | None = None):
        self.block_size = block_size
        self.pending = np.zeros(0, dtype=np.int64) if pending is None else pending

    def ready(self) -> bool:
        return len(self.pending) >= self.block_size + 1

    def add(self, tokens: np.ndarray) -> None:
        self.pending = np.concatenate([self.pending, tokens])

    def take(self) -> np.ndarray:
        block = self.pending[: self.block_size + 1]
        self.pending = self.pending[self.block_size:]  # the last token is the next block's first input
        return block


def held_out_blocks(source: str, split: str, text_field: str, fraction: float, encode, block_size: int,
                    n_blocks: int) -> torch.Tensor:
    """The first ``n_blocks`` blocks of the held-out documents, in corpus order (every process
    reads the same head of the whole corpus; it stops as soon as the blocks are filled)."""
    packer, blocks = BlockPacker(block_size), []
    for row in open_corpus(source, split):
        text = row.get(text_field)
        if not isinstance(text, str) or not is_held_out(text, fraction):
            continue
        packer.add(encode(text))
        while packer.ready() and len(blocks) < n_blocks:
            blocks.append(packer.take())
        if len(blocks) == n_blocks:
            break
    if not blocks:
        raise ConfigError(f"data.source={source!r}: its held-out documents (data.eval_fraction={fraction}) do not "
                          f"fill one block of {block_size + 1} tokens: raise data.eval_fraction or add documents")
    return torch.from_numpy(np.stack(blocks))


class StreamedBatches:
    """Endless micro-batches of packed blocks from this process's part of a streamed corpus.

    ``state_dict()`` is valid between batches: the ``IterableDataset``'s position (after the last
    document read) plus the tokens read but not yet packed, so a resumed stream yields the same
    next batch. At the end of its part it starts the next epoch from the first shard again."""

    # datasets' split_dataset_by_node gives each process its own documents: a position is one process's
    cannot_change_world_size = ("a streamed corpus is split between the processes that read it; resume it on "
                                "the world size that wrote it, or pre-tokenize it (athanor tokenize: a token "
                                "file resumes on any world size)")

    def __init__(self, source: str, split: str, text_field: str, eval_fraction: float, encode,
                 block_size: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.source, self.split, self.text_field, self.eval_fraction = source, split, text_field, eval_fraction
        self.encode, self.batch_size, self.rank, self.world_size = encode, batch_size, rank, world_size
        self.packer = BlockPacker(block_size)
        self.epoch = 0
        self._dataset = self._documents = None
        self._resume_at = None  # an IterableDataset state to start the next iteration from
        self._texts_this_epoch = 0

    def _open_part(self):
        from datasets.distributed import split_dataset_by_node

        part = split_dataset_by_node(open_corpus(self.source, self.split), rank=self.rank, world_size=self.world_size)
        if self._resume_at is not None:  # after the split: splitting makes a new dataset, without its state
            part.load_state_dict(self._resume_at)
        return part

    def _next_text(self) -> str:
        while True:
            if self._documents is None:
                self._dataset = self._open_part()
                self._documents = iter(self._dataset)
            try:
                row = next(self._documents)
            except StopIteration:
                if self._texts_this_epoch == 0 and self._resume_at is None:  # an empty part would loop forever
                    raise ConfigError(f"data.source={self.source!r}: process {self.rank} of {self.world_size} has no "
                                      f"training documents in its part (fewer documents than processes?)") from None
                self.epoch, self._documents, self._resume_at, self._texts_this_epoch = self.epoch + 1, None, None, 0
                continue
            text = row.get(self.text_field)
            if isinstance(text, str) and not is_held_out(text, self.eval_fraction):
                self._texts_this_epoch += 1
                return text

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        blocks = []
        while len(blocks) < self.batch_size:
            while not self.packer.ready():
                self.packer.add(self.encode(self._next_text()))
            blocks.append(self.packer.take())
        return torch.from_numpy(np.stack(blocks))

    def state_dict(self) -> dict:
        examples = self._dataset.state_dict() if self._dataset is not None else self._resume_at
        return {"epoch": self.epoch, "examples": examples, "pending": self.packer.pending.tolist(),
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(f"the streamed position is process {state['rank']} of {state['world_size']}'s, "
                             f"not {self.rank} of {self.world_size}'s")
        self.epoch, self._resume_at = int(state["epoch"]), state["examples"]
        self.packer.pending = np.asarray(state["pending"], dtype=np.int64)
        self._dataset = self._documents = None
