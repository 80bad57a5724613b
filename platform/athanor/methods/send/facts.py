"""Facts for SeND: people × attributes × phrasings, split three ways by phrasing.

The tiny default is the fictitious-facts world O3 uses too (athanor.parts.fact_world, read-only; its
public ``generate_world`` with its templates, people and values). Every fact is asked in
``templates`` phrasings; the split is made here, by a phrasing's index within its fact:

    train    = phrasings 0 .. templates − tracking − test − 1   (the only ones ever trained on)
    tracking = the next ``tracking_templates``                   (SeND's sensitivity inputs; never trained)
    test     = the last ``test_templates``                       (the held-out hallucination rate and
                                                                  EigenScore; never trained, never tracked)

The default regime is the paper's: training from scratch (``old_people`` = 0, one addition holding every
person) through the phase where answers flip between checkpoints. ``old_people`` > 0 keeps the
continued-training variant: the base stage trains on the old people first and the ``new_people`` arrive in
``additions`` chunks.

Real runs name a QA dataset (a local .json/.jsonl file or a ``datasets`` id, loaded by the fact world's
``load_qa_dataset``): groups (people/authors/documents) split the same way, and every
``tracking_every``-th record is the tracking split.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import ConfigError, positive
from ...parts.fact_world import QA, DataConfig as WorldConfig, build_word_tokenizer, generate_world, load_qa_dataset
from ...parts.lm import load_tokenizer


@dataclass
class FactsConfig:
    source: str = "world"  # world (generated) | a local .json/.jsonl file | a datasets id
    seed: int = 0  # the world and the split depend on it only
    old_people: int = 0  # people a base stage trains on first (0: from scratch, the paper's regime)
    new_people: int = 80  # people taught in the arms' training
    additions: int = 1  # ... arriving in this many equal chunks (1: all from step 0)
    replay_fraction: float = 0.25  # fraction of old facts (a fixed subset) mixed into the arms' training
    attributes: int = 2  # world: first N of hometown, job, pet, colour
    templates: int = 6  # world: phrasings per fact ...
    tracking_templates: int = 1  # ... then N never trained (SeND's tracking split) ...
    test_templates: int = 1  # ... and the last N never trained nor tracked (the held-out test split)
    prompt_template: str = "{question}"
    max_length: int = 64
    batch_size: int = 32  # micro-batch per process
    # external QA datasets (the fact world's loader): fields, grouping, and the tracking split
    subset: str = ""
    split: str = "train"
    question_field: str = "question"
    answer_field: str = "answer"
    group_field: str = ""  # empty: consecutive blocks of group_size records
    group_size: int = 1
    tracking_every: int = 10  # every N-th record of an external dataset is a tracking record
    max_records: int = 0

    def validate(self) -> None:
        for key in ("new_people", "additions", "templates", "batch_size", "max_length", "tracking_every",
                    "group_size", "test_templates"):
            positive(getattr(self, key), f"data.{key}")
        positive(self.old_people, "data.old_people", allow_zero=True)
        if not 0 <= self.replay_fraction <= 1:
            raise ConfigError(f"data.replay_fraction={self.replay_fraction} must be in [0, 1]")
        if not (self.tracking_templates >= 1 and self.tracking_templates + self.test_templates < self.templates <= 6):
            raise ConfigError(f"data.tracking_templates={self.tracking_templates} (>= 1) + data.test_templates="
                              f"{self.test_templates} must leave trained phrasings in data.templates={self.templates} <= 6")
        if self.new_people < self.additions:
            raise ConfigError(f"data.new_people={self.new_people} cannot fill data.additions={self.additions}")


@dataclass
class FactSplit:
    records: list[QA]
    old: list[int]  # trained phrasings of old facts
    replay: list[int]  # the subset of ``old`` mixed into continued training
    chunks: list[list[int]]  # trained phrasings of each addition's facts
    tracking: list[int]  # never-trained phrasings (tracking split)
    test: list[int]  # never-trained, never-tracked phrasings (the held-out test split)

    @property
    def new(self) -> list[int]:
        return [i for c in self.chunks for i in c]


def _world_config(cfg: FactsConfig) -> WorldConfig:
    return WorldConfig(source=cfg.source, seed=cfg.seed, people=cfg.old_people + cfg.new_people,
                        attributes=cfg.attributes, templates=cfg.templates,
                        heldout_templates=cfg.tracking_templates + cfg.test_templates,
                        paraphrases=0,  # O3's paraphrase evaluation set is no part of SeND's world
                        countries=0, requests=1, groups_per_request=1, prompt_template=cfg.prompt_template,
                        max_length=cfg.max_length, batch_size=cfg.batch_size, subset=cfg.subset, split=cfg.split,
                        question_field=cfg.question_field, answer_field=cfg.answer_field, group_field=cfg.group_field,
                        group_size=cfg.group_size, max_records=cfg.max_records)


def load_facts(cfg: FactsConfig):
    """(QAData, FactSplit): the records and which are old, replayed, added per chunk, tracking, test."""
    role = []  # per record: "train" | "tracking" | "test"
    if cfg.source == "world":
        data = generate_world(_world_config(cfg))
        records = [r for r in data.records if r.kind == "fact"]
        index: dict[str, int] = {}  # a record's phrasing index within its fact (the world lists them in order)
        first_test = cfg.templates - cfg.test_templates
        for r in records:
            i = index[r.fact] = index.get(r.fact, -1) + 1
            role.append("test" if i >= first_test else "tracking" if i >= first_test - cfg.tracking_templates
                        else "train")
    else:  # every tracking_every-th record tracks, the one after it tests (never trained either)
        data = load_qa_dataset(_world_config(cfg))
        records = data.records
        every = cfg.tracking_every
        role = ["tracking" if i % every == every - 1 else "test" if i % every == 0 and i > 0 else "train"
                for i in range(len(records))]
    groups = list(dict.fromkeys(r.group for r in records))
    if len(groups) < cfg.old_people + cfg.new_people:
        raise ConfigError(f"{len(groups)} groups in data.source={cfg.source!r} cannot give data.old_people="
                          f"{cfg.old_people} + data.new_people={cfg.new_people}")
    old_groups = set(groups[:cfg.old_people])
    new_groups = groups[cfg.old_people:cfg.old_people + cfg.new_people]
    size = len(new_groups) // cfg.additions
    chunk_of = {g: min(i // size, cfg.additions - 1) for i, g in enumerate(new_groups)}
    old, chunks, tracking, test = [], [[] for _ in range(cfg.additions)], [], []
    for i, (r, kind) in enumerate(zip(records, role)):
        if kind != "train" and (r.group in old_groups or r.group in chunk_of):
            (tracking if kind == "tracking" else test).append(i)
        elif r.group in old_groups:
            old.append(i)
        elif r.group in chunk_of:
            chunks[chunk_of[r.group]].append(i)
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    keep = torch.randperm(len(old), generator=gen)[:round(cfg.replay_fraction * len(old))].sort().values
    replay = [old[i] for i in keep.tolist()]
    return data, FactSplit(records, old, replay, chunks, tracking, test)


def make_tokenizer(cfg: FactsConfig, data, name_or_path: str):
    return load_tokenizer(name_or_path) if name_or_path else build_word_tokenizer(data)


class FactStream:
    """Endless micro-batches for continued training: micro-batch j draws ``batch_size`` distinct rows
    from the pool open at j — the replayed old facts plus the chunks added so far (chunk c opens at
    micro-batch c·``phase_len``). A row set is a pure function of (seed, j, rank), so the state is
    one counter and resume continues at the same sample."""

    def __init__(self, data: dict[str, torch.Tensor], replay: list[int], chunks: list[list[int]], phase_len: int,
                 batch_size: int, seed: int, rank: int = 0):
        self.data, self.batch_size, self.seed, self.rank, self.phase_len = data, batch_size, seed, rank, phase_len
        self.pools, open_rows = [], list(replay)
        for chunk in chunks:
            open_rows = open_rows + chunk
            self.pools.append(torch.tensor(open_rows))
        if len(self.pools[0]) < batch_size:
            raise ConfigError(f"the first continued-training pool has {len(self.pools[0])} rows, fewer than "
                              f"data.batch_size={batch_size}")
        self.served = 0

    def phase(self, served: int) -> int:
        return min(served // self.phase_len, len(self.pools) - 1)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        pool = self.pools[self.phase(self.served)]
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.served) * 64 + self.rank)
        rows = pool[torch.randperm(len(pool), generator=gen)[:self.batch_size]]
        self.served += 1
        return {k: v[rows] for k, v in self.data.items()}

    def state_dict(self) -> dict:
        return {"served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.served = int(state["served"])
