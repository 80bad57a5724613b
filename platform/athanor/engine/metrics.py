"""``metrics.jsonl`` (one JSON object per logged step) and TensorBoard events, main process only."""
from __future__ import annotations

import json
import math
from pathlib import Path


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger:
    def __init__(self, output_dir: Path, enabled: bool, keep_up_to: int):
        """Opening drops lines past ``keep_up_to`` (the resumed step): they belong to the part of an
        interrupted run that the checkpoint does not contain and is about to be redone."""
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        kept = [row for row in read_metrics(output_dir) if row.get("step", 0) <= keep_up_to]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        tmp.replace(self.path)
        self.file = self.path.open("a")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=keep_up_to + 1)

    def log(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (v if isinstance(v, (int, str, bool)) or math.isfinite(v) else str(v)) for k, v in row.items()}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        self.file.flush()
        for k, v in row.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled and not self.file.closed:
            self.file.close()
            self.writer.close()
