"""What the codes mean on TokFSM: state detectors, purity, dead codes, transition accuracy, steering.

State features (Tamkin et al. 2024, §4.2). At the last digit of each state in held-out walks,
the label is that state s. A discrete feature f (one head's code, or a layer's tuple of codes
over its heads) "detects s" with precision P(s | f) and recall P(f | s). For each state the
best feature is the one with the highest F1 on the *select* half of the held-out walks; its
precision and recall are then measured on the other (*measure*) half. The baseline's best
neuron (an MLP hidden unit or a residual-stream dim after a block, either sign) is chosen the same way
at the code's recall: threshold each unit so it fires on that fraction of state-s positions
(select half), take the unit with the best precision, measure it on the measure half.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import MLP_NAMES, CodebookModel, _child, decoder_layers
from .tokfsm import TokFSM


@torch.no_grad()
def record_codes(model: CodebookModel, ids: torch.Tensor, batch: int = 128) -> dict[str, torch.Tensor]:
    """{site: (n, T, G, k) code indices} over ``ids`` (n, T)."""
    model.eval()
    out: dict[str, list] = {name: [] for name in model.codebooks}
    with model.recording():
        for i in range(0, len(ids), batch):
            chunk = ids[i:i + batch]
            model.lm(input_ids=chunk)
            for name, layer in model.codebooks.items():
                idx = layer.last_indices  # (G, B*T, k)
                out[name].append(idx.permute(1, 0, 2).reshape(chunk.shape[0], chunk.shape[1], layer.groups, layer.k))
    return {name: torch.cat(v) for name, v in out.items()}


@torch.no_grad()
def record_neurons(model: CodebookModel, ids: torch.Tensor, positions: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """(n * len(positions), M) unit activations at ``positions``: each layer's MLP hidden units (the
    input of the MLP's last linear map) and the residual stream after the layer."""
    model.eval()
    grabbed: list[torch.Tensor] = []
    hooks = []
    for block in decoder_layers(model.lm):
        mlp = _child(block, MLP_NAMES, "MLP")
        last_linear = [m for m in mlp.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"][-1]
        hooks.append(last_linear.register_forward_pre_hook(lambda _m, args: grabbed.append(args[0])))
        hooks.append(block.register_forward_hook(
            lambda _m, _a, out: grabbed.append(out[0] if isinstance(out, tuple) else out)))
    rows = []
    try:
        for i in range(0, len(ids), batch):
            grabbed.clear()
            model.lm(input_ids=ids[i:i + batch])
            rows.append(torch.cat([g[:, positions].float() for g in grabbed], dim=-1).reshape(-1, sum(g.shape[-1] for g in grabbed)))
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(rows)


def _contingency(values: torch.Tensor, labels: torch.Tensor, n_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique feature values, counts (V, S))."""
    uniq, inv = values.unique(return_inverse=True)
    counts = torch.bincount(inv * n_labels + labels, minlength=len(uniq) * n_labels).reshape(len(uniq), n_labels)
    return uniq, counts.float()


def best_discrete(values: torch.Tensor, labels: torch.Tensor, select: torch.Tensor, n_labels: int) -> dict:
    """Per state: the feature value with the best F1 on the select rows; its precision/recall on
    the other rows. ``values`` (n,) int64 feature values."""
    uniq, c_sel = _contingency(values[select], labels[select], n_labels)
    prec = c_sel / c_sel.sum(1, keepdim=True).clamp(min=1)
    rec = c_sel / c_sel.sum(0, keepdim=True).clamp(min=1)
    f1 = 2 * prec * rec / (prec + rec).clamp(min=1e-9)
    best = f1.argmax(0)  # (S,)
    chosen = uniq[best]
    meas_v, meas_y = values[~select], labels[~select]
    fires = meas_v[:, None] == chosen[None, :]  # (n_meas, S)
    is_s = meas_y[:, None] == torch.arange(n_labels)[None, :]
    tp = (fires & is_s).sum(0).float()
    precision = tp / fires.sum(0).clamp(min=1)
    recall = tp / is_s.sum(0).clamp(min=1)
    cols = torch.arange(n_labels)
    return {"value": chosen, "precision": precision, "recall": recall,
            "select_precision": prec[best, cols], "select_recall": rec[best, cols]}


def best_neuron(acts: torch.Tensor, labels: torch.Tensor, select: torch.Tensor, recall: torch.Tensor,
                n_labels: int) -> dict:
    """Per state: the unit (either sign) with the best precision when thresholded to fire on a
    ``recall[s]`` fraction of state-s select rows; precision/recall measured on the other rows."""
    a_sel = torch.cat([acts[select], -acts[select]], dim=1)  # both signs
    a_meas = torch.cat([acts[~select], -acts[~select]], dim=1)
    y_sel, y_meas = labels[select], labels[~select]
    sorted_all = a_sel.T.contiguous().sort(dim=1).values  # (2M, n_sel) ascending
    n_sel = a_sel.shape[0]
    precision, rec_out, unit = torch.zeros(n_labels), torch.zeros(n_labels), torch.zeros(n_labels, dtype=torch.long)
    for s in range(n_labels):
        pos = a_sel[y_sel == s]
        if len(pos) == 0:
            continue
        need = max(1, int(torch.ceil(recall[s].clamp(min=1e-6) * len(pos))))
        thresh = pos.sort(dim=0, descending=True).values[min(need, len(pos)) - 1]  # (2M,)
        fired = n_sel - torch.searchsorted(sorted_all, thresh[:, None], side="left").squeeze(1)
        tp = (pos >= thresh).sum(0)
        prec = tp.float() / fired.clamp(min=1).float()
        m = int(prec.argmax())
        fires = a_meas[:, m] >= thresh[m]
        is_s = y_meas == s
        precision[s] = (fires & is_s).sum().float() / fires.sum().clamp(min=1)
        rec_out[s] = (fires & is_s).sum().float() / is_s.sum().clamp(min=1)
        unit[s] = m
    return {"precision": precision, "recall": rec_out, "unit": unit}


def purity(values: torch.Tensor, labels: torch.Tensor, n_labels: int) -> float:
    """Share of a feature's firings at its most common state, weighted by firings (1 = pure)."""
    _, counts = _contingency(values, labels, n_labels)
    return float(counts.max(1).values.sum() / counts.sum())


def dead_fraction(codes: torch.Tensor, num_codes: int) -> float:
    """Share of (group, code) pairs never chosen on ``codes`` (n, T, G, k)."""
    G = codes.shape[2]
    used = torch.zeros(G, num_codes, dtype=torch.bool)
    flat = codes.permute(2, 0, 1, 3).reshape(G, -1)
    used[torch.arange(G)[:, None].expand_as(flat), flat] = True
    return 1 - float(used.float().mean())


def tuple_ids(codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """(..., G) top-1 codes -> one int per position (mixed radix N)."""
    radix = num_codes ** torch.arange(codes.shape[-1], dtype=torch.long)
    return (codes * radix).sum(-1)


@torch.no_grad()
def transition_accuracy(model: CodebookModel, fsm: TokFSM, walks: torch.Tensor, prompt_states: int,
                        new_states: int) -> float:
    """Greedy continuation of held-out prompts: share of generated transitions (the first one from
    the prompt's last state) that are edges of the FSM."""
    model.eval()
    ids = fsm.encode(walks)[:, :1 + prompt_states * fsm.digits]
    out = model.generate(ids, new_states * fsm.digits)
    states = fsm.decode_state(out[:, 1:].reshape(len(ids), -1, fsm.digits))
    return float(fsm.is_valid(states[:, prompt_states - 1:-1], states[:, prompt_states:]).float().mean())


@torch.no_grad()
def steer(model: CodebookModel, fsm: TokFSM, walks: torch.Tensor, state_codes: dict[str, torch.Tensor],
          one_head: torch.Tensor, prompt_states: int, targets: torch.Tensor, seed: int) -> dict:
    """Force a target state's codes on the digits of the prompt's last state and check whether
    the next generated state is a valid successor of the *target*.

    ``state_codes[key]``: (S, digits) the most common code of head ``key`` at each digit of each
    state; ``one_head[s]``: index into ``state_codes`` keys of the head whose code best detects s.
    Conditions: all heads, one head, random codes in all heads, and no forcing."""
    model.eval()
    keys = list(state_codes)
    P = len(walks)
    ids = fsm.encode(walks)[:, :1 + prompt_states * fsm.digits]
    force_at = list(range(ids.shape[1] - fsm.digits, ids.shape[1]))
    gen = torch.Generator().manual_seed(seed)
    rows = ids.repeat(len(targets), 1)  # target-major
    tgt = targets.repeat_interleave(P)
    out = {}
    num_codes = model.spec["num_codes"]
    for condition in ("all_heads", "random", "none"):
        force = {}
        for key in keys:
            if condition == "all_heads":
                force[key] = state_codes[key][tgt]
            elif condition == "random":
                force[key] = torch.randint(num_codes, (len(rows), fsm.digits), generator=gen)
        out[condition] = _valid_for_target(model, fsm, rows, tgt, force, force_at if force else None)
    # one head: rows grouped by which head is forced (each target's own best head)
    hits = []
    for j, key in enumerate(keys):
        mask = one_head[tgt] == j
        if mask.any():
            v = _valid_for_target(model, fsm, rows[mask], tgt[mask], {key: state_codes[key][tgt[mask]]}, force_at, reduce=False)
            hits.append(v)
    out["one_head"] = float(torch.cat(hits).float().mean()) if hits else float("nan")
    return out


def _valid_for_target(model, fsm, rows, tgt, force, force_at, reduce=True):
    gen = model.generate(rows, fsm.digits, force_codes=force or None, force_at=force_at)
    nxt = fsm.decode_state(gen[:, -fsm.digits:])
    valid = fsm.is_valid(tgt, nxt)
    return float(valid.float().mean()) if reduce else valid
