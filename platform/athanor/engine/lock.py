"""One run per output folder: ``OUTPUT/.athanor.lock`` names the process that holds it.

Two runs writing one folder interleave their ``metrics.jsonl`` lines and overwrite each other's
checkpoints, so the second is refused (``ConfigError``: one line, exit 2) with the holder named.
The lock file is created with ``O_EXCL`` and holds host, PID, the process's start time and a
random token. A lock whose process is gone (same host, PID not running, or running but started
later: a reused PID) is stale and taken over, as is one left by an earlier run of the same SLURM
job (a requeued job, possibly on another node, killed before it could let go). Any other lock
from another host cannot be checked; the message says which file to delete if that run is dead.

Only the main process of a launch takes the lock (the processes of one ``accelerate launch`` share
the folder by design); the engine tells the others the outcome. The same process may take a lock
it already holds (one process runs several engines on one folder, one after the other). The lock
is released when ``fit`` ends and, failing that, at interpreter exit.
"""
from __future__ import annotations

import atexit
import json
import os
import secrets
import socket
import time
from pathlib import Path

from ..config import ConfigError

LOCK_NAME = ".athanor.lock"
_HELD: dict[Path, dict] = {}  # locks this process holds: path -> {"record", "users"}


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OverflowError, ValueError):
        return False
    started = _process_start(pid)
    return holder.get("started") is None or started is None or started == holder["started"]


class OutputLock:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False

    @staticmethod
    def _own_record() -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid()),
                "job": os.environ.get("SLURM_JOB_ID"), "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                "token": secrets.token_hex(8),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # torn by a kill mid-write: nobody can be holding it
            return {}

    def acquire(self) -> None:
        """Take the lock (or share this process's hold on it) or raise ConfigError naming the holder."""
        if self.held:
            return
        mine = _HELD.get(self.path)
        if mine and (self._read() or {}).get("token") == mine["record"]["token"]:
            mine["users"] += 1
            self.held = True
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"run.output_dir={str(self.folder)!r} cannot be created: {e.strerror}") from None
        record = self._own_record()
        for _ in range(3):  # a stale lock removed between our read and our create: try again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue
                same_host = holder.get("host") == record["host"]
                # A requeued SLURM job keeps its id and counts its restarts: a lock of an earlier restart
                # is stale, on any node (that run was killed before it could let go)
                requeued = record["job"] is not None and holder.get("job") == record["job"] and \
                    int(holder.get("restart") or 0) < record["restart"]
                if not holder or requeued or (same_host and not _alive(holder)) or \
                        (same_host and holder.get("pid") == record["pid"] and holder.get("started") == record["started"]):
                    self.path.unlink(missing_ok=True)  # stale (its process is gone), or this very process's
                    continue
                raise ConfigError(
                    f"run.output_dir={str(self.folder)!r} is in use by another run (host {holder.get('host')}, "
                    f"PID {holder.get('pid')}, since {holder.get('since')}); wait for it, choose another "
                    f"--run.output_dir, or delete {self.path} if that run is dead") from None
            except OSError as e:
                raise ConfigError(f"run.output_dir={str(self.folder)!r} is not writable: {e.strerror}") from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record))
            _HELD[self.path] = {"record": record, "users": 1}
            self.held = True
            return
        raise ConfigError(f"could not take the lock {self.path}: it keeps changing; is another run starting?")

    def release(self) -> None:
        """Drop this engine's hold; the file goes with the process's last hold, if it is still ours."""
        if not self.held:
            return
        self.held = False
        mine = _HELD.get(self.path)
        if mine is None:
            return
        mine["users"] -= 1
        if mine["users"] <= 0:
            _remove_if_ours(self.path, mine["record"])


def _remove_if_ours(path: Path, record: dict) -> None:
    _HELD.pop(path, None)
    try:
        if json.loads(path.read_text()).get("token") == record["token"]:
            path.unlink(missing_ok=True)
    except (OSError, ValueError):
        pass


@atexit.register
def _release_all() -> None:
    for path, mine in list(_HELD.items()):
        _remove_if_ours(path, mine["record"])
