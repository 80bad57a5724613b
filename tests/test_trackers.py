"""run.trackers: MLflow (a local file store) and W&B (offline mode), both real packages and no
server; a killed and resumed run continues in the same tracker run."""
import json
import os
import subprocess
import sys

import pytest

from athanor.engine import read_metrics
from conftest import ROOT, run_recipe
from test_checkpoint_multiprocess import run_killed

ARGS = ["--run.progress", "false", "--run.eval_every", "0", "--run.max_steps", "40", "--run.save_every", "10",
        "--model.d_model", "64", "--model.n_layers", "2"]  # the trackers, not the model, are under test


def kill_after(tmp_path, out, step, args):
    """The pretrain recipe SIGKILLs itself on entering ``step`` (past the step-20 checkpoint):
    deterministic, unlike a kill timed by polling metrics.jsonl, which is written every 5 s."""
    run_killed(tmp_path, "pretrain", "cpu", step, out.name, ["--run.output_dir", str(out), *args])
    assert max(r["step"] for r in read_metrics(out)) < 40, "the run ended before it could be killed"


@pytest.mark.slow
def test_mlflow_run_continues_after_a_kill(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    args = [*ARGS, "--run.trackers", "[mlflow]"]
    kill_after(tmp_path, out, 25, args)
    first_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    run_recipe("pretrain", "--run.output_dir", str(out), *args)
    assert json.loads((out / "trackers.json").read_text())["mlflow"] == first_id
    assert not (out / "tensorboard").exists()  # only what run.trackers names
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.tracking.MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [first_id]  # one tracker run, not one per attempt
    logged = {m.step: m.value for m in client.get_metric_history(first_id, "loss")}
    expected = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert set(logged) == set(range(1, 41)) and all(logged[s] == pytest.approx(v) for s, v in expected.items())


@pytest.mark.slow
def test_wandb_offline_run_keeps_its_id(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [*ARGS, "--run.trackers", "[tensorboard,wandb]"]
    kill_after(tmp_path, out, 25, args)
    run_id = json.loads((out / "trackers.json").read_text())["wandb"]
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--run.output_dir", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "trackers.json").read_text())["wandb"] == run_id
    offline = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(run_id) for name in offline)  # both attempts, one run id
    assert (out / "tensorboard").is_dir()


def test_unknown_or_missing_tracker_is_one_line(tmp_path):
    proc = run_recipe("pretrain", "--run.trackers", "[mlfow]", "--run.output_dir", str(tmp_path / "o"), check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "mlflow" in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()
