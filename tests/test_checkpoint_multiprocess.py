"""Two processes, killed with SIGKILL in the middle of a run, resume bit for bit: DMD2 under DDP
(each process has its own noise generator, checkpointed per process) and pretraining under
DeepSpeed ZeRO-2 (its shards in DeepSpeed's format, everything else pickle-free)."""
import pytest

from athanor import testing
from athanor.engine import checkpoint as ckpt
from conftest import ROOT, run_recipe

# The killer (every process SIGKILLs itself on entering engine step KILL_AT of the engine writing
# into a folder named KILL_IN) and the per-step metric rows are athanor.testing's, which every
# paper's tests use; these two keep the names other tests import from here.
def run_killed(tmp_path, recipe, launch, kill_at, kill_in, args):
    return testing.run_killed(ROOT / "recipes" / f"{recipe}.py", args, ROOT / "launch" / f"{launch}.yaml",
                              kill_at=kill_at, kill_in=kill_in, cwd=ROOT)


rows = testing.metric_rows


DMD2_TINY = ["--run.progress", "false", "--teacher.width", "16", "--teacher.layers", "1", "--teacher.heads", "2",
             "--teacher.steps", "4", "--teacher.batch_size", "16", "--teacher.sample_steps", "2",
             "--classifier.steps", "4", "--run.max_steps", "3", "--run.save_every", "1", "--run.eval_every", "3",
             "--run.log_every", "1", "--dmd2.batch_size", "4", "--dmd2.critic_updates_per_generator_step", "2",
             "--dmd2.eval_samples", "20", "--evaluation.samples", "20", "--evaluation.seeds", "1",
             "--evaluation.runs", "[]", "--evaluation.train_seeds", "[]"]


@pytest.mark.slow
def test_dmd2_two_processes_sigkilled_mid_distillation_resumes_bit_for_bit(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_recipe("dmd2", "--run.output_dir", str(full), *DMD2_TINY, launch="ddp-cpu")
    # 3 generator updates x 2 critic updates = 6 engine steps, a checkpoint every 2; killed inside step 5
    run_killed(tmp_path, "dmd2", "ddp-cpu", 5, "dmd2", ["--run.output_dir", str(killed), *DMD2_TINY])
    assert [p.name for _, p in ckpt.list_checkpoints(killed / "dmd2")] == ["step-2", "step-4"]
    run_recipe("dmd2", "--run.output_dir", str(killed), *DMD2_TINY, launch="ddp-cpu")
    keys = ("generator_", "critic_")
    expected = rows(full / "dmd2", keys)
    assert sorted(expected) == list(range(1, 7)) and "generator_dm_loss" in expected[1]
    assert rows(killed / "dmd2", keys) == expected
    for folder in (ckpt.checkpoint_root(killed / "dmd2") / "step-6").rglob("*"):
        assert folder.suffix not in (".pt", ".pkl", ".bin"), folder
    assert {p.name for p in (ckpt.checkpoint_root(killed / "dmd2") / "step-6").iterdir()} >= {"rank0", "rank1"}


PRETRAIN_TINY = ["--run.progress", "false", "--model.d_model", "32", "--model.n_layers", "1", "--data.max_chars",
                 "100000", "--data.eval_batches", "2", "--run.max_steps", "8", "--run.save_every", "2",
                 "--run.eval_every", "4", "--run.log_every", "1"]


@pytest.mark.slow
def test_pretrain_zero2_two_processes_sigkilled_resumes_bit_for_bit(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_recipe("pretrain", "--run.output_dir", str(full), *PRETRAIN_TINY, launch="zero2-cpu")
    run_killed(tmp_path, "pretrain", "zero2-cpu", 6, "killed", ["--run.output_dir", str(killed), *PRETRAIN_TINY])
    assert [p.name for _, p in ckpt.list_checkpoints(killed)][-1] == "step-4"
    run_recipe("pretrain", "--run.output_dir", str(killed), *PRETRAIN_TINY, launch="zero2-cpu")
    expected = rows(full, ("loss", "eval_loss"))
    assert sorted(expected) == list(range(0, 9)) or sorted(expected) == list(range(1, 9))
    assert rows(killed, ("loss", "eval_loss")) == expected
    step = ckpt.checkpoint_root(killed) / "step-8"
    assert ckpt.verify(step) is None
    # DeepSpeed's own shards (.pt, read by DeepSpeed) and its zero_to_*.py converters; everything of
    # ours beside them is safetensors / JSON (and the run's config.yaml)
    ours = [p for p in step.rglob("*") if p.is_file() and not p.name.startswith("zero_to_")
            and not p.relative_to(step).parts[0].startswith("deepspeed-")]
    assert all(p.suffix in (".json", ".safetensors") or p.name == "config.yaml" for p in ours), ours
    assert {p.name for p in (step / "deepspeed-model").iterdir()} == {
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"}  # the pickles of a ZeRO-2 checkpoint (README)
