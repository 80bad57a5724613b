"""``metrics.jsonl`` (one JSON object per logged step) and TensorBoard events, main process only.

Rows are buffered and written together (JSON lines, then TensorBoard scalars) every
``FLUSH_SECONDS`` or ``FLUSH_ROWS`` rows, and always by ``flush()``, which the engine calls before
each checkpoint and ``close()`` calls at every exit of ``fit`` (a signal's, an error's included).
So a checkpoint never lacks a line of the steps it holds, and a hard kill (SIGKILL) loses at most
the lines since the last flush, which resume drops and redoes anyway (they lie past the checkpoint).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from ..config import ConfigError
from .trackers import Trackers

FLUSH_SECONDS = 5.0  # a `tail -f metrics.jsonl` still sees the run live
FLUSH_ROWS = 100
DROPPED_FILE = "metrics.redone.jsonl"  # lines past the resumed step, from the attempts that were redone


def _read_rows(path: Path) -> tuple[list[dict], str | None]:
    """The rows and, when the last line is torn (a kill mid-write), that line, which is left out.
    A bad line anywhere else is not a torn write: it is an error naming the line."""
    if not path.exists():
        return [], None
    lines = [(i, line) for i, line in enumerate(path.read_bytes().splitlines(), 1) if line.strip()]
    rows = []
    for n, (i, line) in enumerate(lines):
        try:
            row = json.loads(line)  # bytes: not UTF-8 is a bad line too
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif n == len(lines) - 1:
            return rows, line.decode(errors="replace")
        else:  # ConfigError: the run stops with this one line (exit 2) and the file is left as it is
            raise ConfigError(f"{path}:{i} is not a JSON line (and not the last line, so not a torn write): "
                              f"fix or delete that line, then run again")
    return rows, None


def read_metrics(output_dir: str | Path) -> list[dict]:
    """Every logged row; a torn last line is left out (``MetricsLogger`` says so on resume)."""
    return _read_rows(Path(output_dir) / "metrics.jsonl")[0]


class MetricsLogger:
    def __init__(self, output_dir: Path, enabled: bool, keep_up_to: int, trackers: tuple[str, ...] = ("tensorboard",)):
        """Opening drops lines past ``keep_up_to`` (the resumed step): they belong to the part of an
        interrupted run that the checkpoint does not contain and is about to be redone."""
        self.enabled = enabled
        self.trackers = None
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        self.pending: list[tuple[int, dict]] = []
        self.last_flush = time.monotonic()
        if not enabled:
            return
        rows, torn = _read_rows(self.path)
        if torn is not None:
            print(f"warning: {self.path}: dropped a torn last line ({len(torn)} characters; the previous run "
                  f"was killed while writing it)", file=sys.stderr, flush=True)
        kept = [row for row in rows if row.get("step", 0) <= keep_up_to]
        if len(kept) < len(rows):  # redone from the checkpoint: the old lines are kept aside, not lost
            with (Path(output_dir) / DROPPED_FILE).open("a") as aside:
                aside.write("".join(json.dumps(row) + "\n" for row in rows if row.get("step", 0) > keep_up_to))
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        tmp.replace(self.path)
        self.file = self.path.open("a")
        if "tensorboard" in trackers:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard is a heavy import

            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=keep_up_to + 1)
        self.trackers = Trackers(output_dir, list(trackers), enabled)

    def log(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        self.pending.append((step, dict(row)))
        if len(self.pending) >= FLUSH_ROWS or time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write every buffered row: whole JSON lines in one write, then the TensorBoard scalars."""
        self.last_flush = time.monotonic()
        if not self.enabled or not self.pending or self.file.closed:
            return
        rows, self.pending = self.pending, []
        lines = []
        for step, row in rows:
            clean = {k: (v if isinstance(v, (int, str, bool)) or math.isfinite(v) else str(v)) for k, v in row.items()}
            lines.append(json.dumps({"step": step, **clean}) + "\n")
        self.file.write("".join(lines))
        self.file.flush()
        for step, row in rows:
            self.trackers.log(step, row)
            for k, v in row.items():
                if self.writer is not None and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.enabled and not self.file.closed:
            self.flush()
            self.file.close()
            if self.writer is not None:
                self.writer.close()
            self.trackers.close()
