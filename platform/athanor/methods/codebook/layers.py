r"""Codebook bottlenecks attached to any Hugging Face decoder by hooks (no forked modeling file).

A codebook site replaces an activation by a sum of learned codes (Tamkin et al. 2024, §2):

.. math::
    \hat x = \mathrm{LN}(x),\qquad I = \operatorname{top-k}_j \cos(\hat x, C_j),\qquad
    z = \sum_{j\in I} C_j\ \ (\text{or the mean}),\qquad y = g\,z,

with a straight-through gradient :math:`\partial\hat x = \partial z`. The codes learn from the
downstream loss (the gradient of ``z`` reaches the chosen rows) and from a reconstruction loss
:math:`\lVert z - \mathrm{sg}(\hat x)\rVert^2` (which, through the straight-through path, also
pulls :math:`\hat x` towards its codes, like VQ-VAE's commitment term). The codes live in the
LayerNorm's unit scale; ``g`` (one learned gain per group, set to the inputs' scale at k-means
initialisation) gives the output the activation's own scale. Without it a transformer's codebook
outputs start ~10x larger than the attention outputs they replace, which are near-identical
across tokens at initialisation: the first code swamped the residual stream and a 100-state
TokFSM model stayed at the uniform loss (log 20) for 200+ steps.

Sites: ``heads`` (each attention head's output before the output projection: one codebook per
head, all heads of a layer in ONE grouped call of ``athanor.kernels.codebook_topk``), ``attn``
(the whole attention output) and ``mlp`` (the MLP output). No T x N similarity tensor is built
and nothing in a forward waits on the host: usage counts are accumulated on the device.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import athanor.models  # noqa: F401  registers AthanorGPT with the Auto classes (from_pretrained)
from athanor.kernels import codebook_topk
from athanor.parts.lm import decoder_layers

SITES = ("heads", "attn", "mlp")
ATTN_NAMES = ("self_attn", "attn", "attention")
OPROJ_NAMES = ("o_proj", "proj", "c_proj", "dense", "out_proj")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
CONFIG_FILE, WEIGHTS_FILE = "codebook_config.json", "codebooks.safetensors"


class CodebookLayer(nn.Module):
    """G independent codebooks of N codes in d dims; ``forward(x (G, T, d)) -> (G, T, d)``.

    ``force`` = {group: code} makes that group output the given code at ``force_positions``
    (flattened token positions) instead of its own top-k: the steering intervention."""

    def __init__(self, groups: int, dim: int, num_codes: int, k: int = 1, reduce: str = "sum"):
        super().__init__()
        self.groups, self.dim, self.num_codes, self.k, self.reduce = groups, dim, num_codes, k, reduce
        self.codebook = nn.Parameter(torch.randn(groups, num_codes, dim))
        self.gain = nn.Parameter(torch.ones(groups))
        self.register_buffer("usage", torch.zeros(groups, num_codes), persistent=False)
        self.last_input = self.last_indices = None
        self.recon_loss = None
        self.force: dict[int, int] = {}
        self.force_positions = None
        self.record = False  # keep the last indices (analysis) even in eval mode
        self.passthrough, self.capture = False, None  # k-means initialisation: identity, inputs kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G, T, d = x.shape
        if self.capture is not None:
            self.capture["x"] = x.detach()
        if self.passthrough:
            return x
        xn = F.layer_norm(x, (d,))
        out, indices = codebook_topk(xn, self.codebook, self.k, reduce=self.reduce)
        if self.force:
            out = self._forced(out, indices)
        if self.training:
            # device-side bookkeeping only: dead-code counts and the inputs replacement samples from
            self.usage.index_put_((torch.arange(G, device=x.device)[:, None].expand(G, T * self.k).reshape(-1),
                                   indices.reshape(G, -1).reshape(-1)),
                                  torch.ones((), device=x.device), accumulate=True)
            self.last_input = xn.detach()
            # The codes alone, gathered again: the op's straight-through path would also push the
            # input away from its code (d/dx of MSE(out, x.detach()) passed through as d/d out).
            picked = self.codebook.gather(1, indices.reshape(G, T * self.k, 1).expand(G, T * self.k, d))
            picked = picked.view(G, T, self.k, d)
            codes = picked.sum(2) if self.reduce == "sum" else picked.mean(2)
            self.recon_loss = F.mse_loss(codes, xn.detach())
        if self.training or self.record:
            self.last_indices = indices
        return (out * self.gain[:, None, None]).to(x.dtype)

    def _forced(self, out: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """A forced code is output as if it were the only one chosen (k copies for a sum)."""
        out = out.clone()
        pos = self.force_positions if self.force_positions is not None else slice(None)
        mult = 1 if self.reduce == "mean" else self.k
        for group, code in self.force.items():
            out[group, pos] = (self.codebook[group, code] * mult).to(out.dtype)
            indices[group, pos] = code if isinstance(code, int) else code[:, None]
        return out

    @torch.no_grad()
    def kmeans_init(self, x: torch.Tensor, iters: int = 10, seed: int = 0) -> None:
        """Spherical k-means (cosine, as the lookup) of LN(x) (G, T, d), all groups at once; the
        centres are rescaled to the inputs' norm so reconstruction starts near the data."""
        xn = F.layer_norm(x.float(), (x.shape[-1],))
        unit = F.normalize(xn, dim=-1)
        gen = torch.Generator().manual_seed(seed)
        T = xn.shape[1]
        pick = torch.randint(T, (self.num_codes,), generator=gen).to(x.device)  # with replacement if T < N
        centres = unit[:, pick].clone()
        for _ in range(iters):
            assign = (unit @ centres.transpose(1, 2)).argmax(-1)  # (G, T)
            sums = torch.zeros_like(centres).scatter_add_(1, assign[..., None].expand_as(unit), unit)
            counts = torch.zeros(centres.shape[:2], device=x.device).scatter_add_(1, assign, torch.ones_like(assign, dtype=torch.float))
            centres = torch.where(counts[..., None] > 0, F.normalize(sums, dim=-1), centres)
        scale = xn.norm(dim=-1).mean() / (self.k if self.reduce == "sum" else 1)
        self.codebook.copy_(centres * scale)
        self.gain.copy_(x.float().std(-1).mean(1))  # LN(x) * std(x) is x less its mean

    @torch.no_grad()
    def replace_dead(self, min_uses: float, generator: torch.Generator) -> int:
        """Codes used fewer than ``min_uses`` times since the last call are re-seeded with random
        recent inputs (one host sync per call, not per forward). Returns how many were replaced."""
        dead = self.usage < min_uses
        n_dead = int(dead.sum())
        if n_dead and self.last_input is not None:
            G, T, _ = self.last_input.shape
            rows = torch.randint(T, (G, self.num_codes), generator=generator).to(dead.device)
            fresh = self.last_input.gather(1, rows[..., None].expand(G, self.num_codes, self.dim))
            fresh = fresh / (self.k if self.reduce == "sum" else 1)
            self.codebook.data = torch.where(dead[..., None], fresh.to(self.codebook.dtype), self.codebook.data)
        self.usage.zero_()
        return n_dead


def child_module(module: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    for name in names:
        if isinstance(getattr(module, name, None), nn.Module):
            return getattr(module, name)
    raise ValueError(f"{type(module).__name__} has no {what} submodule named one of {names}")


class CodebookModel(nn.Module):
    """A causal LM with codebook sites on some layers. ``sites``: e.g. ``["heads"]``; ``layers``:
    indices (empty = all); ``site_codes``: codes per codebook for some sites (default ``num_codes``).
    Codebooks live in ``self.codebooks["<site><layer>"]`` (e.g. ``heads0``)."""

    def __init__(self, lm: nn.Module, sites=("heads",), layers=(), num_codes: int = 256, k: int = 1,
                 reduce: str = "sum", site_codes: dict | None = None):
        super().__init__()
        self.lm = lm
        site_codes = dict(site_codes or {})  # per-site code counts, e.g. {"mlp": 1024}; others: num_codes
        self.spec = dict(sites=list(sites), layers=list(layers), num_codes=num_codes, k=k, reduce=reduce,
                         site_codes=site_codes)
        self.codebooks = nn.ModuleDict()
        blocks = decoder_layers(lm)
        n_heads = lm.config.num_attention_heads
        for i in (layers or range(len(blocks))):
            attn = child_module(blocks[i], ATTN_NAMES, "attention")
            for site in sites:
                if site == "heads":
                    oproj = child_module(attn, OPROJ_NAMES, "output projection")
                    width = getattr(oproj, "in_features", None) or oproj.weight.shape[0]  # GPT-2 Conv1D is (in, out)
                    layer = CodebookLayer(n_heads, width // n_heads, site_codes.get(site, num_codes), k, reduce)
                    oproj.register_forward_pre_hook(self._pre_hook(layer))
                else:
                    width = lm.config.hidden_size
                    layer = CodebookLayer(1, width, site_codes.get(site, num_codes), k, reduce)
                    target = attn if site == "attn" else child_module(blocks[i], MLP_NAMES, "MLP")
                    target.register_forward_hook(self._post_hook(layer))
                self.codebooks[f"{site}{i}"] = layer

    @property
    def config(self):
        return self.lm.config

    @staticmethod
    def _bottleneck(layer: CodebookLayer, h: torch.Tensor) -> torch.Tensor:
        B, T, W = h.shape
        g = layer.groups
        grouped = h.reshape(B * T, g, W // g).transpose(0, 1)  # (G, B*T, d): all groups in one call
        return layer(grouped).transpose(0, 1).reshape(B, T, W)

    def _pre_hook(self, layer):
        def hook(_module, args):
            return (self._bottleneck(layer, args[0]),) + tuple(args[1:])
        return hook

    def _post_hook(self, layer):
        def hook(_module, _args, output):
            if isinstance(output, tuple):
                return (self._bottleneck(layer, output[0]),) + tuple(output[1:])
            return self._bottleneck(layer, output)
        return hook

    def forward(self, *args, **kwargs):
        return self.lm(*args, **kwargs)

    def recon_loss(self) -> torch.Tensor:
        """Mean reconstruction MSE of the codebook sites in the last training forward."""
        losses = [cb.recon_loss for cb in self.codebooks.values() if cb.recon_loss is not None]
        return torch.stack(losses).mean() if losses else torch.zeros(())

    # ------------------------------------------------------------------ steering
    @contextlib.contextmanager
    def forcing(self, force_codes: dict | None, positions: torch.Tensor | None = None):
        """Within the block, ``{"<site><layer>/<group>": code}`` (e.g. ``"heads1/3"``) overrides those groups' codes at
        ``positions`` (indices into the flattened batch*time axis; None = everywhere). A code is
        an int, or a LongTensor with one code per position."""
        touched = []
        for key, code in (force_codes or {}).items():
            site, _, group = key.partition("/")
            layer = self.codebooks[site]
            layer.force = {**layer.force, int(group or 0): code if torch.is_tensor(code) else int(code)}
            layer.force_positions = positions
            touched.append(layer)
        try:
            yield self
        finally:
            for layer in touched:
                layer.force, layer.force_positions = {}, None

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, force_codes: dict | None = None,
                 force_at: list[int] | None = None) -> torch.Tensor:
        """Greedy continuation, recomputing the whole sequence each token so forced positions stay
        forced. ``force_at``: P sequence positions (the same for every row) where ``force_codes``
        apply; each code is an int or a (B, P) LongTensor (a code per row and position)."""
        ids = input_ids
        B = ids.shape[0]
        at = torch.as_tensor(force_at if force_at is not None else [], dtype=torch.long, device=ids.device)
        codes = {k: (v.reshape(-1) if torch.is_tensor(v) else v) for k, v in (force_codes or {}).items()}
        for _ in range(max_new_tokens):
            positions = (torch.arange(B, device=ids.device)[:, None] * ids.shape[1] + at).reshape(-1) \
                if force_at is not None else None
            with self.forcing(codes, positions):
                logits = self.lm(input_ids=ids).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        return ids

    @contextlib.contextmanager
    def recording(self):
        """Keep every site's last indices (G, B*T, k) in eval mode, for analysis."""
        for layer in self.codebooks.values():
            layer.record = True
        try:
            yield self
        finally:
            for layer in self.codebooks.values():
                layer.record = False

    # ------------------------------------------------------------------ Hub folder
    def save_pretrained(self, folder, **kwargs) -> None:
        """The LM's own save_pretrained, plus the codebooks (safetensors) and their spec (JSON)."""
        folder = Path(folder)
        self.lm.save_pretrained(folder, **kwargs)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.codebooks.state_dict().items()},
                  folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(self.spec, indent=2))

    @classmethod
    def from_pretrained(cls, folder, **kwargs) -> "CodebookModel":
        """Loads a folder written by ``save_pretrained`` (the LM through AutoModelForCausalLM)."""
        folder = Path(folder)
        lm = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        model = cls(lm, **json.loads((folder / CONFIG_FILE).read_text()))
        model.codebooks.load_state_dict(load_file(folder / WEIGHTS_FILE))
        return model
