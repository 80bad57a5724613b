"""End-to-end: the pretrain recipe, exact resume (1 and 2 processes, SIGKILL), DeepSpeed."""
import json
import os
import subprocess
import sys

import pytest

from athanor import testing
from athanor.engine import read_metrics
from conftest import ROOT, run_recipe

SMALL = ["--run.progress", "false", "--run.eval_every", "0"]


def losses(output_dir, first, last):
    rows = {r["step"]: r["loss"] for r in read_metrics(output_dir) if "loss" in r}
    return [rows[s] for s in range(first, last + 1)]


def test_bad_key_exits_2_with_one_line(tmp_path):
    proc = run_recipe("pretrain", "--optim.lrr", "1", "--run.output_dir", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "optim.lr" in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()  # nothing was built or written


def test_missing_data_file_fails_cleanly(tmp_path):
    proc = run_recipe("pretrain", "--data.source", str(tmp_path / "missing.txt"), check=False)
    assert proc.returncode == 2 and "no such file" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_local_text_file_and_loadable_model(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"line {i}: the quick brown fox {i % 7}"}) + "\n" for i in range(400)))
    out = tmp_path / "run"
    run_recipe("pretrain", "--data.source", str(corpus), "--run.output_dir", str(out), "--run.max_steps", "30",
               "--data.block_size", "32", "--data.batch_size", "8", "--data.eval_fraction", "0.1", *SMALL)
    report = json.loads((out / "report.json").read_text())
    assert report["final_eval_loss"] < report["initial_eval_loss"] - 1.0
    assert (out / "config.yaml").read_text().count("block_size: 32") == 1
    code = (f"from transformers import AutoModelForCausalLM, AutoTokenizer; import torch;"
            f"m = AutoModelForCausalLM.from_pretrained({str(out / 'model')!r}, trust_remote_code=True);"
            f"t = AutoTokenizer.from_pretrained({str(out / 'model')!r}, trust_remote_code=True);"
            f"ids = t('line 3', return_tensors='pt').input_ids;"
            f"print(m(ids, labels=ids).loss.item())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 5.0


# Resume is checked on a 2-layer, 64-wide model: the recipe's default model takes 4x the time per
# step and resumes through the same code.
RESUME = [*SMALL, "--model.d_model", "64", "--model.n_layers", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["cpu", "ddp-cpu"])
def test_exact_resume(tmp_path, launch):
    full, split = tmp_path / "full", tmp_path / "split"
    run_recipe("pretrain", "--run.output_dir", str(full), "--run.max_steps", "30", *RESUME, launch=launch)
    run_recipe("pretrain", "--run.output_dir", str(split), "--run.max_steps", "10", "--run.save_every", "5",
               *RESUME, launch=launch)
    run_recipe("pretrain", "--run.output_dir", str(split), "--run.max_steps", "20", "--run.resume", "auto",
               *RESUME, launch=launch)
    assert losses(full, 1, 20) == losses(split, 1, 20)  # bit for bit, not approximately
    assert json.loads((split / "report.json").read_text())["world_size"] == (2 if launch == "ddp-cpu" else 1)
    # On another world size (2 -> 1, 1 -> 2) the run continues with the same global batch and data
    # order: its losses track the uninterrupted run's within float tolerance (the reduction order of
    # the gradient mean differs), said on one line and in the report.
    other, sizes = ("cpu", "2 -> 1") if launch == "ddp-cpu" else ("ddp-cpu", "1 -> 2")
    proc = run_recipe("pretrain", "--run.output_dir", str(split), "--run.max_steps", "30", *RESUME, launch=other)
    assert f"world size changed at step 20: {sizes} processes" in proc.stdout
    assert losses(split, 21, 30) == pytest.approx(losses(full, 21, 30), rel=1e-3)
    assert losses(split, 21, 30) != losses(split, 11, 20)  # it trained on, not replayed
    report = json.loads((split / "report.json").read_text())
    assert report["world_size"] == int(sizes[-1]) and sizes in report["world_size_changes"][0]


@pytest.mark.slow
def test_sigkill_mid_run_resumes_exactly(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = ["--run.max_steps", "40", "--run.save_every", "10", "--run.keep_last", "1", *RESUME]
    run_recipe("pretrain", "--run.output_dir", str(full), *args)
    args = ["--run.output_dir", str(killed), *args]  # killed inside step 25, after the checkpoint at 20
    testing.run_killed(ROOT / "recipes" / "pretrain.py", args, kill_at=25, kill_in="killed", cwd=ROOT)
    assert max(r["step"] for r in read_metrics(killed)) < 40, "the run ended before it could be killed"
    run_recipe("pretrain", *args)
    assert losses(full, 1, 40) == losses(killed, 1, 40)
    steps = [r["step"] for r in read_metrics(killed) if "loss" in r]
    assert steps == sorted(set(steps)), "redone steps must replace, not duplicate, logged lines"
    assert [p.name for p in (killed / "checkpoints").iterdir()] == ["step-40"]  # keep_last 1


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_processes(tmp_path, stage):
    out = tmp_path / "ds"
    run_recipe("pretrain", "--run.output_dir", str(out), "--run.max_steps", "5", *SMALL, launch=f"zero{stage}-cpu")
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    assert (out / "checkpoints" / "step-5" / "deepspeed-model").is_dir()  # DeepSpeed's own layout: it ran
    from transformers import AutoModelForCausalLM

    import athanor.models  # noqa: F401  (registers the architecture)

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.wte.weight.abs().sum() > 0  # ZeRO-3 gathered real weights, not empty shards
    if stage == 2:  # ZeRO's per-process shards cannot continue on another world size: one line, exit 2
        proc = run_recipe("pretrain", "--run.output_dir", str(out), "--run.max_steps", "8", *SMALL, check=False)
        assert proc.returncode == 2 and "ds_to_universal" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]


def test_probes_every_n_steps(tmp_path):
    """Probes (max attention logit, ...) land on the steps `probes.every` names, and never with 0."""
    from athanor.methods import pretrain
    from athanor.runner import run

    small = ["--run.max_steps", "6", "--run.log_every", "1", "--model.d_model", "32", "--model.n_layers", "1",
             "--data.max_chars", "20000", *SMALL]
    run(pretrain.PAPER, ["--run.output_dir", str(tmp_path / "every3"), "--probes.every", "3", *small])
    probed = [r["step"] for r in read_metrics(tmp_path / "every3") if "max_attn_logit" in r]
    assert probed == [3, 6]
    run(pretrain.PAPER, ["--run.output_dir", str(tmp_path / "never"), "--probes.every", "0", *small])
    assert not [r for r in read_metrics(tmp_path / "never") if "max_attn_logit" in r]
