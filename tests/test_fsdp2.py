"""FSDP2 on 2 CPU processes (launch/fsdp2-cpu.yaml; the engine's own fully_shard, engine/fsdp.py):
parameters sharded, DCP checkpoints (safetensors shards, one per process, no pickle) that resume
bit for bit after a SIGKILL, and one full Hugging Face folder that loads and gives the reported
eval loss."""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from athanor.engine import checkpoint as ckpt
from athanor.engine import fsdp, launch_parallelism
from conftest import run_recipe
from test_checkpoint_multiprocess import rows, run_killed

# Enough eval blocks that every process runs the same number of eval forwards (each is a collective)
DATA = ["--data.max_chars", "100000", "--data.eval_fraction", "0.1", "--data.batch_size", "4",
        "--data.eval_batches", "2"]
TINY = ["--run.progress", "false", "--model.d_model", "32", "--model.n_layers", "2", *DATA,
        "--run.max_steps", "20", "--run.save_every", "10", "--run.eval_every", "10", "--run.log_every", "1"]


def test_fsdp2_is_read_from_the_launcher_and_taken_from_accelerate(monkeypatch):
    monkeypatch.setenv(fsdp.HIDDEN, "0")  # recorded, so that teardown removes what take_over sets
    for key, value in {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}.items():
        monkeypatch.setenv(key, value)
    parallelism = launch_parallelism()
    assert (parallelism.kind, parallelism.world_size, parallelism.shards_parameters) == ("fsdp2", 2, True)
    assert fsdp.take_over() and "ACCELERATE_USE_FSDP" not in os.environ  # accelerate never wraps
    assert fsdp.requested() and launch_parallelism().kind == "fsdp2"  # later engines still see it
    monkeypatch.setenv(fsdp.HIDDEN, "0")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")  # FSDP1 is not the engine's: accelerate's path, as before
    assert not fsdp.requested()


def eval_loss_of_folder(folder):
    """The eval loss of ``folder`` loaded with from_pretrained, on the eval batches the run used
    (the first 2 global batches of 2 x 4 sequences)."""
    from transformers import AutoModelForCausalLM

    import athanor.models  # noqa: F401  (registers the architecture)
    from athanor.data import TextDataConfig, load_text_data

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    blocks = load_text_data(TextDataConfig(max_chars=100000, eval_fraction=0.1, batch_size=4, eval_batches=2)).eval_blocks
    with torch.no_grad():
        losses = [model(input_ids=blocks[i:i + 4], labels=blocks[i:i + 4]).loss.double() for i in range(0, 16, 4)]
    return model, float(torch.stack(losses).mean())


@pytest.mark.slow
def test_fsdp2_two_processes_sharded_sigkilled_resumes_bit_for_bit_and_saves_one_hf_folder(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = run_recipe("pretrain", "--run.output_dir", str(full), *TINY, launch="fsdp2-cpu")
    assert "parallelism: fsdp2, world size 2" in proc.stdout
    report = json.loads((full / "report.json").read_text())
    assert report["world_size"] == 2

    # sharded: each process wrote its half of every parameter (DCP offsets in the safetensors headers)
    step = ckpt.checkpoint_root(full) / "step-20"
    assert ckpt.verify(step) is None
    state = json.loads((step / "trainer_state.json").read_text())
    assert (state["parallelism"], state["world_size"]) == ("fsdp2", 2)
    shards = sorted((step / "dcp-model").iterdir())
    assert [p.name for p in shards] == ["shard-00001-model-00001-of-00001.safetensors",
                                        "shard-00002-model-00001-of-00001.safetensors"]
    rows_held = []
    for shard in shards:
        with safe_open(shard, "pt") as f:
            rows_held.append(f.get_slice("model/wte.weight").get_shape()[0])
            assert "optim/wte.weight/exp_avg" in f.keys()
    # no pickle anywhere: no .metadata, .pt, .bin, .pkl
    assert all(p.suffix in (".json", ".safetensors") or p.name == "config.yaml"
               for p in step.rglob("*") if p.is_file()), list(step.rglob("*"))

    # one full HF folder: loads with from_pretrained, gives the eval loss the run reported
    model, loss = eval_loss_of_folder(full / "model")
    assert sum(rows_held) == model.wte.weight.shape[0] and min(rows_held) < model.wte.weight.shape[0]
    assert type(model).__name__ == "AthanorGPT"
    assert loss == pytest.approx(report["final_eval_loss"], rel=1e-5)

    # SIGKILL on entering step 11 (step-10 written), then the same command: steps 11-20 bit for bit
    run_killed(tmp_path, "pretrain", "fsdp2-cpu", 11, "killed", ["--run.output_dir", str(killed), *TINY])
    assert [p.name for _, p in ckpt.list_checkpoints(killed)] == ["step-10"]
    on_one = tmp_path / "on-one"
    shutil.copytree(killed, on_one, symlinks=True)
    proc = run_recipe("pretrain", "--run.output_dir", str(killed), *TINY, launch="fsdp2-cpu")
    assert "resumed from" in proc.stdout
    expected = rows(full, ("loss", "eval_loss"))
    assert sorted(expected)[-10:] == list(range(11, 21))
    assert rows(killed, ("loss", "eval_loss")) == expected

    # The same step-10 checkpoint on 1 process (launch/cpu.yaml, no FSDP2): DCP reads the two shards
    # whole into the unsharded model; the global batch and data order are kept, so steps 11-20 track
    # the uninterrupted 2-process run within float tolerance; the change is said on one line.
    proc = run_recipe("pretrain", "--run.output_dir", str(on_one), *TINY, launch="cpu")
    assert "world size changed at step 10: 2 -> 1 processes" in proc.stdout
    resumed = rows(on_one, ("loss",))
    assert [resumed[s]["loss"] for s in range(11, 21)] == pytest.approx(
        [expected[s]["loss"] for s in range(11, 21)], rel=1e-3)
    assert json.loads((on_one / "report.json").read_text())["world_size"] == 1
