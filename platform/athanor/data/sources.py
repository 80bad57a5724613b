"""Where a text recipe's data comes from: a pre-tokenized token file (``data.token_file``), streamed
shards (``data.streaming``) or a corpus read into memory; and what ``athanor tokenize`` writes.

It sits above ``text``, ``streaming`` and ``token_file`` (none of which imports another's caller), so
the data package has no import cycle.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from .streaming import StreamedBatches, held_out_blocks, open_corpus, token_encoder
from .text import TextData, TextDataConfig, build_tokenizer, load_documents, load_text_data
from .token_file import TokenFileBatches, ensure_token_file, eval_blocks, open_tokens, split_tokens, write_token_file


@dataclass
class TokenizeConfig:
    """What ``athanor tokenize`` reads: the ``data.*`` options of a text recipe."""

    data: TextDataConfig = field(default_factory=TextDataConfig)


def corpus_token_arrays(cfg, encode) -> Iterable[np.ndarray]:
    """The ids of every document ``data.source`` gives (streamed shards or the in-memory sources)."""
    if cfg.streaming:
        for row in open_corpus(cfg.source, cfg.split):
            if isinstance(row.get(cfg.text_field), str):
                yield encode(row[cfg.text_field])
        return
    docs = load_documents(cfg)
    for doc in ["".join(docs)[: cfg.max_chars]] if cfg.max_chars else docs:
        yield encode(doc)


def tokenize_corpus(cfg, path: Path) -> dict:
    """Write ``path`` (and its sidecar) from ``cfg``'s source and tokenizer; what ``athanor tokenize`` runs."""
    tokenizer = build_tokenizer(cfg)
    encode = token_encoder(tokenizer, cfg.tokenizer == "bytes")
    return write_token_file(path, corpus_token_arrays(cfg, encode), len(tokenizer), cfg.tokenizer)


def open_token_data(cfg):
    """``TextData`` over ``data.token_file`` (written first from ``data.source`` when missing)."""
    path = Path(cfg.token_file)
    meta = ensure_token_file(path, cfg.tokenizer, lambda: tokenize_corpus(cfg, path))
    tokens = open_tokens(path, meta)
    n_train, eval_start = split_tokens(tokens, cfg.eval_fraction, cfg.block_size)

    def batches(batch_size: int, seed: int, rank: int, world_size: int) -> TokenFileBatches:
        return TokenFileBatches(tokens, n_train, cfg.block_size, batch_size, seed, rank, world_size)

    held_out = eval_blocks(tokens, eval_start, cfg.block_size, cfg.eval_batches * cfg.batch_size)
    return TextData(None, held_out, build_tokenizer(cfg), open_batches=batches)


def open_text_data(cfg: TextDataConfig) -> TextData:
    """From ``data.token_file``; in memory; or with ``data.streaming`` only the eval blocks read now
    (``data.eval_batches`` x ``data.batch_size`` blocks of held-out documents, the same for any world size)."""
    if cfg.token_file:
        return open_token_data(cfg)
    if not cfg.streaming:
        return load_text_data(cfg)
    tokenizer = build_tokenizer(cfg)
    encode = token_encoder(tokenizer, cfg.tokenizer == "bytes")
    eval_blocks = held_out_blocks(cfg.source, cfg.split, cfg.text_field, cfg.eval_fraction, encode,
                                  cfg.block_size, cfg.eval_batches * cfg.batch_size)

    def batches(batch_size: int, seed: int, rank: int, world_size: int) -> StreamedBatches:
        return StreamedBatches(cfg.source, cfg.split, cfg.text_field, cfg.eval_fraction, encode, cfg.block_size,
                               batch_size, rank, world_size)

    return TextData(None, eval_blocks, tokenizer, open_batches=batches)
