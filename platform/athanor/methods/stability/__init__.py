"""Small-scale proxies for large-scale Transformer training instabilities (Wortsman et al. 2023).

``config``: ``StabilityConfig`` and the interventions (``VARIANTS``); ``method``: the sweep's grid,
one pretrain run per point (formulas in its docstring); ``analysis``: LR sensitivity and the
probe-vs-width fits; ``stages``: the sweep stage and ``PAPER``; ``report``: plots, verdicts, report.
"""
from .analysis import (crossing_width, extrapolate, fit_power_law, group_runs, lr_sensitivity, seed_sensitivity,
                       sensitivity_tables, series, summarize_run)
from .config import (DEFAULT_VARIANTS, VARIANTS, AnalysisConfig, LogZDemoConfig, StabilityConfig, SweepConfig)
from .method import (POINT_PAPER, get_dotted, grid_points, make_jobs, point_config, set_dotted, sweep_points,
                     variant_overrides)
from .report import describe, report, write_stability_report
from .stages import PAPER, sweep_executor, worker_threads

__all__ = ["PAPER", "StabilityConfig", "SweepConfig", "AnalysisConfig", "LogZDemoConfig", "VARIANTS",
           "DEFAULT_VARIANTS", "POINT_PAPER", "variant_overrides", "get_dotted", "set_dotted", "point_config",
           "grid_points", "sweep_points", "make_jobs", "series", "summarize_run", "lr_sensitivity", "group_runs",
           "seed_sensitivity", "sensitivity_tables", "fit_power_law", "crossing_width", "extrapolate", "describe",
           "report", "write_stability_report", "worker_threads", "sweep_executor"]
