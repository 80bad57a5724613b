"""The one way athanor writes a small JSON file (STAGE.json, RUN.json, a checkpoint's trainer state
and manifest, the tracker ids): to a temporary name beside it, then renamed over it, so a reader
(or a run killed mid-write) sees the old file or the new one, never half of one. ``durable``
also fsyncs the bytes before the rename (checkpoint files, whose manifest vouches for them).
No torch here: the sweep's parent process imports it."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: str | Path, obj, *, indent: int = 1, durable: bool = False, newline: bool = False) -> Path:
    """``obj`` as JSON in ``path``, atomically (``default=str`` for paths and the like)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, default=str)
        if newline:
            f.write("\n")
        if durable:
            f.flush()
            os.fsync(f.fileno())
    tmp.replace(path)
    return path


def write_json_durably(path: str | Path, obj) -> None:
    """``write_json`` fsynced: what a checkpoint's files and manifest are written with."""
    write_json(path, obj, durable=True)
