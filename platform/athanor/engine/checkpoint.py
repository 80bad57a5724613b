"""Checkpoint folders: ``OUTPUT/checkpoints/step-N`` written whole or not at all.

Every process writes into ``.tmp-step-N``; after a barrier the main process renames it to
``step-N`` (an atomic rename on one filesystem), so a folder named ``step-N`` is always complete
and a killed save leaves only a ``.tmp-*`` folder that the next save clears.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def temporary_dir(output_dir: Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f".tmp-step-{step}"


def clear_stale_temporaries(output_dir: Path) -> None:
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for p in root.glob(".tmp-step-*"):
            shutil.rmtree(p, ignore_errors=True)


def publish(tmp: Path, step: int) -> Path:
    final = tmp.parent / f"step-{step}"
    if final.exists():  # re-saving the same step (e.g. a finished run re-run): replace it whole
        old = tmp.parent / f".old-step-{step}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return final


def prune(output_dir: Path, keep_last: int) -> None:
    for _, path in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_json_atomic(path: Path, obj) -> None:
    tmp = Path(path).with_suffix(Path(path).suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)
