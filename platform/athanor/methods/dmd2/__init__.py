"""DMD2: "Improved Distribution Matching Distillation for Fast Image Synthesis" (Yin et al. 2024).

``config``: the typed config; ``method``: the DMD2 method (generator, critic, GAN head, two
time-scale updates, backward simulation; formulas in its docstring) and one run as a stage;
``stages``: the stages and ``PAPER``; ``report``: the sampler table, checks, plots and the one-step
pipeline.
"""
from .method import (MULTISTEP, VARIANTS, DMD2, Critic, DMD2Config, DMD2Pipeline, check_launch,
                     distribution_matching_loss, few_step_sample, frozen, generator_sigmas, run_dmd2, train_dmd2)
from .config import DMD2RecipeConfig, EvaluationConfig
from .report import build_samplers, fd_curve, must_show, shortfall_note, write_dmd2_report
from .stages import PAPER

__all__ = ["MULTISTEP", "VARIANTS", "DMD2", "Critic", "DMD2Config", "DMD2Pipeline", "check_launch",
           "distribution_matching_loss", "few_step_sample", "frozen", "generator_sigmas", "run_dmd2", "train_dmd2",
           "PAPER", "DMD2RecipeConfig", "EvaluationConfig", "build_samplers", "fd_curve", "must_show",
           "shortfall_note", "write_dmd2_report"]
