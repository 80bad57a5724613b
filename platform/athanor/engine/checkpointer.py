"""The Checkpointer: saves, resumes, verifies and prunes every stateful part of a run.

The engine hands it the parts (torchtitan's ``CheckpointManager`` is the model): its accelerator
(devices, processes, loss scaler, accumulation counter) and the registered models with their
optimizers and LR schedules; ``save`` and ``resume`` also take the method (its own state) and the
data stream (its position). The engine keeps only the step and the eval history it passes in.

Resume treats every checkpoint folder as untrusted input. From the newest down, a folder must pass
``checkpoint.check_folder`` (its files exactly its manifest's, no symlinks, the step its name
says) and ``checkpoint_checks`` (every tensor's dtype and shape those of what receives it); then
the method and the data stream load their states, restored as they were if either refuses. The
first folder that passes all of it on every process is resumed; each newer one is skipped with one
line naming it and why, and is never pruned afterwards (it may hold progress a person can recover).

A checkpoint resumes on another number of processes (DDP's full tensors; FSDP2's DCP shards, which
DCP re-splits for the new mesh or reads whole into an unsharded model): the data stream keeps its
global batch (``data.batches.keep_global_order``), and process r takes the per-process states (RNGs,
method, data position) of saved process ``r mod N``, so per-rank RNG streams are the one thing not
carried over exactly; the change is said on one line and kept in the history
(``world_size_changes``). DeepSpeed's ZeRO shards and a streamed corpus's per-process positions
cannot be re-split: refused in one line (exit 2), naming the way out.
"""
from __future__ import annotations

import json
from pathlib import Path

from accelerate.utils import DistributedType, broadcast_object_list, gather_object
from safetensors.torch import load_model, save_model

from ..config import ConfigError
from . import checkpoint as ckpt
from . import checkpoint_checks as checks
from . import fsdp
from .checkpoint import Rejected
from .state import (fsync_path, join_state, load_state, rng_state, save_state, set_rng_state, split_state,
                    write_json_durably)


OTHER_WORLD_SIZE = "other world size: "  # not a damaged checkpoint but a refused resume (exit 2)


class Checkpointer:
    def __init__(self, output_dir: Path, accelerator, slots: dict, keep_last: int, fsdp2: bool = False):
        """``slots``: the engine's registered models by name (filled as methods register them);
        ``fsdp2``: the models are sharded by the engine (``engine/fsdp.py``): DCP checkpoints."""
        self.output_dir, self.accelerator, self.slots, self.keep_last = Path(output_dir), accelerator, slots, keep_last
        self.fsdp2 = fsdp2
        self.protected: set[str] = set()  # newer checkpoints the resume skipped: never pruned

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def uses_deepspeed(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    # ---------------------------------------------------------------- save
    def save(self, step: int, history: dict, method, data) -> Path:
        """Write ``checkpoints/step-N``: the state of every stateful part, with no Python objects.

        - ``model-<name>.safetensors`` and ``optimizer-<name>.safetensors`` + ``.json`` (its tensors;
          its param groups and plain values) per trained model, from the main process (DDP keeps them
          equal on all processes). Under DeepSpeed ``deepspeed-<name>/`` instead, in DeepSpeed's own
          format, each process writing its shards (those ``.pt`` files are the only ones read by
          ``torch.load``, inside DeepSpeed; see the README);
        - ``trainer_state.json``: step, world size, eval history, LR schedules, loss scaler; and a
          copy of the run's ``config.yaml`` (what resume compares the new config with);
        - ``rank<r>/``, what differs between processes: ``rng`` (Python, numpy, torch, CUDA),
          ``method`` (the method's state dict, its own torch.Generator included), ``data.json``;
        - ``MANIFEST.json`` (every file's size and sha256), written last, then the rename.
        """
        tmp = ckpt.temporary_dir(self.output_dir, step)
        if self.is_main:
            ckpt.clear_stale_temporaries(self.output_dir)
        self.accelerator.wait_for_everyone()
        own = tmp / f"rank{self.accelerator.process_index}"
        own.mkdir(parents=True, exist_ok=True)
        save_state(rng_state(self.accelerator.device), own, "rng")
        save_state(method.state_dict(), own, "method")
        if hasattr(data, "state_dict"):
            write_json_durably(own / "data.json", data.state_dict())
        if self.uses_deepspeed:  # a collective: every process writes its ZeRO shards
            for name, slot in self.slots.items():
                slot.model.save_checkpoint(str(tmp), tag=f"deepspeed-{name}", save_latest=False)
        elif self.fsdp2:  # a collective: every process writes its shards (engine/fsdp.py)
            for name, slot in self.slots.items():
                fsdp.save_sharded(tmp, name, slot.model, slot.optimizer)
        elif self.is_main:
            for name, slot in self.slots.items():
                weights = tmp / f"model-{name}.safetensors"
                save_model(self.accelerator.unwrap_model(slot.model), str(weights), force_contiguous=True)
                fsync_path(weights)
                save_state(slot.optimizer.state_dict(), tmp, f"optimizer-{name}")
        if self.is_main:
            self._write_trainer_state(tmp, step, history)
        hashed = self._hash_own_files(tmp)  # gathered on the main process: a barrier too
        final = tmp.parent / f"step-{step}"
        if self.is_main:
            ckpt.write_manifest(tmp, hashed)
            if final.name in self.protected and final.is_dir() and not final.is_symlink():
                aside = ckpt.set_aside(final)  # skipped at resume: kept for a person, never overwritten
                print(f"checkpoint {final.name} was skipped at resume; it is kept as {aside.name}", flush=True)
            self.protected.discard(final.name)
            final = ckpt.publish(tmp, step)
            ckpt.prune(self.output_dir, self.keep_last, current_step=step, protected=self.protected)
        self.accelerator.wait_for_everyone()
        return final

    def _hash_own_files(self, tmp: Path) -> dict:
        """Each process hashes the files it wrote (its ``rank<r>/``, its FSDP2 shards); the main
        process gets them all, to merge into the manifest (it hashes only the rest)."""
        rank = self.accelerator.process_index
        own = [p for p in (tmp / f"rank{rank}").rglob("*") if p.is_file()]
        hashed = ckpt.hash_files(tmp, own + (fsdp.own_files(tmp, rank) if self.fsdp2 else []))
        if self.world_size == 1:
            return hashed
        merged = {}
        for part in gather_object([hashed]):
            merged.update(part)
        return merged

    def _write_trainer_state(self, folder: Path, step: int, history: dict) -> None:
        scaler = self.accelerator.scaler
        write_json_durably(folder / ckpt.TRAINER_STATE, {
            "step": step, "world_size": self.world_size, "history": history,
            "parallelism": "fsdp2" if self.fsdp2 else "deepspeed" if self.uses_deepspeed else "ddp",
            "accumulation_counter": self.accelerator.step,
            "schedules": {n: s.schedule.state_dict() for n, s in self.slots.items()},
            "scaler": scaler.state_dict() if scaler is not None else None})
        config = self.output_dir / "config.yaml"
        if config.is_file():  # the checkpoint says what wrote it, wherever it goes
            (folder / "config.yaml").write_bytes(config.read_bytes())

    # ---------------------------------------------------------------- resume
    def resume(self, resume: str, method, data) -> dict | None:
        """Load the checkpoint ``resume`` names (``auto``: the newest one that passes every check;
        ``none``: none, and the folder must hold none) into every part. Returns its trainer state
        (``step``, ``history``), or None for a fresh start."""
        if resume == "none":
            if ckpt.list_checkpoints(self.output_dir):
                raise ConfigError(f"{self.output_dir} already holds checkpoints; use --run.resume auto "
                                  f"to continue or choose another --run.output_dir")
            return None
        skipped = []
        fresh = _snapshot(method, data)  # put back on every process when any process refuses a folder
        for path in self._candidates(resume):
            why = self._agree(self._check_on_main(path, data) if self.is_main else None)
            if why is not None and why.startswith(OTHER_WORLD_SIZE):
                if not self.is_main:
                    raise SystemExit(2)  # the main process says it, once
                raise ConfigError(why.removeprefix(OTHER_WORLD_SIZE))
            if why is None:
                why = self._agree(self._load_own_parts(path, method, data))
                if why is not None:  # a process that loaded its part must not keep it when another refused
                    _restore(fresh, method, data)
            if why is None:
                self._say_skipped(skipped, path)
                state = self._load_shared_parts(path)
                self.accelerator.print(f"resumed from {path} at step {state['step']}")
                return state
            if resume != "auto":
                raise ConfigError(f"run.resume={resume}: cannot resume from it: {why}")
            skipped.append((path, why))
        self._say_skipped(skipped, None)
        return None

    def _candidates(self, resume: str) -> list[Path]:
        """The folders to try, newest first; the main process lists them, the others learn its list."""
        if resume != "auto":
            return [Path(resume)]
        names = [p.name for _, p in reversed(ckpt.list_checkpoints(self.output_dir))] if self.is_main else None
        if self.world_size > 1:
            names = broadcast_object_list([names])[0]
        return [ckpt.checkpoint_root(self.output_dir) / name for name in names]

    def _agree(self, why: str | None) -> str | None:
        """One answer on every process: the first reason any process gave, or None."""
        if self.world_size == 1:
            return why
        return next((w for w in gather_object([why]) if w is not None), None)

    def _say_skipped(self, skipped: list, chosen: Path | None) -> None:
        self.protected = {path.name for path, _ in skipped}
        if not self.is_main:
            return
        instead = f"resuming from {chosen.name} instead" if chosen else "no earlier one passes: starting afresh"
        for path, why in skipped:
            print(f"skipping checkpoint {path.name} ({path}): {why}; {instead}", flush=True)

    def _cannot_change_world_size(self, path: Path, state: dict, data) -> str | None:
        """Why this checkpoint cannot continue on this run's number of processes, or None."""
        if self.uses_deepspeed or state.get("parallelism") == "deepspeed":
            return ("DeepSpeed's ZeRO shards are per process; resume with the world size that wrote it, or convert "
                    "it with DeepSpeed's universal checkpoint (python -m deepspeed.checkpoint.ds_to_universal), "
                    "which Athanor does not load yet")
        if not hasattr(data, "state_dict"):
            return None  # no position to carry over
        if why := getattr(data, "cannot_change_world_size", None):
            return why
        if not getattr(data, "keeps_global_order", False):  # opt-in: a stream that says it re-splits its batches
            return (f"its data stream ({type(data).__name__}) does not keep its global order on another number of "
                    f"processes; resume with the world size that wrote it")
        position = path / "rank0" / "data.json"  # checked against the manifest already
        saved = json.loads(position.read_text()).get("global_batch") if position.is_file() else None
        if type(saved) is not int:
            return "its data position records no global batch (written before resuming on another world size existed)"
        if saved % self.world_size:
            return f"its global batch of {saved} rows cannot be split evenly over {self.world_size} processes"
        return None

    def _check_on_main(self, path: Path, data=None) -> str | None:
        """Why ``path`` cannot be resumed, from the main process's checks of every file in it
        (every process's too), or None. Nothing is loaded."""
        try:
            state = ckpt.check_folder(path)
            if state["world_size"] != self.world_size and (why := self._cannot_change_world_size(path, state, data)):
                return (f"{OTHER_WORLD_SIZE}checkpoint {path} was written by {state['world_size']} processes, "
                        f"this run has {self.world_size}: {why}")
            self._check_shared_files(path, state)
            for rank in range(state["world_size"]):
                own = path / f"rank{rank}"
                checks.check_rng(checks.state_specs(own, "rng", f"rank{rank}/rng"), f"rank{rank}/rng")
                checks.state_specs(own, "method", f"rank{rank}/method")
        except Rejected as why:
            return str(why)
        except Exception as err:  # any other failure to read it: skipped all the same, said in one line
            return f"it cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})"
        return None

    def _check_shared_files(self, path: Path, state: dict) -> None:
        for name, slot in self.slots.items():
            if name not in state["schedules"]:
                raise Rejected(f"it holds no LR schedule for {name!r}")
            checks.same_kind(state["schedules"][name], slot.schedule.state_dict(), f"the LR schedule of {name!r}")
            if self.uses_deepspeed:  # DeepSpeed's own format, read by DeepSpeed (see the README)
                if not (path / f"deepspeed-{name}").is_dir():
                    raise Rejected(f"it holds no deepspeed-{name}/")
                continue
            if self.fsdp2 and not fsdp.dcp_dir(path, name).is_dir():
                raise Rejected(f"it was written without FSDP2 (no dcp-{name}/); an FSDP2 run resumes FSDP2 "
                               f"checkpoints only: resume it with the launch config that wrote it")
            if fsdp.dcp_dir(path, name).is_dir():  # DCP's safetensors shards, their layout from the files' headers
                fsdp.check_saved(path, name, self._model(slot), Rejected)
                continue
            weights = f"model-{name}.safetensors"
            checks.check_model(checks.tensor_header(path / weights), self.accelerator.unwrap_model(slot.model), weights)
            checks.check_optimizer(checks.state_specs(path, f"optimizer-{name}"), slot.optimizer, f"optimizer-{name}")
        if self.accelerator.scaler is not None and state.get("scaler") is not None:
            checks.same_kind(state["scaler"], self.accelerator.scaler.state_dict(), "the loss scaler")

    def _model(self, slot):
        """The model whose state a checkpoint holds: FSDP2's sharded module itself, else unwrapped."""
        return slot.model if self.fsdp2 else self.accelerator.unwrap_model(slot.model)

    def _own_folder(self, path: Path) -> Path:
        """This process's ``rank<r>/``; on a run with more processes than saved it, saved process r mod N's."""
        saved = json.loads((path / ckpt.TRAINER_STATE).read_text())["world_size"]
        return path / f"rank{self.accelerator.process_index % saved}"

    def _load_own_parts(self, path: Path, method, data) -> str | None:
        """Load this process's method and data states (the data position checked against the
        current one first); when either refuses its state, both are put back as they were and the
        reason returned."""
        own = self._own_folder(path)
        fresh_method = _copy_state(method.state_dict())
        fresh_data = data.state_dict() if hasattr(data, "state_dict") else None
        try:
            method.load_state_dict(load_state(own, "method"))
            if fresh_data is not None and (own / "data.json").is_file():
                position = json.loads((own / "data.json").read_text())
                checks.same_kind(position, fresh_data, "data.json", lists_as_now=False)
                data.load_state_dict(position)
        except Exception as err:
            method.load_state_dict(fresh_method)
            if fresh_data is not None:
                data.load_state_dict(fresh_data)
            what = str(err) if isinstance(err, Rejected) else f"{type(err).__name__}: {str(err)[:120]}"
            return f"its method or data state does not load ({what})".replace("\n", " ")
        return None

    def _load_shared_parts(self, path: Path) -> dict:
        """Models, optimizers, schedules, loss scaler, accumulation counter, and this process's RNGs
        last (nothing after them draws a random number); all of it was checked before."""
        state = json.loads((path / ckpt.TRAINER_STATE).read_text())
        device = self.accelerator.device
        for name, slot in self.slots.items():
            if self.uses_deepspeed:
                slot.model.load_checkpoint(str(path), tag=f"deepspeed-{name}")
            elif fsdp.dcp_dir(path, name).is_dir():  # each process reads the parts of every shard it holds
                fsdp.load_sharded(path, name, self._model(slot), slot.optimizer)
            else:
                # safetensors knows "cpu" but not DDP-on-CPU's "cpu:0"
                load_model(self.accelerator.unwrap_model(slot.model), str(path / f"model-{name}.safetensors"),
                           device="cpu" if device.type == "cpu" else str(device))
                slot.optimizer.load_state_dict(load_state(path, f"optimizer-{name}"))
            slot.schedule.load_state_dict(state["schedules"][name])
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.accelerator.step = state.get("accumulation_counter", 0)
        set_rng_state(load_state(self._own_folder(path), "rng"), device)
        if state["world_size"] != self.world_size:
            self._say_world_size_change(state)
        return {"step": state["step"], "history": state["history"]}

    def _say_world_size_change(self, state: dict) -> None:
        """One line, also kept in the eval history (``world_size_changes``) for the run's report."""
        saved = state["world_size"]
        line = (f"world size changed at step {state['step']}: {saved} -> {self.world_size} processes; the global "
                f"batch and data order are kept, per-process RNG streams are not (process r continues saved "
                f"process r mod {saved}'s)")
        state["history"].setdefault("world_size_changes", []).append(line)
        self.accelerator.print(line)


def _snapshot(method, data) -> tuple:
    """The method's and the data stream's state before any checkpoint was tried."""
    return _copy_state(method.state_dict()), (data.state_dict() if hasattr(data, "state_dict") else None)


def _restore(snapshot: tuple, method, data) -> None:
    method_state, data_state = snapshot
    method.load_state_dict(_copy_state(method_state))
    if data_state is not None:
        data.load_state_dict(data_state)


def _copy_state(state):
    """A copy of a method's state to put back if a checkpoint's is refused (its tensors cloned)."""
    structure, tensors = split_state(state)
    return join_state(structure, {k: t.detach().clone() for k, t in tensors.items()})

