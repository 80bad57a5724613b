"""Steering by codes as the paper measures it (Tamkin et al. 2024, §4.3; the TokFSM tutorial of
taufeeque9/codebook-features: patch a state's codes into a run on another state, compare the output
distribution with the patched state's own by Jensen-Shannon divergence).

For each held-out prompt (a walk cut after ``prompt_states`` states, last state ``s`` reached from
``prev``) two other successors of ``prev`` are drawn: the *target* ``t`` and the *other* state ``u``
(so both counterfactual walks are walks the FSM can produce). The counterfactual run is the same
prompt with ``t`` in place of ``s``; its codes at ``t``'s own digit positions -- and only there --
replace the source run's codes at those positions (heads, MLP, or both). Then

- ``js_divergence``: JS divergence (base 2, so in [0, 1]) between the patched run's next-token
  distribution at the state's last digit and the target's TRUE next-token distribution (the first
  digits of t's successors, each edge equally likely);
- ``valid_successor``: the successor generated greedily under the same patch is an edge from ``t``.

Controls: ``no_patch`` (the source run as it is, scored against the target) and ``other_state_codes``
(the codes of ``u`` patched the same way, scored against ``t``): a patch that merely breaks the
model, or moves it anywhere but to t, does not beat them. ``target_run`` (the model run on t's own
prompt) is the ceiling.
"""
from __future__ import annotations

import torch
from scipy.spatial.distance import jensenshannon

from .analysis import codebook_keys, record_codes
from .layers import CodebookModel
from .tokfsm import TokFSM


def _pick_two(fsm: TokFSM, prev: torch.Tensor, last: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two distinct successors of ``prev`` other than ``last`` per row (needs >= 3 edges)."""
    cand = fsm.successors[prev]  # (n, E)
    score = torch.rand(cand.shape, generator=gen)
    score[cand == last[:, None]] = -1.0
    top = score.topk(2, dim=1).indices
    return cand.gather(1, top[:, :1]).squeeze(1), cand.gather(1, top[:, 1:]).squeeze(1)


def true_next_token(fsm: TokFSM, states: torch.Tensor) -> torch.Tensor:
    """(n,) states -> (n, vocab) distribution of the first token of their successor (uniform edges)."""
    first = fsm.successors[states] // 10 ** (fsm.digits - 1)  # first place's tokens are the digits 0-9
    q = torch.zeros(len(states), fsm.vocab_size)
    q.scatter_add_(1, first, torch.ones(first.shape))
    return q / q.sum(1, keepdim=True)


@torch.no_grad()
def _score(model: CodebookModel, fsm: TokFSM, src: torch.Tensor, at: torch.Tensor, codes: dict,
           target: torch.Tensor, q: torch.Tensor) -> dict:
    B, L = src.shape
    positions = (torch.arange(B)[:, None] * L + at).reshape(-1)
    with model.forcing({k: v.reshape(-1) for k, v in codes.items()}, positions):
        p = model.lm(input_ids=src).logits[:, -1].float().softmax(-1)
    js = torch.as_tensor(jensenshannon(p.numpy(), q.numpy(), axis=1, base=2)) ** 2
    out = model.generate(src, fsm.digits, force_codes=codes, force_at=at.tolist() if codes else None)
    valid = fsm.is_valid(target, fsm.decode_state(out[:, -fsm.digits:]))
    return {"js_divergence": float(js.mean()), "valid_successor": float(valid.float().mean())}


def site_groups(model: CodebookModel) -> dict[str, list[str]]:
    """{"heads"/"attn"/"mlp": that site's codebook groups, "both": all of them (with two sites or more)}."""
    keys = codebook_keys(model)
    groups = {site: [k for k in keys if k.split("/")[0].rstrip("0123456789") == site] for site in ("heads", "attn", "mlp")}
    groups = {site: ks for site, ks in groups.items() if ks}
    if len(groups) > 1:
        groups["both"] = keys
    return groups


@torch.no_grad()
def steer(model: CodebookModel, fsm: TokFSM, walks: torch.Tensor, prompt_states: int, seed: int) -> dict:
    """The conditions and controls of the module docstring, over the rows of ``walks``."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    source = walks[:, :prompt_states]
    target, other = _pick_two(fsm, source[:, -2], source[:, -1], gen)
    q = true_next_token(fsm, target)
    start = 1 + (prompt_states - 1) * fsm.digits
    at = torch.arange(start, start + fsm.digits)  # the last state's own digit positions
    ids = {}
    for name, state in (("source", source[:, -1]), ("target", target), ("other", other)):
        walk = source.clone()
        walk[:, -1] = state
        ids[name] = fsm.encode(walk)
    recorded = {name: record_codes(model, ids[name]) for name in ("target", "other")}

    def codes(name: str, keys: list[str]) -> dict:
        return {k: recorded[name][k.split("/")[0]][:, at, int(k.split("/")[1]), 0] for k in keys}

    groups = site_groups(model)
    out = {"state_positions_only": {g: _score(model, fsm, ids["source"], at, codes("target", ks), target, q)
                                    for g, ks in groups.items()},
           "other_state_codes": {g: _score(model, fsm, ids["source"], at, codes("other", ks), target, q)
                                 for g, ks in groups.items()},
           "no_patch": _score(model, fsm, ids["source"], at, {}, target, q),
           "target_run": _score(model, fsm, ids["target"], at, {}, target, q),
           "rows": len(walks), "patched_positions": at.tolist()}
    return out
