"""What the codes mean on TokFSM: state detectors, purity, dead codes, transition accuracy, steering.

State features (Tamkin et al. 2024, §4.2). At the last digit of each state in held-out walks,
the label is that state s. A discrete feature f (one codebook group's code, or a layer's tuple
of the codes of all its codebooks: every head, plus the attention/MLP codebooks) "detects s" with precision P(s | f) and recall P(f | s). For each state the
best feature is the one with the highest F1 on the *select* half of the held-out walks; its
precision and recall are then measured on the other (*measure*) half. The baseline's best
neuron (an MLP hidden unit or a residual-stream dim after a block, either sign) is chosen the same way
at the code's recall: threshold each unit so it fires on that fraction of state-s positions
(select half), take the unit with the best precision, measure it on the measure half.
"""
from __future__ import annotations

import torch
from torch import nn

from athanor.parts.lm import decoder_layers

from .layers import MLP_NAMES, CodebookModel, child_module
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
        mlp = child_module(block, MLP_NAMES, "MLP")
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


def tuple_ids(codes: torch.Tensor) -> torch.Tensor:
    """(n, G) top-1 codes -> one int per row, equal exactly when the rows' codes are (no radix
    arithmetic: G codebooks of N codes overflow int64 beyond a few heads)."""
    return torch.unique(codes, dim=0, return_inverse=True)[1]


def site_layer(site: str) -> str:
    """'heads1' -> '1': the decoder layer a codebook site sits in."""
    return site[len(site.rstrip("0123456789")):]


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
def steer(model: CodebookModel, fsm: TokFSM, walks: torch.Tensor, prompt_states: int, targets: torch.Tensor,
          best_group: torch.Tensor, seed: int) -> dict:
    """Steering by codes alone (an interchange intervention on the discrete bottleneck).

    For each held-out prompt and target state t: the *source* run is the prompt as it is; the
    *target* run is the same prompt with its last state replaced by t. While the successor is
    generated greedily (``fsm.digits`` tokens), the source run's codes at the last state's digits
    and at the successor's digits generated so far are overwritten by the target run's codes at
    those positions (the tokens stay the source's). Success: the generated successor is a valid
    edge *from t*. Only integer codes move between the runs, so success says the codes carry
    the state.

    Why the successor's own digits are forced too: with a state written as several tokens, the
    successor's second digit is predicted at the position of its first digit, where layer-0
    attention reads the *raw* digit tokens of the last state (no codebook sits between them);
    forcing only the state's own digits leaves that path to the source state
    (``*_state_only``, reported for comparison).

    Conditions: every codebook of the heads site (``all_heads``), all heads of one layer
    (``layer<i>_heads``), each target's best single code group (``one_head``, ``best_group[t]``
    indexes :func:`codebook_keys`), every codebook of every site (``all_codebooks``, when sites
    other than heads exist), random codes in all heads at the same positions (``random``), no
    forcing (``none``)."""
    model.eval()
    keys = codebook_keys(model)
    heads = [k for k in keys if k.startswith("heads")] or keys
    P = len(walks)
    source = walks[:, :prompt_states].repeat(len(targets), 1)  # target-major rows
    tgt = targets.repeat_interleave(P)
    counter = source.clone()
    counter[:, -1] = tgt
    src_ids, cf_ids = fsm.encode(source), fsm.encode(counter)
    gen = torch.Generator().manual_seed(seed)
    run = lambda rows, ks, **kw: _steered(model, fsm, src_ids[rows], cf_ids[rows], tgt[rows], ks, **kw)  # noqa: E731
    everything = torch.ones(len(tgt), dtype=torch.bool)
    out = {"all_heads": float(run(everything, heads).mean()),
           "all_heads_state_only": float(run(everything, heads, state_only=True).mean())}
    for layer in sorted({site_layer(k.split("/")[0]) for k in heads}, key=int):
        in_layer = [k for k in heads if site_layer(k.split("/")[0]) == layer]
        out[f"layer{layer}_heads"] = float(run(everything, in_layer).mean())
    if len(heads) < len(keys):
        out["all_codebooks"] = float(run(everything, keys).mean())
    out["random"] = float(run(everything, heads, random=gen).mean())
    out["none"] = float(run(everything, []).mean())
    hits = [run(best_group[tgt] == j, [key]) for j, key in enumerate(keys) if (best_group[tgt] == j).any()]
    out["one_head"] = float(torch.cat(hits).mean()) if hits else float("nan")
    return out


def codebook_keys(model: CodebookModel) -> list[str]:
    """``"<site><layer>/<group>"`` for every codebook group, in the model's order."""
    return [f"{site}/{g}" for site, layer in model.codebooks.items() for g in range(layer.groups)]


def _steered(model: CodebookModel, fsm: TokFSM, src: torch.Tensor, cf: torch.Tensor, tgt: torch.Tensor,
             keys: list[str], state_only: bool = False, random: torch.Generator | None = None) -> torch.Tensor:
    """(rows,) float: 1 where the successor generated under the forcing is valid from ``tgt``."""
    start = src.shape[1] - fsm.digits
    B = len(src)
    if random is not None:  # one random code per (row, position), fixed across generation steps
        table = {k: torch.randint(model.codebooks[k.split("/")[0]].num_codes, (B, start + 2 * fsm.digits), generator=random)
                 for k in keys}
    for _ in range(fsm.digits):
        end = start + fsm.digits if state_only else src.shape[1]
        at = torch.arange(start, end)
        if random is not None:
            codes = {k: table[k][:, at] for k in keys}
        elif keys:
            recorded = record_codes(model, cf)
            codes = {k: recorded[k.split("/")[0]][:, at, int(k.split("/")[1]), 0] for k in keys}
        else:
            codes = {}
        positions = (torch.arange(B)[:, None] * src.shape[1] + at).reshape(-1)
        with model.forcing({k: v.reshape(-1) for k, v in codes.items()}, positions):
            nxt = model.lm(input_ids=src).logits[:, -1].argmax(-1, keepdim=True)
        src, cf = torch.cat([src, nxt], 1), torch.cat([cf, nxt], 1)
    return fsm.is_valid(tgt, fsm.decode_state(src[:, -fsm.digits:])).float()
