"""SeND: sensitive-neuron dropout, with exact and efficient EigenScore.

Mohammadzadeh et al., "Hallucination Detox: Sensitive Neuron Dropout (SeND) for Large Language Model
Training" (arXiv 2410.15460). ``eigenscore`` (exact Gram identity + EES), ``neurons`` (sensitivity,
hook dropout), ``facts`` (old facts + a stream of additions), ``training`` (the Method),
``paper`` (stages), ``report``.
"""
from ...runner import Paper
from .paper import SendPaperConfig, check, stages
from .report import report, summary

PAPER = Paper(name="send", config=SendPaperConfig, stages=stages, report=report, check=check, summary=summary)

__all__ = ["PAPER", "SendPaperConfig"]
