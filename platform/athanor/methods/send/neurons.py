"""Sensitive neurons: which hidden dimensions of one layer swing most across training, and their
deterministic dropout (zeroing) through a forward hook.

Sensitivity (SeND, Mohammadzadeh et al. 2024, Sec. 3 "Sensitive Neuron Dropout"): with E^t(x) ∈ R^d
the chosen layer's embedding of tracking input x at re-estimation point t = 1..T, neuron i's
net change is ΔE_i(x) = Σ_{t=1}^{T−1} |E_i^{t+1}(x) − E_i^t(x)| and its variability is
Var_t(E_i^t(x)) (population variance over the T points); the sensitivity weights the one by the
other and averages over the tracking split:

    S_i = mean_x [ ΔE_i(x) · Var_t E_i^t(x) ]

(The reference code averaged over the checkpoints first and then took differences across inputs;
here the change is across points, per input, as the paper defines it.) The top ``fraction``·d
neurons by S_i are dropped; ties go to the lower index (a stable sort), so the choice is a pure
function of the recorded embeddings.
"""
from __future__ import annotations

import contextlib

import torch

from ...parts.lm import decoder_layers


def sensitivity(embeddings: torch.Tensor) -> torch.Tensor:
    """S_i from embeddings stacked as (T points, N tracking inputs, d): ΔE · Var_t, averaged over inputs."""
    if embeddings.shape[0] < 2:
        raise ValueError("sensitivity needs embeddings from at least two points")
    e = embeddings.to(torch.float64)
    net_change = (e[1:] - e[:-1]).abs().sum(0)
    variability = e.var(0, unbiased=False)
    return (net_change * variability).mean(0)


def top_sensitive(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (ascending) of the floor(fraction·d) largest scores; ties to the lower index."""
    k = int(fraction * scores.numel())
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k].sort().values


def _zero_dims(output, mask: torch.Tensor):
    if isinstance(output, tuple):
        return (output[0] * mask.to(output[0].dtype),) + output[1:]
    return output * mask.to(output.dtype)


@contextlib.contextmanager
def dropped_neurons(model, layer: int, dims: torch.Tensor | None):
    """Zero hidden dimensions ``dims`` of decoder layer ``layer``'s output while inside (no-op when
    ``dims`` is None or empty). Deterministic: no rescaling, the same dims on every token."""
    if dims is None or dims.numel() == 0:
        yield
        return
    block = decoder_layers(model)[layer]
    mask = None

    def hook(_module, _inputs, output):
        nonlocal mask
        ref = output[0] if isinstance(output, tuple) else output
        if mask is None or mask.device != ref.device:
            mask = torch.ones(ref.shape[-1], device=ref.device)
            mask[dims.to(ref.device)] = 0
        return _zero_dims(output, mask)

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def layer_embeddings(model, batch: dict, layer: int, position: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The output of decoder layer ``layer`` at token ``position`` of each row (N×d, float32)."""
    device = next(model.parameters()).device
    blocks = decoder_layers(model)
    captured = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = blocks[layer].register_forward_hook(hook)
    out = []
    try:
        for start in range(0, len(batch["input_ids"]), batch_size):
            rows = slice(start, start + batch_size)
            captured.clear()
            model(input_ids=batch["input_ids"][rows].to(device),
                  attention_mask=batch["attention_mask"][rows].to(device))
            hidden = captured[-1]
            pos = position[rows].to(device)
            out.append(hidden[torch.arange(len(pos), device=device), pos].float().cpu())
    finally:
        handle.remove()
    return torch.cat(out)


def last_prompt_position(batch: dict) -> torch.Tensor:
    """Index of the last prompt token of each row (the one whose output predicts the answer)."""
    labelled = batch["labels"] != -100
    return labelled.float().argmax(1) - 1
