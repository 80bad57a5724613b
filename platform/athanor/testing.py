"""The checks every paper's tests make, one call each (README, "Adding a paper"):

- ``check_end_to_end(paper, out, *args)``: the paper runs in this process; its report, ``RUN.json``
  and ``config.yaml`` sit at the run's root, every recorded stage left ``STAGE.json``, and a paper
  that declares a main model gets an upload folder (a dry-run publish) with that model on top and a
  card of its declared kind. Returns the report.
- ``check_resume_after_sigkill(target, root, *args, kill_at=N, stage=S)``: the paper run whole,
  and run again killed with SIGKILL inside engine step N of stage S, then once more: every logged
  loss equals the whole run's, bit for bit. ``target``: the paper's module (``athanor.methods.<paper>``;
  the killed run is a fresh process, the other two run here) or a recipe script; with
  ``launch=<accelerate config>`` all three run under ``accelerate launch``.
- ``check_bad_value(paper, out, *args, key=K)``: the arguments exit 2 with one line naming ``K``
  before any compute (the output folder is never made).

No pytest here: plain ``assert`` with a message, so any test runner (or a script) can call them.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from .config import load_config
from .engine import read_metrics
from .hub import build_upload_folder
from .hub_card import LIBRARY
from .runfiles import RUN_FILE, STAGE_FILE
from .runner import Paper, run

# Every process SIGKILLs itself on entering engine step KILL_AT of the engine writing into a folder
# named KILL_IN: deterministic, unlike a kill from outside timed by polling (under DDP every process
# reaches that step; none has started its collective, so none hangs).
KILLER = """
import os, runpy, signal, sys
from athanor.engine import Engine

kill_at, kill_in, target = int(os.environ["KILL_AT"]), os.environ["KILL_IN"], sys.argv[1]
optimize = Engine.optimize

def optimize_then_die(self, name, loss):
    if self.step == kill_at and self.output_dir.name == kill_in:
        os.kill(os.getpid(), signal.SIGKILL)
    return optimize(self, name, loss)

Engine.optimize = optimize_then_die
if target.endswith(".py"):
    sys.argv = [target, *sys.argv[2:]]
    runpy.run_path(target, run_name="__main__")
else:  # a paper module, as `python -m athanor.runner <module>` runs it
    sys.argv = ["athanor.runner", target, *sys.argv[2:]]
    runpy.run_module("athanor.runner", run_name="__main__", alter_sys=True)
"""


def free_port() -> int:
    """A local TCP port nobody listens on now (a launch config's fixed port may be taken)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(target: str | Path, args, launch: str | Path | None = None, wrapper: str | Path | None = None) -> list[str]:
    """The command line running ``target`` (a recipe ``.py`` or a paper module) with ``args``,
    under ``accelerate launch --config_file launch`` when given; ``wrapper``: a script run in its
    place that gets ``target`` as its first argument (the killer)."""
    target = str(target)
    if wrapper:
        program = [str(wrapper), target]
    elif target.endswith(".py"):
        program = [target]
    else:
        program = ["-m", "athanor.runner", target]
    if launch:
        program = ["-m", "accelerate.commands.launch", "--config_file", str(launch), "--main_process_port",
                   str(free_port()), *(["--module"] if program[0] == "-m" else []),
                   *(program[1:] if program[0] == "-m" else program)]
    return [sys.executable, *program, *map(str, args)]


def run_process(target, args, launch=None, *, env: dict | None = None, timeout: float = 600, cwd=None,
                wrapper=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(command(target, args, launch, wrapper), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_killed(target, args, launch=None, *, kill_at: int, kill_in: str, timeout: float = 600,
               cwd=None) -> subprocess.CompletedProcess:
    """Run ``target`` until every process kills itself (SIGKILL) in engine step ``kill_at`` of the
    engine writing into a folder named ``kill_in``; asserts that it died."""
    with tempfile.TemporaryDirectory() as tmp:
        killer = Path(tmp) / "killer.py"
        killer.write_text(KILLER)
        proc = run_process(target, args, launch, env={"KILL_AT": str(kill_at), "KILL_IN": kill_in}, timeout=timeout,
                           cwd=cwd, wrapper=killer)
    assert proc.returncode != 0, f"the run was not killed at step {kill_at} of {kill_in}:\n{proc.stderr[-3000:]}"
    return proc


def metric_rows(folder, keys=("loss",)) -> dict[int, dict]:
    """Per step, the logged metrics whose names start with one of ``keys``: compared with ``==``, bit for bit."""
    out: dict[int, dict] = {}
    for row in read_metrics(folder):
        picked = {k: v for k, v in row.items() if any(k.startswith(p) for p in keys)}
        if picked:
            out.setdefault(row["step"], {}).update(picked)
    return out


def _run_to_the_end(target, args, launch, timeout: float, what: str) -> None:
    """A paper module without a launcher runs in this process (a fresh interpreter costs ~10 s of
    imports); a script, or anything launched, in a fresh one."""
    if launch is None and not str(target).endswith(".py"):
        run(importlib.import_module(str(target)).PAPER, [str(a) for a in args])
        return
    proc = run_process(target, args, launch, timeout=timeout)
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{proc.stderr[-4000:]}"


def check_resume_after_sigkill(target, root, *args, kill_at: int, stage: str = "", keys=("loss",),
                               launch=None, timeout: float = 600) -> dict[int, dict]:
    """``root/full`` run whole; ``root/killed`` SIGKILLed inside engine step ``kill_at`` of stage
    ``stage`` ("": a stage that runs in the run folder itself), then run again with the same
    arguments: its logged ``keys`` equal the whole run's at every step. Returns them."""
    full, killed = Path(root) / "full", Path(root) / "killed"
    _run_to_the_end(target, ["--run.output_dir", full, *args], launch, timeout, "the whole run")
    run_killed(target, ["--run.output_dir", killed, *args], launch, kill_at=kill_at, kill_in=stage or "killed",
               timeout=timeout)
    stage_dir = killed / stage if stage else killed
    assert (stage_dir / "checkpoints").is_dir(), f"the killed run wrote no checkpoint in {stage_dir} before step {kill_at}"
    _run_to_the_end(target, ["--run.output_dir", killed, *args], launch, timeout, "the resumed run")
    expected = metric_rows(full / stage if stage else full, keys)
    assert expected and max(expected) > kill_at, f"the whole run logged no {keys} past step {kill_at}: {expected}"
    got = metric_rows(stage_dir, keys)
    diff = sorted(step for step in set(expected) | set(got) if expected.get(step) != got.get(step))
    assert not diff, f"resumed run differs from the whole run at steps {diff[:5]}: " \
                     f"{[(expected.get(s), got.get(s)) for s in diff[:2]]}"
    return expected


def check_bad_value(paper: Paper, output_dir, *args, key: str) -> str:
    """``args`` make ``run(paper)`` exit 2 with one line on stderr naming ``key``, before any
    compute: ``output_dir`` is never created. Returns the line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            run(paper, ["--run.output_dir", str(output_dir), *map(str, args)])
            code = 0
        except SystemExit as stop:
            code = stop.code
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code == 2, f"{args} exited {code}, not 2: {lines}"
    assert len(lines) == 1 and key in lines[0], f"expected one line naming {key}: {lines}"
    assert not Path(output_dir).exists(), f"{output_dir} was made: something ran before the check"
    return lines[0]


def check_end_to_end(paper: Paper, output_dir, *args) -> dict:
    """Run ``paper`` in this process and check what every finished run leaves (see the module doc)."""
    out = Path(output_dir)
    argv = ["--run.output_dir", str(out), *map(str, args)]
    report = run(paper, argv)
    assert report, f"{paper.name}: the report is empty"
    saved = json.loads((out / "report.json").read_text())
    assert set(saved) <= set(report) | {"seconds"}, f"report.json keys {sorted(saved)} vs returned {sorted(report)}"
    assert (out / "report.md").is_file() and (out / "config.yaml").is_file(), f"{out}: report.md or config.yaml missing"
    record = json.loads((out / RUN_FILE).read_text())
    assert record["paper"] == paper.name and record["main_model"] == paper.main_model, record
    cfg = load_config(paper.config, argv)
    for stage in paper.stages(cfg):
        if stage.record:
            marker = out / (stage.folder or stage.name) / STAGE_FILE
            assert marker.is_file(), f"stage {stage.name} left no {STAGE_FILE}"
    if paper.main_model:
        check_upload(paper, out)
    return report


def check_upload(paper: Paper, output_dir) -> object:
    """A dry-run publish of a finished run: the declared main model on top, the run's config as
    ``training_config.yaml``, every plot at its run-relative path, a card of the declared kind
    (library, the recorded command to reproduce). Returns the card."""
    out = Path(output_dir).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        stage, card = build_upload_folder(out, "you/" + paper.name.lower(), Path(tmp) / "upload")
        main = out / paper.main_model
        on_top = {p.name for p in main.iterdir() if p.is_file()} - {"README.md"}
        missing = sorted(n for n in on_top if not (stage / n).is_file())
        assert not missing, f"the main model's files {missing} are not at the top of the upload"
        assert (stage / "training_config.yaml").is_file(), "no training_config.yaml in the upload"
        plots = [p.relative_to(out) for p in out.rglob("*.png") if "hub_upload" not in p.parts
                 and not any(part in ("checkpoints", "tensorboard") for part in p.relative_to(out).parts)]
        lost = [str(p) for p in plots if not (stage / p).is_file() and not (stage / p.name).is_file()]
        assert not lost, f"plots missing from the upload: {lost[:5]}"
    if paper.card:
        assert card.data.library_name == LIBRARY[paper.card], f"card library {card.data.library_name} for {paper.card}"
    reproduce = card.text.split("## Reproduce")[1]
    assert "not recorded" not in reproduce, "the card has no command to reproduce the run"
    return card


__all__ = ["KILLER", "check_bad_value", "check_end_to_end", "check_resume_after_sigkill", "check_upload",
           "command", "free_port", "metric_rows", "run_killed", "run_process"]
