"""Codebook Features (Tamkin et al., ICML 2024): sparse, discrete, steerable transformer features.

- ``layers``: ``CodebookModel`` puts codebook bottlenecks on any HF decoder by hooks (per head,
  whole attention output, MLP output), steering by ``generate(..., force_codes=...)``, and a
  ``save_pretrained``/``from_pretrained`` folder that keeps the codebooks;
- ``tokfsm``: the TokFSM data; ``config``: the typed config; ``method``: the training step, data
  and models; ``analysis``: state features, purity, dead codes, transition accuracy, steering;
  ``stages``: the stages and ``PAPER``; ``report``: the analysis stage, the report, the model folder.
"""
from .config import CodebookPaperConfig
from .layers import CodebookLayer, CodebookModel
from .method import CodebookLM
from .stages import PAPER

__all__ = ["PAPER", "CodebookLayer", "CodebookModel", "CodebookPaperConfig", "CodebookLM"]
