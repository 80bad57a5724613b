"""Recording codes and neurons, purity, dead codes and transition accuracy on TokFSM (the state
features are in ``features``, steering in ``steering``)."""
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


def codebook_keys(model: CodebookModel) -> list[str]:
    """``"<site><layer>/<group>"`` for every codebook group, in the model's order."""
    return [f"{site}/{g}" for site, layer in model.codebooks.items() for g in range(layer.groups)]
