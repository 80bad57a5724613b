"""O3's evaluation: the evaluation sets of the QA world, the metrics after each request (per model
and gate) and the detectors' AUROCs, where each stage finds the folders of earlier ones.

Evaluation runs on the main process with plain (non-DeepSpeed) models and is broadcast, since
it trains nothing; detector scores of every record are cached by the detector stage.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file

from ...compat import plain_loading
from ...engine import process_state
from ...parts.fact_world import QAData, load_data, partial_groups, request_facts
from ...runner import StageContext
from .config import O3Config
from .method import earlier_lora_A, unlearning_answers
from .model import O3Model


@dataclass
class EvalSets:
    """Indices into ``data.records`` of every set the report measures. A request forgets facts
    (``fact_world.request_facts``): every fact of its people, or only some for attribute-level
    requests, whose people's other facts count as retained."""
    forget_train: list[list[int]]  # per request: its facts, trained phrasings (S.U.)
    forget_heldout: list[list[int]]  # per request: its facts, held-out phrasings (D.U.)
    retain: list[int]  # facts never requested (incl. the kept facts of partly forgotten people), every template
    utility: list[int]  # facts of another kind, never requested
    forget_all: list[list[int]] = field(default_factory=list)  # per request: trained + held-out templates
    forget_paraphrase: list[list[int]] = field(default_factory=list)  # per request: PARAPHRASES wordings
    retain_paraphrase: list[int] = field(default_factory=list)  # retained facts' paraphrases
    # attribute-level requests, every phrasing (trained + held-out templates + paraphrases):
    # per request: the forgotten facts of its partly forgotten people
    partial_forget: list[list[int]] = field(default_factory=list)
    partial_retain: list[list[int]] = field(default_factory=list)  # ... and the same people's retained facts
    partial_retain_train: list[list[int]] = field(default_factory=list)  # ... the latter's trained phrasings

    @classmethod
    def build(cls, data: QAData, forget_facts: list[list[str]], partial: list[list[str]] | None = None) -> "EvalSets":
        def idx(pred):
            return [i for i, r in enumerate(data.records) if pred(r) and r.kind == "fact"]

        requested = {f for fs in forget_facts for f in fs}
        sets = cls([idx(lambda r, f=set(fs): r.fact in f and not r.heldout and not r.paraphrase)
                    for fs in forget_facts],
                   [idx(lambda r, f=set(fs): r.fact in f and r.heldout and not r.paraphrase) for fs in forget_facts],
                   idx(lambda r: r.fact not in requested and not r.paraphrase),
                   [i for i, r in enumerate(data.records) if r.kind == "utility"])
        sets.forget_all = [a + b for a, b in zip(sets.forget_train, sets.forget_heldout)]
        sets.forget_paraphrase = [idx(lambda r, f=set(fs): r.paraphrase and r.fact in f) for fs in forget_facts]
        sets.retain_paraphrase = idx(lambda r: r.paraphrase and r.fact not in requested)
        for people, fs in zip(partial or [[] for _ in forget_facts], forget_facts):
            g, f = set(people), set(fs)
            sets.partial_forget.append(idx(lambda r: r.group in g and r.fact in f))
            sets.partial_retain.append(idx(lambda r: r.group in g and r.fact not in requested))
            sets.partial_retain_train.append(idx(lambda r: r.group in g and r.fact not in requested and not r.heldout))
        return sets


_WORLDS: dict[str, tuple[QAData, EvalSets]] = {}


def world(cfg: O3Config) -> tuple[QAData, EvalSets]:
    """The QA data and its evaluation sets (built once per process and data config)."""
    key = repr(cfg.data)
    if key not in _WORLDS:
        data = load_data(cfg.data)
        _WORLDS[key] = data, EvalSets.build(data, request_facts(data, cfg.data), partial_groups(data, cfg.data))
    return _WORLDS[key]


def base_dir(ctx: StageContext) -> str:
    """The base LM folder (relative when trained here, so the output folder can move)."""
    base = ctx.results["base"]
    return str(ctx.stage_dir("base") / "model") if base["steps"] else base["model_dir"]


@contextlib.contextmanager
def this_nodes_threads():
    """On CPU, torch threads for every process of this node while the others wait: accelerate's
    launcher sets OMP_NUM_THREADS=1 per process, which would leave their cores idle (a detector
    stage under 2-process ZeRO-3: 27 s on one thread)."""
    threads = torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available() or local == 1:
        yield
        return
    torch.set_num_threads(min(threads * local, os.cpu_count() or 1))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def on_main_then_broadcast(fn):
    """Run ``fn()`` on the main process only (with this node's threads); every process gets its
    (picklable) result."""
    state = process_state()
    if state.is_main_process:
        with this_nodes_threads():
            box = [fn()]
    else:
        box = [None]
    if state.num_processes > 1:
        broadcast_object_list(box)
    return box[0]


# ---------------------------------------------------------------------------- evaluation
def load_scores(paths: list[str]) -> dict[str, torch.Tensor]:
    """Stack the detector stages' cached scores: each [n_records, T]."""
    loaded = [load_file(p) for p in paths]
    return {k: torch.stack([s[k] for s in loaded], dim=1) for k in loaded[0]}


def auroc(positive_scores: torch.Tensor, negative_scores: torch.Tensor) -> float:
    from sklearn.metrics import roc_auc_score  # scikit-learn: a second of import, only when evaluating

    y = [1] * len(positive_scores) + [0] * len(negative_scores)
    return float(roc_auc_score(y, torch.cat([positive_scores, negative_scores]).double().numpy()))


def measure(o3: O3Model, data: QAData, sets: EvalSets, t: int, logits: torch.Tensor | None,
            targets: list[list[str]] | None = None) -> dict:
    """The report's metrics after request t (1-based) for one model and gate; with ``targets``
    (per request, the unlearning answers its adapter was trained to give on its trained
    questions) also ``composed_target_rate``: the share of requests 1..t's trained questions that
    the composed adapters still answer with their own request's target. Each adapter was trained
    alone on the base LM, so a rate below the adapters' own ``target_rate`` is interference."""
    def acc(idx):
        if not idx:
            return None
        records = [data.records[i] for i in idx]
        weights = o3.adapter_weights(logits[idx] if logits is not None else None, len(idx))
        return o3.answer_matches(records, weights).float().mean().item()

    def mean_w(idx):
        return o3.adapter_weights(logits[idx] if logits is not None else None, len(idx)).amax(1).mean().item() \
            if o3.adapters else 0.0

    earlier = [i for s in sets.forget_all[:t - 1] for i in s]
    out = {**{k: acc(idx) for k, idx in attribute_sets(data, sets, t).items()},
           "request": t, "forget_acc_train": acc(sets.forget_train[t - 1]),
           "forget_acc_heldout_templates": acc(sets.forget_heldout[t - 1]),
           "forget_acc_paraphrase": acc(sets.forget_paraphrase[t - 1]),
           "retain_acc": acc(sets.retain), "retain_acc_paraphrase": acc(sets.retain_paraphrase),
           "utility": acc(sets.utility),
           "earlier_requests_forget_acc": acc(earlier) if earlier else None,
           "mean_w_forget": mean_w(sets.forget_all[t - 1]), "mean_w_retain": mean_w(sets.retain),
           "mean_w_utility": mean_w(sets.utility)}
    if targets is not None and o3.adapters:
        idx = [i for s in sets.forget_train[:t] for i in s]
        weights = o3.adapter_weights(logits[idx] if logits is not None else None, len(idx))
        answers = [a for request in targets[:t] for a in request]
        hits = o3.answer_matches([data.records[i] for i in idx], weights, answers)
        out["composed_target_rate"] = hits.float().mean().item()
    return out


def attribute_sets(data: QAData, sets: EvalSets, t: int) -> dict[str, list[int]]:
    """Attribute-level requests 1..t, every wording: their people's forgotten facts, the same
    people's retained facts, and the latter in wordings no detector or calibration saw."""
    retained = [i for s in sets.partial_retain[:t] for i in s]
    return {"attribute_forget_acc": [i for s in sets.partial_forget[:t] for i in s],
            "attribute_retain_acc": retained,
            "attribute_retain_acc_new_wordings": [i for i in retained if data.records[i].heldout]}


def gate_metrics(data: QAData, gate: torch.Tensor, sets: EvalSets, t: int) -> dict:
    """AUROCs of one gate score ([n_records], higher = forget) on questions no detector stored:
    held-out templates and paraphrases of requests 1..t against every question no request touches,
    and the attribute-level requests' forgotten facts against the same people's retained facts
    (new wordings on both sides: the calibration saw the retained facts' trained wordings)."""
    heldout = [i for s in sets.forget_heldout[:t] for i in s]
    paraphrase = [i for s in sets.forget_paraphrase[:t] for i in s]
    negatives = sets.retain + sets.retain_paraphrase + sets.utility
    forgotten = [i for s in sets.partial_forget[:t] for i in s if data.records[i].heldout]
    kept = attribute_sets(data, sets, t)["attribute_retain_acc_new_wordings"]
    return {"auroc_heldout_templates": auroc(gate[heldout], gate[negatives]) if heldout else None,
            "auroc_paraphrase": auroc(gate[paraphrase], gate[negatives]) if paraphrase else None,
            "auroc_attribute_level": auroc(gate[forgotten], gate[kept]) if forgotten and kept else None}


def detector_metrics(scores: dict[str, torch.Tensor], data: QAData, sets: EvalSets, t: int, key: str = "logit") -> dict:
    """AUROC of forget (requests 1..t) vs retain records for the gate and its parts."""
    forget = [i for s in sets.forget_all[:t] for i in s]
    heldout = [i for s in sets.forget_heldout[:t] for i in s]
    paraphrase = [i for s in sets.forget_paraphrase[:t] for i in s]
    negatives = sets.retain + sets.retain_paraphrase + sets.utility  # every question no request touches
    gate = scores[key][:, :t].amax(1)  # max over requests, monotone in w(x)
    cosine = -scores["cos_distance"][:, :t].amin(1)
    maha = -scores["mahalanobis"][:, :t].amin(1)
    return {"auroc": auroc(gate[forget], gate[sets.retain]),  # pooled: 2/3 of its positives are stored questions
            **gate_metrics(data, gate, sets, t),  # questions the detectors never stored
            # at the calibrated threshold (w = ½): never-stored forget questions caught, untouched ones let through
            "caught_new_forget": (gate[heldout + paraphrase] > 0).float().mean().item() if heldout + paraphrase
            else None,
            "passed_untouched": (gate[negatives] < 0).float().mean().item(),
            "auroc_max_cosine_only": auroc(cosine[forget], cosine[sets.retain]),
            "auroc_mahalanobis_only": auroc(maha[forget], maha[sets.retain])}


def request_targets(cfg: O3Config, data: QAData, sets: EvalSets) -> list[list[str]]:
    """Per request, the answers its adapter was trained on (as ``unlearn_request`` draws them)."""
    return [unlearning_answers([data.records[i] for i in idx], cfg.unlearn, data, seed=cfg.run.seed * 1000 + t)
            for t, idx in enumerate(sets.forget_train, start=1)]


def evaluate_request(cfg: O3Config, data: QAData, sets: EvalSets, t: int, base_dir: str, adapters: list[str],
                     score_paths: list[str]) -> dict:
    def run():
        with plain_loading():
            scores = load_scores(score_paths)
            o3 = O3Model.from_parts(base_dir, [Path(a) for a in adapters], [], cfg.unlearn.gate,
                                    cfg.data.prompt_template, cfg.data.max_length, cfg.model.dtype, detectors=[])
            return {**measure(o3, data, sets, t, scores["logit"], request_targets(cfg, data, sets)),
                    **detector_metrics(scores, data, sets, t)}
    return on_main_then_broadcast(run)


def evaluate_base(cfg: O3Config, data: QAData, sets: EvalSets, base_dir: str) -> dict:
    def run():
        with plain_loading():
            o3 = O3Model.from_parts(base_dir, [], [], "off", cfg.data.prompt_template, cfg.data.max_length,
                                    cfg.model.dtype, detectors=[])

        def acc(idx):
            return o3.answer_matches([data.records[i] for i in idx]).float().mean().item() if idx else None

        per_request = [attribute_sets(data, sets, t) for t in range(1, len(sets.forget_train) + 1)]
        return {**{k: [acc(a[k]) for a in per_request] for k in per_request[0]},
                "forget_acc_train": [acc(s) for s in sets.forget_train],
                "forget_acc_heldout_templates": [acc(s) for s in sets.forget_heldout],
                "forget_acc_paraphrase": [acc(s) for s in sets.forget_paraphrase],
                "retain_acc": acc(sets.retain), "retain_acc_paraphrase": acc(sets.retain_paraphrase),
                "utility": acc(sets.utility)}
    return on_main_then_broadcast(run)


def evaluate_ablation(cfg: O3Config, data: QAData, sets: EvalSets, base_dir: str, adapters: list[str], gate: str,
                      score_paths: list[str], key: str = "logit") -> dict:
    """Metrics after the last request; ``key`` picks a gate variant's cached logits."""
    def run():
        with plain_loading():
            scores = load_scores(score_paths) if score_paths else None
            o3 = O3Model.from_parts(base_dir, [Path(a) for a in adapters], [], gate, cfg.data.prompt_template,
                                    cfg.data.max_length, cfg.model.dtype, detectors=[])
            t = len(sets.forget_train)
            targets = request_targets(cfg, data, sets)
            if scores is None:
                return measure(o3, data, sets, t, None, targets)
            return {**measure(o3, data, sets, t, scores[key], targets), **detector_metrics(scores, data, sets, t, key)}
    return on_main_then_broadcast(run)


def evaluate_gate(cfg: O3Config, data: QAData, sets: EvalSets, base_dir: str, adapters: list[str],
                  logits: torch.Tensor) -> dict:
    """O3's adapters after the last request under the max gate of any detector's logits [n, T]."""
    def run():
        with plain_loading():
            o3 = O3Model.from_parts(base_dir, [Path(a) for a in adapters], [], "max", cfg.data.prompt_template,
                                    cfg.data.max_length, cfg.model.dtype, detectors=[])
            t = len(sets.forget_train)
            gate = logits[:, :t].amax(1)
            new = [i for s in sets.forget_heldout + sets.forget_paraphrase for i in s]
            return {**measure(o3, data, sets, t, logits), **gate_metrics(data, gate, sets, t),
                    "caught_new_forget": (gate[new] > 0).float().mean().item() if new else None,
                    "passed_untouched": (gate[sets.retain + sets.retain_paraphrase + sets.utility] < 0)
                    .float().mean().item()}
    return on_main_then_broadcast(run)


def adapter_overlap(adapters: list[str]) -> float | None:
    """Mean over modules and pairs s<t of ‖A_s A_tᵀ‖_F / (‖A_s‖_F ‖A_t‖_F): 0 = orthogonal subspaces."""
    if len(adapters) < 2:
        return None
    per = [earlier_lora_A([Path(a)]) for a in adapters]
    values = []
    for s in range(len(per)):
        for t in range(s + 1, len(per)):
            for key, a_s in per[s].items():
                a_t = per[t][key]
                values.append(((a_s @ a_t.T).norm() / (a_s.norm() * a_t.norm())).item())
    return sum(values) / len(values)


def forget_records(cfg: O3Config, t: int):
    data, sets = world(cfg)
    return [data.records[i] for i in sets.forget_train[t - 1]]  # trained phrasings only


def adapters(ctx: StageContext, prefix: str, upto: int) -> list[str]:
    """Adapter folders of stages ``<prefix>1 .. <prefix>upto`` (relative to the output folder's parent)."""
    return [str(ctx.stage_dir(f"{prefix}{s}") / "adapter") for s in range(1, upto + 1)]


def score_files(ctx: StageContext, upto: int) -> list[str]:
    return [str(ctx.stage_dir(f"detector_{s}") / "scores.safetensors") for s in range(1, upto + 1)]
