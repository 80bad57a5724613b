"""State features with precision AND recall, counted at every token position (Tamkin et al. 2024, §4.2).

Every token position of a held-out walk gets a label: the state ``s`` at the last digit of each state
(where the model "is in" s), and a "no state" label everywhere else (BOS, a state's earlier digits).
A feature "detects s" with precision P(s | fires) over ALL positions -- a code that also fires where the
state is not pays for it -- and recall P(fires | s) over the positions labelled s.

Two picks per state, both made on the *select* half of the walks and measured on the other half:

- ``precision_at_recall_0.5``: the feature with the best select precision among those whose select
  recall is >= 0.5 (a feature that fires on one occurrence in twenty cannot win by being rare);
- ``f1``: the feature with the best select F1 = 2PR / (P + R).

Kinds: a single code of one codebook group (``code``), a layer's tuple of its ATTENTION codes (every
head's code at once, or the whole-attention code; the MLP code is left out: it alone can name the
state, which made every tuple holding it precise by construction), and a baseline neuron (an MLP
hidden unit or a residual-stream dimension, either sign) thresholded to fire on a given fraction of
the select half's state-s positions -- at recall >= 0.5 on a grid, and at each state's code recall
(``neuron_at_code_recall``: codes vs neurons at matched recall).
"""
from __future__ import annotations

import torch

from . import analysis as A

GRID = torch.linspace(0.5, 1.0, 11)  # neuron recall levels tried for the recall >= 0.5 pick
F1_GRID = torch.linspace(0.1, 1.0, 19)  # and for the best-F1 pick


def position_labels(walks: torch.Tensor, digits: int, n_states: int) -> torch.Tensor:
    """(n, S) walks -> (n, 1 + S*digits) labels: the state at its last digit, ``n_states`` elsewhere."""
    n, s = walks.shape
    labels = torch.full((n, 1 + s * digits), n_states, dtype=torch.long)
    labels[:, torch.arange(s) * digits + digits] = walks
    return labels


def _f1(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return 2 * p * r / (p + r).clamp(min=1e-9)


def _counts(values: torch.Tensor, labels: torch.Tensor, n_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted unique values (V,), counts (V, n_labels))."""
    uniq, inv = values.unique(return_inverse=True)
    c = torch.bincount(inv * n_labels + labels, minlength=len(uniq) * n_labels).reshape(len(uniq), n_labels)
    return uniq, c.float()


def discrete(values: torch.Tensor, labels: torch.Tensor, select: torch.Tensor, n_states: int) -> dict:
    """Per state, both picks (see the module) for one discrete feature (``values`` (N,) int64, one per
    position; ``labels`` (N,) in [0, n_states]). Returns {pick: {value, sel_p, sel_r, precision, recall}}."""
    L = n_states + 1
    uniq, c = _counts(values[select], labels[select], L)
    sel_p = c[:, :n_states] / c.sum(1, keepdim=True).clamp(min=1)
    sel_r = c[:, :n_states] / c[:, :n_states].sum(0, keepdim=True).clamp(min=1)
    at_half = torch.where(sel_r >= 0.5, sel_p + 1e-6 * sel_r, torch.full_like(sel_p, -1.0))
    u_m, c_m = _counts(values[~select], labels[~select], L)
    n_s = c_m[:, :n_states].sum(0).clamp(min=1)
    cols = torch.arange(n_states)
    out = {}
    for pick, score in (("precision_at_recall_0.5", at_half), ("f1", _f1(sel_p, sel_r))):
        best = score.argmax(0)
        value = uniq[best]
        row = torch.searchsorted(u_m, value).clamp(max=len(u_m) - 1)
        seen = u_m[row] == value  # a value never seen on the measure half fires nowhere there
        tp = torch.where(seen, c_m[row, cols], torch.zeros(()))
        fired = torch.where(seen, c_m[row].sum(1), torch.zeros(()))
        reached = sel_r[best, cols] >= 0.5 if pick != "f1" else torch.ones(n_states, dtype=torch.bool)
        out[pick] = {"value": value, "sel_p": torch.where(reached, sel_p[best, cols], torch.zeros(())),
                     "sel_r": sel_r[best, cols], "reached": reached,
                     "precision": torch.where(reached, tp / fired.clamp(min=1), torch.zeros(())),
                     "recall": tp / n_s}
    return out


def best_over(results: list[dict], pick: str) -> dict:
    """Per state, the feature among ``results`` (e.g. every codebook group) with the best select score
    for ``pick``; its measured precision/recall/F1 and select recall."""
    stack = {k: torch.stack([r[pick][k].float() for r in results]) for k in ("sel_p", "sel_r", "precision", "recall", "reached")}
    score = stack["sel_p"] if pick != "f1" else _f1(stack["sel_p"], stack["sel_r"])
    which = score.argmax(0)
    cols = torch.arange(score.shape[1])
    got = {k: v[which, cols] for k, v in stack.items()}
    got["which"] = which
    return got


def neuron(acts: torch.Tensor, labels: torch.Tensor, select: torch.Tensor, n_states: int,
           code_recall: torch.Tensor | None = None) -> dict:
    """The best unit per state (both signs) at recall >= 0.5 (grid), by F1 (grid), and at
    ``code_recall[s]`` (clamped to >= 0.5); precision over every position. ``acts`` (N, M)."""
    a_sel = torch.cat([acts[select], -acts[select]], 1)
    a_meas = torch.cat([acts[~select], -acts[~select]], 1)
    y_sel, y_meas = labels[select], labels[~select]
    sorted_all = a_sel.T.contiguous().sort(dim=1).values  # (2M, n_sel)
    out = {name: {k: torch.zeros(n_states) for k in ("precision", "recall", "sel_r")}
           for name in ("precision_at_recall_0.5", "f1", "at_code_recall")}
    for s in range(n_states):
        pos = a_sel[y_sel == s]
        if len(pos) == 0:
            continue
        desc = pos.sort(dim=0, descending=True).values
        picks = {"precision_at_recall_0.5": (GRID, "p"), "f1": (F1_GRID, "f1")}
        if code_recall is not None:
            picks["at_code_recall"] = (code_recall[s:s + 1].clamp(min=0.5), "p")
        for name, (grid, crit) in picks.items():
            best = (-1.0, 0, 0.0)
            for r in grid.tolist():
                need = min(len(pos), max(1, int(torch.ceil(torch.tensor(r * len(pos))))))
                thresh = desc[need - 1]
                fired = len(sorted_all[0]) - torch.searchsorted(sorted_all, thresh[:, None]).squeeze(1)
                tp = (pos >= thresh).sum(0).float()
                p = tp / fired.clamp(min=1).float()
                score = p if crit == "p" else _f1(p, tp / len(pos))
                m = int(score.argmax())
                if float(score[m]) > best[0]:
                    best = (float(score[m]), m, float(thresh[m]))
            _, m, t = best
            fires, is_s = a_meas[:, m] >= t, y_meas == s
            tp = (fires & is_s).sum().float()
            out[name]["precision"][s] = tp / fires.sum().clamp(min=1)
            out[name]["recall"][s] = tp / is_s.sum().clamp(min=1)
    return out


def summarise(got: dict) -> dict:
    """Medians over states (and the share of states whose pick reached select recall 0.5)."""
    med = lambda t: float(t.float().median())  # noqa: E731
    out = {"precision": med(got["precision"]), "recall": med(got["recall"]), "f1": med(_f1(got["precision"], got["recall"]))}
    if "reached" in got:
        out["states_reaching_recall_0.5"] = float(got["reached"].float().mean())
    return out


def state_features(model, baseline, fsm, ids: torch.Tensor, walks: torch.Tensor, batch: int) -> tuple[dict, dict]:
    """Code / attention-tuple / baseline-neuron detectors of every state (module docstring): the
    report's ``state_features`` and what the heat map needs."""
    S = fsm.cfg.states
    labels2d = position_labels(walks, fsm.digits, S)
    n, T = labels2d.shape
    labels = labels2d.reshape(-1)
    select = (torch.arange(n) < n // 2)[:, None].expand(n, T).reshape(-1)  # first half selects, second measures
    at_state = labels < S
    codes = A.record_codes(model, ids, batch)
    singles, keys, purity, attention = [], [], {}, {}
    for site, c in codes.items():
        top1 = c[..., 0].reshape(n * T, c.shape[2])
        for g in range(top1.shape[1]):
            singles.append(discrete(top1[:, g], labels, select, S))
            keys.append(f"{site}/{g}")
        purity[site] = sum(A.purity(top1[at_state, g], labels[at_state], S) for g in range(top1.shape[1])) / top1.shape[1]
        if not site.startswith("mlp"):
            attention.setdefault(A.site_layer(site), []).append(top1)
    out: dict = {}
    code_pr, code_f1 = best_over(singles, "precision_at_recall_0.5"), best_over(singles, "f1")
    sites = [keys[i].split("/")[0] for i in code_pr["which"].tolist()]
    out["code"] = {"precision_at_recall_0.5": summarise(code_pr), "best_f1": summarise(code_f1),
                   "picked_from": {s: sites.count(s) / len(sites) for s in sorted(set(sites))}}
    tuples, per_layer = [], {}
    for layer, cols in attention.items():
        tup = A.tuple_ids(torch.cat(cols, 1))
        tuples.append(discrete(tup, labels, select, S))
        per_layer[f"layer{layer}"] = {**summarise(tuples[-1]["precision_at_recall_0.5"]),
                                      "distinct_tuples": int(tup.unique().numel())}
    if tuples:
        out["tuple"] = {"precision_at_recall_0.5": summarise(best_over(tuples, "precision_at_recall_0.5")),
                        "best_f1": summarise(best_over(tuples, "f1")), "per_layer": per_layer}
    acts = A.record_neurons(baseline, ids, torch.arange(T), batch)
    nr = neuron(acts, labels, select, S, code_recall=code_pr["sel_r"])
    out["neuron"] = {"precision_at_recall_0.5": summarise(nr["precision_at_recall_0.5"]), "best_f1": summarise(nr["f1"]),
                     "at_code_recall": summarise(nr["at_code_recall"])}
    diff = code_pr["precision"] - nr["at_code_recall"]["precision"]
    out["code_vs_neuron_at_matched_recall"] = {
        "code_better_fraction": float((diff > 0.01).float().mean()), "neuron_better_fraction": float((diff < -0.01).float().mean()),
        "precision_difference_median": float(diff.median())}
    out["code_purity"] = purity
    out["counting"] = ("every token position of the measure half; a feature firing where the state is not counts "
                       "against its precision; picked on the select half")
    return out, {"codes": codes, "labels": labels, "at_state": at_state, "keys": keys, "which": code_pr["which"]}
