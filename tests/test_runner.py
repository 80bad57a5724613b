"""The runner (athanor.runner) on the template paper: end to end, skipping finished stages, exact
resume mid-fit, a bad value before compute, and publishing the result (dry run, offline)."""
import json
import os
import subprocess
import sys

import pytest

from athanor.data.batches import ShuffledBatches
from athanor.engine import read_metrics
from athanor.methods import template
from athanor.runner import run
from conftest import ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
FAST = ["--run.progress", "false", "--run.max_steps", "120", "--run.save_every", "25", "--run.log_every", "1"]


def losses(folder) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(folder) if "loss" in r}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("template") / "run"
    return out, run(template.PAPER, ["--run.output_dir", str(out), *FAST])


def test_runs_end_to_end_and_learns_the_weights(finished):
    out, report = finished
    assert report["steps"] == 120
    assert report["held_out_mse"] < 2 * report["noise_floor"]  # held-out rows: the fit is near the noise floor
    assert report["weight_error"] < 0.1
    assert json.loads((out / "report.json").read_text())["held_out_mse"] == report["held_out_mse"]
    assert (out / "fit" / "model" / "config.json").is_file() and (out / "fit" / "model" / "model.safetensors").is_file()
    for stage in ("fit", "evaluate"):
        assert json.loads((out / stage / "STAGE.json").read_text())["stage"] == stage


def test_a_second_run_skips_finished_stages(finished):
    out, report = finished
    markers = {p: p.stat().st_mtime_ns for p in out.glob("*/STAGE.json")}
    metrics = (out / "fit" / "metrics.jsonl").read_text()
    again = run(template.PAPER, ["--run.output_dir", str(out), *FAST])
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in report.items() if k != "seconds"}
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/STAGE.json")} == markers  # nothing re-ran
    assert (out / "fit" / "metrics.jsonl").read_text() == metrics


class NodeLost(RuntimeError):
    pass


def test_a_fit_that_dies_midway_resumes_exactly(finished, tmp_path, monkeypatch):
    """A crash at step 60 (no checkpoint of its own): the next run resumes from step 50's checkpoint
    and every step's loss equals the uninterrupted run's."""
    out, _ = finished
    crashed = tmp_path / "crashed"

    class DiesAtStep60(ShuffledBatches):
        served = 0

        def __next__(self):
            DiesAtStep60.served += 1
            if DiesAtStep60.served > 60:
                raise NodeLost("the node went away")
            return super().__next__()

    monkeypatch.setattr(template.stages, "ShuffledBatches", DiesAtStep60)  # where fit_stage finds it
    with pytest.raises(NodeLost):
        run(template.PAPER, ["--run.output_dir", str(crashed), *FAST])
    assert not (crashed / "fit" / "STAGE.json").exists() and max(losses(crashed / "fit")) == 60
    monkeypatch.undo()
    resumed = run(template.PAPER, ["--run.output_dir", str(crashed), *FAST])
    assert losses(crashed / "fit") == losses(out / "fit")  # steps 1..120, bit for bit
    assert sorted(p.name for p in (crashed / "fit" / "checkpoints").iterdir())[-1] == "step-120"
    assert resumed["steps"] == 120


def test_bad_value_exits_2_with_one_line_before_compute(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(template.PAPER, ["--run.output_dir", str(tmp_path / "o"), "--data.batch_size", "4096"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(err) == 1 and "data.batch_size" in err[0]
    assert not (tmp_path / "o").exists()


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
