import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    """A local TCP port nobody listens on now (launch configs' fixed ports may be taken on a shared host)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_recipe(recipe: str, *args: str, launch: str | None = None, timeout: float = 600,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run ``recipes/<recipe>.py`` in a fresh process, optionally under ``accelerate launch``."""
    script = str(ROOT / "recipes" / f"{recipe}.py")
    if launch:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "launch" / f"{launch}.yaml"), script, *args]
    else:
        cmd = [sys.executable, script, *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def recipe():
    return run_recipe
