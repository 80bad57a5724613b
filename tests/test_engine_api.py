"""What methods may ask of the engine instead of reaching into accelerate: ``optimize`` says whether
the step ended, after-step hooks, ``reduce``/``gather``, the parallelism the run is under."""
import pytest
import torch
from torch import nn

from athanor.config import EngineConfig, OptimConfig, RunConfig, TrainConfig
from athanor.data import ShuffledBatches
from athanor.engine import Engine, Method, Parallelism, Update, launch_parallelism


class Recorded(Method):
    """A regression whose after-step hook records the step and the weights it sees."""

    def setup(self, engine):
        self.engine = engine
        torch.manual_seed(0)
        self.model = engine.register("model", nn.Linear(4, 1))
        self.updates, self.hooked = [], []
        engine.after_step("model", lambda: self.hooked.append((engine.step, self.model.weight.detach().clone())))

    def train_step(self, batch):
        loss = (self.model(batch["x"]).squeeze(-1) - batch["y"]).pow(2).mean()
        update = self.engine.optimize("model", loss)
        self.updates.append(update)
        return {"loss": loss.detach()}


def fit(tmp_path, grad_accum: int, steps: int = 3) -> Recorded:
    cfg = TrainConfig(run=RunConfig(output_dir=str(tmp_path), max_steps=steps, progress=False),
                      optim=OptimConfig(lr=0.1, schedule="constant", warmup_steps=0, grad_clip=1.0),
                      engine=EngineConfig(grad_accum=grad_accum))
    engine = Engine(cfg)
    method = Recorded()
    method.setup(engine)
    g = torch.Generator().manual_seed(0)
    engine.fit(method, ShuffledBatches({"x": torch.randn(32, 4, generator=g), "y": torch.randn(32, generator=g)}, 4, 0))
    return method


def test_optimize_says_when_the_step_ended_and_hooks_run_once_per_step(tmp_path):
    method = fit(tmp_path, grad_accum=2)
    assert all(isinstance(u, Update) for u in method.updates)
    assert [u.stepped for u in method.updates] == [False, True] * 3  # two micro-batches per step
    assert all(u.grad_norm is None for u in method.updates[0::2])
    assert all(torch.is_tensor(u.grad_norm) and u.grad_norm > 0 for u in method.updates[1::2])
    assert [step for step, _ in method.hooked] == [1, 2, 3]
    # the hook runs after the optimizer: it sees each step's new weights
    assert not torch.equal(method.hooked[0][1], method.hooked[1][1])
    torch.testing.assert_close(method.hooked[-1][1], method.model.weight.detach())


def test_reduce_gather_and_parallelism_on_one_process(tmp_path):
    method = fit(tmp_path, grad_accum=1, steps=1)
    engine = method.engine
    x = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(engine.reduce(x), x)
    torch.testing.assert_close(engine.reduce(x, reduction="mean"), x)
    torch.testing.assert_close(engine.gather(x), x)
    assert engine.parallelism == Parallelism("single") and engine.parallelism.zero_stage == 0
    assert not engine.parallelism.shards_parameters


@pytest.mark.parametrize("env, expected", [
    ({}, Parallelism("single")),
    ({"WORLD_SIZE": "2"}, Parallelism("ddp")),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, Parallelism("deepspeed", 2)),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, Parallelism("deepspeed", 3)),
])
def test_launch_parallelism_reads_the_launcher(monkeypatch, env, expected):
    for key in ("WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launch_parallelism() == expected
    assert launch_parallelism().shards_parameters == (expected.zero_stage == 3)


def test_eval_batches_are_as_many_on_every_process():
    """Under FSDP2 each eval forward is a collective: a process with one batch fewer hangs the rest."""
    from athanor.data import sharded_batches

    data = torch.arange(10)
    for world in (1, 2, 3, 4):
        per_rank = [list(sharded_batches(data, 2, 10, rank, world)) for rank in range(world)]
        assert len({len(batches) for batches in per_rank}) == 1 and all(per_rank), world
        assert all(len(b) > 0 for batches in per_rank for b in batches)
    assert [b.tolist() for b in sharded_batches(data, 2, 10)] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]  # one process: all of it
