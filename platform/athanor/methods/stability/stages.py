"""The stability paper's one declared stage (the sweep, one pretrain run per point) and ``PAPER``."""
from __future__ import annotations

import os
import shutil

from ...runner import Paper, StageContext
from ...sweep import Job, make_executor, sweep_stage
from .config import StabilityConfig
from .method import check_points, make_jobs, sweep_points
from .report import report


def worker_threads(cfg: StabilityConfig) -> int:
    """Torch threads per sweep worker: the one ``engine.cpu_threads`` setting every recipe uses (the
    points' own runs get it too); 0 (torch's default) shares this machine's cores among the workers."""
    return cfg.engine.cpu_threads or max(1, (os.cpu_count() or 1) // cfg.sweep.workers)


def sweep_executor(cfg: StabilityConfig):
    """The executor the sweep runs its points on (``sweep.executor``), one thread setting for all."""
    return make_executor(cfg.sweep.executor, workers=cfg.sweep.workers, threads_per_worker=worker_threads(cfg),
                         devices=cfg.sweep.devices)


def _drop_checkpoints(ctx: StageContext, jobs: list[Job]) -> None:
    if not ctx.cfg.sweep.keep_checkpoints:  # finished points are skipped from now on: checkpoints are dead weight
        for job in jobs:
            shutil.rmtree(job.output_dir / "checkpoints", ignore_errors=True)


PAPER = Paper(
    name="stability",
    config=StabilityConfig,
    check=lambda cfg: check_points(cfg, sweep_points(cfg)),
    stages=lambda cfg: [sweep_stage("sweep", lambda ctx: make_jobs(ctx.cfg, sweep_points(ctx.cfg)), sweep_executor,
                                    desc="sweep", after=_drop_checkpoints)],
    report=report,
)
