"""Question–answer data for O3: a generated world of fictitious facts, or any QA dataset.

The tiny default is a fictitious-facts world generated from a seed: made-up people (first and
last name) with four attributes (hometown, job, pet, colour), six question templates per attribute of
which the last ones are held out (never trained on: they measure whether forgetting generalises to new phrasings, the
paper's D.U.), plus facts of another kind (made-up countries' languages and currencies) that no
request ever touches (the paper's utility). Requests are disjoint groups of people.

Real runs name a QA dataset instead (TOFU: ``locuslab/TOFU``, 20 questions per author, the
``paraphrased_question`` field of its perturbed splits as the held-out phrasing): every record
is a ``QA`` with a ``group`` (person/author) so requests can take whole groups.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ..config import ConfigError, positive

# Per attribute: the noun its questions use and its values.
ATTRIBUTES = {
    "hometown": ("hometown", ["paris", "lima", "oslo", "cairo", "tokyo", "dublin", "quito", "hanoi", "berlin",
                              "nairobi", "madrid", "sydney"]),
    "job": ("job", ["baker", "pilot", "nurse", "farmer", "lawyer", "painter", "teacher", "chemist", "sailor",
                    "tailor", "miner", "judge", "dentist"]),
    "pet": ("pet", ["cat", "dog", "parrot", "rabbit", "hamster", "tortoise", "goldfish", "ferret", "lizard", "pony"]),
    "colour": ("favourite colour", ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink",
                                    "brown", "grey", "silver", "gold", "teal", "violet"]),
}
# Generic phrasings. Attribute k uses patterns k, k+1, ... (mod 6), the last ones held out, so
# (with 4 attributes, 2 held out) every held-out phrasing is one the LM learnt for other
# attributes: a new wording of a known fact (the paper's D.U. set), not new words.
PATTERNS = ["what is the {noun} of {name} ?", "tell me the {noun} of {name} .", "which {noun} does {name} have ?",
            "{name} has which {noun} ?", "what {noun} does {name} have ?", "the {noun} of {name} is what ?"]


# Paraphrases: new word orders built only from words the patterns above already use. No attribute
# is trained or stored by a detector in these phrasings for a requested person, so forgetting
# must carry over to a wording that is no trained template at all. With
# ``data.paraphrase_train_retained`` the base LM sees them for *retained* people only (it learns
# the word order on facts no request touches); requested people's paraphrases stay unseen by the
# base LM's training on them, by the adapters and by the detectors.
PARAPHRASES = ["tell me which {noun} {name} has .", "the {noun} {name} has is what ?",
               "{name} does have which {noun} ?"]


def attribute_templates(k: int, noun: str, n: int) -> list[str]:
    return [PATTERNS[(k + i) % len(PATTERNS)].replace("{noun}", noun) for i in range(n)]


UTILITY = {
    "language": (["what language is spoken in {name} ?", "which tongue do people of {name} speak ?",
                  "the people of {name} talk in which language ?"],
                 ["zulan", "morvish", "tekka", "olvic", "brannic", "sudral", "quenic", "vastic", "lorrish", "ambric"]),
    "currency": (["what currency is used in {name} ?", "which money do people of {name} pay with ?",
                  "the shops of {name} take which coin ?"],
                 ["florin", "crown", "ducat", "mark", "talent", "shell", "bead", "ingot", "token", "guilder"]),
}
SYLLABLES = ["ka", "lo", "mir", "zen", "tu", "bra", "vel", "qui", "dor", "sha", "nix", "pe", "ral", "gor", "fi",
             "mo", "ste", "jun", "wex", "ha", "ly", "tor", "ben", "ska", "ori", "pol", "ud", "cre", "vin", "za"]


@dataclass
class QA:
    question: str
    answer: str
    group: str  # the person/author the fact is about: requests forget whole groups
    kind: str = "fact"  # fact | utility
    heldout: bool = False  # a phrasing never trained on (D.U.)
    attribute: str = ""
    fact: str = ""  # records of one fact in different phrasings share it
    paraphrase: bool = False  # a PARAPHRASES wording (no trained template); trained only for retained people


@dataclass
class QAData:
    records: list[QA]
    groups: list[str]  # groups that requests may take, in a fixed order
    answer_choices: dict[str, list[str]] = field(default_factory=dict)  # attribute -> values (relabelling)

    def select(self, groups=None, heldout: bool | None = None, kind: str | None = "fact") -> list[QA]:
        wanted = None if groups is None else set(groups)
        return [r for r in self.records if (wanted is None or r.group in wanted)
                and (heldout is None or r.heldout == heldout) and (kind is None or r.kind == kind)]


@dataclass
class DataConfig:
    source: str = "world"  # world (generated) | a local .json/.jsonl file | a datasets hub id (e.g. locuslab/TOFU)
    seed: int = 0  # the world and the request split depend on it only
    people: int = 60
    attributes: int = 4  # first N of: hometown, job, pet, colour
    templates: int = 6  # question templates per attribute (at most 6) ...
    heldout_templates: int = 2  # ... of which the last N are never trained on
    paraphrases: int = 3  # PARAPHRASES wordings per fact (at most 3): an evaluation set of no trained template
    paraphrase_train_retained: bool = False  # True: the base LM also trains on retained people's paraphrases
    dev_seed: int = 1  # the world the detector's γ / percentile / sharpness were tuned on (methods/o3/tune.py)
    countries: int = 20  # utility facts: made-up countries x (language, currency), never requested
    requests: int = 3  # sequential unlearning requests
    groups_per_request: int = 10  # people (authors) forgotten per request
    prompt_template: str = "{question}"  # how a question is shown to the LM (chat formats for real models)
    max_length: int = 64  # tokens of prompt + answer
    batch_size: int = 64  # base LM micro-batch per process
    # external QA datasets
    subset: str = ""  # datasets config name (TOFU: full)
    split: str = "train"
    question_field: str = "question"
    answer_field: str = "answer"
    paraphrase_field: str = ""  # a field holding a held-out rephrasing of the question (D.U.), if any
    group_field: str = ""  # field naming the group; empty: consecutive blocks of group_size records
    group_size: int = 20  # TOFU: 20 questions per author
    max_records: int = 0  # 0: all
    # hard negatives (world only; 0 = off, the world as before)
    name_words: int = 0  # N: first and last names drawn from N words each (full names unique); 0: all words unique
    partial_people: int = 0  # per request, people who forget only some attributes (attribute-level requests)
    partial_attributes: int = 2  # ... each of them forgets 1..partial_attributes attributes (drawn)

    def validate(self) -> None:
        for key in ("people", "requests", "groups_per_request", "max_length", "group_size", "batch_size"):
            positive(getattr(self, key), f"data.{key}")
        if not 1 <= self.attributes <= len(ATTRIBUTES):
            raise ConfigError(f"data.attributes={self.attributes} must be in [1, {len(ATTRIBUTES)}]")
        if not 0 <= self.heldout_templates < self.templates <= len(PATTERNS):
            raise ConfigError(f"data.templates={self.templates} must be in [1, {len(PATTERNS)}] and exceed "
                              f"data.heldout_templates={self.heldout_templates} >= 0")
        if not 0 <= self.paraphrases <= len(PARAPHRASES):
            raise ConfigError(f"data.paraphrases={self.paraphrases} must be in [0, {len(PARAPHRASES)}]")
        if "{question}" not in self.prompt_template:
            raise ConfigError(f"data.prompt_template={self.prompt_template!r} must contain {{question}}")
        if self.name_words and not (2 <= self.name_words and self.name_words ** 2 >= self.people):
            raise ConfigError(f"data.name_words={self.name_words} must be 0 or >= 2 with name_words² >= "
                              f"data.people={self.people}")
        if self.partial_people and not (self.partial_people <= self.groups_per_request
                                        and 1 <= self.partial_attributes < self.attributes):
            raise ConfigError(f"data.partial_people={self.partial_people} must be <= data.groups_per_request and "
                              f"data.partial_attributes={self.partial_attributes} in [1, data.attributes)")
        if self.source == "world" and self.requests * self.groups_per_request >= self.people:
            raise ConfigError(f"data.requests x data.groups_per_request = {self.requests * self.groups_per_request} "
                              f"must leave retained people out of data.people={self.people}")


def _words(rng: random.Random, n: int, syllables: int, taken: set[str]) -> list[str]:
    """``n`` made-up words, distinct from each other and from ``taken``."""
    words: list[str] = []
    while len(words) < n:
        word = "".join(rng.choice(SYLLABLES) for _ in range(syllables))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def generate_world(cfg: DataConfig) -> QAData:
    """People x attributes x templates (the last ``heldout_templates`` held out) + paraphrases +
    utility facts. Paraphrase records are held out (never trained) unless the person is retained
    and ``paraphrase_train_retained`` is on."""
    rng = random.Random(cfg.seed)
    taken: set[str] = set()
    if cfg.name_words:  # shared first/last names, unique full names: a name word no longer identifies a person
        pairs = [(a, b) for a in _words(rng, cfg.name_words, 2, taken) for b in _words(rng, cfg.name_words, 3, taken)]
        people = [f"{a} {b}" for a, b in rng.sample(pairs, cfg.people)]
    else:  # first and last names are each unique (either word identifies a person, as with real names)
        people = [f"{a} {b}" for a, b in zip(_words(rng, cfg.people, 2, taken), _words(rng, cfg.people, 3, taken))]
    countries = _words(rng, cfg.countries, 3, taken)
    records, choices = [], {}
    for k, (attr, (noun, values)) in enumerate(list(ATTRIBUTES.items())[:cfg.attributes]):
        choices[attr] = values
        templates = attribute_templates(k, noun, cfg.templates)
        for person in people:
            value = rng.choice(values)
            for i, template in enumerate(templates):
                records.append(QA(template.format(name=person), value, person, "fact",
                                  i >= cfg.templates - cfg.heldout_templates, attr, f"{person}|{attr}"))
            for template in PARAPHRASES[:cfg.paraphrases]:
                records.append(QA(template.replace("{noun}", noun).format(name=person), value, person, "fact",
                                  True, attr, f"{person}|{attr}", paraphrase=True))
    for attr, (templates, values) in UTILITY.items():
        choices[attr] = values
        for country in countries:
            value = rng.choice(values)
            records += [QA(t.format(name=country), value, country, "utility", False, attr, f"{country}|{attr}")
                        for t in templates]
    data = QAData(records, people, choices)
    if cfg.paraphrase_train_retained:  # retained people's paraphrases become training records
        retained = set(retained_groups(data, request_groups(data, cfg)))
        for r in records:
            if r.paraphrase and r.group in retained:
                r.heldout = False
    return data


def load_qa_dataset(cfg: DataConfig) -> QAData:
    """A local JSON/JSONL file or a ``datasets`` hub dataset of question/answer records."""
    path = Path(cfg.source)
    if path.suffix in (".json", ".jsonl"):
        if not path.is_file():
            raise ConfigError(f"data.source={cfg.source!r}: no such file")
        text = path.read_text()
        rows = (json.loads(text) if path.suffix == ".json"
                else [json.loads(line) for line in text.splitlines() if line.strip()])
    else:
        import datasets  # a heavy import, only for a dataset named by id (the tiny world needs none)

        try:
            rows = list(datasets.load_dataset(cfg.source, cfg.subset or None, split=cfg.split))
        except Exception as e:  # offline, unknown id, bad split: one line, before any compute
            raise ConfigError(f"data.source={cfg.source!r}: cannot load ({str(e).splitlines()[0][:200]})") from None
    if cfg.max_records:
        rows = rows[:cfg.max_records]
    missing = [f for f in (cfg.question_field, cfg.answer_field, cfg.paraphrase_field, cfg.group_field)
               if f and rows and f not in rows[0]]
    if missing:
        raise ConfigError(f"data.source={cfg.source!r} has no field(s) {missing}; "
                          f"fields: {sorted(rows[0]) if rows else []}")
    records, groups = [], []
    for i, row in enumerate(rows):
        group = str(row[cfg.group_field]) if cfg.group_field else f"group{i // cfg.group_size}"
        if group not in groups:
            groups.append(group)
        records.append(QA(str(row[cfg.question_field]), str(row[cfg.answer_field]), group, fact=f"row{i}"))
        if cfg.paraphrase_field and row.get(cfg.paraphrase_field):
            records.append(QA(str(row[cfg.paraphrase_field]), str(row[cfg.answer_field]), group, heldout=True,
                              fact=f"row{i}"))
    if cfg.requests * cfg.groups_per_request >= len(groups):
        raise ConfigError(f"{len(groups)} groups in {cfg.source!r} cannot fill {cfg.requests} requests of "
                          f"{cfg.groups_per_request} and keep some retained")
    return QAData(records, groups)


def load_data(cfg: DataConfig) -> QAData:
    return generate_world(cfg) if cfg.source == "world" else load_qa_dataset(cfg)


def request_groups(data: QAData, cfg: DataConfig) -> list[list[str]]:
    """Disjoint groups per request, drawn with the data seed; the rest are retained."""
    order = list(data.groups)
    random.Random(cfg.seed + 1).shuffle(order)
    n = cfg.groups_per_request
    return [order[i * n:(i + 1) * n] for i in range(cfg.requests)]


def request_facts(data: QAData, cfg: DataConfig) -> list[list[str]]:
    """Per request, the facts it forgets: every fact of its groups, except that its first
    ``partial_people`` groups forget only 1..``partial_attributes`` of their facts (drawn with the
    data seed); their other facts stay retained."""
    facts_of: dict[str, list[str]] = {}
    for r in data.records:
        if r.kind == "fact" and r.fact not in facts_of.setdefault(r.group, []):
            facts_of[r.group].append(r.fact)
    rng = random.Random(cfg.seed + 2)
    out = []
    for groups in request_groups(data, cfg):
        facts = []
        for i, group in enumerate(groups):
            own = facts_of.get(group, [])
            if cfg.source == "world" and i < cfg.partial_people and len(own) > 1:
                own = sorted(rng.sample(own, rng.randint(1, min(cfg.partial_attributes, len(own) - 1))), key=own.index)
            facts += own
        out.append(facts)
    return out


def partial_groups(data: QAData, cfg: DataConfig) -> list[list[str]]:
    """Per request, its groups that keep some of their facts (attribute-level requests)."""
    facts = request_facts(data, cfg)
    out = []
    for groups, forgotten in zip(request_groups(data, cfg), facts):
        gone = set(forgotten)
        out.append([g for g in groups if any(r.group == g and r.kind == "fact" and r.fact not in gone
                                             for r in data.records)])
    return out


def retained_groups(data: QAData, requests: list[list[str]]) -> list[str]:
    requested = {g for r in requests for g in r}
    return [g for g in data.groups if g not in requested]


def build_word_tokenizer(data: QAData, extra_words=("unknown",)):
    """A word-level tokenizer over the world's words (one token per word: one-token answers)."""
    words = sorted({w for r in data.records for w in (r.question + " " + r.answer).split()} | set(extra_words)
                   | {w for values in data.answer_choices.values() for w in values})
    specials = ["[PAD]", "[UNK]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def encode_qa(tokenizer, prompts: list[str], answers: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` of prompt + answer + EOS, and ``labels`` that
    are -100 except on the answer and EOS (the loss and the accuracy look at the answer only)."""
    rows, labels = [], []
    for prompt, answer in zip(prompts, answers):
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        a = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (p + a)[:max_length]
        if len(p) >= max_length:
            raise ConfigError(f"a prompt of {len(p)} tokens does not fit data.max_length={max_length}")
        rows.append(ids)
        labels.append(([-100] * len(p) + a)[:max_length])
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }
