"""One runner for every paper: a paper declares its stages, the runner does the rest.

A paper (one package under ``athanor.methods``) exports a ``Paper``: its typed config class, a
function that lists its stages for a config, and a function that writes its report. A recipe
script is then configuration plus one call::

    from athanor.methods import codebook
    from athanor.runner import run

    if __name__ == "__main__":
        run(codebook.PAPER)

For every paper the runner: parses the config (defaults < ``--config`` files < dotted overrides;
a bad value exits 2 with one line), sets CPU threads, runs ``Paper.check`` before any compute,
runs each stage in ``OUTPUT/<stage>`` (a finished stage is recorded in ``STAGE.json`` and
skipped when the recipe runs again, returning its stored result), writes the report on the main
process, publishes to the Hub when ``hub.push_to_hub`` is set, and prints one closing line.

A stage is one function ``fn(ctx) -> dict`` (a JSON-serialisable result). ``ctx.fit`` trains a
``Method`` with an ``Engine`` writing into the stage's folder; ``ctx.save_pretrained`` saves a
trained model there (gathering ZeRO-3 shards, saving on the main process, then a barrier).
"""
from __future__ import annotations

import dataclasses
import errno
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import psutil
import torch

from .config import ConfigError, TrainConfig, exit_on_config_error, parse_or_exit
from .engine import Engine, Method, process_state
from .hub import maybe_publish
from .runfiles import (CARD_KINDS, STAGE_FILE, finished_stage, progress_wanted, quiet_libraries,  # noqa: F401
                       record_stage, write_run_record)


@dataclass
class Stage:
    """One step of a paper's pipeline, run once in ``OUTPUT/<name>``."""

    name: str
    fn: Callable[["StageContext"], dict]
    needs: tuple[str, ...] = ()  # earlier stages whose results ``fn`` reads from ``ctx.results``
    describe: str = ""  # one line for the progress log and the report
    folder: str = ""  # its folder under OUTPUT ("": its name; ".": OUTPUT itself, e.g. a one-stage paper)
    # False: never recorded, so it runs on every invocation (a stage whose engine resumes by itself,
    # where a second run with more steps must continue training; a sweep that skips finished points).
    record: bool = True


@dataclass
class Paper:
    """What a paper declares; ``run(paper)`` does everything else."""

    name: str
    config: type  # a TrainConfig subclass whose defaults are the tiny CPU run
    stages: Callable[[Any], Iterable[Stage]]  # cfg -> stages, in order
    report: Callable[["StageContext", dict], dict]  # (ctx at OUTPUT, {stage: result}) -> report (main process)
    check: Callable[[Any], None] | None = None  # raise ConfigError before any compute
    summary: Callable[[dict], str] | None = None  # the closing line printed after the report path
    # The saved model publish puts at the top of the upload (a folder under OUTPUT, e.g. "model" or
    # "distill/generator"). A paper that declares one publishes: its config has a ``hub: HubConfig``
    # section (``--hub.push_to_hub true`` uploads at the end). "": it never publishes by itself
    # (``athanor publish`` then takes OUTPUT itself, then OUTPUT/model, then the first by path).
    main_model: str = ""
    # Its model card's kind: transformers | diffusers | peft | torch ("": told by the saved files).
    card: str = ""
    # "module:Class" whose ``from_pretrained`` loads the main model (a Hub-mixin module, a wrapper
    # such as O3Model): the card's loading snippet uses it. "": the kind's own loader.
    model_class: str = ""


@dataclass
class StageContext:
    """What a stage function gets: the config, its folder, earlier results and engine helpers."""

    cfg: Any
    root: Path
    name: str = ""
    results: dict[str, dict] = field(default_factory=dict)
    folder: str = ""  # the stage's folder under root ("": its name)
    started: float = field(default_factory=time.time)  # when this invocation of the recipe began

    @property
    def dir(self) -> Path:
        return self.root / (self.folder or self.name)

    def stage_dir(self, name: str) -> Path:
        return self.root / name

    @property
    def state(self):
        return process_state(self.cfg.engine.cpu)

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    def barrier(self) -> None:
        self.state.wait_for_everyone()

    def train_config(self, max_steps: int | None = None, optim=None, seed: int | None = None, **run_changes):
        """The paper's run/optim/engine sections for an engine writing into this stage's folder."""
        run = dataclasses.replace(self.cfg.run, output_dir=str(self.dir), **run_changes,
                                  **({} if max_steps is None else {"max_steps": max_steps}),
                                  **({} if seed is None else {"seed": seed}))
        return TrainConfig(run=run, optim=optim or self.cfg.optim, engine=self.cfg.engine)

    def engine(self, train: TrainConfig | None = None, **changes) -> Engine:
        """An engine for this stage (``changes`` as in ``train_config``); its config.yaml is the
        paper's whole config with this stage's run/optim sections."""
        train = train or self.train_config(**changes)
        full = dataclasses.replace(self.cfg, run=train.run, optim=train.optim, engine=train.engine)
        return Engine(full, output_dir=self.dir)

    def fit(self, method: Method, data=None, *, engine: Engine | None = None, **changes) -> tuple[Engine, dict]:
        """Set ``method`` up on an engine for this stage and train it; returns (engine, final eval)."""
        engine = engine or self.engine(**changes)
        method.setup(engine)
        final = engine.fit(method, data if data is not None else method.batches(engine))
        return engine, final

    def save_pretrained(self, engine: Engine, name: str, folder: str | Path, **kwargs) -> Path:
        return engine.save_pretrained(name, folder, **kwargs)


# A full disk (or quota) mid-run: one line, this code. What was written before stays: checkpoints are
# renamed into place only once complete, metrics lines are whole or dropped on resume as torn.
DISK_FULL_EXIT_CODE = 74  # EX_IOERR
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class exit_on_disk_full:
    """Context manager: an ``OSError`` saying the disk (or quota) is full ends the run with one line
    and ``DISK_FULL_EXIT_CODE``; other errors pass through."""

    def __init__(self, root: Path):
        self.root = root

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None or not issubclass(exc_type, OSError) or exc.errno not in DISK_FULL_ERRNOS:
            return False
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"error: disk full{where} ({exc.strerror or os.strerror(exc.errno)}): the run stopped; what it "
              f"wrote before is kept in {self.root} (checkpoints, metrics.jsonl); free space and run the same "
              f"command again to resume", file=sys.stderr, flush=True)
        sys.exit(DISK_FULL_EXIT_CODE)


def check_stage_folder(folder: Path) -> None:
    """A stage folder whose ``checkpoints`` is a file (or a link to none) would fail at its first save:
    refuse it now. (Whether a link to a folder elsewhere may hold checkpoints is the checkpoint code's call.)"""
    checkpoints = folder / "checkpoints"
    if (checkpoints.exists() or checkpoints.is_symlink()) and not checkpoints.is_dir():
        what = "a symbolic link to no folder" if checkpoints.is_symlink() else "a file"
        raise ConfigError(f"{checkpoints} is {what}, not the run's checkpoint folder: move it away and run "
                          f"again (nothing in it was touched)")


def threads_chosen_by_environment() -> bool:
    """``OMP_NUM_THREADS`` set by the user or by a launcher sharing cores among processes, not the
    1 that ``accelerate launch`` sets for a lone process on any machine (its simple launcher,
    without ``--num_cpu_threads_per_process``): that one leaves the choice to ``engine.cpu_threads``."""
    lone_accelerate_default = (os.environ.get("OMP_NUM_THREADS") == "1" and "ACCELERATE_DYNAMO_BACKEND" in os.environ
                               and int(os.environ.get("WORLD_SIZE", "1")) == 1)
    return "OMP_NUM_THREADS" in os.environ and not lone_accelerate_default


def set_cpu_threads(threads: int) -> None:
    """Tiny models on a shared CPU: one thread per process is as fast and never oversubscribes
    (two threads on two loaded cores measured 16× slower per step); 0: torch's default, restored
    when an earlier run in this process set fewer. ``OMP_NUM_THREADS`` wins (see above)."""
    if not torch.cuda.is_available() and not threads_chosen_by_environment():
        # at most this machine's CPUs: a config may be written for a bigger machine
        torch.set_num_threads(min(threads, os.cpu_count() or 1) if threads else every_core())


def every_core() -> int:
    """torch's own default, one thread per physical core, within the CPUs this process may use."""
    return max(1, min(psutil.cpu_count(logical=False) or os.cpu_count() or 1, len(os.sched_getaffinity(0))))


def run_stage(ctx: StageContext, stage: Stage) -> dict:
    """``stage.fn(ctx)`` in its folder (``OUTPUT/<stage>``), unless a ``STAGE.json`` there says it
    finished (a stage with ``record=False`` always runs and is never recorded)."""
    stage_ctx = dataclasses.replace(ctx, name=stage.name, folder=stage.folder)
    missing = [n for n in stage.needs if n not in ctx.results]
    if missing:
        raise ConfigError(f"stage {stage.name} needs {', '.join(missing)}, which did not run before it")
    if stage.record and finished_stage(stage_ctx.dir) is not None:
        return finished_stage(stage_ctx.dir)
    check_stage_folder(stage_ctx.dir)
    stage_ctx.dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result = stage.fn(stage_ctx)
    result = {**result, "seconds": result.get("seconds", time.time() - started)}
    if stage.record and stage_ctx.is_main:
        record_stage(stage_ctx.dir, stage.name, result)
    stage_ctx.barrier()
    return result


def check_declaration(paper: Paper) -> None:
    """What a paper declares for publishing is consistent: a known card kind, and a ``hub`` section
    in its config when it declares a main model (it publishes)."""
    if paper.card not in ("", *CARD_KINDS):
        raise ConfigError(f"{paper.name}: card={paper.card!r} is not one of: {', '.join(CARD_KINDS)}")
    if paper.main_model and "hub" not in {f.name for f in dataclasses.fields(paper.config)}:
        raise ConfigError(f"{paper.name}: it declares main_model={paper.main_model!r}, so it publishes: its config "
                          f"needs a `hub: HubConfig` section")
    if paper.model_class and paper.model_class.count(":") != 1:
        raise ConfigError(f"{paper.name}: model_class={paper.model_class!r} is not 'module:Class'")


CHECK_ONLY_ENV = "ATHANOR_CHECK_ONLY"  # =1: parse and check the config, list the stages, exit 0 (athanor submit)


def prepare(paper: Paper, argv=None) -> tuple[Any, list[Stage]]:
    """The config (one line and exit 2 if bad) and the stages, before any compute."""
    quiet_libraries()
    cfg = parse_or_exit(paper.config, argv)
    cfg.run.progress = progress_wanted(cfg.run.progress)  # a log file gets no bar (run.progress is free on resume)
    set_cpu_threads(cfg.engine.cpu_threads)
    with exit_on_config_error():
        check_declaration(paper)
        if paper.check:
            paper.check(cfg)
        stages = list(paper.stages(cfg))
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"{paper.name}: stage names repeat: {names}")
    if os.environ.get(CHECK_ONLY_ENV) == "1":
        sys.exit(0)
    return cfg, stages


def run(paper: Paper, argv=None) -> dict:
    """The whole recipe: config, stages, report, publish, one closing line. Returns the report."""
    started = time.time()
    cfg, stages = prepare(paper, argv)
    ctx = StageContext(cfg=cfg, root=Path(cfg.run.output_dir))
    with exit_on_disk_full(ctx.root):
        for stage in stages:
            with exit_on_config_error():  # e.g. a data file found missing when the stage loads it
                ctx.results[stage.name] = run_stage(ctx, stage)
        if not ctx.is_main:
            ctx.barrier()
            return {}
        report = paper.report(ctx, ctx.results)
        declared = {"main_model": paper.main_model, "card": paper.card, "model_class": paper.model_class}
        write_run_record(ctx.root, cfg, paper.name, declared, config_here=any(stage.folder == "." for stage in stages),
                         argv=argv)
    report.setdefault("seconds", time.time() - started)
    if paper.main_model:  # it publishes (check_declaration: its config has a hub section)
        maybe_publish(cfg.hub, ctx.root, is_main=True)
    line = paper.summary(report) + "; " if paper.summary else ""
    print(f"{paper.name}: {line}report: {ctx.root / 'report.md'}")
    ctx.barrier()
    return report


if __name__ == "__main__":  # python -m athanor.runner athanor.methods.<paper> [--section.key value ...]
    import importlib
    import sys

    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python -m athanor.runner athanor.methods.<paper> [--config FILE] [--section.key value ...]")
    run(importlib.import_module(sys.argv[1]).PAPER, sys.argv[2:])
