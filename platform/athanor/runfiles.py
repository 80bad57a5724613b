"""What a recipe leaves in its run folder besides what the engine writes, and how quiet it is.

``STAGE.json`` in a stage's (or a sweep job's) folder records that it finished and its result: a
later run (or sweep) skips it. This module imports no torch, so the sweep's parent process reads it.

``RUN.json`` records the paper, the main model it declares (the folder publish puts at the top of
the upload), its model card's kind and the exact command (secrets as ``***``); ``config.yaml`` at
the root is the resolved config of that invocation (stage folders keep their own). Library chatter
("Loading weights" bars, DeepSpeed's accelerator line) and progress bars are off unless asked
(``ATHANOR_VERBOSE=1``) or, for bars, unless the output is a terminal.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

from .jsonfile import write_json

RUN_FILE = "RUN.json"
STAGE_FILE = "STAGE.json"
CARD_KINDS = ("transformers", "diffusers", "peft", "torch")


def finished_stage(folder: str | Path) -> dict | None:
    """The result recorded in ``folder/STAGE.json`` by a finished stage (or sweep job), else None."""
    marker = Path(folder) / STAGE_FILE
    return json.loads(marker.read_text())["result"] if marker.exists() else None


def record_stage(folder: str | Path, name: str, result: dict) -> None:
    """Write ``folder/STAGE.json`` atomically: from now on the stage counts as finished."""
    write_json(Path(folder) / STAGE_FILE, {"stage": name, "result": result}, indent=2)


def invocation(argv: list[str] | None = None) -> str:
    """The command that started this process, as a shell would take it, secrets hidden; ``argv``:
    the recipe's arguments when they were not the command line's own."""
    from .redact import redact

    words = list(sys.argv)
    if argv is not None and (not argv or words[-len(argv):] != list(argv)):
        words = [words[0], *argv]
    return redact(shlex.join([Path(words[0]).as_posix(), *words[1:]]))


def write_run_record(root: Path, cfg: Any, paper_name: str, declared: dict, config_here: bool,
                     argv: list[str] | None = None) -> None:
    """``RUN.json`` and ``config.yaml`` at the root, unless a stage's engine writes that one there (and
    keeps its history); a stage in the root that runs no engine there (a sweep) gets it too. Main
    process only."""
    from .engine.resume_config import save_with_history

    root.mkdir(parents=True, exist_ok=True)
    if not config_here or not (root / "config.yaml").is_file():
        save_with_history(cfg, root)
    record = {"paper": paper_name, **declared, "command": invocation(argv)}  # main_model, card, model_class
    write_json(root / RUN_FILE, record, indent=2, newline=True)


def read_run_record(root: Path) -> dict:
    """The record a finished recipe left, or {} (an older run, or a link: nothing outside is read)."""
    path = Path(root) / RUN_FILE
    if not path.is_file() or path.is_symlink():
        return {}
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def verbose() -> bool:
    return os.environ.get("ATHANOR_VERBOSE", "") not in ("", "0")


def quiet_libraries() -> None:
    """Errors only from transformers, diffusers, datasets, huggingface_hub and DeepSpeed, and their
    progress bars off, unless ``ATHANOR_VERBOSE=1``. Set before they are imported where possible."""
    if verbose():
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("transformers", "diffusers", "datasets", "huggingface_hub", "DeepSpeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _quiet_deepspeed()
    # peft (0.21) reads transformers' deprecated ``is_gradient_checkpointing`` on every PeftModel:
    # a FutureWarning per adapter loaded that says nothing about the run
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # transformers' bars ("Loading weights") follow huggingface_hub's switch
    from .compat import quiet_hub_mixin_loading

    quiet_hub_mixin_loading()
    if "transformers" in sys.modules:  # imported already: its own switches
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def _quiet_deepspeed() -> None:
    """DeepSpeed warns "Setting accelerator to CPU ..." whenever it detects no GPU (under DDP too,
    since accelerate imports it). Naming the CPU accelerator up front is the same choice, said at
    INFO, which its logger does not print."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def progress_wanted(asked: bool) -> bool:
    """A progress bar only where someone watches it: a log file gets one huge line otherwise."""
    return asked and (sys.stderr.isatty() or verbose())
