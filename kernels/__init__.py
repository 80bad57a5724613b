"""Fused ops for athanor, each with a plain torch reference beside it (the truth).

- ``fused_linear_cross_entropy``: CE(h W^T + b, y) + w_z mean(logZ^2) without the
  T x V logits (reference: ``reference_linear_cross_entropy``; module
  ``FusedLinearCrossEntropyLoss``).
- ``head_norm``: LayerNorm/RMSNorm of each attention head, for qk-layernorm
  (``reference_head_norm``; module ``HeadNorm``).
- ``codebook_topk``: k most cosine-similar codebook rows, summed, straight-through
  backward, blockwise so T x N similarities never exist (``reference_codebook_topk``;
  module ``CodebookTopK``).

Every op is a ``torch.library`` custom op (``athanor::*``, with fake and autograd
registrations) so ``torch.compile`` can trace it.  Backend: Triton on CUDA, a memory-lean
chunked torch path elsewhere; ``ATHANOR_KERNELS=auto|triton|torch|reference`` or
``use_backend(...)`` forces one.  Triton is imported only when its backend runs, so this
package imports on machines without triton.
"""

from ._backend import BACKENDS, requested_backend, resolve_backend, set_backend, triton_available, use_backend
from .codebook import CodebookTopK, codebook_topk, reference_codebook_topk
from .headnorm import HeadNorm, head_norm, reference_head_norm
from .linear_ce import (
    FusedLinearCrossEntropyLoss,
    LinearCEOutput,
    fused_linear_cross_entropy,
    reference_linear_cross_entropy,
)

__all__ = [
    "BACKENDS",
    "CodebookTopK",
    "FusedLinearCrossEntropyLoss",
    "HeadNorm",
    "LinearCEOutput",
    "codebook_topk",
    "fused_linear_cross_entropy",
    "head_norm",
    "reference_codebook_topk",
    "reference_head_norm",
    "reference_linear_cross_entropy",
    "requested_backend",
    "resolve_backend",
    "set_backend",
    "triton_available",
    "use_backend",
]
