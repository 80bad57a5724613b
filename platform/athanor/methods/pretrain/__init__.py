"""Causal-LM pretraining on packed text — the run the stability paper sweeps.

``config``: ``PretrainConfig``; ``method``: the ``Pretrain`` method (loss, z-loss, the instability
probes; formulas in its docstring); ``stages``: the one stage and ``PAPER``; ``report``: the report.
"""
from ...parts.gpt import GPTModelConfig, ProbeConfig, build_model
from .config import PretrainConfig
from .method import PROBE_ROWS, Pretrain
from .report import report, summary
from .stages import PAPER, train_stage

__all__ = ["PAPER", "PretrainConfig", "Pretrain", "GPTModelConfig", "ProbeConfig", "build_model", "PROBE_ROWS",
           "report", "summary", "train_stage"]
