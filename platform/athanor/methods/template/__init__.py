"""The smallest complete paper: the template to copy when adding one (README, "Adding a paper").

Two stages on noisy linear data y = x·w* + ε: ``fit`` trains a linear model (a ``Method`` run by the
engine: checkpoints, exact resume, metrics) and saves it; ``evaluate`` reloads the saved model and
measures it on held-out rows. The report compares the fitted weights with w*.

Every paper is a package with these role files: ``config`` (its typed config), ``method`` (its
Method(s) and what they need), ``stages`` (its declared stages and ``PAPER``), ``report`` (its
report and closing line); this ``__init__`` exports ``PAPER`` and the public API.
"""
from .config import LinearDataConfig, TemplateConfig
from .method import LinearModel, LinearRegression, make_data
from .report import report, summary
from .stages import PAPER, evaluate_stage, fit_stage

__all__ = ["PAPER", "TemplateConfig", "LinearDataConfig", "LinearModel", "LinearRegression", "make_data", "report",
           "summary", "fit_stage", "evaluate_stage"]
