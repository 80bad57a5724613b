"""The runner (athanor.runner) on the template paper: end to end, skipping finished stages, exact
resume after a SIGKILL mid-fit, a bad value before compute, and publishing the result (dry run,
offline). The three checks every paper needs are one call each (athanor.testing)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from athanor.methods import template
from athanor.runner import run
from athanor.testing import check_bad_value, check_end_to_end, check_resume_after_sigkill
from conftest import ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
FAST = ["--run.progress", "false", "--run.max_steps", "120", "--run.save_every", "25", "--run.log_every", "1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("template") / "run"
    return out, check_end_to_end(template.PAPER, out, *FAST)  # report, RUN.json, config.yaml, STAGE.json, upload


def test_runs_end_to_end_and_learns_the_weights(finished):
    out, report = finished
    assert report["steps"] == 120
    assert report["held_out_mse"] < 2 * report["noise_floor"]  # held-out rows: the fit is near the noise floor
    assert report["weight_error"] < 0.1
    assert json.loads((out / "report.json").read_text())["held_out_mse"] == report["held_out_mse"]
    assert (out / "fit" / "model" / "config.json").is_file() and (out / "fit" / "model" / "model.safetensors").is_file()


def test_a_second_run_skips_finished_stages(finished):
    out, report = finished
    markers = {p: p.stat().st_mtime_ns for p in out.glob("*/STAGE.json")}
    metrics = (out / "fit" / "metrics.jsonl").read_text()
    again = run(template.PAPER, ["--run.output_dir", str(out), *FAST])
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in report.items() if k != "seconds"}
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/STAGE.json")} == markers  # nothing re-ran
    assert (out / "fit" / "metrics.jsonl").read_text() == metrics


def test_a_fit_sigkilled_midway_resumes_exactly(tmp_path):
    """SIGKILL inside step 60 (the newest checkpoint is step 50's): the rerun's every loss equals the
    uninterrupted run's. Without exact resume (e.g. the batch order restarted) this fails."""
    rows = check_resume_after_sigkill("athanor.methods.template", tmp_path, *FAST, kill_at=60, stage="fit")
    assert sorted(rows) == list(range(1, 121))


def test_bad_value_exits_2_with_one_line_before_compute(tmp_path):
    check_bad_value(template.PAPER, tmp_path / "o", "--data.batch_size", "4096", key="data.batch_size")


def test_publishes_the_saved_model(finished, tmp_path):
    """``athanor publish --dry-run`` builds the upload folder from the run: the fitted model at the
    top, loadable with ``from_pretrained``, with a model card."""
    out, _ = finished
    stage = tmp_path / "stage"
    proc = subprocess.run([sys.executable, "-m", "athanor.cli", "publish", str(out), "--repo-id", "you/template",
                           "--dry-run", "--staging-dir", str(stage)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert proc.returncode == 0 and "nothing uploaded" in proc.stdout, proc.stderr[-2000:]
    model = template.LinearModel.from_pretrained(stage)
    fitted = template.LinearModel.from_pretrained(out / "fit" / "model")
    assert model.linear.weight.equal(fitted.linear.weight) and (stage / "README.md").is_file()
    assert (stage / "report.json").is_file()


def test_push_to_hub_at_the_end_publishes_or_says_why_in_one_line(tmp_path):
    """``--hub.push_to_hub true``: the runner publishes after the report; offline that is one line,
    exit 1, with the command to retry, and nothing of the run lost."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "template.py"), "--run.output_dir", str(out),
                           *FAST, "--hub.push_to_hub", "true", "--hub.repo_id", "you/template"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: publishing to you/template failed") and f"athanor publish {out}" in last
    assert (out / "report.json").is_file() and (out / "fit" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("env, threads, expected", [
    ({}, 1, 1), ({}, 0, "every core"),
    ({"OMP_NUM_THREADS": "1", "ACCELERATE_DYNAMO_BACKEND": "NO"}, 0, "every core"),  # `accelerate launch x.py`
    ({"OMP_NUM_THREADS": "1", "ACCELERATE_DYNAMO_BACKEND": "NO", "WORLD_SIZE": "2"}, 0, 1),  # its DDP: cores shared
    ({"OMP_NUM_THREADS": "1"}, 0, 1)])  # the user's own setting
def test_cpu_threads_follow_the_config_unless_the_environment_chose(monkeypatch, env, threads, expected):
    from athanor.runner import every_core, set_cpu_threads

    if torch.cuda.is_available():
        pytest.skip("threads are set on CPU only")
    for key in ("OMP_NUM_THREADS", "ACCELERATE_DYNAMO_BACKEND", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        set_cpu_threads(threads)
        got = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert got == (every_core() if expected == "every core" else expected)
