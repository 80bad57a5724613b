"""Resuming with a changed config: refused, or applied and said; never silently ignored.

Before an engine resumes a checkpoint it compares its config with the one the folder's run saved
(``config.yaml`` beside the checkpoints, or inside the checkpoint folder when one is there):

- a change to what shapes the model, the data or its order (``model.*``, ``data.*``, ``run.seed``,
  ``engine.grad_accum``, ``engine.mixed_precision``, ``optim.name``, any paper-specific section)
  is refused: ``ConfigError`` naming the keys, so one line and exit 2, before any model is built;
- a change to optimizer or schedule values (``optim.*`` but the optimizer's kind, ``run.max_steps``,
  ``engine.cpu``) is applied for real (``Engine.fit`` writes the new values into the loaded
  optimizer and schedule; see ``apply_optimizer_values``) and said on one line;
- bookkeeping (``run.log_every``/``eval_every``/``save_every``/``keep_last``/``progress``/
  ``output_dir``/``resume``/non-finite policy, ``engine.cpu_threads``, ``hub.*``) may change freely.

A paper whose config has other keys that may change on resume lists them (fnmatch patterns) in a
class attribute ``resume_may_change``. ``config.yaml`` is written only after this check passes;
the one it replaces, when different, is kept as ``config-history/NNN.yaml`` (001 the oldest).
Only the main process reads and writes these files (the engine shares the outcome).
"""
from __future__ import annotations

import fnmatch
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import ConfigError, config_text, save_config, to_dict
from .. import compat
from . import checkpoint as ckpt
from .schedule import lr_multiplier

FREE = ("run.output_dir", "run.resume", "run.progress", "run.log_every", "run.eval_every", "run.save_every",
        "run.keep_last", "run.on_nonfinite", "run.nonfinite_limit", "engine.cpu_threads", "engine.compile", "hub.*")
APPLIED = ("optim.*", "run.max_steps", "engine.cpu")
REFUSED_ANYWAY = ("optim.name",)  # another optimizer kind cannot take the saved optimizer state


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, tuple):  # config.yaml stores a tuple (optim.betas) as a list: the same value
        return {prefix[:-1]: list(tree)}
    return {prefix[:-1]: tree}


def _matches(key: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def checkpoint_to_resume(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint ``fit`` will resume (None: a fresh start). ``resume=none`` in a folder that
    holds checkpoints is refused here, before ``config.yaml`` is touched."""
    if resume == "none":
        if ckpt.list_checkpoints(output_dir):
            raise ConfigError(f"{output_dir} already holds checkpoints; use --run.resume auto "
                              f"to continue or choose another --run.output_dir")
        return None
    return ckpt.latest_verified_checkpoint(output_dir) if resume == "auto" else Path(resume)


def saved_config(checkpoint: Path) -> dict | None:
    """The config that wrote ``checkpoint``: a copy inside it, else its run folder's config.yaml."""
    for path in (checkpoint / "config.yaml", checkpoint.parent.parent / "config.yaml"):
        if path.is_file():
            saved = OmegaConf.load(path)
            try:  # a secret is saved as its ${oc.env:NAME} reference: compare the value it names
                return OmegaConf.to_container(saved, resolve=True)
            except OmegaConfBaseException:
                return OmegaConf.to_container(saved, resolve=False)
    return None


def compare(config, checkpoint: Path) -> str | None:
    """Raise ConfigError for a refused change; return the one line announcing applied changes (or
    None when nothing that matters changed)."""
    old = saved_config(checkpoint)
    if old is None:
        return f"resuming {checkpoint}: no saved config.yaml to compare with; the current config is used"
    old, new = _flatten(old), _flatten(to_dict(config))
    may_change = tuple(getattr(type(config), "resume_may_change", ()))
    changed = {k: (old[k], new[k]) for k in new if k in old and old[k] != new[k]}  # keys a newer version added: not changes
    refused, applied = [], []
    for key, (before, after) in sorted(changed.items()):
        text = f"{key} {before!r} -> {after!r}"
        if _matches(key, FREE + may_change):
            continue
        if _matches(key, APPLIED) and not _matches(key, REFUSED_ANYWAY):
            applied.append(text)
        else:
            refused.append(text)
    if refused:
        raise ConfigError(f"cannot resume {checkpoint} with a changed model/data/order: {'; '.join(refused)}. "
                          f"Rerun with the saved values (config.yaml there) or choose another --run.output_dir")
    if applied:
        return f"resuming {checkpoint} with changed optimizer/schedule/device values, applied: {'; '.join(applied)}"
    return None


def save_with_history(config, output_dir: Path) -> Path:
    """Write ``config.yaml`` (``save_config``: secrets stay references); a different previous one
    is kept as ``config-history/NNN.yaml``."""
    path = Path(output_dir) / "config.yaml"
    old = path.read_text() if path.is_file() else None
    if old is not None and old != config_text(config):  # the old one kept first: a full disk loses neither
        history = path.parent / "config-history"
        history.mkdir(exist_ok=True)
        number = 1 + max((int(p.stem) for p in history.glob("[0-9][0-9][0-9].yaml")), default=0)
        (history / f"{number:03d}.yaml").write_text(old)
    return save_config(config, output_dir)


def optimizer_values(slots: dict) -> dict:
    """The hyper-parameters the current config gave each model's optimizer and schedule (taken
    before a checkpoint's are loaded over them)."""
    return {name: ([{k: v for k, v in g.items() if k != "params"} for g in slot.schedule.optimizer.param_groups],
                   list(slot.schedule.base_lrs)) for name, slot in slots.items()}


def apply_optimizer_values(slots: dict, values: dict) -> None:
    """Put the current config's hyper-parameters back after a resume loaded the saved ones: the
    optimizer state (moments) and the schedule's position come from the checkpoint, the values
    (peak LR, betas, eps, weight decay) from the config. The LR in force is recomputed from the
    schedule at its loaded position: base LR × s_t (``lr_multiplier``)."""
    for name, (groups, base_lrs) in values.items():
        schedule = slots[name].schedule
        schedule.base_lrs = list(base_lrs)
        s_t = lr_multiplier(schedule.last_epoch, schedule.cfg, schedule.max_steps)
        for group, fresh, base in zip(schedule.optimizer.param_groups, groups, base_lrs):
            group.update({k: v for k, v in fresh.items() if k != "lr"})
            group["lr"] = base * s_t
        compat.set_scheduler_last_lr(schedule, [g["lr"] for g in schedule.optimizer.param_groups])
