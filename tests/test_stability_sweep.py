"""The sweep runner (athanor.sweep) on toy jobs, and the stability recipe end to end."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from athanor.sweep import InlineExecutor, Job, LocalExecutor, expand_grid, make_executor, run_sweep
from conftest import ROOT, run_recipe

TOY_SCRIPT = textwrap.dedent("""
    import os, sys, time
    def main(argv):
        mode, value = argv
        if mode == "fail":
            raise RuntimeError("boom")
        if mode == "crash":
            os._exit(3)  # dies without a word, like an out-of-memory kill
        if mode == "exit":
            sys.exit(2)  # a recipe's own exit (bad config): the worker leaves after reporting it
        time.sleep(float(value) / 10)
        return {"value": int(value), "pid": os.getpid(), "threads": os.environ.get("OMP_NUM_THREADS")}
""")


def toy_jobs(tmp_path, modes):
    script = tmp_path / "toy.py"
    script.write_text(TOY_SCRIPT)
    root = tmp_path / "sweep"
    return [Job(f"job{i}/{mode}", str(root), str(script), [mode, str(i)], cost=i) for i, mode in enumerate(modes)]


def test_expand_grid_is_the_cartesian_product_first_axis_slowest():
    grid = expand_grid({"variant": ["a", "b"], "width": [1, 2, 3]})
    assert len(grid) == 6 and grid[0] == {"variant": "a", "width": 1} and grid[3] == {"variant": "b", "width": 1}


def test_inline_sweep_records_results_and_skips_finished_jobs(tmp_path):
    jobs = toy_jobs(tmp_path, ["ok", "ok", "fail", "ok"])
    first = run_sweep(jobs, InlineExecutor(), progress=False)
    assert [o.ok for o in first.outcomes.values()] == [True, True, False, True]
    assert "RuntimeError: boom" in first.failed[0].error
    assert first.outcomes["job3/ok"].result["value"] == 3
    assert json.loads((jobs[3].output_dir / "STAGE.json").read_text())["result"]["value"] == 3  # the runner's stage format
    stamp = (jobs[0].output_dir / "STAGE.json").stat().st_mtime_ns
    again = run_sweep(jobs, InlineExecutor(), progress=False)
    assert again.skipped == 3 and again.ran == 1  # only the failed job runs again
    assert (jobs[0].output_dir / "STAGE.json").stat().st_mtime_ns == stamp
    assert again.outcomes["job0/ok"].result == first.outcomes["job0/ok"].result


def test_local_workers_survive_failures_and_replace_a_dead_worker(tmp_path):
    jobs = toy_jobs(tmp_path, ["ok", "fail", "crash", "ok", "ok", "ok"])
    executor = make_executor("local", workers=2, threads_per_worker=1, devices=[])
    assert isinstance(executor, LocalExecutor)
    result = run_sweep(jobs, executor, progress=False)
    outcomes = result.outcomes
    assert [outcomes[j.name].ok for j in jobs] == [True, False, False, True, True, True]
    assert "boom" in outcomes["job1/fail"].error and "code 3" in outcomes["job2/crash"].error
    pids = {outcomes[j.name].result["pid"] for j in jobs if outcomes[j.name].ok}
    assert os.getpid() not in pids and len(pids) <= 3  # two workers, plus one replacing the crashed one
    assert all(outcomes[j.name].result["threads"] == "1" for j in jobs if outcomes[j.name].ok)
    assert (jobs[0].output_dir / "log.txt").exists()


TINY = ["--run.max_steps", "12", "--sweep.head_dim", "8", "--data.max_chars", "120000", "--data.eval_batches", "2",
        "--data.batch_size", "8", "--data.block_size", "32", "--run.log_every", "4",
        "--sweep.seeds", "[0]", "--sweep.table_width", "0"]  # one seed, every variant at every width


@pytest.mark.slow
def test_two_by_two_by_two_sweep_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    proc = run_recipe("stability", "--run.output_dir", str(out), "--sweep.variants", "[baseline,qk_layernorm]",
                      "--sweep.widths", "[8,16]", "--sweep.lrs", "[0.01,0.3]", "--logz_demo.steps", "16",
                      "--logz_demo.z_loss_weights", "[0.0,0.0001]", *TINY)
    assert "sweep: 10 run(s) now, 0 finished earlier, 0 failed" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert len(report["runs"]) == 8
    assert {(r["variant"], r["width"], r["lr"]) for r in report["runs"]} == \
        {(v, w, lr) for v in ("baseline", "qk_layernorm") for w in (8, 16) for lr in (0.01, 0.3)}
    for r in report["runs"]:
        assert set(r) >= {"variant", "width", "depth", "lr", "final_eval_loss", "max_attn_logit", "max_log_z", "diverged"}
        assert isinstance(r["diverged"], bool)
    assert set(report["lr_sensitivity"]) == {"baseline", "qk_layernorm"}
    assert set(report["lr_sensitivity"]["baseline"]) == {"8", "16"}
    assert all(v["mean"] >= 0 and v["per_seed"] == [v["mean"]] for row in report["lr_sensitivity"].values()
               for v in row.values())
    assert [d["z_loss_weight"] for d in report["logz_demo"]] == [0.0, 0.0001]
    for png in ("loss_vs_lr.png", "max_attn_logit_high_lr.png", "log_z_demo.png"):
        assert (out / png).stat().st_size > 1000, png
    assert "LR sensitivity" in (out / "report.md").read_text()
    # each point is an ordinary pretrain run: its own folder, config, metrics with the probes
    point = out / "qk_layernorm" / "w16_L2" / "lr3e-01"
    config = (point / "config.yaml").read_text()
    assert "d_model: 16" in config and "qk_layernorm: true" in config and "lr: 0.3" in config
    row = [json.loads(line) for line in (point / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"max_attn_logit", "attn_entropy", "act_rms", "grad_rms", "log_z_mean", "diverged"} <= set(row)
    assert (point / "model" / "config.json").exists() and not (point / "checkpoints").exists()


def run_stability(argv):
    from athanor.methods import stability
    from athanor.runner import run

    return run(stability.PAPER, argv)


@pytest.mark.parametrize("argv, fragment", [
    (["--sweep.variants", "[baseline,nope]"], "nope"),
    (["--sweep.custom_variants", "{odd: {optim.nothing: 1}}", "--sweep.variants", "[odd]"], "optim.nothing"),
    (["--sweep.widths", "[48]"], "head_dim"),
])
def test_bad_override_exits_2_with_one_line_before_compute(tmp_path, capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        run_stability(["--run.output_dir", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and fragment in err[0]
    assert not (tmp_path / "o").exists()


def test_a_folder_run_with_other_settings_is_refused(tmp_path, capsys):
    from athanor.config import load_config
    from athanor.methods import stability

    small = ["--run.output_dir", str(tmp_path), *TINY, "--sweep.widths", "[8]", "--logz_demo.enabled", "false"]

    def jobs(*argv):
        cfg = load_config(stability.StabilityConfig, [*small, *argv])
        return stability.make_jobs(cfg, stability.sweep_points(cfg))

    first = jobs()
    assert [j.name for j in jobs()] == [j.name for j in first]  # same settings: the same jobs again
    with pytest.raises(SystemExit) as exit_info:
        run_stability([*small, "--optim.eps", "1e-12"])
    assert exit_info.value.code == 2 and "run with other settings" in capsys.readouterr().err


def children_of(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return kids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's reaping is missing


@pytest.mark.slow
def test_killed_sweep_resumes_without_redoing_finished_runs(tmp_path):
    out = tmp_path / "sweep"
    args = ["--run.output_dir", str(out), "--sweep.variants", "[baseline]", "--sweep.widths", "[8]",
            "--sweep.lrs", "[0.001,0.003,0.01,0.03,0.1,0.3]", "--logz_demo.enabled", "false", *TINY]
    cmd = [sys.executable, str(ROOT / "recipes" / "stability.py"), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list(out.glob("*/*/*/STAGE.json")):
        time.sleep(0.1)
    workers = children_of(proc.pid)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: the workers must notice by themselves
    proc.wait()
    deadline = time.time() + 90
    while time.time() < deadline and any(alive(pid) for pid in workers):
        time.sleep(0.2)
    assert workers and not any(alive(pid) for pid in workers), "orphaned workers must stop"
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*/*/*/STAGE.json")}
    assert 1 <= len(finished) < 6, "the sweep must be killed midway"
    resumed = run_recipe("stability", *args)
    assert f"{6 - len(finished)} run(s) now, {len(finished)} finished earlier, 0 failed" in resumed.stdout
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in finished.items())  # not redone
    assert len(json.loads((out / "report.json").read_text())["runs"]) == 6


def test_gpu_config_scales_the_same_recipe(tmp_path):
    """recipes/configs/stability/gpu.yaml: widths to 2048, the paper's 256 x 512-token batches; every
    point validates as a pretrain config."""
    from athanor.config import load_config
    from athanor.methods import stability

    cfg = load_config(stability.StabilityConfig, ["--config", str(ROOT / "recipes/configs/stability/gpu.yaml"),
                                               "--run.output_dir", str(tmp_path)])
    assert max(cfg.sweep.widths) >= 1024 and cfg.data.block_size == 512
    assert cfg.data.batch_size * cfg.engine.grad_accum == 256 and len(cfg.sweep.devices) == cfg.sweep.workers
    points = stability.sweep_points(cfg)
    jobs = stability.make_jobs(cfg, points)
    assert len(jobs) == len(cfg.sweep.variants) * len(cfg.sweep.widths) * len(cfg.sweep.lrs) * len(cfg.sweep.seeds) \
        + len(cfg.logz_demo.z_loss_weights)
    assert len(cfg.sweep.seeds) >= 2 and "coupled_wd" in cfg.sweep.variants
    widest = next(p for p in points if p["width"] == 2048)["config"]["model"]
    assert (widest["n_layers"], widest["n_heads"]) == (12, 32)
    assert stability.sweep_executor(cfg).threads == cfg.engine.cpu_threads == 4  # one thread setting: engine.cpu_threads
    slurm = load_config(stability.StabilityConfig, ["--sweep.executor", "slurm", "--sweep.workers", "16",
                                                    "--engine.cpu_threads", "3"])
    executor = stability.sweep_executor(slurm)
    assert type(executor).__name__ == "SlurmExecutor" and executor.workers == 16  # athanor.cluster plugs in
    assert executor.threads_per_worker == 3


def test_sweep_workers_take_their_threads_from_engine_cpu_threads():
    """No sweep-specific thread knob: engine.cpu_threads (0: the cores shared among the workers)."""
    from athanor.config import ConfigError, load_config
    from athanor.methods import stability

    assert stability.sweep_executor(load_config(stability.StabilityConfig, [])).threads == 1  # the default: one
    cfg = load_config(stability.StabilityConfig, ["--engine.cpu_threads", "0", "--sweep.workers", "2"])
    assert stability.worker_threads(cfg) == max(1, (os.cpu_count() or 1) // 2)
    with pytest.raises(ConfigError, match="threads_per_worker"):  # the old key is gone, not silently ignored
        load_config(stability.StabilityConfig, ["--sweep.threads_per_worker", "2"])


def test_jobs_that_exit_do_not_use_up_the_workers(tmp_path):
    """Every worker whose job called sys.exit leaves; replacements must run the remaining jobs."""
    jobs = toy_jobs(tmp_path, ["exit", "exit", "exit", "ok", "ok"])
    result = run_sweep(jobs, make_executor("local", workers=2, threads_per_worker=1, devices=[]), progress=False)
    assert [result.outcomes[j.name].ok for j in jobs] == [False, False, False, True, True]
    assert all("stopped (exit 2)" in result.outcomes[j.name].error for j in jobs[:3])


def test_a_point_that_diverges_to_nan_is_a_diverged_result_not_a_failed_job(tmp_path):
    """The engine stops a run at a non-finite gradient (exit 3); in an LR sweep that is an outcome:
    the point is recorded as diverged (final eval loss inf) with the engine's one line."""
    argv = ["--optim.lr", "1e6", "--optim.grad_clip", "0", "--run.max_steps", "6", "--run.progress", "false",
            "--data.max_chars", "20000", "--data.block_size", "32", "--data.batch_size", "4",
            "--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2"]
    job = Job("lr1e6", str(tmp_path), "", [*argv, "--run.output_dir", str(tmp_path / "lr1e6")],
              paper="athanor.methods.pretrain")
    sweep = run_sweep([job], InlineExecutor(), progress=False)
    outcome = sweep.outcomes["lr1e6"]
    assert outcome.ok and not sweep.failed
    assert outcome.result["diverged"] and outcome.result["final_eval_loss"] == float("inf")
    assert "non-finite" in outcome.result["nonfinite"]
    assert outcome.result["initial_eval_loss"] > 0
    assert not list((tmp_path / "lr1e6").glob("checkpoints/step-*"))  # nothing non-finite saved
