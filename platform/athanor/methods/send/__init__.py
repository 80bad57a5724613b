"""SeND: sensitive-neuron dropout, with exact and efficient EigenScore.

Mohammadzadeh et al., "Hallucination Detox: Sensitive Neuron Dropout (SeND) for Large Language Model
Training" (arXiv 2410.15460). ``config`` (the typed config), ``eigenscore`` (exact Gram identity +
EES), ``neurons`` (sensitivity, hook dropout), ``facts`` (old facts + a stream of additions),
``method`` (the Method), ``stages`` (stages and ``PAPER``), ``report``.
"""
from .config import SendPaperConfig
from .method import ContinuedTraining, EigenScoreConfig, SendConfig
from .stages import PAPER

__all__ = ["PAPER", "SendPaperConfig", "ContinuedTraining", "SendConfig", "EigenScoreConfig"]
