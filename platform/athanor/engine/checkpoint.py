"""Checkpoint folders: ``OUTPUT/checkpoints/step-N``, written whole, verified before use.

Every process writes into ``.tmp-step-N``; after a barrier the main process hashes every file
into ``MANIFEST.json`` (names, sizes, sha256), fsyncs it and the folders, and renames the folder
to ``step-N`` (an atomic rename on one filesystem), then fsyncs ``checkpoints/``. A killed save
leaves only a ``.tmp-*`` folder that the next save clears. A ``step-N`` whose files no longer
match its manifest (a node lost after the rename on a network filesystem, a truncated copy) is
skipped on resume, with one line saying why, in favour of the newest one that verifies
(``newest_verified``).

What is in a folder and who writes it: see ``Engine.save_checkpoint``.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

from .state import fsync_path, write_json_durably

STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "MANIFEST.json"


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest ``step-N`` folder, verified or not (see ``newest_verified``)."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def temporary_dir(output_dir: Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f".tmp-step-{step}"


def clear_stale_temporaries(output_dir: Path) -> None:
    root = checkpoint_root(output_dir)
    if root.is_dir():  # .old-step-N: a replaced step-N whose removal was cut short (see publish)
        for p in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------ manifest
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> dict:
    """Hash every file of ``folder`` into ``MANIFEST.json``, written last and fsynced, then fsync
    the folders. Files other processes (or DeepSpeed) wrote are fsynced here too."""
    folder = Path(folder)
    files, dirs = {}, [folder]
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            dirs.append(path)
        elif path.is_file() and path.name != MANIFEST:
            fsync_path(path)
            files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": 1, "files": files}
    write_json_durably(folder / MANIFEST, manifest)
    for d in reversed(dirs):  # deepest first: each folder's entries, then the folder itself in its parent
        fsync_path(d)
    return manifest


def verify(folder: Path) -> str | None:
    """None when every file in the manifest is there with its size and hash, else why not.
    Files the manifest does not list are not read by resume, so they do not fail it."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST} (its save did not finish, or it predates manifests)"
    except (ValueError, KeyError, TypeError) as err:
        return f"its {MANIFEST} is unreadable ({type(err).__name__})"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{name} has {size} bytes, its manifest says {entry['bytes']}"
        if _sha256(path) != entry["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def newest_verified(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest checkpoint that verifies or None, [(skipped newer checkpoint, why)])."""
    skipped = []
    for _, path in reversed(list_checkpoints(output_dir)):
        problem = verify(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def latest_verified_checkpoint(output_dir: Path) -> Path | None:
    return newest_verified(output_dir)[0]


# ------------------------------------------------------------------------------ publish, prune
def publish(tmp: Path, step: int) -> Path:
    """Rename the finished ``.tmp-step-N`` (manifest written) to ``step-N``, durably."""
    final = tmp.parent / f"step-{step}"
    if final.exists():  # re-saving the same step (a finished run re-run, a skipped bad one): replace it whole
        old = tmp.parent / f".old-step-{step}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync_path(final.parent)
    return final


def prune(output_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints, and in any case the newest one with a manifest
    (older ones may be needed when newer ones turn out damaged)."""
    found = list_checkpoints(output_dir)
    with_manifest = [path for _, path in found if (path / MANIFEST).is_file()]
    keep = {path for _, path in found[-keep_last:]} | set(with_manifest[-1:])
    for _, path in found:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_json_atomic(path: Path, obj) -> None:
    write_json_durably(path, obj)
