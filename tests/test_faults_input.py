"""Bad values and broken files (issue 20, item 4): each ends in one line and a non-zero exit, before
any compute where the value alone says it is wrong, and nothing written so far is lost.

A toy paper (linear regression, one stage in OUTPUT itself, as pretrain's) runs through the real
runner in process. Each test failed on the code before the fix with a traceback (a YAML
ReaderError/ConstructorError, UnicodeEncodeError, OSError ENAMETOOLONG, TypeError, KeyError,
NotADirectoryError, ValueError), a silently changed value (``a #b`` read as ``a``, a newline read
as a space, 100000 threads accepted) or, for the disk-full and two-process cases, rc 1 with a
traceback and the error line printed once per process."""
import errno
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from athanor.config import ConfigError, TrainConfig, load_config
from athanor.data import ShuffledBatches
from athanor.engine import Method, read_metrics
from athanor.engine import checkpoint as ckpt
from athanor.runner import DISK_FULL_EXIT_CODE, Paper, Stage, run
from conftest import ROOT, free_port, run_recipe


@dataclass
class ToySection:
    width: int = 4


@dataclass
class ToyConfig(TrainConfig):
    toy: ToySection = field(default_factory=ToySection)


FULL_AT_STEP = {"step": None}  # the disk fills up once the run reaches this step


class Toy(Method):
    def setup(self, engine):
        self.engine = engine
        self.model = engine.register("model", nn.Linear(4, 1))

    def batches(self, engine):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=g)
        return ShuffledBatches({"x": x, "y": x.sum(1, keepdim=True)}, 8, 0, engine.rank, engine.world_size)

    def train_step(self, batch):
        if FULL_AT_STEP["step"] is not None and self.engine.step >= FULL_AT_STEP["step"]:
            FULL_AT_STEP["full"] = True
        loss = nn.functional.mse_loss(self.model(batch["x"]), batch["y"])
        self.engine.optimize("model", loss)
        return {"loss": loss}

    def evaluate(self):
        return {"loss": 1.0}


def _train(ctx):
    engine, final = ctx.fit(Toy())
    return {"final": final}


def _report(ctx, results):
    (ctx.root / "report.json").write_text(json.dumps({"steps": 1}))
    return {}


PAPER = Paper("toy", ToyConfig, lambda cfg: [Stage("train", _train, folder=".", record=False)], _report)


def toy(out, *args):
    return ["--run.output_dir", str(out), "--run.progress", "false", *map(str, args)]


def exits(argv, code, capsys) -> str:
    """Run the toy paper; it must exit ``code`` with one ``error:`` line and no traceback."""
    with pytest.raises(SystemExit) as info:
        run(PAPER, argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert info.value.code == code, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


# ---------------------------------------------------------------------- bad values, before compute

@pytest.mark.parametrize("name,expected", [
    ("a #b", "/a' (a ' #' starts a comment)"), ("a\nb", "control character '\\n'"),
    ("a\x07b", "control character '\\x07'"), ("a\udcffb", "not valid UTF-8 (byte 0xff)"),
    ("x" * 300, "longer than 255 bytes"), ("y/" * 2100, "longer than 4096 bytes")])
def test_a_bad_output_dir_is_one_line_and_exit_2_before_compute(tmp_path, capsys, name, expected):
    out = tmp_path / name
    assert expected in exits(toy(out), 2, capsys)
    assert list(tmp_path.iterdir()) == []  # nothing was made


def test_a_config_file_that_is_a_list_or_holds_a_python_tag(tmp_path, capsys):
    listing = tmp_path / "list.yaml"
    listing.write_text("- run\n- optim\n")
    assert "holds a list, expected a mapping" in exits(["--config", str(listing)], 2, capsys)
    tagged = tmp_path / "tag.yaml"
    tagged.write_text("run:\n  output_dir: !!python/object/apply:os.system ['touch pwned']\n")
    assert "could not determine a constructor" in exits(["--config", str(tagged)], 2, capsys)
    assert not Path("pwned").exists()


@pytest.mark.parametrize("args", [["--run.seed", "!!python/object:os.system"],
                                  ["--optim.betas", "!!python/tuple [0.1, 0.2]"],
                                  ["--run.output_dir", "!!python/name:os.system"]])
def test_a_python_tag_on_the_command_line_is_one_line(tmp_path, capsys, args):
    line = exits([*toy(tmp_path / "run"), *args], 2, capsys)
    assert f"bad value for {args[0]}" in line and "constructor" in line


def test_values_yaml_would_change_are_refused_and_quoted_ones_kept(tmp_path):
    with pytest.raises(ConfigError, match="YAML reads it as 'x'"):
        load_config(ToyConfig, ["--run.resume", "x #y"])
    for kept in ("ok dir", "q'#x"):  # YAML reads these as typed: valid names
        cfg = load_config(ToyConfig, ["--run.output_dir", str(tmp_path / kept), "--run.resume", "auto"])
        assert cfg.run.output_dir == str(tmp_path / kept)
    cfg = load_config(ToyConfig, ["--run.output_dir", f'"{tmp_path}/quoted #kept"'])
    assert cfg.run.output_dir == f"{tmp_path}/quoted #kept"


def test_cpu_threads_beyond_the_machine_is_refused(tmp_path, capsys):
    assert "more than any machine's CPUs" in exits([*toy(tmp_path / "run"), "--engine.cpu_threads", "100000"], 2, capsys)
    load_config(ToyConfig, ["--engine.cpu_threads", "64"])  # a config for a bigger machine passes (and is capped)


def test_a_text_source_folder_of_non_text_files(tmp_path):
    from athanor.data.text import TextDataConfig, load_documents

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    with pytest.raises(ConfigError, match=r"holds \.png files, which are not text"):
        TextDataConfig(source=str(images)).validate()
    disguised = tmp_path / "disguised"
    disguised.mkdir()
    (disguised / "weights.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="is not a text file"):
        load_documents(TextDataConfig(source=str(disguised)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no files"):
        TextDataConfig(source=str(tmp_path / "empty")).validate()


# ---------------------------------------------------------------------- broken files in the run folder

def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".athanor.lock"}


def test_a_bad_middle_line_of_metrics_is_one_line_and_loses_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    run(PAPER, toy(out, "--run.max_steps", 4))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[2] = "{not json"
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    before = snapshot(out)
    line = exits(toy(out, "--run.max_steps", 6), 2, capsys)
    assert "metrics.jsonl:3 is not a JSON line" in line
    after = snapshot(out)
    assert after["metrics.jsonl"] == before["metrics.jsonl"]
    assert {k: v for k, v in after.items() if k.startswith("checkpoints/")} == \
        {k: v for k, v in before.items() if k.startswith("checkpoints/")}


def test_checkpoints_being_a_file_is_one_line_and_it_is_left_alone(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("my notes\n")
    assert "checkpoints is a file, not the run's checkpoint folder" in exits(toy(out), 2, capsys)
    assert (out / "checkpoints").read_text() == "my notes\n"


def test_disk_full_mid_run_has_its_own_exit_code_and_keeps_what_was_written(tmp_path, capsys, monkeypatch):
    """The disk fills up while step 4's checkpoint is written (fsync reports ENOSPC, as delayed
    allocation does): exit 74 with one line; step 2's checkpoint and the metrics stay; once space
    is back the same command resumes from step 2 and finishes."""
    out = tmp_path / "run"
    real_fsync = os.fsync

    def fsync(fd):
        if FULL_AT_STEP.get("full"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    FULL_AT_STEP.update(step=4, full=False)
    argv = toy(out, "--run.max_steps", 6, "--run.save_every", 2)
    try:
        line = exits(argv, DISK_FULL_EXIT_CODE, capsys)
    finally:
        FULL_AT_STEP.update(step=None, full=False)
    assert line.startswith("error: disk full") and str(out) in line, line
    assert [step for step, _ in ckpt.list_checkpoints(out)] == [2]
    assert ckpt.latest_verified_checkpoint(out) is not None
    assert [r["step"] for r in read_metrics(out)][:3] == [0, 1, 2]
    run(PAPER, argv)  # space freed: the same command resumes and finishes
    assert "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2, 3, 4, 5, 6]


def test_only_the_main_process_prints_a_refusal(capsys, monkeypatch):
    """Under ``accelerate launch`` every process meets the same refusal; each printed it (how many
    lines showed depended on how fast the launcher killed the others)."""
    from athanor.config import exit_on_config_error

    for rank, printed in (("1", ""), ("0", "error: refused\n")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as info, exit_on_config_error():
            raise ConfigError("refused")
        assert info.value.code == 2 and capsys.readouterr().err == printed


def test_disk_full_while_config_yaml_is_rewritten_leaves_the_old_one_whole(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    run(PAPER, toy(out, "--run.max_steps", 2))
    before = (out / "config.yaml").read_text()
    real_write_text = Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.parent == out and self.name in ("config.yaml", ".config.yaml.tmp"):  # however it is written
            real_write_text(self, data[: len(data) // 2], *args, **kwargs)  # half of it fits, then none
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    capsys.readouterr()
    exits(toy(out, "--run.max_steps", 4, "--optim.lr", "0.5"), DISK_FULL_EXIT_CODE, capsys)
    assert (out / "config.yaml").read_text() == before
    assert not list(out.glob(".config.yaml*"))


@pytest.mark.slow
def test_resuming_one_process_run_on_two_says_so_once(tmp_path):
    """Resuming a 1-process checkpoint under a 2-process launch continues (issue 22): the world-size
    change is said once, by the main process only."""
    out = tmp_path / "run"
    tiny = ["--model.d_model", "32", "--model.n_layers", "1", "--data.max_chars", "100000",
            "--data.eval_batches", "2", "--run.progress", "false", "--run.output_dir", str(out)]
    run_recipe("pretrain", *tiny, "--run.max_steps", "2")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / "ddp-cpu.yaml"),
           "--main_process_port", str(free_port()), str(ROOT / "recipes" / "pretrain.py"), *tiny, "--run.max_steps", "4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("world size changed at step 2: 1 -> 2 processes") == 1, proc.stdout[-3000:]
