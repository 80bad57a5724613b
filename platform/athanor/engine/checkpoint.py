"""Checkpoint folders: ``OUTPUT/checkpoints/step-N``, written whole, verified before use.

Every process writes into ``.tmp-step-N``; after a barrier the main process hashes every file
into ``MANIFEST.json`` (names, sizes, sha256), fsyncs it and the folders, and renames the folder
to ``step-N`` (an atomic rename on one filesystem), then fsyncs ``checkpoints/``. A killed save
leaves only a ``.tmp-*`` folder that the next save clears.

A checkpoint folder is untrusted input (a copy from elsewhere, a tampered or half-synced one), so
``check_folder`` accepts one only when it is a real folder (not a symlink) whose manifest lists
exactly its regular files by plain relative names, each with its size and sha256 — no absolute
paths, no ``..``, no symlinks, nothing missing, nothing unlisted — and whose ``trainer_state.json``
records the step its name says. Nothing outside the folder is ever opened. A folder that fails is
skipped on resume, with one line saying why, in favour of the next older one (``newest_verified``;
the tensors themselves are checked against the model by ``checkpoint_checks``).

What is in a folder and who writes it: see ``Checkpointer.save``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path, PurePosixPath

from omegaconf import DictConfig, OmegaConf

from .state import fsync_path, write_json_durably

STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer_state.json"
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Rejected(Exception):
    """A checkpoint that cannot be used; the message says why, in a few words (one line)."""


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Every ``step-N`` entry that is (or links to) a folder, oldest first; symlinks are listed so
    that resume can say why it refuses them."""
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
            if p.is_symlink():  # planted: the save would write through it, outside the run folder
                p.unlink()
            else:
                shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------ manifest
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_files(folder: Path, paths) -> dict[str, dict]:
    """Manifest entries (size, sha256) of ``paths`` inside ``folder``, each fsynced first: what a
    process wrote, hashed by that process (``write_manifest`` merges them)."""
    out = {}
    for path in paths:
        fsync_path(path)
        out[Path(path).relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return out


def write_manifest(folder: Path, hashed: dict | None = None) -> dict:
    """Hash every file of ``folder`` into ``MANIFEST.json``, written last and fsynced, then fsync
    the folders. Files other processes (or DeepSpeed) wrote are fsynced here too; ``hashed``: the
    entries of files the processes that wrote them hashed already (``hash_files``)."""
    folder = Path(folder)
    files, dirs, hashed = {}, [folder], hashed or {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_dir():
            dirs.append(path)
        elif name in hashed and path.is_file():
            files[name] = hashed[name]
        elif path.is_file() and path.name != MANIFEST:
            files.update(hash_files(folder, [path]))
    manifest = {"format": 1, "files": files}
    write_json_durably(folder / MANIFEST, manifest)
    for d in reversed(dirs):  # deepest first: each folder's entries, then the folder itself in its parent
        fsync_path(d)
    return manifest


def _regular_files(folder: Path) -> set[str]:
    """Relative names of the files under ``folder``, walked without following links: a symlink
    (to a file or a folder) or anything but a regular file is refused, so no later read leaves it."""
    names = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            relative = path.relative_to(folder).as_posix()
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                raise Rejected(f"{relative} is a symlink")
            if name in filenames:
                if not stat.S_ISREG(mode):
                    raise Rejected(f"{relative} is not a regular file")
                names.add(relative)
    return names


def _is_plain_relative(name) -> bool:
    """A name inside the folder: relative, normalised, no ``..`` or ``.`` part, no backslash or NUL."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and path.as_posix() == name and not {"..", "."} & set(path.parts)


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise Rejected(f"its {what} is not JSON ({type(err).__name__})") from None


def _manifest_files(folder: Path) -> dict[str, dict]:
    manifest = _read_json(folder / MANIFEST, MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise Rejected(f"its {MANIFEST} has no 'files' table naming the folder's files")
    for name, entry in files.items():
        if not _is_plain_relative(name) or name == MANIFEST:
            raise Rejected(f"its {MANIFEST} lists {name[:80]!r}, not a plain relative name inside the folder")
        size = entry.get("bytes") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if type(size) is not int or size < 0 or not isinstance(digest, str) or not SHA256.match(digest):
            raise Rejected(f"its {MANIFEST} entry for {name} lacks a byte count or a sha256")
    return files


def _check_files(folder: Path) -> None:
    present = _regular_files(folder)
    if MANIFEST not in present:
        raise Rejected(f"it has no {MANIFEST} (its save did not finish, or it predates manifests)")
    files = _manifest_files(folder)
    for name in sorted(files):
        if name not in present:
            raise Rejected(f"{name} is missing")
    unlisted = sorted(present - set(files) - {MANIFEST})
    if unlisted:
        raise Rejected(f"{unlisted[0]} is not in its manifest")
    for name, entry in sorted(files.items()):
        size = (folder / name).stat().st_size
        if size != entry["bytes"]:
            raise Rejected(f"{name} has {size} bytes, its manifest says {entry['bytes']}")
        if _sha256(folder / name) != entry["sha256"]:
            raise Rejected(f"{name} does not match its sha256 in the manifest")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_trainer_state(folder: Path) -> dict:
    """``trainer_state.json`` with the type of every field the engine reads checked; the step it
    records must be the one the folder is named after (a copy of step-5 named step-99 is not 99)."""
    state = _read_json(Path(folder) / TRAINER_STATE, TRAINER_STATE)
    if not isinstance(state, dict):
        raise Rejected(f"its {TRAINER_STATE} is not a JSON object")
    step, world_size = state.get("step"), state.get("world_size")
    if type(step) is not int or step < 0:
        raise Rejected(f"its {TRAINER_STATE} records step {str(step)[:40]!r}, not a whole number")
    named = STEP_DIR.match(Path(folder).name)
    if named and int(named.group(1)) != step:
        raise Rejected(f"it records step {step}, not the step its name says (a copied or renamed folder)")
    if type(world_size) is not int or world_size < 1:
        raise Rejected(f"its {TRAINER_STATE} records world size {str(world_size)[:40]!r}")
    if type(state.get("accumulation_counter", 0)) is not int or not isinstance(state.get("schedules"), dict):
        raise Rejected(f"its {TRAINER_STATE} lacks its accumulation counter or LR schedules")
    history = state.get("history")
    if not isinstance(history, dict) or not all(
            isinstance(metrics, dict) and all(isinstance(k, str) and _is_number(v) for k, v in metrics.items())
            for metrics in history.values()):
        raise Rejected(f"its {TRAINER_STATE} history is not eval metrics by name")
    if not isinstance(state.get("scaler"), (dict, type(None))):
        raise Rejected(f"its {TRAINER_STATE} loss scaler is not a table")
    return state


def _check_saved_config(folder: Path) -> None:
    """The copy of ``config.yaml`` resume compares the new config with must read as a mapping
    (OmegaConf's loader is YAML's safe one: no tags that build objects)."""
    if not (folder / "config.yaml").is_file():
        return
    try:
        config = OmegaConf.load(folder / "config.yaml")
    except Exception as err:  # a YAML, OmegaConf or decoding error: whichever, the file is unusable
        raise Rejected(f"its config.yaml does not read as a config ({type(err).__name__})") from None
    if not isinstance(config, DictConfig):
        raise Rejected("its config.yaml is not a mapping of sections")


def check_folder(folder: Path) -> dict:
    """The folder's trainer state, once the folder itself and every file in it passed (see the
    module's docstring); ``Rejected`` otherwise."""
    folder = Path(folder)
    if folder.is_symlink():
        raise Rejected("it is a symlink, not a folder of this run")
    if not folder.is_dir():
        raise Rejected("it is not a folder")
    _check_files(folder)
    _check_saved_config(folder)
    return read_trainer_state(folder)


def verify(folder: Path) -> str | None:
    """None when ``check_folder`` accepts the folder, else why not (one line)."""
    try:
        check_folder(folder)
    except Rejected as why:
        return str(why)
    except OSError as err:  # unreadable, or changed while being read
        return f"it cannot be read ({type(err).__name__}: {err.strerror or err})"
    except Exception as err:  # any other failure to check it is a reason to skip it, not a traceback
        return f"it cannot be checked ({type(err).__name__})"
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
        old.unlink() if old.is_symlink() else shutil.rmtree(old)  # a refused symlink: the link goes, not its target
    else:
        tmp.rename(final)
    fsync_path(final.parent)
    return final


def set_aside(folder: Path) -> Path:
    """Rename a checkpoint a resume skipped to ``skipped-step-N`` (``-2``, ``-3``... if taken) before
    a save of the same step takes its name: it may hold progress a person can still recover, and
    nothing lists, resumes or prunes ``skipped-*`` folders."""
    aside, n = folder.with_name(f"skipped-{folder.name}"), 1
    while aside.exists() or aside.is_symlink():
        n += 1
        aside = folder.with_name(f"skipped-{folder.name}-{n}")
    folder.rename(aside)
    return aside


def prune(output_dir: Path, keep_last: int, current_step: int | None = None, protected=()) -> None:
    """Keep the newest ``keep_last`` checkpoints up to ``current_step``, and in any case the newest
    one with a manifest (older ones may be needed when newer ones turn out damaged). Never deleted:
    a symlink or anything else not a real ``step-N`` folder, a folder newer than ``current_step``,
    and the ``protected`` names (the newer checkpoints a resume skipped: they may hold progress a
    person can still recover, so they are left for a person to look at)."""
    found = [(step, path) for step, path in list_checkpoints(output_dir)
             if not path.is_symlink() and path.name not in protected
             and (current_step is None or step <= current_step)]
    with_manifest = [path for _, path in found if (path / MANIFEST).is_file()]
    keep = {path for _, path in found[-keep_last:]} | set(with_manifest[-1:])
    for _, path in found:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
