"""Faults the engine must survive without losing data or running silently wrong (issue 11):
non-finite losses/gradients/weights and config values, resuming with a changed config, two runs on
one folder, a torn metrics line, Ctrl-C. In process on toy methods, plus two recipe runs."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from athanor.config import ConfigError, OptimConfig, RunConfig, TrainConfig, load_config
from athanor.data import ShuffledBatches
from athanor.engine import INTERRUPTED_EXIT_CODE, NONFINITE_EXIT_CODE, Engine, Method, read_metrics
from athanor.engine import checkpoint as ckpt
from athanor.engine.lock import LOCK_NAME, _process_start
from conftest import ROOT, run_recipe


@dataclass
class ToyModelConfig:
    width: int = 4


@dataclass
class ToyConfig(TrainConfig):
    model: ToyModelConfig = field(default_factory=ToyModelConfig)


class Toy(Method):
    """Linear regression; ``poison`` maps a step to what goes wrong in it: "loss" (NaN loss),
    "grad" (finite loss, NaN gradient), "weights" (inf written into a weight after the update)."""

    def __init__(self, width=4, poison=None, signals=()):
        self.width, self.poison, self.signals = width, poison or {}, signals

    def setup(self, engine):
        self.engine = engine
        torch.manual_seed(0)
        self.model = engine.register("model", nn.Linear(self.width, 1))

    def train_step(self, batch):
        for at, sig in self.signals:
            if self.engine.step == at:
                os.kill(os.getpid(), sig)
        x, y = batch["x"][:, : self.width], batch["y"]
        loss = (self.model(x).squeeze(-1) - y).pow(2).mean()
        what = self.poison.get(self.engine.step)
        if what == "loss":
            loss = loss * float("nan")
        elif what == "grad":  # d/dw sqrt(|w - w|^2) at 0: inf * 0 = NaN, while the value added is 0
            w = self.model.weight
            loss = loss + torch.sqrt((w - w.detach()).pow(2).sum())
        self.engine.optimize("model", loss)
        if what == "weights":
            with torch.no_grad():
                self.model.weight[0, 0] = float("inf")
        return {"loss": loss.detach()}


def stream(seed=0):
    g = torch.Generator().manual_seed(1)
    return ShuffledBatches({"x": torch.randn(64, 8, generator=g), "y": torch.randn(64, generator=g)}, 8, seed)


def config(out, lr=1e-2, width=4, **run):
    return ToyConfig(run=RunConfig(output_dir=str(out), progress=False, **run),
                     optim=OptimConfig(lr=lr, warmup_steps=0, schedule="constant"), model=ToyModelConfig(width))


def train(out, method=None, **kw):
    engine = Engine(config(out, **kw))
    method = method or Toy(width=kw.get("width", 4))
    method.setup(engine)
    engine.fit(method, stream())
    return engine, method


def all_weights_finite(folder) -> bool:
    files = list(folder.rglob("*.safetensors"))
    assert files
    return all(torch.isfinite(t).all() for f in files for t in load_file(f).values())


# ------------------------------------------------------------------------------ item 2: NaN / inf
@pytest.mark.parametrize("override", [["--optim.lr", "nan"], ["--optim.lr", "inf"], ["--optim.eps", "-inf"],
                                      ["--optim.betas", "[0.9,nan]"]])
def test_nonfinite_config_values_are_refused_at_parse_time(override):
    with pytest.raises(ConfigError, match="must be a finite number"):
        load_config(TrainConfig, override)


@pytest.mark.parametrize("what, named", [("loss", "non-finite loss"), ("grad", "non-finite gradient norm"),
                                         ("weights", "non-finite weights")])
def test_nonfinite_stops_at_that_step_and_keeps_the_last_finite_checkpoint(tmp_path, capsys, what, named):
    engine = Engine(config(tmp_path, max_steps=8, save_every=2, keep_last=2))
    method = Toy(poison={5: what} if what != "weights" else {6: what})
    method.setup(engine)
    with pytest.raises(SystemExit) as exit_:
        engine.fit(method, stream())
    assert exit_.value.code == NONFINITE_EXIT_CODE
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    stop_step = 5 if what != "weights" else 6
    assert len(err) == 1 and err[0].startswith(f"error: step {stop_step}: {named}"), err
    # step-2 and step-4 stay (nothing pruned for a non-finite state), nothing later was written
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4]
    assert all_weights_finite(tmp_path)
    if what != "weights":  # stopped before the optimizer step: the weights in memory are still finite
        assert all(torch.isfinite(p).all() for p in method.model.parameters())
    # the folder is resumable from the last finite checkpoint (the lock was released)
    _, again = train(tmp_path, max_steps=6, save_every=2, keep_last=2)
    assert ckpt.latest_checkpoint(tmp_path).name == "step-6"


def test_skip_policy_drops_the_step_and_stops_after_the_limit(tmp_path):
    engine, method = train(tmp_path / "once", Toy(poison={3: "loss"}), max_steps=6, on_nonfinite="skip")
    rows = [r for r in read_metrics(tmp_path / "once") if "loss" in r]
    assert [r.get("nonfinite_skipped", 0) for r in rows] == [0, 0, 1, 1, 1, 1]
    assert all(torch.isfinite(p).all() for p in method.model.parameters()) and engine.step == 6
    engine = Engine(config(tmp_path / "always", max_steps=20, on_nonfinite="skip", nonfinite_limit=3))
    method = Toy(poison={s: "grad" for s in range(4, 21)})
    method.setup(engine)
    with pytest.raises(SystemExit) as exit_:
        engine.fit(method, stream())
    assert exit_.value.code == NONFINITE_EXIT_CODE and engine.step == 6  # steps 4, 5, 6 dropped: stop


@pytest.mark.slow
def test_pretrain_diverging_lr_exits_3_with_one_line_and_no_nonfinite_weights(tmp_path):
    out = tmp_path / "run"
    proc = run_recipe("pretrain", "--run.output_dir", str(out), "--optim.lr", "1e6", "--optim.grad_clip", "0",
                      "--run.max_steps", "6", "--run.save_every", "1", "--run.eval_every", "0",
                      "--data.max_chars", "20000", "--run.progress", "false", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == NONFINITE_EXIT_CODE, proc.stderr[-3000:]
    assert len(errors) == 1 and "non-finite" in errors[0] and "Traceback" not in proc.stderr
    assert not (out / "model").exists()
    assert ckpt.list_checkpoints(out) and all_weights_finite(out)
    bad = run_recipe("pretrain", "--run.output_dir", str(tmp_path / "inf"), "--optim.lr", "inf", check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert [line for line in bad.stderr.splitlines() if line.startswith("error:")] == [
        "error: optim.lr=inf must be a finite number"]


# ------------------------------------------------------------------------------ item 3: resume with a changed config
def test_resume_refuses_a_model_change_before_touching_config_yaml(tmp_path):
    train(tmp_path, max_steps=4)
    saved = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"model\.width 4 -> 8.*run\.seed 0 -> 1"):
        Engine(ToyConfig(run=RunConfig(output_dir=str(tmp_path), progress=False, max_steps=8, seed=1),
                         optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), model=ToyModelConfig(8)))
    assert (tmp_path / "config.yaml").read_text() == saved
    assert not (tmp_path / LOCK_NAME).exists()  # the refused run let go of the folder


def test_resume_applies_a_changed_lr_says_so_and_keeps_the_config_history(tmp_path, capsys):
    train(tmp_path, lr=1e-2, max_steps=4)
    engine, _ = train(tmp_path, lr=1e-3, max_steps=8)
    out = capsys.readouterr().out
    assert "optim.lr 0.01 -> 0.001" in out and "run.max_steps 4 -> 8" in out
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path) if "lr" in r}
    assert lrs[4] == pytest.approx(1e-2) and all(lrs[s] == pytest.approx(1e-3) for s in range(5, 9))
    assert engine.slots["model"].optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert "lr: 0.01" in (tmp_path / "config-history" / "001.yaml").read_text()
    assert "lr: 0.001" in (tmp_path / "config.yaml").read_text()


# ------------------------------------------------------------------------------ item 4: one run per folder
def _lock_of(pid: int, host: str | None = None) -> str:
    return json.dumps({"host": host or socket.gethostname(), "pid": pid, "started": _process_start(pid),
                       "token": "x", "since": "earlier"})


def test_a_second_run_on_a_held_folder_exits_2_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(_lock_of(holder.pid))
        with pytest.raises(ConfigError, match=rf"in use by another run \(host {socket.gethostname()}, PID {holder.pid}"):
            Engine(config(tmp_path, max_steps=2))
        assert not (tmp_path / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    train(tmp_path, max_steps=2)  # its process is gone: the stale lock is taken over
    assert not (tmp_path / LOCK_NAME).exists()  # and released when fit ends


def test_two_processes_one_folder_the_second_exits_2(tmp_path):
    engine = Engine(config(tmp_path, max_steps=2))  # holds the folder until its fit ends
    code = ("from athanor.config import exit_on_config_error, TrainConfig, RunConfig\n"
            "from athanor.engine import Engine\n"
            f"with exit_on_config_error():\n    Engine(TrainConfig(run=RunConfig(output_dir={str(tmp_path)!r})))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"PID {os.getpid()}" in errors[0], proc.stderr[-2000:]
    method = Toy()
    method.setup(engine)
    engine.fit(method, stream())
    assert not (tmp_path / LOCK_NAME).exists()


# ------------------------------------------------------------------------------ item 5: torn metrics line
def test_a_torn_last_metrics_line_is_dropped_with_a_warning_on_resume(tmp_path, capsys):
    train(tmp_path, max_steps=4)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.12')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]
    train(tmp_path, max_steps=6)
    assert "dropped a torn last line" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------ item 11: Ctrl-C
@pytest.fixture
def default_sigint():
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_first_ctrl_c_checkpoints_and_exits_130_and_the_run_resumes(tmp_path, default_sigint):
    engine = Engine(config(tmp_path, max_steps=8))
    method = Toy(signals=[(3, signal.SIGINT)])
    method.setup(engine)
    with pytest.raises(SystemExit) as exit_:
        engine.fit(method, stream())
    assert exit_.value.code == INTERRUPTED_EXIT_CODE
    assert ckpt.latest_checkpoint(tmp_path).name == "step-3"
    train(tmp_path, max_steps=8)
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == list(range(1, 9))


def test_second_ctrl_c_exits_at_once_without_a_checkpoint(tmp_path, default_sigint):
    engine = Engine(config(tmp_path, max_steps=8))
    method = Toy(signals=[(3, signal.SIGINT), (3, signal.SIGINT)])
    method.setup(engine)
    with pytest.raises(SystemExit) as exit_:
        engine.fit(method, stream())
    assert exit_.value.code == INTERRUPTED_EXIT_CODE and engine.step == 3
    assert ckpt.list_checkpoints(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back


def test_a_requeued_slurm_job_takes_over_the_lock_of_its_killed_earlier_run(tmp_path, monkeypatch):
    other_node = json.dumps({"host": "node-that-died", "pid": 1, "job": "77", "restart": 0, "token": "x"})
    (tmp_path / LOCK_NAME).write_text(other_node)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    with pytest.raises(ConfigError, match="node-that-died"):  # same job, same restart: a live twin, refused
        Engine(config(tmp_path, max_steps=2))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    train(tmp_path, max_steps=2)
    assert not (tmp_path / LOCK_NAME).exists()
