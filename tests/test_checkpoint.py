"""Checkpoints in process: state dicts as safetensors + JSON, per-process RNG, the manifest, resume
from the newest checkpoint that verifies, and nothing in a checkpoint folder is ever unpickled."""
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from athanor.config import ConfigError, OptimConfig, RunConfig, TrainConfig
from athanor.data import ShuffledBatches
from athanor.engine import Engine, Method, read_metrics
from athanor.engine import checkpoint as ckpt
from athanor.engine.state import join_state, load_state, rng_state, save_state, set_rng_state, split_state


class NoisyTwoModels(Method):
    """Two models (one stepped every 2nd step), dropout (the global torch RNG), noise from the
    method's own torch.Generator, and a running average of the weights in its state dict: all of
    it must come back from a checkpoint for the losses to match."""

    def setup(self, engine):
        self.engine = engine
        torch.manual_seed(0)
        self.gen = engine.register("gen", nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 4)), every=2)
        self.critic = engine.register("critic", nn.Linear(4, 1))
        self.rng = torch.Generator().manual_seed(7)
        self.average = [p.detach().clone() for p in self.critic.parameters()]
        self.updates = {"gen": 0}

    def train_step(self, batch):
        noisy = batch + 0.1 * torch.randn(batch.shape, generator=self.rng)
        out = {"samples": len(batch)}
        if self.engine.due("gen"):
            gen_loss = self.critic(self.gen(noisy)).mean()
            self.engine.optimize("gen", gen_loss)
            self.engine.slots["critic"].optimizer.zero_grad()
            self.updates["gen"] += 1
            out["gen_loss"] = gen_loss.detach()
        loss = (self.critic(self.gen(noisy).detach()) - 1).pow(2).mean()
        self.engine.optimize("critic", loss)
        for avg, p in zip(self.average, self.critic.parameters()):
            avg.lerp_(p.detach(), 0.1)
        return {"loss": loss.detach(), **out}

    def state_dict(self):
        return {"rng": self.rng.get_state(), "average": self.average, "updates": dict(self.updates)}

    def load_state_dict(self, state):
        self.rng.set_state(state["rng"])
        self.average = [a.clone() for a in state["average"]]
        self.updates = dict(state["updates"])


def run(output_dir, max_steps, save_every=2, keep_last=5, **run_changes):
    cfg = TrainConfig(run=RunConfig(output_dir=str(output_dir), max_steps=max_steps, save_every=save_every,
                                    keep_last=keep_last, progress=False, **run_changes),
                      optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"))
    engine = Engine(cfg)
    method = NoisyTwoModels()
    method.setup(engine)
    engine.fit(method, ShuffledBatches(torch.randn(64, 4, generator=torch.Generator().manual_seed(1)), 8, 0))
    return engine, method


def loss_rows(output_dir):
    return [{k: r[k] for k in ("step", "loss", "gen_loss") if k in r} for r in read_metrics(output_dir) if "loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    _, method = run(out, 8)
    return loss_rows(out), method


# ------------------------------------------------------------------------------ state files
def test_nested_state_round_trips_through_safetensors_and_json(tmp_path):
    weight = torch.randn(3, 4)
    state = {"rng": torch.Generator().manual_seed(3).get_state(), "tied": [weight, weight, weight[1]],
             "by_id": {0: {"step": torch.tensor(5.0), "note": "x"}, 1: {"step": 2}},
             "betas": (0.9, 0.99), "nothing": None, "flag": True, "nan": float("inf"), "np": np.float64(0.25)}
    save_state(state, tmp_path, "thing")
    back = load_state(tmp_path, "thing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing.json", "thing.safetensors"]
    assert torch.equal(back["rng"], state["rng"]) and back["rng"].dtype == torch.uint8
    assert all(torch.equal(a, b) for a, b in zip(back["tied"], state["tied"]))
    assert back["by_id"][0]["step"].item() == 5.0 and back["by_id"][0]["note"] == "x" and back["by_id"][1] == {"step": 2}
    assert back["betas"] == (0.9, 0.99) and back["nothing"] is None and back["flag"] is True
    assert back["nan"] == float("inf") and back["np"] == 0.25


def test_python_objects_are_refused_with_their_path():
    with pytest.raises(TypeError, match=r"state/ema/model: a Linear is neither a tensor nor a JSON value"):
        split_state({"ema": {"model": nn.Linear(2, 2)}})


def test_split_and_join_are_inverse():
    structure, tensors = split_state({"a": [torch.ones(2), {"b": torch.zeros(1)}]})
    json.dumps(structure)  # the structure is plain JSON
    back = join_state(structure, tensors)
    assert torch.equal(back["a"][0], torch.ones(2)) and torch.equal(back["a"][1]["b"], torch.zeros(1))


def test_global_rng_states_come_back(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_state(rng_state(torch.device("cpu")), tmp_path, "rng")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_state(tmp_path, "rng"), torch.device("cpu"))
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


# ------------------------------------------------------------------------------ the engine's checkpoints
def test_checkpoint_holds_no_python_objects_and_a_manifest_of_every_file(tmp_path):
    run(tmp_path, 2)
    folder = ckpt.checkpoint_root(tmp_path) / "step-2"
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert names == ["MANIFEST.json", "config.yaml", "model-critic.safetensors", "model-gen.safetensors", "optimizer-critic.json",
                     "optimizer-critic.safetensors", "optimizer-gen.json", "optimizer-gen.safetensors",
                     "rank0/data.json", "rank0/method.json", "rank0/method.safetensors", "rank0/rng.json",
                     "rank0/rng.safetensors", "trainer_state.json"]
    manifest = json.loads((folder / "MANIFEST.json").read_text())["files"]
    assert sorted(manifest) == [n for n in names if n != "MANIFEST.json"]
    assert ckpt.verify(folder) is None


def test_resume_with_own_generator_dropout_and_averages_is_exact(tmp_path, uninterrupted, capsys):
    rows, full = uninterrupted
    run(tmp_path, 5)  # the final checkpoint at 5 is odd: the generator's every-2 phase must come back too
    _, again = run(tmp_path, 8)
    assert "resumed from" in capsys.readouterr().out
    assert loss_rows(tmp_path) == rows
    assert all(torch.equal(a, b) for a, b in zip(full.average, again.average))
    assert again.updates == full.updates


class Planted:
    """Unpickling this writes a marker file (what a malicious checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickles_in_a_checkpoint_are_never_unpickled(tmp_path, uninterrupted, monkeypatch, capsys):
    run(tmp_path, 4)
    folder = ckpt.checkpoint_root(tmp_path) / "step-4"
    marker = tmp_path / "code-ran"
    payload = pickle.dumps(Planted(str(marker)))
    pickle.loads(payload)  # the payload works: it does write the marker when unpickled
    assert marker.exists()
    marker.unlink()
    for name in ("method_state.pt", "random_states_0.pkl", "optimizer.bin", "rank0/method.pt", "pytorch_model.bin"):
        (folder / name).write_bytes(payload)
    ckpt.write_manifest(folder)  # listed, as one who planted them would (unlisted files are refused anyway)
    def refuse(*args, **kwargs):
        raise AssertionError("resume called an unpickler")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    engine, _ = run(tmp_path, 8)
    assert f"resumed from {folder} at step 4" in capsys.readouterr().out
    assert engine.step == 8 and not marker.exists()
    assert loss_rows(tmp_path) == uninterrupted[0]


def test_truncated_newest_checkpoint_is_skipped_with_one_line(tmp_path, uninterrupted, capsys):
    run(tmp_path, 8)
    root = ckpt.checkpoint_root(tmp_path)
    weights = root / "step-8" / "model-critic.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # a torn write after the rename
    capsys.readouterr()
    engine, _ = run(tmp_path, 8)
    lines = [line for line in capsys.readouterr().out.splitlines() if "skipping" in line]
    assert len(lines) == 1, lines
    assert "step-8" in lines[0] and "model-critic.safetensors has" in lines[0] and "step-6" in lines[0]
    assert engine.step == 8 and loss_rows(tmp_path) == uninterrupted[0]  # steps 7 and 8 retrained, the same
    assert ckpt.verify(root / "step-8") is None  # ...and step-8 written again, whole


def test_verify_names_what_is_wrong(tmp_path):
    run(tmp_path, 2)
    folder = ckpt.checkpoint_root(tmp_path) / "step-2"
    data = folder / "rank0" / "data.json"
    data.write_text(data.read_text().replace("1", "2"))
    assert ckpt.verify(folder) == "rank0/data.json does not match its sha256 in the manifest"
    (folder / "optimizer-gen.json").unlink()
    assert ckpt.verify(folder) == "optimizer-gen.json is missing"
    (folder / "MANIFEST.json").unlink()
    assert "no MANIFEST.json" in ckpt.verify(folder)


def test_a_named_checkpoint_that_does_not_verify_is_a_config_error(tmp_path):
    run(tmp_path / "a", 2)
    folder = ckpt.checkpoint_root(tmp_path / "a") / "step-2"
    (folder / "trainer_state.json").write_text("{}")
    with pytest.raises(ConfigError, match="trainer_state.json has .* bytes"):
        run(tmp_path / "b", 4, resume=str(folder))


def test_prune_keeps_the_newest_checkpoint_that_has_a_manifest(tmp_path):
    run(tmp_path, 2)
    root = ckpt.checkpoint_root(tmp_path)
    for step in (4, 6):
        (root / f"step-{step}").mkdir()  # newer, but without manifests (cut short, or not ours)
    ckpt.prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-6"]


def test_interrupted_save_leaves_no_step_folder(tmp_path, monkeypatch):
    run(tmp_path, 2)

    def killed(folder, *_):
        raise KeyboardInterrupt  # the process dies between writing the files and the manifest
    monkeypatch.setattr(ckpt, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, 4)
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["step-2"]
    assert os.path.isdir(ckpt.temporary_dir(tmp_path, 4))


def test_publish_include_checkpoint_uploads_only_the_pickle_free_files(tmp_path):
    from athanor import hub

    out = tmp_path / "run"
    run(out, 2)
    (out / "model").mkdir()  # a saved model folder is what makes a run publishable
    (out / "model" / "config.json").write_text("{}")
    folder = ckpt.checkpoint_root(out) / "step-2"
    for name in ("random_states_0.pkl", "method_state.pt", "optimizer.bin"):
        (folder / name).write_bytes(b"planted")
    ckpt.write_manifest(folder)  # listed: a checkpoint with unlisted files does not verify
    stage, _ = hub.build_upload_folder(out, "me/tiny", tmp_path / "stage", include_checkpoint=True)
    names = {p.relative_to(stage / "checkpoint" / "step-2").as_posix()
             for p in (stage / "checkpoint" / "step-2").rglob("*") if p.is_file()}
    assert {"model-gen.safetensors", "trainer_state.json", "rank0/rng.safetensors", "MANIFEST.json"} <= names
    assert not any(n.endswith((".pkl", ".pt", ".bin")) or n.startswith("optimizer") for n in names), names


def test_a_stream_resumed_on_another_world_size_keeps_its_global_batches():
    """2 processes' position loaded into 1 (and back): the next global batch is the same rows, each
    process taking global / N of them; a global batch that does not split evenly is refused."""
    data = torch.arange(96).reshape(48, 2)
    ranks = [ShuffledBatches(data, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(7):  # into the second epoch (6 global batches of 8 per epoch)
        for stream in ranks:
            next(stream)
    one = ShuffledBatches(data, 4, seed=3)
    one.load_state_dict(ranks[0].state_dict())
    assert torch.equal(next(one), torch.cat([next(ranks[0]), next(ranks[1])]))
    two = [ShuffledBatches(data, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    for stream in two:
        stream.load_state_dict(one.state_dict())
    assert torch.equal(torch.cat([next(s) for s in two]), next(one))
    three = ShuffledBatches(data, 4, seed=3, rank=0, world_size=3)
    with pytest.raises(ValueError, match="cannot be split evenly over 3 processes"):
        three.load_state_dict(ranks[0].state_dict())
