"""Experiment trackers beside ``metrics.jsonl`` and TensorBoard: MLflow, W&B and Aim through
accelerate's tracker classes (``accelerate.tracking``), main process only.

``run.trackers`` names them (default ``[tensorboard]``, which ``metrics.py`` writes itself, with
its ``purge_step`` on resume). A tracker's run id is kept in the run folder (``trackers.json``),
written when the tracker run starts, so a resumed or requeued run — from a checkpoint, or from
nothing when killed before its first one — logs into the same tracker run. The steps between the
checkpoint and the kill are logged again after a resume (MLflow and W&B then hold both values of
those steps; ``metrics.jsonl`` holds each step once).

Where they write: MLflow to ``MLFLOW_TRACKING_URI``, else a local file store ``OUTPUT/mlruns``
(MLflow 3 refuses file stores unless ``MLFLOW_ALLOW_FILE_STORE=true``, which is set for that
default only); W&B to ``OUTPUT/wandb`` (``WANDB_MODE=offline`` works with no server); Aim to
``OUTPUT/aim``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path

from ..jsonfile import write_json

RUN_IDS_FILE = "trackers.json"


def _read_run_ids(path: Path) -> dict:
    """Saved tracker run ids; a damaged file starts new tracker runs (one line), it stops nothing."""
    if not path.is_file():
        return {}
    try:
        ids = json.loads(path.read_text())
        if isinstance(ids, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in ids.items()):
            return ids
    except (OSError, ValueError):
        pass
    print(f"warning: {path} is not a JSON object of run ids: new tracker runs are started", file=sys.stderr)
    return {}


def _start(name: str, output_dir: Path, run_id: str | None):
    """(accelerate tracker, its run id) for ``name``, continuing ``run_id`` when given."""
    from accelerate import tracking  # trackers import their (heavy) packages on start only

    run_name = output_dir.name
    if name == "mlflow":
        import mlflow

        if "MLFLOW_TRACKING_URI" not in os.environ:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((output_dir / "mlruns").resolve().as_uri())
        tracker = tracking.MLflowTracker(experiment_name="athanor", logging_dir=str(output_dir / "mlruns"),
                                         run_id=run_id, run_name=run_name)
        tracker.start()
        return tracker, tracker.active_run.info.run_id
    if name == "wandb":
        run_id = run_id or uuid.uuid4().hex[:12]
        (output_dir / "wandb").mkdir(exist_ok=True)
        tracker = tracking.WandBTracker(run_name, id=run_id, resume="allow", dir=str(output_dir))
        tracker.start()
        return tracker, tracker.run.id
    tracker = tracking.AimTracker(run_name, logging_dir=str(output_dir / "aim"),
                                  **({"run_hash": run_id} if run_id else {}))
    tracker.start()
    return tracker, tracker.writer.hash


class Trackers:
    """The external trackers of one run; ``log`` takes the rows ``MetricsLogger`` flushes."""

    def __init__(self, output_dir: str | Path, names: list[str], enabled: bool):
        self.active = []
        external = [n for n in names if n != "tensorboard"]
        if not enabled or not external:
            return
        output_dir = Path(output_dir)
        path = output_dir / RUN_IDS_FILE
        ids = _read_run_ids(path)
        for name in external:
            tracker, ids[name] = _start(name, output_dir, ids.get(name))
            self.active.append(tracker)
        write_json(path, ids)

    def log(self, step: int, row: dict) -> None:
        values = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and math.isfinite(v)}
        for tracker in self.active:
            tracker.log(values, step=step)

    def close(self) -> None:
        for tracker in self.active:
            tracker.finish()
        self.active = []
