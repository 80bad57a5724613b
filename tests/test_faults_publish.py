"""Publishing and the run folder (issue 20, item 3): publish reads nothing outside the run folder
(symbolic links in model/, in a checkpoint, anywhere, are skipped with one line), every Hub call has
a total deadline, and a read-only run folder still publishes (staged elsewhere).

Each test failed on the code before the fix: the linked file's marker reached the fake Hub's
commit; the trickling Hub held publish for as long as it kept trickling (each read within the
per-request timeout); the read-only folder ended in an OSError traceback."""
import base64
import errno
import gzip
import io
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from athanor import hub
from conftest import ROOT

REPO = "me/tiny"
TOKEN = "hf_NotARealTokenButLongEnough123"
MARKER = "OUTSIDE-THE-RUN-7f3a9c"  # in a file outside the run folder: must never reach the Hub


def cli(*args, timeout=120, **env):
    return subprocess.run([sys.executable, "-m", "athanor.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


@pytest.fixture
def run_dir(tmp_path):
    """A finished run (a saved model, a verified checkpoint, config, report) and, beside it, a file
    holding MARKER, linked into the run from several places."""
    from athanor.engine import checkpoint as ckpt

    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    save_file({"w": torch.zeros(2)}, out / "model" / "model.safetensors")
    step = out / "checkpoints" / "step-4"
    step.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, step / "model-model.safetensors")
    (step / "trainer_state.json").write_text(json.dumps({"step": 4, "world_size": 1, "history": {}, "schedules": {},
                                                          "accumulation_counter": 0, "scaler": None}))
    ckpt.write_manifest(step)
    (out / "config.yaml").write_text("run:\n  seed: 0\n")
    (out / "report.json").write_text(json.dumps({"final_eval_loss": 2.5, "steps": 4}))
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text(f"private notes {MARKER}\n")
    (secret.parent / "sub").mkdir()
    (secret.parent / "sub" / "more.txt").write_text(MARKER)
    return out, secret


def plant_links(out: Path, secret: Path) -> None:
    (out / "model" / "notes.txt").symlink_to(secret)  # a file link in the main model
    (out / "model" / "vocab").symlink_to(secret.parent / "sub")  # a folder link in it
    (out / "report.md").symlink_to(secret)  # a run file
    (out / "loss.png").symlink_to(secret)  # a plot
    (out / "extra").symlink_to(secret.parent, target_is_directory=True)  # a folder publish would visit


def everything_in(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


def test_links_are_skipped_with_one_line_and_nothing_outside_is_staged(run_dir, tmp_path, capsys):
    out, secret = run_dir
    plant_links(out, secret)
    stage, card = hub.build_upload_folder(out, REPO, tmp_path / "stage", include_checkpoint=True)
    assert MARKER.encode() not in everything_in(stage) and MARKER not in str(card)
    assert not any(p.is_symlink() for p in stage.rglob("*"))
    assert (stage / "model.safetensors").is_file()  # the run's own files are all there
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("warning: publish skipped") and "model/notes.txt" in err[0], err
    assert secret.read_text() == f"private notes {MARKER}\n"  # the outside file is untouched


def test_a_link_inside_the_included_checkpoint_is_skipped(run_dir, tmp_path, monkeypatch):
    """Were a checkpoint with a link in it to verify (its manifest is the checkpoint code's
    business), publish still copies only its regular files."""
    from athanor.engine import checkpoint as ckpt

    out, secret = run_dir
    step = out / "checkpoints" / "step-4"
    (step / "notes.txt").symlink_to(secret)
    monkeypatch.setattr(ckpt, "latest_verified_checkpoint", lambda _: step)
    stage, _ = hub.build_upload_folder(out, REPO, tmp_path / "stage", include_checkpoint=True)
    assert (stage / "checkpoint" / "step-4" / "model-model.safetensors").is_file()
    assert MARKER.encode() not in everything_in(stage)


def test_a_linked_checkpoints_folder_is_refused(run_dir, tmp_path):
    out, secret = run_dir
    (out / "checkpoints").rename(secret.parent / "checkpoints")
    (out / "checkpoints").symlink_to(secret.parent / "checkpoints")
    try:
        stage, _ = hub.build_upload_folder(out, REPO, tmp_path / "stage", include_checkpoint=True)
    except hub.PublishInputError as e:  # refused (here, or as a checkpoint that does not verify)
        assert "link" in str(e) or "checkpoint" in str(e)
    else:
        assert not (stage / "checkpoint").exists()


# ---------------------------------------------------------------------- a local fake Hub


class FakeHub(BaseHTTPRequestHandler):
    """Enough of the Hub's HTTP API for ``upload_folder``: every file goes as a regular (inline)
    blob in the commit, and every request body is kept. ``server.trickle`` makes it answer one
    byte at a time, forever."""

    def _body(self) -> bytes:
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        return gzip.decompress(data) if self.headers.get("Content-Encoding") == "gzip" else data

    def _answer(self):
        body = self._body()
        self.server.received.append((self.command, self.path, body))
        if self.server.trickle:
            return self._trickle()
        if self.path == "/api/repos/create":
            answer = {"url": f"{self.server.endpoint}/{REPO}", "name": REPO}
        elif "/preupload/" in self.path:
            files = json.loads(body)["files"]
            answer = {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        elif "/commit/" in self.path:
            answer = {"commitUrl": f"{self.server.endpoint}/{REPO}/commit/{'a' * 40}", "commitOid": "a" * 40}
        else:
            answer = {}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _trickle(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            while not self.server.stopping:
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.5)  # well within the per-read timeout, forever
        except OSError:
            pass

    do_GET = do_POST = do_PUT = do_HEAD = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.daemon_threads = True
    server.received, server.trickle, server.stopping = [], False, False
    server.endpoint = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.stopping = True
    server.shutdown()
    server.server_close()


def committed_files(server) -> dict[str, bytes]:
    """The files of the commit the fake Hub received, decoded."""
    files = {}
    for _, path, body in server.received:
        if "/commit/" not in path:
            continue
        for line in body.splitlines():
            item = json.loads(line)
            if item.get("key") == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
    return files


def test_a_linked_file_never_reaches_the_hubs_commit(run_dir, fake_hub):
    out, secret = run_dir
    plant_links(out, secret)
    proc = cli("publish", out, "--repo-id", REPO, "--include-checkpoint", HF_HUB_OFFLINE="0", HF_TOKEN=TOKEN,
               HF_ENDPOINT=fake_hub.endpoint)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = committed_files(fake_hub)
    assert "model.safetensors" in files and "README.md" in files, sorted(files)  # the upload happened
    assert not any(MARKER.encode() in data for data in files.values())
    assert not any(MARKER.encode() in body for _, _, body in fake_hub.received)  # nor anywhere else
    assert "notes.txt" not in files and "report.md" not in files
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: publish skipped")]
    assert len(warnings) == 1, proc.stderr


def test_a_hub_that_answers_one_byte_at_a_time_meets_the_deadline(run_dir, fake_hub):
    """Each byte comes well within ATHANOR_HUB_TIMEOUT, so only a deadline on the whole call ends it."""
    out, _ = run_dir
    fake_hub.trickle = True
    started = time.monotonic()
    proc = cli("publish", out, "--repo-id", REPO, timeout=150, HF_HUB_OFFLINE="0", HF_TOKEN=TOKEN,
               HF_ENDPOINT=fake_hub.endpoint, ATHANOR_HUB_TIMEOUT="5", ATHANOR_HUB_DEADLINE="3")
    elapsed = time.monotonic() - started
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: the Hub at {fake_hub.endpoint}: creating the repository did not finish "
                               f"within 3 s"), lines[0]
    assert elapsed < 90  # imports on a loaded machine + the 3 s deadline


def test_the_deadline_bounds_a_call_from_any_thread():
    from athanor.hub_http import HubDeadline, with_deadline

    os.environ["ATHANOR_HUB_DEADLINE"] = "0.5"
    try:
        started = time.monotonic()
        with pytest.raises(HubDeadline):
            with_deadline(lambda: time.sleep(30), "sleeping")
        assert time.monotonic() - started < 5
        assert with_deadline(lambda: 7, "answering") == 7
        with pytest.raises(KeyError):  # the call's own error comes back as it was
            with_deadline(lambda: {}["x"], "failing")
    finally:
        del os.environ["ATHANOR_HUB_DEADLINE"]


# ---------------------------------------------------------------------- a read-only run folder


@pytest.fixture
def read_only(monkeypatch):
    """Make writes under a folder fail as a read-only file system does (EROFS). As root, chmod
    does not stop writes, so the file-system calls publish makes are refused instead."""
    holder = {}

    def refuse(path):
        root = holder.get("root")
        if root is not None and Path(os.path.abspath(path)).is_relative_to(root):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    real_mkdir, real_link, real_open = os.mkdir, os.link, io.open

    def mkdir(path, *a, **k):
        refuse(path)
        return real_mkdir(path, *a, **k)

    def link(src, dst, *a, **k):
        refuse(dst)
        return real_link(src, dst, *a, **k)

    def open_(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr("builtins.open", open_)
    return holder


def test_a_read_only_run_folder_publishes_from_a_temporary_folder(run_dir, read_only, capsys):
    out, _ = run_dir
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    read_only["root"] = out.resolve()
    stage, card = hub.build_upload_folder(out, REPO)
    read_only["root"] = None
    assert not stage.is_relative_to(out.resolve()) and (stage / "model.safetensors").is_file()
    assert (stage / "README.md").is_file() and (stage / "training_config.yaml").is_file()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "is not writable: the upload folder is built in" in err[0], err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing changed


def test_a_read_only_staging_folder_asked_for_is_one_line(run_dir, read_only, tmp_path):
    out, _ = run_dir
    read_only["root"] = (tmp_path / "ro").resolve()
    with pytest.raises(hub.PublishInputError, match="cannot make the upload folder"):
        hub.build_upload_folder(out, REPO, tmp_path / "ro" / "stage")
