"""O3's evaluation: the evaluation sets of the QA world, the metrics after each request (per model
and gate) and the detectors' AUROCs, where each stage finds the folders of earlier ones.

Evaluation runs on the main process with plain (non-DeepSpeed) models and is broadcast, since
it trains nothing; detector scores of every record are cached by the detector stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file

from ...compat import plain_loading
from ...engine import process_state
from ...parts.fact_world import QAData, load_data, request_groups, retained_groups
from ...runner import StageContext
from .config import O3Config
from .method import earlier_lora_A, unlearning_answers
from .model import O3Model


@dataclass
class EvalSets:
    """Indices into ``data.records`` of every set the report measures."""
    forget_train: list[list[int]]  # per request: its groups, trained phrasings (S.U.)
    forget_heldout: list[list[int]]  # per request: its groups, held-out phrasings (D.U.)
    retain: list[int]  # groups never requested, every phrasing (R.D.)
    utility: list[int]  # facts of another kind, never requested
    forget_all: list[list[int]] = field(default_factory=list)  # per request: trained + held-out templates
    forget_paraphrase: list[list[int]] = field(default_factory=list)  # per request: PARAPHRASES wordings
    retain_paraphrase: list[int] = field(default_factory=list)  # retained people's paraphrases

    @classmethod
    def build(cls, data: QAData, requests: list[list[str]], retained: list[str]) -> "EvalSets":
        def idx(pred):
            return [i for i, r in enumerate(data.records) if pred(r)]

        fact = [lambda r, g=set(gs), h=h: r.kind == "fact" and r.group in g and r.heldout == h and not r.paraphrase
                for gs in requests for h in (False, True)]
        kept = set(retained)
        sets = cls([idx(f) for f in fact[0::2]], [idx(f) for f in fact[1::2]],
                   idx(lambda r: r.kind == "fact" and r.group in kept and not r.paraphrase),
                   idx(lambda r: r.kind == "utility"))
        sets.forget_all = [a + b for a, b in zip(sets.forget_train, sets.forget_heldout)]
        sets.forget_paraphrase = [idx(lambda r, g=set(gs): r.paraphrase and r.group in g) for gs in requests]
        sets.retain_paraphrase = idx(lambda r: r.paraphrase and r.group in kept)
        return sets


_WORLDS: dict[str, tuple[QAData, EvalSets]] = {}


def world(cfg: O3Config) -> tuple[QAData, EvalSets]:
    """The QA data and its evaluation sets (built once per process and data config)."""
    key = repr(cfg.data)
    if key not in _WORLDS:
        data = load_data(cfg.data)
        requests = request_groups(data, cfg.data)
        _WORLDS[key] = data, EvalSets.build(data, requests, retained_groups(data, requests))
    return _WORLDS[key]


def base_dir(ctx: StageContext) -> str:
    """The base LM folder (relative when trained here, so the output folder can move)."""
    base = ctx.results["base"]
    return str(ctx.stage_dir("base") / "model") if base["steps"] else base["model_dir"]


def on_main_then_broadcast(fn):
    """Run ``fn()`` on the main process only; every process gets its (picklable) result."""
    state = process_state()
    box = [fn() if state.is_main_process else None]
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
    out = {"request": t, "forget_acc_train": acc(sets.forget_train[t - 1]),
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


def detector_metrics(scores: dict[str, torch.Tensor], sets: EvalSets, t: int, key: str = "logit") -> dict:
    """AUROC of forget (requests 1..t) vs retain records for the gate and its parts."""
    forget = [i for s in sets.forget_all[:t] for i in s]
    heldout = [i for s in sets.forget_heldout[:t] for i in s]
    paraphrase = [i for s in sets.forget_paraphrase[:t] for i in s]
    negatives = sets.retain + sets.retain_paraphrase + sets.utility  # every question no request touches
    gate = scores[key][:, :t].amax(1)  # max over requests, monotone in w(x)
    cosine = -scores["cos_distance"][:, :t].amin(1)
    maha = -scores["mahalanobis"][:, :t].amin(1)
    return {"auroc": auroc(gate[forget], gate[sets.retain]),  # pooled: 2/3 of its positives are stored questions
            # questions the detectors never stored (vs retained/utility questions)
            "auroc_heldout_templates": auroc(gate[heldout], gate[negatives]) if heldout else None,
            "auroc_paraphrase": auroc(gate[paraphrase], gate[negatives]) if paraphrase else None,
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
            return {**measure(o3, data, sets, t, scores["logit"], request_targets(cfg, data, sets)), **detector_metrics(scores, sets, t)}
    return on_main_then_broadcast(run)


def evaluate_base(cfg: O3Config, data: QAData, sets: EvalSets, base_dir: str) -> dict:
    def run():
        with plain_loading():
            o3 = O3Model.from_parts(base_dir, [], [], "off", cfg.data.prompt_template, cfg.data.max_length,
                                    cfg.model.dtype, detectors=[])

        def acc(idx):
            return o3.answer_matches([data.records[i] for i in idx]).float().mean().item() if idx else None

        return {"forget_acc_train": [acc(s) for s in sets.forget_train],
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
            return {**measure(o3, data, sets, t, scores[key], targets), **detector_metrics(scores, sets, t, key)}
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
