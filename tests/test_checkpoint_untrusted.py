"""A checkpoint folder is untrusted input (issue 20, item 2).

Each case tampers with the newest checkpoint (step-4) of a run in one way: the manifest (absolute
paths, ``..``, ``"files": {}`` or ``[]``, an entry without sha256, a bare number, an unlisted file),
symlinks (inside the folder, or the folder itself), or content whose manifest was recomputed (a
step that is not a number, an unknown RNG version, a missing tensor key, a 2^62 header length, a
truncated file, another dtype or shape, a state the method refuses). Every one must be skipped
with one line naming it, and the run must resume from step-2 and end exactly as an uninterrupted
run does; nothing outside the run folder may be opened, and a marker written outside it must not
reach anything loaded or written. Pruning must not delete a checkpoint newer than the one resumed.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from athanor.config import OptimConfig, RunConfig, TrainConfig
from athanor.data import ShuffledBatches
from athanor.engine import Engine, Method, read_metrics
from athanor.engine import checkpoint as ckpt
from conftest import ROOT, free_port

MARKER = "MARKER-7f3c91d2-outside-the-run-folder"


class Noisy(Method):
    """A linear model fed noise from the method's own generator; its state also holds a count and
    a note, which ``load_state_dict`` keeps (so a test can see what was loaded)."""

    def setup(self, engine):
        self.engine = engine
        torch.manual_seed(0)
        self.model = engine.register("model", nn.Linear(4, 1))
        self.rng = torch.Generator().manual_seed(7)
        self.seen, self.loaded = 0, None

    def train_step(self, batch):
        noisy = batch + 0.1 * torch.randn(batch.shape, generator=self.rng)
        loss = (self.model(noisy) - 1).pow(2).mean()
        self.engine.optimize("model", loss)
        self.seen += 1
        return {"loss": loss.detach()}

    def state_dict(self):
        return {"rng": self.rng.get_state(), "seen": self.seen, "note": "mine"}

    def load_state_dict(self, state):
        self.rng.set_state(state["rng"])
        self.seen = state["seen"]
        self.loaded = state


def run(output_dir, max_steps, keep_last=5):
    cfg = TrainConfig(run=RunConfig(output_dir=str(output_dir), max_steps=max_steps, save_every=2,
                                    keep_last=keep_last, progress=False),
                      optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"))
    engine = Engine(cfg)
    method = Noisy()
    method.setup(engine)
    engine.fit(method, ShuffledBatches(torch.randn(64, 4, generator=torch.Generator().manual_seed(1)), 8, 0))
    return engine, method


def loss_rows(output_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(output_dir) if "loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    run(out, 6)
    return loss_rows(out)


# ------------------------------------------------------------------------------ watching what is opened
OPENED: list[str] = []
WATCHING: list[bool] = []


def _audit(event, args):
    if WATCHING and event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes)):
        OPENED.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only while a test watches


# ------------------------------------------------------------------------------ tampering
def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_json(path, change):
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def with_marker(source, target):
    """A copy of a state JSON file with the marker put in as the note / an extra field."""
    state = json.loads(source.read_text())
    state["note"] = MARKER
    target.write_text(json.dumps(state))
    return target


def manifest_entry_outside(folder, outside, absolute):
    secret = with_marker(folder / "rank0" / "method.json", outside / "method.json")
    name = str(secret) if absolute else os.path.relpath(secret, folder)
    edit_json(folder / ckpt.MANIFEST, lambda m: {**m, "files": {
        **m["files"], name: {"bytes": secret.stat().st_size, "sha256": sha256(secret)}}})


def symlink_inside(folder, outside):
    secret = with_marker(folder / "rank0" / "method.json", outside / "method.json")
    (folder / "rank0" / "method.json").unlink()
    (folder / "rank0" / "method.json").symlink_to(secret)
    ckpt.write_manifest(folder)  # as one who planted it would: the manifest matches


def symlinked_folder(folder, outside):
    real = outside / "step-4"
    shutil.move(str(folder), real)
    with_marker(real / "rank0" / "method.json", real / "rank0" / "method.json")
    ckpt.write_manifest(real)
    folder.symlink_to(real, target_is_directory=True)


OUTSIDE = {
    "absolute manifest entry": lambda f, o: manifest_entry_outside(f, o, absolute=True),
    "../ manifest entry": lambda f, o: manifest_entry_outside(f, o, absolute=False),
    "symlink inside": symlink_inside,
    "symlinked step folder": symlinked_folder,
}


def rewrite_weights(folder, change):
    path = folder / "model-model.safetensors"
    save_file(change(load_file(str(path))), str(path))


def set_header_length(path, length):
    raw = path.read_bytes()
    path.write_bytes(length.to_bytes(8, "little") + raw[8:])


def truncate(path, by=10):
    path.write_bytes(path.read_bytes()[:-by])


def unlisted_file(folder):
    (folder / "extra.txt").write_text("not in the manifest")


def files_empty_dict(folder):
    edit_json(folder / ckpt.MANIFEST, lambda m: {**m, "files": {}})
    truncate(folder / "model-model.safetensors")


def first_entry_without_sha256(manifest):
    name = sorted(manifest["files"])[0]
    return {**manifest, "files": {**manifest["files"], name: {"bytes": manifest["files"][name]["bytes"]}}}


def schedule_with_foreign_field(state):
    state["schedules"]["model"]["optimizer"] = 1  # LambdaLR.load_state_dict would set any attribute
    return state


# Manifest and folder cases (not re-hashed: the manifest is what is wrong).
MANIFEST_CASES = {
    "files empty dict": files_empty_dict,
    "files a list": lambda f: edit_json(f / ckpt.MANIFEST, lambda m: {**m, "files": []}),
    "entry without sha256": lambda f: edit_json(f / ckpt.MANIFEST, first_entry_without_sha256),
    "entry a bare number": lambda f: edit_json(f / ckpt.MANIFEST, lambda m: {**m, "files": dict.fromkeys(m["files"], 5)}),
    "manifest a bare number": lambda f: (f / ckpt.MANIFEST).write_text("5"),
    "unlisted file": unlisted_file,
}
# Content cases: the files are changed and the manifest recomputed, so it verifies.
CONTENT_CASES = {
    "step not a number": lambda f: edit_json(f / "trainer_state.json", lambda s: {**s, "step": "four"}),
    "trainer state a bare number": lambda f: (f / "trainer_state.json").write_text("7"),
    "unknown rng version": lambda f: edit_json(f / "rank0" / "rng.json",
                                                lambda s: {**s, "python": {**s["python"], "version": 99}}),
    "missing weight": lambda f: rewrite_weights(f, lambda w: {k: v for k, v in w.items() if k != "bias"}),
    "weights of another dtype": lambda f: rewrite_weights(f, lambda w: {k: v.double() for k, v in w.items()}),
    "weights of another shape": lambda f: rewrite_weights(f, lambda w: {**w, "weight": torch.zeros(1, 5)}),
    "header length 2^62": lambda f: set_header_length(f / "model-model.safetensors", 2 ** 62),
    "truncated weights": lambda f: truncate(f / "model-model.safetensors"),
    "truncated optimizer state": lambda f: truncate(f / "optimizer-model.safetensors"),
    "optimizer names a missing tensor": lambda f: edit_json(
        f / "optimizer-model.json", lambda s: {**s, "state": {"0": {"exp_avg": {"__tensor__": "nope"}}}}),
    "method names a missing tensor": lambda f: edit_json(
        f / "rank0" / "method.json", lambda s: {**s, "rng": {"__tensor__": "nope"}}),
    "method state the method refuses": lambda f: edit_json(
        f / "rank0" / "method.json", lambda s: {k: v for k, v in s.items() if k != "seen"}),
    "data position of another kind": lambda f: edit_json(f / "rank0" / "data.json", lambda s: {**s, "index": "x"}),
    "schedule with a foreign field": lambda f: edit_json(f / "trainer_state.json", schedule_with_foreign_field),
    "config.yaml not YAML": lambda f: (f / "config.yaml").write_text("run: {max_steps: [\n"),
    "config.yaml a list": lambda f: (f / "config.yaml").write_text("- 1\n- 2\n"),
}


def resume_after(tmp_path, tamper, capsys):
    """Run to step 4 (checkpoints at 2 and 4), tamper with step-4, resume to 6: the output."""
    out = tmp_path / "run"
    run(out, 4)
    tamper(ckpt.checkpoint_root(out) / "step-4")
    capsys.readouterr()
    engine, method = run(out, 6)
    return out, engine, method, capsys.readouterr().out


def assert_fell_back_to_step_2(out, engine, printed, uninterrupted):
    skipped = [line for line in printed.splitlines() if line.startswith("skipping checkpoint")]
    assert len(skipped) == 1 and "step-4" in skipped[0] and "resuming from step-2 instead" in skipped[0], printed
    assert f"resumed from {ckpt.checkpoint_root(out) / 'step-2'} at step 2" in printed
    assert engine.step == 6 and loss_rows(out) == uninterrupted  # steps 3-6 redone, the same
    steps = [r["step"] for r in read_metrics(out)]
    assert len(steps) == len(set(steps)), steps  # each step once


@pytest.mark.parametrize("case", list(OUTSIDE))
def test_nothing_outside_the_run_folder_is_opened_or_loaded(tmp_path, case, capsys, uninterrupted):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "run"
    run(out, 4)
    OUTSIDE[case](ckpt.checkpoint_root(out) / "step-4", outside)
    capsys.readouterr()
    OPENED.clear()
    WATCHING.append(True)
    try:
        engine, method = run(out, 6)
    finally:
        WATCHING.clear()
    printed = capsys.readouterr().out
    assert not [p for p in OPENED if p.startswith(str(outside.resolve()))], "resume opened a file outside the run"
    assert_fell_back_to_step_2(out, engine, printed, uninterrupted)
    assert MARKER not in repr(method.loaded) and method.loaded["note"] == "mine"
    for root, _, files in os.walk(out):  # not following links: the run's own files
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                assert MARKER.encode() not in open(path, "rb").read(), path


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_a_bad_manifest_is_skipped_with_one_line(tmp_path, case, capsys, uninterrupted):
    out, engine, _, printed = resume_after(tmp_path, MANIFEST_CASES[case], capsys)
    assert_fell_back_to_step_2(out, engine, printed, uninterrupted)


@pytest.mark.parametrize("case", list(CONTENT_CASES))
def test_content_that_verifies_but_is_wrong_is_skipped_with_one_line(tmp_path, case, capsys, uninterrupted):
    def tamper(folder):
        CONTENT_CASES[case](folder)
        ckpt.write_manifest(folder)
    out, engine, method, printed = resume_after(tmp_path, tamper, capsys)
    assert_fell_back_to_step_2(out, engine, printed, uninterrupted)
    assert method.loaded["seen"] == 2  # the method holds step-2's state, nothing of the refused one


def test_a_copy_named_for_a_later_step_is_refused_and_nothing_newer_is_pruned(tmp_path, capsys, uninterrupted):
    out = tmp_path / "run"
    run(out, 4)
    root = ckpt.checkpoint_root(out)
    shutil.copytree(root / "step-2", root / "step-99")  # a copy of step-2 named as the newest
    capsys.readouterr()
    engine, _ = run(out, 6, keep_last=1)
    printed = capsys.readouterr().out
    skipped = [line for line in printed.splitlines() if line.startswith("skipping checkpoint")]
    assert len(skipped) == 1 and "step-99" in skipped[0] and "records step 2" in skipped[0], printed
    assert f"resumed from {root / 'step-4'} at step 4" in printed
    assert loss_rows(out) == uninterrupted
    assert sorted(p.name for _, p in ckpt.list_checkpoints(out)) == ["step-6", "step-99"]


def test_pruning_keeps_a_skipped_newer_checkpoint_and_the_one_just_written(tmp_path, capsys):
    out = tmp_path / "run"
    run(out, 6)
    root = ckpt.checkpoint_root(out)
    truncate(root / "step-6" / "model-model.safetensors")  # damaged after its rename
    engine, _ = run(out, 5, keep_last=1)  # resumes step-4, writes step-5, prunes
    assert engine.step == 5
    assert sorted(p.name for _, p in ckpt.list_checkpoints(out)) == ["step-5", "step-6"]


def test_a_skipped_checkpoint_is_set_aside_not_overwritten_when_its_step_is_saved_again(tmp_path, capsys):
    out = tmp_path / "run"
    run(out, 6)
    root = ckpt.checkpoint_root(out)
    truncate(root / "step-6" / "model-model.safetensors")
    damaged = (root / "step-6" / "model-model.safetensors").read_bytes()
    capsys.readouterr()
    engine, _ = run(out, 6)  # resumes step-4, reaches step 6 again and saves it
    assert engine.step == 6 and "kept as skipped-step-6" in capsys.readouterr().out
    assert (root / "skipped-step-6" / "model-model.safetensors").read_bytes() == damaged
    assert ckpt.verify(root / "step-6") is None  # the new one, whole


def test_when_no_checkpoint_passes_the_run_starts_afresh_and_logs_each_step_once(tmp_path, capsys, uninterrupted):
    out = tmp_path / "run"
    run(out, 4)
    for step in (2, 4):
        (ckpt.checkpoint_root(out) / f"step-{step}" / ckpt.MANIFEST).unlink()
    capsys.readouterr()
    engine, _ = run(out, 6)
    printed = capsys.readouterr().out
    assert sum(line.startswith("skipping checkpoint") for line in printed.splitlines()) == 2
    assert "starting afresh" in printed and engine.step == 6 and loss_rows(out) == uninterrupted
    steps = [r["step"] for r in read_metrics(out)]
    assert steps.count(0) == 1 and len(steps) == len(set(steps)), steps
    redone = [json.loads(line)["step"] for line in (out / "metrics.redone.jsonl").read_text().splitlines()]
    assert redone and max(redone) == 4  # the first attempt's lines, kept aside, not lost


def test_a_planted_temporary_folder_link_is_removed_not_written_through(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "run"
    run(out, 4)
    (ckpt.checkpoint_root(out) / ".tmp-step-6").symlink_to(outside, target_is_directory=True)
    engine, _ = run(out, 6)
    assert engine.step == 6 and ckpt.verify(ckpt.checkpoint_root(out) / "step-6") is None
    assert list(outside.iterdir()) == []


TWO_PROCESSES = """
import sys
sys.path.insert(0, {tests!r})
from test_checkpoint_untrusted import loss_rows, run
engine, _ = run(sys.argv[1], int(sys.argv[2]))
"""


def launch_two(tmp_path, out, steps) -> str:
    """``run(out, steps)`` on 2 DDP processes; returns what they printed."""
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESSES.format(tests=str(ROOT / "tests")))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / "ddp-cpu.yaml"),
           "--main_process_port", str(free_port()), str(script), str(out), str(steps)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def uninterrupted_two_processes(tmp_path_factory):
    """The reference both tamperings end as: 6 steps on 2 processes, run once."""
    tmp = tmp_path_factory.mktemp("two-full")
    launch_two(tmp, tmp / "full", 6)
    return loss_rows(tmp / "full")


@pytest.mark.slow
@pytest.mark.parametrize("tampered", [("step-4",), ("step-4", "step-2")], ids=["newest", "all"])
def test_two_processes_agree_to_skip_a_checkpoint_only_one_of_them_cannot_load(tmp_path, tampered,
                                                                              uninterrupted_two_processes):
    """Rank 1's method state lacks a key its method needs: both processes skip that checkpoint
    (one line, from the main process) and resume the previous one, or start afresh when none is
    left — rank 0 then holds none of the state it had loaded; the run ends as an uninterrupted one."""
    launch_two(tmp_path, tmp_path / "run", 4)
    for name in tampered:
        folder = ckpt.checkpoint_root(tmp_path / "run") / name
        edit_json(folder / "rank1" / "method.json", lambda s: {k: v for k, v in s.items() if k != "seen"})
        ckpt.write_manifest(folder)
    printed = launch_two(tmp_path, tmp_path / "run", 6)
    skipped = [line for line in printed.splitlines() if line.startswith("skipping checkpoint")]
    instead = "resuming from step-2" if len(tampered) == 1 else "starting afresh"
    assert len(skipped) == len(tampered) and all("KeyError" in line and instead in line for line in skipped), printed
    assert loss_rows(tmp_path / "run") == uninterrupted_two_processes
