"""Multi-stage recipes: each stage is one engine run in its own subfolder; a finished stage is
recorded (``STAGE.json``) and skipped when the recipe runs again, returning its stored result."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .engine import process_state


class Stages:
    def __init__(self, output_dir: str | Path):
        self.root = Path(output_dir)
        self.results: dict[str, dict] = {}

    def dir(self, name: str) -> Path:
        return self.root / name

    def done(self, name: str) -> bool:
        return (self.dir(name) / "STAGE.json").exists()

    def run(self, name: str, fn: Callable[[Path], dict]) -> dict:
        """``fn(stage_dir) -> result`` (JSON-serialisable), unless the stage finished before."""
        marker = self.dir(name) / "STAGE.json"
        if marker.exists():
            result = json.loads(marker.read_text())["result"]
        else:
            self.dir(name).mkdir(parents=True, exist_ok=True)
            result = fn(self.dir(name))
            state = process_state()
            if state.is_main_process:
                tmp = marker.with_suffix(".tmp")
                tmp.write_text(json.dumps({"stage": name, "result": result}, indent=2))
                tmp.replace(marker)
            state.wait_for_everyone()
        self.results[name] = result
        return result
