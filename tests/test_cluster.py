"""SLURM: generated scripts (fast), then real jobs on the local cluster (launch/slurm/local-cluster.sh):
a 2-node CPU job equal to the local ddp-cpu run, a preempted job that requeues and resumes exactly,
exit status, status/cancel, and a sweep as a job array.

The cluster tests start the local cluster when none answers (and stop it afterwards); they skip,
saying why, only when it cannot be started. ATHANOR_REQUIRE_SLURM=1 (CI) turns that skip into a
failure.
"""
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from athanor import cluster
from athanor.engine import read_metrics
from conftest import ROOT, free_port

LOCAL_CLUSTER = ROOT / "launch" / "slurm" / "local-cluster.sh"
# Same tiny run everywhere: two processes (2 nodes x 1, or ddp-cpu's 2 on one machine). Long enough
# (~10 s of steps on an idle machine) that the preemption signal, sent at step 3, lands mid-run.
STEPS = 160
RUN = ["--run.max_steps", str(STEPS), "--model.d_model", "64", "--model.n_layers", "2", "--data.max_chars", "300000",
       "--run.progress", "false", "--run.eval_every", "0"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def athanor(*args, check=False, timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", "athanor.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env or ENV, check=check)


def losses(output_dir):
    return {r["step"]: r["loss"] for r in read_metrics(output_dir) if "loss" in r}


# ---------------------------------------------------------------------- scripts (no cluster needed)

def test_console_script_is_installed():
    assert (Path(sys.executable).parent / "athanor").exists(), "pip install -e . should install `athanor`"


def test_dry_run_multinode_gpu_script():
    proc = athanor("submit", "--nodes", 2, "--gpus-per-node", 8, "--partition", "gpu", "--time", "4:00:00",
                   "--launch-config", "launch/zero3.yaml", "--dry-run", "recipes/pretrain.py", "--optim.lr", "3e-4",
                   "--run.output_dir", "outputs/o3-big")
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    for directive in ("--nodes=2", "--gpus-per-node=8", "--partition=gpu", "--time=4:00:00", "--requeue",
                      "--signal=B:USR1@90", "--ntasks-per-node=1",
                      f"--output={ROOT}/outputs/o3-big/slurm/slurm-%j.out"):
        assert f"#SBATCH {directive}\n" in script, directive
    assert f"--config_file {ROOT}/launch/zero3.yaml --num_processes 16 --num_machines 2" in script
    assert '--machine_rank "$SLURM_NODEID" --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT"' in script
    assert script.rstrip().endswith('exit "$rc"') and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert "--optim.lr 3e-4" in script and "OMP_NUM_THREADS" not in script  # GPU job: no CPU thread split
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid bash


def test_dry_run_cpu_defaults():
    proc = athanor("submit", "--nodes", 2, "--dry-run", "recipes/pretrain.py")
    assert proc.returncode == 0, proc.stderr
    assert f"--config_file {ROOT}/launch/ddp-cpu.yaml --num_processes 2 --num_machines 2" in proc.stdout
    assert f"--output={ROOT}/outputs/slurm/slurm-%j.out" in proc.stdout
    one = athanor("submit", "--dry-run", "recipes/pretrain.py").stdout  # one process: no rendezvous
    assert f"launch/cpu.yaml {ROOT}/recipes/pretrain.py" in one and "--machine_rank" not in one


@pytest.mark.parametrize("args, message", [
    (["submit", "recipes/nope.py"], "recipe not found: recipes/nope.py"),
    (["submit", "--time", "soon", "recipes/pretrain.py"], "--time 'soon'"),
    (["submit", "--launch-config", "launch/nope.yaml", "recipes/pretrain.py"], "launch config not found"),
    (["submit", "--nodes", "0", "recipes/pretrain.py"], "--nodes must be >= 1"),
])
def test_bad_submit_input_exits_2_with_one_line(args, message):
    proc = athanor(*args)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_missing_slurm_is_one_line(tmp_path):
    proc = athanor("submit", "--log-dir", tmp_path, "recipes/pretrain.py", env={**ENV, "PATH": str(tmp_path)})
    assert proc.returncode == 1 and proc.stderr.startswith("error: sbatch not found"), proc.stderr
    assert proc.stderr.count("\n") == 1


def test_exit_status_from_scontrol_record():
    assert cluster.job_exit_status({"JobState": "COMPLETED", "ExitCode": "0:0"}) == 0
    assert cluster.job_exit_status({"JobState": "FAILED", "ExitCode": "2:0"}) == 2
    assert cluster.job_exit_status({"JobState": "CANCELLED", "ExitCode": "0:9"}) == 137
    assert cluster.job_exit_status({"JobState": "CANCELLED", "ExitCode": "0:0"}) == 1


def test_sweep_array_script(tmp_path):
    script = cluster.SlurmExecutor(workers=1, threads_per_worker=2, partition="cpu").script(tmp_path / "jobs.json", 3,
                                                                                              tmp_path)
    assert "#SBATCH --array=0-2%1\n" in script and "#SBATCH --partition=cpu\n" in script
    assert "#SBATCH --cpus-per-task=2\n" in script
    assert f'-m athanor.cluster sweep-task {tmp_path}/jobs.json "$SLURM_ARRAY_TASK_ID" &' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


# ---------------------------------------------------------------------- the local cluster

def _cluster_nodes() -> int:
    if shutil.which("sinfo") is None:
        return 0
    proc = subprocess.run(["sinfo", "-h", "-N", "-t", "idle,mix,alloc", "-o", "%N"], capture_output=True, text=True,
                          timeout=30)
    return len(set(proc.stdout.split())) if proc.returncode == 0 else 0


@pytest.fixture(scope="module")
def slurm():
    """A SLURM with at least two nodes: the running one, or the local cluster started here."""
    started = False
    if _cluster_nodes() < 2:
        reason = None
        if os.geteuid() != 0:
            reason = "SLURM is not running and the local cluster needs root to start"
        else:
            proc = subprocess.run(["bash", str(LOCAL_CLUSTER), "start"], capture_output=True, text=True, timeout=600)
            started = proc.returncode == 0
            if not started or _cluster_nodes() < 2:
                reason = f"SLURM could not be started: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
        if reason:
            if os.environ.get("ATHANOR_REQUIRE_SLURM") == "1":
                pytest.fail(reason)
            pytest.skip(reason)
    yield
    if started:
        subprocess.run(["bash", str(LOCAL_CLUSTER), "stop"], capture_output=True, timeout=120)


def _wait_for_step(output_dir: Path, step: int, job_id: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r.get("step", 0) >= step and "loss" in r for r in read_metrics(output_dir)):
            return
        info = cluster.job_info(job_id)
        assert info is None or info["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), info
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach step {step} in {timeout} s")


@pytest.fixture(scope="module")
def runs(slurm, tmp_path_factory):
    """Three runs of the same tiny config, at once: local ddp-cpu (the reference), a 2-node SLURM
    job (`athanor submit --wait`), and a 2-node job sent SIGUSR1 at step >= 3."""
    tmp = tmp_path_factory.mktemp("slurm-runs")
    local, two_node, preempted = tmp / "local", tmp / "two-node", tmp / "preempted"
    port = free_port()  # ddp-cpu.yaml's fixed one may be taken by another run on this host
    reference = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                  str(ROOT / "launch" / "ddp-cpu.yaml"), "--main_process_port", str(port),
                                  str(ROOT / "recipes" / "pretrain.py"),
                                  *RUN, "--run.output_dir", str(local)], cwd=ROOT, env=ENV,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    submit_args = ["submit", "--nodes", "2", "--cpus-per-task", "1"]
    waiting = subprocess.Popen([sys.executable, "-m", "athanor.cli", *submit_args, "--wait", "recipes/pretrain.py",
                                *RUN, "--run.output_dir", str(two_node)], cwd=ROOT, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    preempted_id = None
    try:
        proc = athanor(*submit_args, "recipes/pretrain.py", *RUN, "--run.output_dir", preempted)
        assert proc.returncode == 0, proc.stderr
        preempted_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
        _wait_for_step(preempted, 3, preempted_id)
        signalled = athanor("cancel", "--signal", "USR1", preempted_id)
        assert signalled.returncode == 0, signalled.stderr
        preempted_info = cluster.wait(preempted_id, poll_s=1, timeout_s=300)
        out = {"local": local, "two_node": two_node, "preempted": preempted, "preempted_id": preempted_id,
               "preempted_info": preempted_info, "waiting_stdout": waiting.communicate(timeout=300)[0],
               "waiting_rc": waiting.returncode, "reference_stdout": reference.communicate(timeout=300)[0]}
    except BaseException:  # leave no process or job behind
        for p in (reference, waiting):
            p.kill()
        if preempted_id:
            athanor("cancel", preempted_id)
        raise
    assert reference.returncode == 0, out["reference_stdout"][-3000:]
    return out


@pytest.mark.slow
def test_two_node_job_equals_local_ddp(runs):
    stdout = runs["waiting_stdout"]
    assert runs["waiting_rc"] == 0 and "ended COMPLETED with exit status 0" in stdout, stdout[-3000:]
    job_id = re.search(r"submitted job (\d+)", stdout).group(1)
    info = cluster.job_info(job_id)
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]", info
    for run in ("two_node", "local"):
        assert json.loads((runs[run] / "report.json").read_text())["world_size"] == 2
    reference = losses(runs["local"])
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert losses(runs["two_node"]) == reference  # bit for bit, not approximately


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes_exactly(runs):
    info, job_id = runs["preempted_info"], runs["preempted_id"]
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    log = (runs["preempted"] / "slurm" / f"slurm-{job_id}.out").read_text()
    assert "SIGUSR1 received" in log and f"requeueing job {job_id}" in log
    resumed = [int(s) for s in re.findall(r"resumed from \S+/checkpoints/step-(\d+) at step \d+", log)]
    assert resumed and len(set(resumed)) == 1 and 3 <= resumed[0] < STEPS, log[-3000:]  # mid-run
    steps = [r["step"] for r in read_metrics(runs["preempted"]) if "loss" in r]
    assert steps == sorted(set(steps)), "redone steps must replace, not duplicate, logged lines"
    assert losses(runs["preempted"]) == losses(runs["local"])
    status = athanor("status", job_id)
    assert status.returncode == 0 and "COMPLETED" in status.stdout and "restarts=1" in status.stdout
    assert f"log={runs['preempted']}/slurm/slurm-{job_id}.out" in status.stdout


@pytest.mark.slow
def test_failed_run_gives_its_exit_status(slurm, tmp_path):
    """A value only the node can find wrong (a batch larger than the corpus it loads): submit's own
    config check passes it, the job fails (accelerate launch reports the recipe's exit 2 as 1) with the
    recipe's one line in its log."""
    proc = athanor("submit", "--wait", "--log-dir", tmp_path, "recipes/pretrain.py", *TINY, "--data.batch_size",
                   "100000", "--run.output_dir", tmp_path / "run", timeout=300)
    assert proc.returncode == 1 and "ended FAILED with exit status 1" in proc.stdout, proc.stdout + proc.stderr
    (log,) = tmp_path.glob("slurm-*.out")
    assert "data.batch_size=100000 is more than the" in log.read_text()  # the recipe's own one-line error


def test_submit_refuses_a_bad_recipe_value_before_writing_a_script(tmp_path):
    proc = athanor("submit", "--log-dir", tmp_path, "recipes/pretrain.py", "--optim.lrr", "1")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "unknown config key 'optim.lrr'" in proc.stderr and not list(tmp_path.iterdir())  # no script


@pytest.mark.slow
def test_cancel_and_status_of_a_queued_job(slurm, tmp_path):
    proc = athanor("submit", "--log-dir", tmp_path, "--sbatch-arg=--begin=now+1hour", "recipes/pretrain.py")
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    assert "PENDING" in athanor("status", job_id).stdout
    assert job_id in athanor("status").stdout  # the user's queue
    assert athanor("cancel", job_id).returncode == 0
    assert cluster.wait(job_id, poll_s=0.5, timeout_s=60)["JobState"] == "CANCELLED"


@pytest.mark.slow
def test_sweep_runs_as_a_job_array(slurm, tmp_path):
    sweep = pytest.importorskip("athanor.sweep", reason="the sweep runner (athanor/sweep.py) is not in this checkout")
    cluster.register_sweep_executor()

    tiny = ["--run.max_steps", "3", "--model.d_model", "32", "--model.n_layers", "1", "--data.max_chars", "100000",
            "--run.progress", "false", "--data.eval_batches", "1"]
    jobs = [sweep.Job(name=f"lr{lr}", root=str(tmp_path), script="", paper="athanor.methods.pretrain",
                argv=["--optim.lr", str(lr), "--run.output_dir", str(tmp_path / f"lr{lr}"), *tiny])
            for lr in (1e-3, 1e-2)]
    executor = sweep.make_executor("slurm", workers=2, threads_per_worker=1)  # as --sweep.executor slurm would
    executor.poll_s = 0.5
    result = sweep.run_sweep(jobs, executor, progress=False)
    assert not result.failed, [o.error for o in result.failed]
    finals = {name: o.result["final_eval_loss"] for name, o in result.outcomes.items()}
    assert len(set(finals.values())) == 2  # two different runs, each with its own result
    assert len(list((tmp_path / "slurm").glob("sweep-*_*.out"))) == 2  # one array task per run
    again = sweep.run_sweep(jobs, executor, progress=False)
    assert again.skipped == 2  # finished runs are recognised, not resubmitted


TINY = ["--run.max_steps", "2", "--model.d_model", "32", "--model.n_layers", "1", "--data.max_chars", "100000",
        "--data.eval_batches", "1", "--run.progress", "false", "--run.eval_every", "0"]


@pytest.mark.slow
def test_job_whose_paths_hold_a_space_and_quotes(slurm, tmp_path):
    """#SBATCH --output/--chdir once went into the script unquoted: sbatch cut the path at the
    space (the log went elsewhere, the job could not enter its folder)."""
    output_dir = tmp_path / "out dir \"q'#x"
    workdir = tmp_path / "work dir 'w\""
    workdir.mkdir()
    proc = subprocess.run([sys.executable, "-m", "athanor.cli", "submit", "--wait", str(ROOT / "recipes" / "pretrain.py"),
                           *TINY, "--run.output_dir", str(output_dir)], cwd=workdir, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "ended COMPLETED with exit status 0" in proc.stdout, proc.stdout + proc.stderr
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    log = output_dir / "slurm" / f"slurm-{job_id}.out"
    assert log.is_file() and "athanor: exit 0" in log.read_text(), list(tmp_path.rglob("*.out"))
    assert (output_dir / "report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([output_dir.name, workdir.name])  # nothing beside


@pytest.mark.slow
def test_local_cluster_starts_and_stops_only_its_own_daemons(slurm):
    """A second, one-node cluster in its own state folder and ports: it comes up, and stopping it
    stops its daemons only (the cluster the other tests use keeps running)."""
    # munged wants every folder above its socket searchable by all, which pytest's tmp_path is not
    state = Path(tempfile.mkdtemp(prefix="athanor-slurm-test-"))
    state.chmod(0o755)
    env = {**os.environ, "ATHANOR_SLURM_DIR": str(state), "ATHANOR_SLURM_NODES": "1",
           "ATHANOR_SLURM_PORT": str(free_port())}
    started = subprocess.run(["bash", str(LOCAL_CLUSTER), "start"], capture_output=True, text=True, timeout=300,
                             env=env)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        assert stat.S_IMODE(state.stat().st_mode) == 0o755 and not state.is_symlink()
        conf = {**env, "SLURM_CONF": str(state / "etc" / "slurm.conf")}
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, env=conf,
                               timeout=60)
        assert nodes.stdout.split() == ["n1", "idle"], nodes.stdout + nodes.stderr
        pids = [int(p.read_text()) for p in (state / "run").glob("*.pid")]
        assert len(pids) == 3  # munged, slurmctld, one slurmd
    finally:
        stopped = subprocess.run(["bash", str(LOCAL_CLUSTER), "stop"], capture_output=True, text=True, timeout=120,
                                 env=env)
    shutil.rmtree(state, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stderr
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert _cluster_nodes() >= 2  # the shared cluster is untouched
