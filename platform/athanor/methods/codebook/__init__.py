"""Codebook Features (Tamkin et al., ICML 2024): sparse, discrete, steerable transformer features.

- ``layers``: ``CodebookModel`` puts codebook bottlenecks on any HF decoder by hooks (per head,
  whole attention output, MLP output), steering by ``generate(..., force_codes=...)``, and a
  ``save_pretrained``/``from_pretrained`` folder that keeps the codebooks;
- ``tokfsm``: the TokFSM data; ``method``: the training step; ``analysis``: state features,
  purity, dead codes, transition accuracy, steering; ``paper``/``report``: the runner paper.
"""
from .layers import CodebookLayer, CodebookModel
from .paper import CodebookPaperConfig, make_paper

PAPER = make_paper()

__all__ = ["PAPER", "CodebookLayer", "CodebookModel", "CodebookPaperConfig"]
