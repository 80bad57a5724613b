"""The inner-loop feedback module, attached to a frozen DiT-like backbone with forward hooks.

ILF ("Accelerate High-Quality Diffusion Models with Inner Loop Feedback", Gwilliam et al. 2025): the
backbone's blocks ``b_0 … b_{L-1}`` are left untouched; a loop region ``b_a … b_e`` gets a feedback
block ``F`` (a transformer block with the backbone's own settings, trained from scratch) and a learnable
scale ``s`` (initialised at 0). With ``h`` the loop's input and ``B = b_e ∘ … ∘ b_a``:

    loop  (ILF):      h' = B(h + s · F(B(h)))          the loop runs twice; cost L + (e − a + 1) + 1 blocks
    once  (control):  h' = B(h) + s · F(B(h))          the same block added once, no re-run; cost L + 1

and the backbone continues from ``h'``. With ``s = 0`` both give ``B(h)``: the frozen backbone exactly.
``F`` is conditioned like the backbone's blocks (it receives the same timestep/class arguments as the
loop's first block), so for DiT it is an adaLN-zero block.

The hooks need only a list of blocks (``blocks_attr``, e.g. ``transformer_blocks``) whose blocks take the
hidden states as their first argument and return them; the feedback block is a diffusers
``BasicTransformerBlock`` whose settings are read from a ``DiTTransformer2DModel`` config (or given).

Block caching (the baseline "reuse a block's output from the previous step"): on a refresh step the
cached blocks run and their residual ``r = b(h) − h`` is kept; on the other steps ``b(h) ≈ h + r``
costs no block evaluation (the residual-reuse form of FORA / Δ-DiT for residual transformers).
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ...config import ConfigError
from ...parts.diffusion import disable_builtin_label_dropout

MODES = ("loop", "once")


def backbone_blocks(backbone: nn.Module, blocks_attr: str = "transformer_blocks") -> nn.ModuleList:
    blocks = getattr(backbone, blocks_attr, None)
    if not isinstance(blocks, nn.ModuleList):
        raise ConfigError(f"{type(backbone).__name__} has no block list {blocks_attr!r}")
    return blocks


def dit_block_kwargs(backbone: nn.Module) -> dict:
    """``BasicTransformerBlock`` arguments that rebuild one of a ``DiTTransformer2DModel``'s blocks."""
    c = backbone.config
    if "num_embeds_ada_norm" not in c or "attention_head_dim" not in c:
        raise ConfigError(f"cannot read block settings from {type(backbone).__name__}; pass block_kwargs")
    return {"dim": c.num_attention_heads * c.attention_head_dim, "num_attention_heads": c.num_attention_heads,
            "attention_head_dim": c.attention_head_dim, "dropout": c.dropout, "activation_fn": c.activation_fn,
            "num_embeds_ada_norm": c.num_embeds_ada_norm, "attention_bias": c.attention_bias,
            "upcast_attention": c.upcast_attention, "norm_type": c.norm_type,
            "norm_elementwise_affine": c.norm_elementwise_affine, "norm_eps": c.norm_eps}


class FeedbackModule(ModelMixin, ConfigMixin):
    """``s · F(h)``: one transformer block and a scalar gate; where it sits is part of its config."""

    @register_to_config
    def __init__(self, block_kwargs: dict | None = None, loop_start: int = 0, loop_end: int = 0, mode: str = "loop",
                 blocks_attr: str = "transformer_blocks"):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"feedback mode {mode!r} is not one of: {', '.join(MODES)}")
        if not 0 <= loop_start <= loop_end:
            raise ConfigError(f"feedback loop {loop_start}..{loop_end} is not a block range")
        # DiT's label embedding drops labels by itself in train mode (independently per block); the
        # feedback block must see the same labels as the backbone's blocks, so that dropout is off.
        self.block = disable_builtin_label_dropout(BasicTransformerBlock(**(block_kwargs or {})))
        self.scale = nn.Parameter(torch.zeros(()))  # s = 0: the backbone exactly

    @classmethod
    def for_backbone(cls, backbone: nn.Module, loop_start: int, loop_end: int, mode: str = "loop",
                     block_kwargs: dict | None = None, blocks_attr: str = "transformer_blocks") -> "FeedbackModule":
        n = len(backbone_blocks(backbone, blocks_attr))
        if not 0 <= loop_start <= loop_end < n:
            raise ConfigError(f"loop {loop_start}..{loop_end} is outside the backbone's {n} blocks")
        return cls(block_kwargs or dit_block_kwargs(backbone), loop_start, loop_end, mode, blocks_attr)

    @property
    def loop_length(self) -> int:
        return self.config.loop_end - self.config.loop_start + 1

    def extra_blocks(self) -> int:
        """Block evaluations this module adds to one backbone pass."""
        return 1 + (self.loop_length if self.config.mode == "loop" else 0)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.scale * self.block(hidden_states, *args, **kwargs)


# The hooks attached to each backbone, both held weakly (the hooks live as long as their handles on the
# backbone's blocks): a backbone that goes away takes its entry along.
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class FeedbackHooks:
    """Hooks that run ``feedback`` inside ``backbone``'s forward (see the module docstring).

    ``feedback`` may be a wrapped module (DDP): it is called as given, its config read unwrapped.
    A backbone carries one set of hooks: attaching again removes the previous set (two sets would
    each feed back, and each would re-trigger the other's re-run)."""

    def __init__(self, backbone: nn.Module, feedback: nn.Module):
        previous = _ATTACHED[backbone]() if backbone in _ATTACHED else None
        if previous is not None:
            previous.remove()
        config = getattr(feedback, "module", feedback).config
        self.feedback, self.mode = feedback, config.mode
        blocks = backbone_blocks(backbone, config.blocks_attr)
        self.loop = list(blocks[config.loop_start:config.loop_end + 1])
        self.enabled, self._rerunning, self._call = True, False, None
        self.handles = [self.loop[0].register_forward_pre_hook(self._keep_input, with_kwargs=True),
                        self.loop[-1].register_forward_hook(self._feed_back, with_kwargs=True)]
        self.backbone = backbone
        _ATTACHED[backbone] = weakref.ref(self)

    def _keep_input(self, module, args, kwargs):
        if self.enabled and not self._rerunning:
            self._call = (args, kwargs)

    def _feed_back(self, module, args, kwargs, output):
        if not self.enabled or self._rerunning:
            return None
        (hidden, *rest), loop_kwargs = self._call
        self._call = None
        fed_back = self.feedback(output, *rest, **loop_kwargs)
        if self.mode == "once":
            return output + fed_back
        self._rerunning = True
        try:
            h = hidden + fed_back
            for block in self.loop:
                h = block(h, *rest, **loop_kwargs)
        finally:
            self._rerunning = False
        return h

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.backbone in _ATTACHED and _ATTACHED[self.backbone]() is self:
            del _ATTACHED[self.backbone]

    @contextlib.contextmanager
    def disabled(self):
        """The plain backbone (hooks attached but inert)."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True


def attach_feedback(backbone: nn.Module, feedback: nn.Module) -> FeedbackHooks:
    return FeedbackHooks(backbone, feedback)


@contextlib.contextmanager
def count_block_calls(*modules: nn.Module, blocks_attr: str = "transformer_blocks"):
    """Counts every block evaluation of the backbones' block lists (and of feedback modules' blocks)
    while the context is open: ``counter["blocks"]``. Each call processes the whole batch, so the count
    is block evaluations per sample."""
    counter = {"blocks": 0}

    def count(*_):
        counter["blocks"] += 1

    handles = []
    for module in modules:
        blocks = module.block if isinstance(module, FeedbackModule) else backbone_blocks(module, blocks_attr)
        for block in ([blocks] if isinstance(blocks, BasicTransformerBlock) else blocks):
            handles.append(block.register_forward_pre_hook(count))
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()


class _CachedBlock(nn.Module):
    """Wraps one block: computes it (and keeps its residual) when ``state['refresh']``, else reuses it."""

    def __init__(self, block: nn.Module, state: dict):
        super().__init__()
        self.inner, self.state, self.residual = block, state, None

    def forward(self, hidden_states, *args, **kwargs):
        if self.state["refresh"] or self.residual is None:
            out = self.inner(hidden_states, *args, **kwargs)
            self.residual = out - hidden_states
            return out
        return hidden_states + self.residual


@contextlib.contextmanager
def block_caching(backbone: nn.Module, cached: range, blocks_attr: str = "transformer_blocks"):
    """Swap ``cached`` blocks for caching wrappers; yields the state dict whose ``refresh`` flag the
    sampler sets per step (the blocks are restored on exit)."""
    blocks = backbone_blocks(backbone, blocks_attr)
    state = {"refresh": True}
    originals = {i: blocks[i] for i in cached}
    try:
        for i, block in originals.items():
            blocks[i] = _CachedBlock(block, state)
        yield state
    finally:
        for i, block in originals.items():
            blocks[i] = block
