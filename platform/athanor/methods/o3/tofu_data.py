"""The items TOFU's metrics score (``athanor.parts.tofu_metrics``): question, answer, paraphrased
answer and perturbed (wrong) answers, for the forget set of every request, the retain set and the
utility set.

- The tiny world (``data.source: world``): answers are one word, so the paraphrased answer is the
  answer itself (a one-word value has no rewording in the world's vocabulary) and the perturbed
  answers are ``tofu.perturbed`` other values of the same attribute, drawn per fact from the
  world's value pools (``data.answer_choices``). One question per fact (its first trained
  phrasing): the KS test needs independent samples, and a fact's phrasings are not. Retain set:
  the retained facts; utility set: the facts of another kind (countries), scored in TOFU's
  real-authors / world-facts form (probability normalised over the options).
- The TOFU schema (``locuslab/TOFU`` or a local folder laid out like it: one JSON-lines file per
  config, named in its README's ``configs``): the O3 world is ``data.source`` with
  ``data.subset`` (e.g. ``forget10_perturbed``: every author there has paraphrased and perturbed
  answers); forget items are looked up by question in that split, and the retain and utility
  sets are the splits ``tofu.retain_split`` (``retain_perturbed``) and ``tofu.utility_splits``
  (``real_authors_perturbed,world_facts_perturbed``), loaded through ``datasets``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ...config import ConfigError, positive
from ...parts.fact_world import QAData
from ...parts.tofu_metrics import TofuItem

TOFU_FIELDS = ("question", "answer", "paraphrased_answer", "perturbed_answer")


@dataclass
class TofuConfig:
    enabled: bool = True  # TOFU's metrics for O3, the retain-only model and the baselines
    perturbed: int = 5  # tiny world: perturbed answers per question (TOFU has 5)
    max_new_tokens: int = 4  # greedy answer length for ROUGE-L (TOFU: up to 200)
    # "" or "train": the retain-only model is trained here like the base LM (model config,
    # run.max_steps, optim) on every record whose fact no request forgets; else a folder / hub id of one
    retain_model: str = ""
    retain_split: str = ""  # TOFU schema: the retain set's split (retain_perturbed); "": retained records
    utility_splits: str = ""  # TOFU schema: comma-separated option splits; "": the world's utility facts
    seeds: int = 3  # O3's adapters run with run.seed, +1, +2 on the same base LM (and retain-only model)
    seed_detectors: bool = False  # also retrain the detectors per seed (~4x the cost of the adapters on the tiny world)
    forget_quality_min: float = 0.05  # check: KS p-value >= this (not distinguishable from retain-only)
    utility_ratio_min: float = 0.95  # check: model utility >= this x retain-only's

    def trained_here(self) -> bool:
        return self.retain_model in ("", "train")

    def validate(self) -> None:
        positive(self.perturbed, "tofu.perturbed")
        positive(self.max_new_tokens, "tofu.max_new_tokens")
        positive(self.seeds, "tofu.seeds")
        if not 0 < self.forget_quality_min < 1 or not 0 < self.utility_ratio_min <= 1:
            raise ConfigError(f"tofu.forget_quality_min={self.forget_quality_min} must be in (0, 1) and "
                              f"tofu.utility_ratio_min={self.utility_ratio_min} in (0, 1]")


def load_split(source: str, name: str) -> list[dict]:
    """Rows of one TOFU config (hub id or local folder with the hub's layout), one line if missing."""
    import datasets  # heavy to import (seconds): only the TOFU-format path needs it

    try:
        rows = list(datasets.load_dataset(source, name, split="train"))
    except Exception as e:  # offline, unknown config, bad folder: one line, before compute
        raise ConfigError(f"TOFU split {name!r} of {source!r}: cannot load ({str(e).splitlines()[0][:200]})") from None
    missing = [f for f in TOFU_FIELDS if rows and f not in rows[0]]
    if missing or not rows:
        raise ConfigError(f"TOFU split {name!r} of {source!r} lacks field(s) {missing or list(TOFU_FIELDS)}")
    return rows


def row_item(row: dict) -> TofuItem:
    perturbed = row["perturbed_answer"]
    perturbed = [perturbed] if isinstance(perturbed, str) else list(perturbed)
    return TofuItem(str(row["question"]), str(row["answer"]), str(row.get("paraphrased_answer") or row["answer"]),
                    [str(p) for p in perturbed])


def canonical(data: QAData, indices: list[int]) -> list[int]:
    """One record per fact: its first trained phrasing (else its first record)."""
    best: dict[str, int] = {}
    for i in indices:
        r = data.records[i]
        key = r.fact or f"row{i}"
        if key not in best or (data.records[best[key]].heldout and not r.heldout):
            best[key] = i
    return sorted(best.values())


def world_item(data: QAData, i: int, n: int, seed: int) -> TofuItem:
    r = data.records[i]
    pool = data.answer_choices.get(r.attribute) or sorted({x.answer for x in data.records})
    others = [v for v in pool if v != r.answer]
    rng = random.Random(f"{seed}|{r.fact or i}")  # fixed per fact and data seed: every model gets the same
    return TofuItem(r.question, r.answer, r.answer, rng.sample(others, min(n, len(others))))


def eval_items(cfg, data: QAData, sets) -> dict:
    """{"forget": [items of request 1, ..., T], "retain": items, "utility": [items per option set]}."""
    tcfg, dcfg = cfg.tofu, cfg.data
    if dcfg.source == "world":
        make = lambda idx: [world_item(data, i, tcfg.perturbed, dcfg.seed) for i in canonical(data, idx)]  # noqa: E731
        return {"forget": [make(idx) for idx in sets.forget_train], "retain": make(sets.retain),
                "utility": [make(sets.utility)] if sets.utility else []}
    lookup = {str(row["question"]): row_item(row) for row in load_split(dcfg.source, dcfg.subset)}
    forget = []
    for t, idx in enumerate(sets.forget_train, start=1):
        items = [lookup[data.records[i].question] for i in canonical(data, idx) if data.records[i].question in lookup]
        if not items:
            raise ConfigError(f"request {t}: none of its questions is in {dcfg.source!r} {dcfg.subset!r} with "
                              f"perturbed answers (data.subset must be a *_perturbed split)")
        forget.append(items)
    retain = ([row_item(r) for r in load_split(dcfg.source, tcfg.retain_split)] if tcfg.retain_split
              else [lookup[data.records[i].question] for i in canonical(data, sets.retain)
                    if data.records[i].question in lookup])
    utility = [[row_item(r) for r in load_split(dcfg.source, s.strip())]
               for s in tcfg.utility_splits.split(",") if s.strip()]
    return {"forget": forget, "retain": retain, "utility": utility}


def retain_only_records(data: QAData, sets) -> list:
    """Training records of the retain-only model: trained phrasings of every fact no request forgets."""
    forgotten = {data.records[i].fact or f"row{i}" for s in sets.forget_all for i in s}
    forgotten |= {data.records[i].fact or f"row{i}" for s in sets.forget_train for i in s}
    return [r for i, r in enumerate(data.records) if not r.heldout and (r.fact or f"row{i}") not in forgotten]
