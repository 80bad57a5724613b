"""Sweeps: a grid of runs, each an ordinary recipe run in its own folder, on a pluggable executor.

A ``Job`` is one run described as a command line plus the folder it writes to: a paper run
(``python -m athanor.runner <paper module> <argv...>``, e.g. one ``athanor.methods.pretrain`` run
per grid point) or a script with a ``main(argv)``. ``run_job(job)`` executes it *in the calling
process* and records the result as ``<folder>/STAGE.json`` (the runner's stage format), so a
finished job is recognised and skipped by any later sweep, whatever executed it. For a paper,
``sweep_stage`` makes a whole sweep one stage of the runner (``athanor.methods.stability``).

Executors decide where ``run_job`` runs; ``run_sweep`` skips finished jobs, hands the rest to the
executor (most expensive first) and gathers one ``Outcome`` per job:

- ``InlineExecutor``: one job after another in this process (debugging, tests).
- ``LocalExecutor``: persistent worker processes on this machine (spawned once, so torch and the
  recipe import once per worker, not once per run), ``threads_per_worker`` torch threads each,
  optionally one accelerator each (``devices``). Each worker has its own pipe to the sweep, which
  hands out the jobs; a worker that dies (killed, out of memory) fails only its job and is replaced.
- ``athanor.cluster.SlurmExecutor`` implements the same ``Executor.run`` as one SLURM job array
  whose tasks call ``run_job``; ``register_sweep_executor()`` adds it here as ``"slurm"``.

Kill safety: a job holds an exclusive lock on its folder while it runs, so a resumed sweep never
runs the same job twice at once; a local worker whose parent dies (SIGKILL) sends itself SIGTERM,
which the engine turns into a checkpoint and exit 75, and the next sweep resumes that run from its
checkpoint. A SIGTERM/SIGINT to the sweep does the same for every worker, then exits 75.
"""
from __future__ import annotations

import abc
import contextlib
import importlib
import importlib.util
import itertools
import math
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from .runfiles import STAGE_FILE, finished_stage, record_stage

PREEMPTED_EXIT_CODE = 75  # same as athanor.engine: checkpoint written, run again


def expand_grid(axes: dict[str, Sequence]) -> list[dict]:
    """The cartesian product of ``axes`` (name -> values), first axis varying slowest."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]


@dataclass
class Job:
    """One run writing into ``root / name``: the paper ``paper`` (a module exporting ``PAPER``) run by
    the runner with ``argv``, or, without ``paper``, the ``main(argv)`` of the Python file ``script``."""

    name: str  # path of the run's folder relative to ``root`` (may contain '/')
    root: str
    script: str
    argv: list[str]
    cost: float = 1.0  # relative expected run time: expensive jobs start first
    paper: str = ""  # e.g. "athanor.methods.pretrain"

    @property
    def output_dir(self) -> Path:
        return Path(self.root) / self.name

    def command(self) -> list[str]:
        """The same run as a shell command (what a cluster executor may submit instead)."""
        if self.paper:
            return [sys.executable, "-m", "athanor.runner", self.paper, *self.argv]
        return [sys.executable, self.script, *self.argv]

    def finished(self) -> bool:
        return (self.output_dir / STAGE_FILE).exists()  # the runner's record: any later sweep skips the job

    def stored_result(self) -> dict:
        return finished_stage(self.output_dir)


@dataclass
class Outcome:
    name: str
    ok: bool
    result: dict | None = None
    error: str | None = None
    seconds: float = 0.0
    skipped: bool = False  # finished by an earlier sweep


# ---------------------------------------------------------------------------- running one job
_SCRIPTS: dict[str, object] = {}


def _script_module(script: str):
    """Import a job's script once per process (its ``main(argv)`` is what a job calls)."""
    path = str(Path(script).resolve())
    if path not in _SCRIPTS:
        spec = importlib.util.spec_from_file_location(f"_athanor_job_script_{len(_SCRIPTS)}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SCRIPTS[path] = module
    return _SCRIPTS[path]


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """Exclusive lock on ``folder`` for the job's lifetime; released when the process dies."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".sweep.lock", "w") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process protection
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _output_to(log_file: Path):
    """Send this process's stdout/stderr (file descriptors too) to ``log_file``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_file, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_job(job: Job) -> dict:
    """Run ``job`` in this process (its paper through the runner, or its script's ``main(argv)``)
    unless it finished before; record and return its result. Output goes to ``<folder>/log.txt``."""
    from .engine import NonFiniteStop
    from .runner import run  # the runner imports torch; a sweep's parent process never runs a job itself

    with _folder_lock(job.output_dir):
        if job.finished():  # finished while we waited for the lock
            return job.stored_result()
        with _output_to(job.output_dir / "log.txt"):
            try:
                if job.paper:
                    result = run(importlib.import_module(job.paper).PAPER, list(job.argv))
                else:
                    result = _script_module(job.script).main(list(job.argv))
            except NonFiniteStop as stop:  # in a sweep, divergence is an outcome, not a failure
                result = diverged_result(job.output_dir, stop.message)
            record_stage(job.output_dir, job.name, result)
            return result


def diverged_result(output_dir: Path, message: str) -> dict:
    """The result of a run the engine stopped at a non-finite value: its final eval loss is inf;
    its initial eval loss is the one the engine logged at step 0 (metrics.jsonl)."""
    from .engine import read_metrics

    initial = next((row["eval_loss"] for row in read_metrics(output_dir) if row["step"] == 0 and "eval_loss" in row),
                   math.nan)
    return {"final_eval_loss": math.inf, "initial_eval_loss": initial, "diverged": True, "nonfinite": message}


def _error_text(exc: BaseException) -> str:
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return "".join(lines)[-3000:]


# ---------------------------------------------------------------------------- executors
class Executor(abc.ABC):
    """Runs jobs somewhere; yields ``(job, Outcome)`` as each one ends (in any order)."""

    @abc.abstractmethod
    def run(self, jobs: Sequence[Job]) -> Iterator[tuple[Job, Outcome]]:
        ...


class InlineExecutor(Executor):
    def run(self, jobs):
        for job in jobs:
            start = time.perf_counter()
            try:
                yield job, Outcome(job.name, True, result=run_job(job), seconds=time.perf_counter() - start)
            except Exception as exc:  # one failed run must not end the sweep
                yield job, Outcome(job.name, False, error=_error_text(exc), seconds=time.perf_counter() - start)


_STOP = threading.Event()  # set in a worker once it must take no further job


def _stop_now(_signum, _frame) -> None:
    """A worker's SIGTERM handler outside a training loop (inside one, the engine's handler
    checkpoints first). Everything a job writes is atomic, so leaving mid-job is safe."""
    _STOP.set()
    raise SystemExit(PREEMPTED_EXIT_CODE)


def _watch_parent(parent_pid: int, grace_s: float) -> None:
    """Orphaned worker (its sweep was killed): stop via SIGTERM, hard exit after ``grace_s``."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    _STOP.set()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os._exit(PREEMPTED_EXIT_CODE)


def _worker_main(conn, threads: int, parent_pid: int, grace_s: float) -> None:
    """A local worker: receive a job on its own pipe, run it, send the outcome back, repeat.
    One pipe per worker, so a worker that dies mid-message harms no other worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the sweep, which stops us cleanly
    signal.signal(signal.SIGTERM, _stop_now)
    threading.Thread(target=_watch_parent, args=(parent_pid, grace_s), daemon=True).start()
    import torch

    torch.set_num_threads(threads)
    while not _STOP.is_set():
        try:
            job = conn.recv()
        except EOFError:  # the sweep is gone
            return
        if job is None:
            return
        start = time.perf_counter()
        try:
            outcome = {"ok": True, "result": run_job(job)}
        except SystemExit as exc:  # SIGTERM: the engine checkpointed (or the job had not started training)
            conn.send({"ok": False, "error": f"stopped (exit {exc.code})", "seconds": time.perf_counter() - start,
                       "exiting": True})
            sys.exit(exc.code if isinstance(exc.code, int) else 1)
        except Exception as exc:
            outcome = {"ok": False, "error": _error_text(exc)}
        conn.send({**outcome, "seconds": time.perf_counter() - start})
    sys.exit(PREEMPTED_EXIT_CODE)


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class _Worker:
    proc: object
    conn: object
    job: Job | None = None


class LocalExecutor(Executor):
    """``workers`` persistent processes on this machine, each running one job at a time; the
    sweep hands out the jobs (most expensive first) and replaces a worker that dies."""

    def __init__(self, workers: int = 2, threads_per_worker: int = 1, devices: Sequence[str] | None = None,
                 stop_grace_s: float = 60.0):
        if workers < 1 or threads_per_worker < 1:
            raise ValueError("workers and threads_per_worker must be >= 1")
        self.workers, self.threads, self.devices = workers, threads_per_worker, list(devices or [])
        self.stop_grace_s = stop_grace_s

    def _start(self, ctx, index: int) -> _Worker:
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "TOKENIZERS_PARALLELISM": "false"}
        if self.devices:
            env["CUDA_VISIBLE_DEVICES"] = self.devices[index % len(self.devices)]
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, name=f"sweep-worker-{index}",
                           args=(theirs, self.threads, os.getpid(), self.stop_grace_s))
        with _environ(env):  # a spawned child reads the environment at start, before importing torch
            proc.start()
        theirs.close()  # only the worker holds its end: its death reads as EOF here
        return _Worker(proc, ours)

    def run(self, jobs):
        import multiprocessing as mp
        from multiprocessing.connection import wait

        pending = list(jobs)
        if not pending:
            return
        ctx = mp.get_context("spawn")
        workers = [self._start(ctx, i) for i in range(min(self.workers, len(pending)))]
        next_index = len(workers)

        def feed(worker: _Worker) -> None:
            worker.job = pending.pop(0) if pending else None
            worker.conn.send(worker.job)  # None: no more work, exit

        for worker in workers:
            feed(worker)
        stop = _StopFlag()
        try:
            with stop.installed():
                while any(w.job is not None for w in workers):
                    if stop.signum:
                        raise SystemExit(PREEMPTED_EXIT_CODE)
                    busy = {w.conn: w for w in workers if w.job is not None}
                    for conn in wait(list(busy), timeout=0.5):
                        worker, job = busy[conn], busy[conn].job
                        try:
                            reply = conn.recv()
                        except (EOFError, OSError):  # died inside the job (killed, out of memory, ...)
                            reply = None
                        gone = reply is None or reply.get("exiting")  # died, or leaving after a SystemExit
                        if gone:
                            worker.proc.join(5)
                            worker.conn.close()
                            workers.remove(worker)
                        if reply is None:
                            reply = {"ok": False, "error": f"worker exited with code {worker.proc.exitcode}",
                                     "seconds": 0.0}
                        yield job, Outcome(job.name, reply["ok"], reply.get("result"), reply.get("error"),
                                           reply["seconds"])
                        if not gone:
                            feed(worker)
                        elif pending:  # a replacement keeps the sweep at its width
                            workers.append(self._start(ctx, next_index))
                            next_index += 1
                            feed(workers[-1])
        finally:
            self._stop_workers(workers)

    def _stop_workers(self, workers: list[_Worker]) -> None:
        for worker in workers:
            if worker.proc.is_alive() and worker.job is not None:
                os.kill(worker.proc.pid, signal.SIGTERM)  # in training: checkpoint, then exit 75
            elif worker.proc.is_alive():
                try:
                    worker.conn.send(None)
                except OSError:
                    pass
        deadline = time.time() + self.stop_grace_s
        for worker in workers:
            worker.proc.join(max(0.0, deadline - time.time()))
            if worker.proc.is_alive():
                worker.proc.kill()
                worker.proc.join()
            worker.conn.close()


class _StopFlag:
    """SIGTERM/SIGINT set a flag the sweep loop checks (main thread only)."""

    def __init__(self):
        self.signum = 0

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in old:
            signal.signal(s, self._handle)
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    def _handle(self, signum, _frame):
        self.signum = signum


# ---------------------------------------------------------------------------- the sweep
@dataclass
class SweepResult:
    outcomes: dict[str, Outcome] = field(default_factory=dict)  # by job name, in the jobs' order

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes.values() if not o.ok]

    @property
    def skipped(self) -> int:
        return sum(o.skipped for o in self.outcomes.values())

    @property
    def ran(self) -> int:
        return sum(not o.skipped for o in self.outcomes.values())


def run_sweep(jobs: Iterable[Job], executor: Executor, progress: bool = True, desc: str = "sweep") -> SweepResult:
    """Run every unfinished job on ``executor`` (most expensive first); finished ones are skipped."""
    from tqdm.auto import tqdm

    jobs = list(jobs)
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise ValueError("job names must be unique")
    outcomes = {job.name: Outcome(job.name, True, result=job.stored_result(), skipped=True)
                for job in jobs if job.finished()}
    todo = sorted((job for job in jobs if job.name not in outcomes), key=lambda job: -job.cost)
    bar = tqdm(total=len(jobs), initial=len(outcomes), desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        for job, outcome in executor.run(todo):
            outcomes[job.name] = outcome
            bar.update(1)
            failed = sum(not o.ok for o in outcomes.values())
            bar.set_postfix(last=job.name, failed=failed)
    finally:
        bar.close()
    return SweepResult({name: outcomes[name] for name in names if name in outcomes})


EXECUTORS = {"local": LocalExecutor, "inline": InlineExecutor}  # a cluster executor registers here too


def make_executor(kind: str, **options) -> Executor:
    """An executor by name; ``options`` it does not take are ignored (e.g. workers for inline)."""
    import inspect

    cls = EXECUTORS[kind]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in options.items() if k in accepted})


def sweep_stage(name: str, jobs: Callable, executor: Callable, desc: str = "sweep", after: Callable | None = None):
    """A runner stage that runs a sweep: ``jobs(ctx) -> [Job]`` on ``executor(cfg)``; prints one line
    of counts and one per failed job (then exits 1); ``after(ctx, jobs)`` tidies up (e.g. deletes
    checkpoints). Its result is ``{"jobs": {job name: job result}}``. The stage lives in OUTPUT itself
    (the jobs' folders are under it) and runs on every invocation: finished jobs are skipped, new
    grid points run."""
    from .runner import Stage

    def fn(ctx) -> dict:
        todo = jobs(ctx)
        result = run_sweep(todo, executor(ctx.cfg), desc=desc, progress=ctx.cfg.run.progress)  # off in a log file
        print(f"{desc}: {result.ran} run(s) now, {result.skipped} finished earlier, {len(result.failed)} failed")
        for failed in result.failed:
            last_line = (failed.error or "").strip().splitlines()[-1:] or [""]
            folder = next(job.output_dir for job in todo if job.name == failed.name)
            print(f"FAILED {failed.name}: {last_line[0]} (log: {folder / 'log.txt'})", file=sys.stderr)
        if result.failed:
            sys.exit(1)
        if after is not None:
            after(ctx, todo)
        return {"jobs": {job_name: outcome.result for job_name, outcome in result.outcomes.items()}}

    return Stage(name, fn, folder=".", record=False)
