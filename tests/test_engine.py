"""The engine on toy methods, in process: update rates, accumulation, precision, checkpoints."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

from athanor.config import ConfigError, EngineConfig, OptimConfig, RunConfig, TrainConfig
from athanor.data import ShuffledBatches
from athanor.engine import PREEMPTED_EXIT_CODE, Engine, Method, lr_multiplier, read_metrics
from athanor.engine import checkpoint as ckpt
from conftest import ROOT, free_port


class TwoModels(Method):
    """A 'generator' stepped every 3rd step and a 'critic' every step (DMD2's shape)."""

    def setup(self, engine):
        self.engine = engine
        torch.manual_seed(0)
        self.gen = engine.register("gen", nn.Linear(4, 4), every=3)
        self.critic = engine.register("critic", nn.Linear(4, 1))
        self.updates = {"gen": 0, "critic": 0}

    def train_step(self, batch):
        metrics = {}
        if self.engine.due("gen"):
            loss = self.critic(self.gen(batch)).mean()
            self.engine.optimize("gen", loss)
            self.engine.slots["critic"].optimizer.zero_grad()  # the critic must not learn from this
            self.updates["gen"] += 1
            metrics["gen_loss"] = loss.detach()
        loss = (self.critic(self.gen(batch).detach()) - 1).pow(2).mean()
        self.engine.optimize("critic", loss)
        self.updates["critic"] += 1
        return {"loss": loss.detach(), "samples": len(batch), **metrics}

    def state_dict(self):
        return dict(self.updates)

    def load_state_dict(self, state):
        self.updates = dict(state)


def make_engine(tmp_path, **run):
    cfg = TrainConfig(run=RunConfig(output_dir=str(tmp_path), progress=False, **run),
                      optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"))
    return Engine(cfg)


def losses(output_dir):
    return [r["loss"] for r in read_metrics(output_dir) if "loss" in r]


def data(seed=0):
    return ShuffledBatches(torch.randn(64, 4, generator=torch.Generator().manual_seed(1)), 8, seed)


def test_update_rates_and_metrics(tmp_path):
    engine = make_engine(tmp_path, max_steps=9)
    method = TwoModels()
    method.setup(engine)
    gen_before = method.gen.weight.detach().clone()
    engine.fit(method, data())
    assert method.updates == {"gen": 3, "critic": 9}
    assert not torch.equal(gen_before, method.gen.weight)
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert all(r["samples_per_s"] > 0 and r["lr_gen"] == pytest.approx(1e-2) for r in rows)
    assert sum("gen_loss" in r for r in rows) == 3  # logged only on the generator's steps
    assert (tmp_path / "config.yaml").exists() and list((tmp_path / "tensorboard").iterdir())


def test_resume_in_process_matches(tmp_path):
    full = make_engine(tmp_path / "full", max_steps=8)
    m1 = TwoModels()
    m1.setup(full)
    full.fit(m1, data())
    part = make_engine(tmp_path / "part", max_steps=4)
    m2 = TwoModels()
    m2.setup(part)
    part.fit(m2, data())
    again = make_engine(tmp_path / "part", max_steps=8)
    m3 = TwoModels()
    m3.setup(again)
    again.fit(m3, data())
    assert m3.updates == {"gen": 3, "critic": 8}  # method state came back from the checkpoint
    assert losses(tmp_path / "full") == losses(tmp_path / "part")
    assert torch.equal(m1.critic.weight, m3.critic.weight)


class SignalsItself(TwoModels):
    """Sends this process a signal in the middle of step ``at`` (or while step ``at``'s checkpoint
    is being written, after the loop's last look at the flag)."""

    def __init__(self, at, during_save=False):
        self.at, self.during_save = at, during_save

    def train_step(self, batch):
        if not self.during_save and self.engine.step == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return super().train_step(batch)

    def state_dict(self):
        if self.during_save and self.engine.step == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return super().state_dict()


@pytest.fixture
def usr1_recorder():
    """SIGUSR1 goes to a recorder outside fit; the engine must hand it back afterwards."""
    class Recorder(list):
        def __call__(self, signum, _frame):
            self.append(signum)

    received = Recorder()
    old = signal.signal(signal.SIGUSR1, received)
    yield received
    signal.signal(signal.SIGUSR1, old)


def test_signal_mid_run_checkpoints_exits_75_and_resumes_exactly(tmp_path, usr1_recorder):
    full = make_engine(tmp_path / "full", max_steps=8)
    method = TwoModels()
    method.setup(full)
    full.fit(method, data())
    stopped = make_engine(tmp_path / "stopped", max_steps=8)
    method = SignalsItself(at=3)
    method.setup(stopped)
    with pytest.raises(SystemExit) as exit_:
        stopped.fit(method, data())
    assert exit_.value.code == PREEMPTED_EXIT_CODE
    assert ckpt.latest_checkpoint(tmp_path / "stopped").name == "step-3"
    assert usr1_recorder == []  # the engine acted on it; not passed on
    assert signal.getsignal(signal.SIGUSR1) is usr1_recorder  # handed back
    again = make_engine(tmp_path / "stopped", max_steps=8)
    method = TwoModels()
    method.setup(again)
    again.fit(method, data())
    assert losses(tmp_path / "stopped") == losses(tmp_path / "full")


def test_signal_after_the_last_check_is_passed_on(tmp_path, usr1_recorder):
    engine = make_engine(tmp_path, max_steps=4)
    method = SignalsItself(at=4, during_save=True)
    method.setup(engine)
    engine.fit(method, data())  # finishes: the signal came during the final checkpoint
    assert usr1_recorder == [signal.SIGUSR1]  # ...and reached the handler that was there before fit


class Regression(Method):
    def setup(self, engine):
        self.engine = engine
        torch.manual_seed(0)
        self.model = engine.register("model", nn.Linear(4, 1))

    def train_step(self, batch):
        x, y = batch["x"], batch["y"]
        loss = (self.model(x).squeeze(-1) - y).pow(2).mean()
        self.engine.optimize("model", loss)
        return {"loss": loss.detach()}


def test_grad_accumulation_equals_bigger_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    xy = {"x": torch.randn(64, 4, generator=g), "y": torch.randn(64, generator=g)}
    weights = []
    for accum, batch in ((1, 16), (2, 8)):
        cfg = TrainConfig(run=RunConfig(output_dir=str(tmp_path / str(accum)), max_steps=4, progress=False),
                          optim=OptimConfig(lr=0.1, schedule="constant", grad_clip=0, name="sgd", betas=(0.0, 0.9)),
                          engine=EngineConfig(grad_accum=accum))
        engine = Engine(cfg)
        method = Regression()
        method.setup(engine)
        # accumulation takes consecutive micro-batches, so feed the same rows in the same order
        stream = ShuffledBatches(xy, batch, seed=0) if accum == 1 else _halves(ShuffledBatches(xy, 16, seed=0))
        engine.fit(method, stream)
        weights.append(method.model.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)


def _halves(stream):
    for batch in stream:
        yield {k: v[:8] for k, v in batch.items()}
        yield {k: v[8:] for k, v in batch.items()}


def test_bf16_autocast_runs(tmp_path):
    cfg = TrainConfig(run=RunConfig(output_dir=str(tmp_path), max_steps=3, progress=False),
                      engine=EngineConfig(mixed_precision="bf16"))
    engine = Engine(cfg)
    method = Regression()
    method.setup(engine)
    g = torch.Generator().manual_seed(0)
    engine.fit(method, ShuffledBatches({"x": torch.randn(32, 4, generator=g), "y": torch.randn(32, generator=g)}, 8, 0))
    assert engine.accelerator.mixed_precision == "bf16"
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path) if "loss" in r)


def test_fp16_on_cpu_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        Engine(TrainConfig(run=RunConfig(output_dir=str(tmp_path)), engine=EngineConfig(mixed_precision="fp16")))


def test_resume_none_refuses_a_used_directory(tmp_path):
    engine = make_engine(tmp_path, max_steps=2)
    method = Regression()
    method.setup(engine)
    g = torch.Generator().manual_seed(0)
    stream = ShuffledBatches({"x": torch.randn(32, 4, generator=g), "y": torch.randn(32, generator=g)}, 8, 0)
    engine.fit(method, stream)
    with pytest.raises(ConfigError, match="already holds checkpoints"):  # before config.yaml is touched
        Engine(TrainConfig(run=RunConfig(output_dir=str(tmp_path), resume="none", max_steps=4, progress=False)))


def test_incomplete_checkpoints_are_ignored_and_pruned(tmp_path):
    root = ckpt.checkpoint_root(tmp_path)
    for name in ("step-5", "step-10", ".tmp-step-15", "step-x"):
        (root / name).mkdir(parents=True)
    assert ckpt.latest_checkpoint(tmp_path) == root / "step-10"  # the killed save of 15 is not 'newest'
    ckpt.clear_stale_temporaries(tmp_path)
    assert not (root / ".tmp-step-15").exists()
    ckpt.prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-10", "step-x"]


@pytest.mark.parametrize("schedule, step, expected", [
    ("constant", 50, 1.0), ("cosine", 10, 1.0), ("cosine", 110, 0.1), ("cosine", 60, 0.55), ("linear", 60, 0.55),
])
def test_lr_schedule_after_warmup(schedule, step, expected):
    cfg = OptimConfig(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(step, cfg, max_steps=110) == pytest.approx(expected)


def test_warmup_is_linear():
    cfg = OptimConfig(warmup_steps=10)
    assert [lr_multiplier(s, cfg, 110) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])


STAGE_FIRST = """
import json, sys
from athanor.config import TrainConfig, RunConfig
from athanor.engine import Engine
from pathlib import Path
from athanor.runner import Stage, StageContext, run_stage

ctx = StageContext(cfg=TrainConfig(run=RunConfig(output_dir=sys.argv[1], progress=False)), root=Path(sys.argv[1]))
run_stage(ctx, Stage("evaluate-only", lambda c: {"ok": True}))  # the first stage builds no engine
engine = Engine(TrainConfig(run=RunConfig(output_dir=sys.argv[1] + "/train", progress=False)))
with open(f"{sys.argv[1]}/rank-{engine.rank}.json", "w") as f:  # one file each: shared stdout interleaves
    json.dump({"rank": engine.rank, "processes": engine.world_size}, f)
"""


@pytest.mark.slow
def test_a_stage_without_engine_first_keeps_deepspeed_on_all_processes(tmp_path):
    """Under DeepSpeed on CPU a bare PartialState() before the first engine came up as one
    process, and the engine after it inherited that (each process believing it was alone)."""
    script = tmp_path / "stage_first.py"
    script.write_text(STAGE_FIRST)
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "launch" / "zero2-cpu.yaml"), "--main_process_port", str(port), str(script),
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads(path.read_text()) for path in sorted((tmp_path / "out").glob("rank-*.json"))]
    assert seen == [{"rank": 0, "processes": 2}, {"rank": 1, "processes": 2}], seen
