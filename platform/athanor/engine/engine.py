"""The training loop's bookkeeping on top of accelerate.

A ``Method`` owns what one step does; the ``Engine`` owns everything around it: devices and
distribution (accelerate), gradient accumulation, clipping, LR schedules, the eval/log/save
schedule, metrics, progress, checkpoints, exact resume and preemption signals.

Methods with several models (a generator and a critic) register each with its own optimizer and
call ``engine.optimize(name, loss)`` as often as their update rule says; ``engine.due(name)``
reads a model's ``every`` rate. Nothing in the engine knows which method it runs.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, broadcast, set_seed
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from .. import compat
from ..config import ConfigError, OptimConfig, TrainConfig
from . import checkpoint as ckpt
from . import resume_config
from .guard import NonFiniteGuard, NonFiniteStop
from .lock import OutputLock
from .metrics import MetricsLogger
from .schedule import Schedule, build_optimizer, param_groups
from .state import fsync_path, load_state, rng_state, save_state, set_rng_state, write_json_durably

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpoint written, run me again (SLURM requeues)
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C (128 + SIGINT), as a shell reports it; the first one checkpoints
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def _launch_settings(cpu_requested: bool) -> tuple[bool, bool, bool]:
    """(cpu, deepspeed, distributed) for this process, from the config and accelerate's launcher."""
    cpu = cpu_requested or not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return cpu, deepspeed, int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state(cpu: bool = False) -> PartialState:
    """accelerate's per-process state, set up exactly as ``Engine`` sets it up. Code that runs
    before any engine exists (a stage that only evaluates, a resumed recipe whose stages are all
    done) must use this rather than a bare ``PartialState()``: under DeepSpeed on CPU that comes
    up as a single process, and every later engine inherits it."""
    cpu, deepspeed, distributed = _launch_settings(cpu)
    return PartialState(cpu=cpu and not deepspeed, **({"backend": "gloo"} if cpu and distributed else {}))


class Method:
    """What one training step does. Subclasses build models in ``setup`` and register them.

    What the engine may ask of a method is declared here: ``flops_per_token`` (for MFU; None when
    unknown) and ``batches(engine)`` (its stateful training stream, when the caller gives none)."""

    flops_per_token: float | None = None

    def batches(self, engine: "Engine"):
        raise NotImplementedError(f"{type(self).__name__} has no default batches: pass data to fit")

    def setup(self, engine: "Engine") -> None:
        raise NotImplementedError

    def train_step(self, batch: Any) -> dict:
        """One micro-batch; returns metrics (tensors or numbers). ``tokens``/``samples`` counts
        become throughput."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        """The method's own state (its torch.Generator, weight averages, counters), saved per process:
        tensors and JSON values in nested dicts/lists/tuples, never other Python objects."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class Slot:
    model: torch.nn.Module
    optimizer: Any
    schedule: Schedule | None
    every: int
    grad_clip: float


class Engine:
    def __init__(self, config: TrainConfig, output_dir: str | Path | None = None):
        """``config`` has ``run``, ``optim`` and ``engine`` sections; its resolved form is saved as
        ``OUTPUT/config.yaml``. ``output_dir`` overrides ``run.output_dir`` (multi-stage recipes)."""
        run, optim, engine = config.run, config.optim, config.engine
        self.run, self.optim_cfg, self.engine_cfg = run, optim, engine
        cpu, deepspeed, distributed = _launch_settings(engine.cpu)
        if cpu and engine.mixed_precision == "fp16":
            raise ConfigError("engine.mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")
        # Accelerator(cpu=True) silently drops DeepSpeed; on a GPU-less machine DeepSpeed picks its
        # CPU accelerator by itself, so cpu=True is only passed when DeepSpeed is not asked for.
        # DeepSpeed and DDP on CPU need gloo named explicitly (see ENVIRONMENT.md).
        handlers = [InitProcessGroupKwargs(backend="gloo")] if cpu and distributed else []
        # A multi-stage recipe may change precision between stages; accelerate's state is a
        # process-wide singleton that refuses that unless reset (the process group survives).
        compat.reset_accelerator_state_if_precision_changes(engine.mixed_precision)
        self.accelerator = Accelerator(cpu=cpu and not deepspeed, mixed_precision=engine.mixed_precision,
                                       gradient_accumulation_steps=engine.grad_accum,
                                       step_scheduler_with_optimizer=False, kwargs_handlers=handlers,
                                       **({"dynamo_backend": "inductor"} if engine.compile else {}))
        self.output_dir = Path(output_dir or run.output_dir)
        if run.on_nonfinite == "skip" and self.uses_deepspeed:
            raise ConfigError("run.on_nonfinite=skip is not supported under DeepSpeed (its optimizer steps "
                              "inside backward); use stop")
        self._lock = OutputLock(self.output_dir)
        self._on_main_then_all(lambda: self._claim_output_dir(config))
        self.guard = NonFiniteGuard(self)
        self.slots: dict[str, Slot] = {}
        self.frozen: dict[str, torch.nn.Module] = {}
        self._unwrapped: dict[str, tuple] = {}  # name -> (wrapped model, unwrapped model)
        self.step = 0
        self.history: dict[str, Any] = {}  # initial/final eval metrics, carried across resumes
        self._stop_signal = None
        set_seed(run.seed)

    def _claim_output_dir(self, config: TrainConfig) -> None:
        """Lock the folder, compare the config with the checkpoint's about to be resumed (a change
        that shapes the model or data is refused; optimizer/schedule changes are said here and
        applied in ``fit``), and only then write ``config.yaml`` (the old one kept in its history)."""
        self._lock.acquire()
        try:
            checkpoint = resume_config.checkpoint_to_resume(self.output_dir, self.run.resume)
            note = resume_config.compare(config, checkpoint) if checkpoint is not None else None
        except ConfigError:
            self._lock.release()
            raise
        if note:
            print(note, flush=True)
        resume_config.save_with_history(config, self.output_dir)

    def _on_main_then_all(self, fn) -> None:
        """``fn()`` on the main process; a ConfigError it raises is raised on every process (one
        line from the main one, exit 2 everywhere, nobody left waiting at a barrier)."""
        error = None
        if self.is_main:
            try:
                fn()
            except ConfigError as e:
                error = str(e)
        if self.world_size > 1:
            from accelerate.utils import broadcast_object_list

            error = broadcast_object_list([error])[0]
        if error is not None and not self.is_main:
            raise SystemExit(2)  # the main process says it, once
        if error is not None:
            raise ConfigError(error)

    # ---------------------------------------------------------------- facts
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def uses_deepspeed(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    # ---------------------------------------------------------------- models
    def register(self, name: str, model: torch.nn.Module, *, optim: OptimConfig | None = None,
                 max_steps: int | None = None, every: int = 1, lr_scales: dict | None = None,
                 trainable: bool = True, batch_size: int = 1) -> torch.nn.Module:
        """Prepare a model (and, if trainable, its optimizer and schedule); returns the wrapped model.
        Trainable models are checkpointed; frozen ones are only moved to the device."""
        if not trainable:
            model.requires_grad_(False).eval()
            self.frozen[name] = model.to(self.device)
            return self.frozen[name]
        cfg = optim or self.optim_cfg
        if self.uses_deepspeed:  # DeepSpeed wants a micro-batch size; ours come from no DataLoader
            ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
            if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
                ds["train_micro_batch_size_per_gpu"] = batch_size
        optimizer = build_optimizer(param_groups(model, cfg, lr_scales), cfg)
        # The schedule holds the raw torch optimizer: wrappers (DeepSpeed's included) keep its
        # param_groups, and accelerate's scheduler wrapper would step once per process.
        schedule = Schedule(optimizer, cfg, max_steps or self.run.max_steps)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        self.slots[name] = Slot(model, optimizer, schedule, every, cfg.grad_clip)
        return model

    def due(self, name: str) -> bool:
        """Whether ``name`` updates at this step (its ``every`` rate, counted from step 1)."""
        return (self.step - 1) % self.slots[name].every == 0

    def optimize(self, name: str, loss: torch.Tensor) -> torch.Tensor | None:
        """Backward ``loss`` into ``name``'s parameters; on the last micro-batch of a step, clip,
        step the optimizer and the schedule, and zero the gradients. Returns the grad norm."""
        slot = self.slots[name]
        if self.uses_deepspeed:  # DeepSpeed steps inside backward: the loss is the last thing to check
            self.guard.check_loss_before_backward(name, loss)
        else:
            self.guard.note_loss(name, loss)
        if self.uses_deepspeed and slot.model is not compat.first_deepspeed_engine(self.accelerator):
            # accelerator.backward drives only the first prepared DeepSpeed engine; a second model (a
            # critic beside a generator) drives its own engine the same way: backward, then step at the
            # accumulation boundary (DeepSpeed's step clips, steps the optimizer and zeroes the grads).
            slot.model.set_gradient_accumulation_boundary(is_boundary=self.accelerator.sync_gradients)
            slot.model.backward(loss)
            if self.accelerator.sync_gradients:
                slot.model.step()
        else:
            self.accelerator.backward(loss)
        if not self.accelerator.sync_gradients:
            return None
        norm = None
        if not self.uses_deepspeed:  # DeepSpeed clips inside its engine step
            # The norm is taken even without clipping (max_norm=inf): a NaN/inf gradient must be seen
            # before the optimizer steps. Under fp16 the scaler owns inf gradients (guard.py).
            fp16 = self.accelerator.scaler is not None
            if slot.grad_clip or not fp16:
                norm = self.accelerator.clip_grad_norm_(slot.model.parameters(), slot.grad_clip or float("inf"))
            if not self.guard.step_is_finite(name, None if fp16 else norm) and not fp16:
                slot.optimizer.zero_grad(set_to_none=True)  # run.on_nonfinite=skip: drop this update
                slot.schedule.step()
                return norm
        slot.optimizer.step()
        slot.schedule.step()
        slot.schedule.apply_independent_decay()
        slot.optimizer.zero_grad(set_to_none=True)
        return norm

    def unwrap(self, name: str) -> torch.nn.Module:
        # Cached per wrapped model: accelerate's unwrap_model reads package metadata on every call
        # (~30 ms of CPU, a tenth of a tiny model's step), and the answer never changes.
        model = self.slots[name].model
        cached = self._unwrapped.get(name)
        if cached is None or cached[0] is not model:
            cached = self._unwrapped[name] = (model, self.accelerator.unwrap_model(model))
        return cached[1]

    def save_pretrained(self, name: str, folder: str | Path, **kwargs) -> Path:
        """``save_pretrained`` of the registered model ``name`` into ``folder``: ZeRO-3 shards are
        gathered on every process, the main process writes (safetensors), then all wait."""
        model = self.slots[name].model if name in self.slots else self.frozen[name]
        zero3 = self.uses_deepspeed and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        state_dict = self.accelerator.get_state_dict(model) if zero3 else None  # a collective: all ranks
        if self.is_main:
            unwrapped = self.accelerator.unwrap_model(model)
            if state_dict is not None:
                kwargs["state_dict"] = state_dict
            unwrapped.save_pretrained(folder, safe_serialization=True, **kwargs)
        self.accelerator.wait_for_everyone()
        return Path(folder)

    def lr(self, name: str | None = None) -> float:
        slot = self.slots[name or next(iter(self.slots))]
        return slot.schedule.get_last_lr()[0]

    # ---------------------------------------------------------------- loop
    def fit(self, method: Method, data: Iterator, max_steps: int | None = None) -> dict:
        """Run ``method`` on ``data`` (a stateful iterator) to ``max_steps``; resumes when asked."""
        max_steps = self.run.max_steps if max_steps is None else max_steps
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._on_main_then_all(self._lock.acquire)  # held since __init__ unless an earlier fit ended
        config_values = resume_config.optimizer_values(self.slots)
        self._resume(method, data)
        resume_config.apply_optimizer_values(self.slots, config_values)  # the config's values, not the saved ones
        logger = MetricsLogger(self.output_dir, self.is_main, keep_up_to=self.step)
        if self.step == 0 and "initial_eval" not in self.history:
            self.history["initial_eval"] = self._evaluate(method)
            logger.log(0, {f"eval_{k}": v for k, v in self.history["initial_eval"].items()})
        previous_handlers = self._install_signal_handlers()
        bar = tqdm(total=max_steps, initial=self.step, disable=not (self.is_main and self.run.progress),
                   desc=self.output_dir.name, dynamic_ncols=True)
        window: dict[str, list] = {}
        t_window = time.perf_counter()
        try:
            while self.step < max_steps:
                self.step += 1
                lrs = {name: self.lr(name) for name in self.slots}  # the LR this step uses
                for _ in range(self.engine_cfg.grad_accum):
                    batch = self._to_device(next(data))
                    with self.accelerator.accumulate(*[s.model for s in self.slots.values()]):
                        out = method.train_step(batch)
                    for k, v in out.items():
                        window.setdefault(k, []).append(v.detach().float() if torch.is_tensor(v) else float(v))
                is_last = self.step == max_steps
                row = {}
                if self.step % self.run.log_every == 0 or is_last:
                    row = self._reduce_window(window, time.perf_counter() - t_window, method, lrs)
                    window, t_window = {}, time.perf_counter()
                if (self.run.eval_every and self.step % self.run.eval_every == 0) or is_last:
                    evals = self._evaluate(method)
                    row.update({f"eval_{k}": v for k, v in evals.items()})
                    if is_last:
                        self.history["final_eval"] = evals
                if row and self.guard.skipped:
                    row["nonfinite_skipped"] = self.guard.skipped
                if row:
                    logger.log(self.step, row)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "eval_loss", "lr")})
                bar.update(1)
                stop = self._stop_requested()
                if (self.run.save_every and self.step % self.run.save_every == 0) or is_last or stop:
                    self.guard.check_weights()  # no checkpoint of non-finite weights, whatever the policy
                    logger.flush()  # buffered metrics lines of the steps this checkpoint holds
                    self.save_checkpoint(method, data)
                if stop:
                    bar.close()
                    logger.close()
                    self.accelerator.print(f"signal {stop}: checkpoint at step {self.step} written, exiting")
                    raise SystemExit(INTERRUPTED_EXIT_CODE if stop == signal.SIGINT else PREEMPTED_EXIT_CODE)
        except NonFiniteStop as nonfinite:
            bar.close()  # the line goes below the progress bar, not into it
            if self.is_main:
                print(f"error: {nonfinite.message}", file=sys.stderr, flush=True)
            raise
        finally:
            bar.close()
            logger.close()
            self._restore_signal_handlers(previous_handlers)
            if self.is_main:
                self._lock.release()
        self._pass_on_late_signal(previous_handlers)
        if "final_eval" not in self.history:  # resumed at max_steps: evaluate the loaded model
            self.history["final_eval"] = self._evaluate(method)
        return self.history["final_eval"]

    def _to_device(self, batch):
        if torch.is_tensor(batch):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, dict):
            return {k: self._to_device(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._to_device(v) for v in batch)
        return batch

    def _evaluate(self, method: Method) -> dict:
        for slot in self.slots.values():
            slot.model.eval()
        with torch.no_grad():
            out = method.evaluate()
        for slot in self.slots.values():
            slot.model.train()
        return {k: float(v) for k, v in out.items()}

    def _reduce_window(self, window: dict, seconds: float, method: Method, lrs: dict) -> dict:
        """Means over the window's micro-batches and over processes; counts become rates."""
        keys = sorted(window)
        counts = {"tokens", "samples"}
        local = torch.tensor([sum(map(float, window[k])) / (1 if k in counts else len(window[k])) for k in keys],
                             dtype=torch.float64, device=self.device)
        total = self.accelerator.reduce(local, reduction="sum")
        row = {}
        for k, v in zip(keys, total.tolist()):
            row[f"{k}_per_s" if k in counts else k] = v / seconds if k in counts else v / self.world_size
        for name, lr in lrs.items():
            row["lr" if len(lrs) == 1 else f"lr_{name}"] = lr
        peak = self._peak_flops()
        flops_per_token = method.flops_per_token
        if peak and flops_per_token and "tokens_per_s" in row:
            row["mfu"] = row["tokens_per_s"] * flops_per_token / (peak * self.world_size)
        return row

    def _peak_flops(self) -> float | None:
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), None)

    # ---------------------------------------------------------------- signals
    def _install_signal_handlers(self) -> dict:
        """SIGUSR1/SIGTERM during ``fit`` mean: checkpoint at the end of this step, exit 75. A first
        SIGINT (Ctrl-C) does the same and exits 130; a second one exits 130 at once, without a
        checkpoint (one being written stays a ``.tmp-*`` folder, cleared by the next save). SIGINT
        is only taken over from Python's default handler (a sweep worker that ignores it keeps
        ignoring it)."""
        def handler(signum, _frame):
            if signum == signal.SIGINT and self._stop_signal == signal.SIGINT:
                os.write(2, b"second interrupt: exiting now, without a checkpoint\n")
                raise SystemExit(INTERRUPTED_EXIT_CODE)
            self._stop_signal = signum
            if signum == signal.SIGINT and self.is_main:  # os.write: print is not safe in a handler
                os.write(2, f"interrupt: checkpoint at the end of step {self.step}, then exit "
                            f"(Ctrl-C again: exit now)\n".encode())

        previous = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            if sig == signal.SIGINT and signal.getsignal(sig) is not signal.default_int_handler:
                continue
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside a notebook worker)
                pass
        return previous

    def _restore_signal_handlers(self, previous: dict) -> None:
        """Give the signals back to whoever had them (a later stage's engine, a sweep worker, the
        default). A signal that came after the last step was checked is then passed on, not lost
        (``_pass_on_late_signal``): under SLURM the default action ends the process, and the job
        requeues and resumes from the final checkpoint."""
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)

    def _pass_on_late_signal(self, handled: dict) -> None:
        pending, self._stop_signal = self._stop_signal, None
        if pending and pending in handled:
            signal.raise_signal(pending)

    def _stop_requested(self) -> int:
        if self.world_size == 1:  # no collective to join: skip the tensor and its device sync
            return int(self._stop_signal or 0)
        flag = torch.tensor([self._stop_signal or 0], device=self.device)
        return int(self.accelerator.gather(flag).max().item())  # one process signalled: all stop at this step

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, method: Method, data) -> Path:
        """Write ``checkpoints/step-N``: the state of every stateful object, with no Python objects.

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
        tmp = ckpt.temporary_dir(self.output_dir, self.step)
        if self.is_main:
            ckpt.clear_stale_temporaries(self.output_dir)
        self.accelerator.wait_for_everyone()
        own = tmp / f"rank{self.rank}"
        own.mkdir(parents=True, exist_ok=True)
        save_state(rng_state(self.device), own, "rng")
        save_state(method.state_dict(), own, "method")
        if hasattr(data, "state_dict"):
            write_json_durably(own / "data.json", data.state_dict())
        if self.uses_deepspeed:  # a collective: every process writes its ZeRO shards
            for name, slot in self.slots.items():
                slot.model.save_checkpoint(str(tmp), tag=f"deepspeed-{name}", save_latest=False)
        elif self.is_main:
            for name, slot in self.slots.items():
                weights = tmp / f"model-{name}.safetensors"
                save_model(self.accelerator.unwrap_model(slot.model), str(weights), force_contiguous=True)
                fsync_path(weights)
                save_state(slot.optimizer.state_dict(), tmp, f"optimizer-{name}")
        if self.is_main:
            scaler = self.accelerator.scaler
            write_json_durably(tmp / "trainer_state.json", {
                "step": self.step, "world_size": self.world_size, "history": self.history,
                "accumulation_counter": self.accelerator.step,
                "schedules": {n: s.schedule.state_dict() for n, s in self.slots.items()},
                "scaler": scaler.state_dict() if scaler is not None else None})
            if (self.output_dir / "config.yaml").is_file():  # the checkpoint says what wrote it, wherever it goes
                (tmp / "config.yaml").write_bytes((self.output_dir / "config.yaml").read_bytes())
        self.accelerator.wait_for_everyone()
        final = tmp.parent / f"step-{self.step}"
        if self.is_main:
            ckpt.write_manifest(tmp)
            final = ckpt.publish(tmp, self.step)
            ckpt.prune(self.output_dir, self.run.keep_last)
        self.accelerator.wait_for_everyone()
        return final

    def _checkpoint_to_resume(self, resume: str) -> Path | None:
        """The checkpoint to resume from: with ``auto`` the newest whose manifest verifies (one line
        per newer one skipped, and why), else the one named. The main process hashes; the others
        learn its choice by a broadcast."""
        code, chosen, problem = -1, None, None  # code: step of the chosen, -1 none, -2 the named one is bad
        if self.is_main:
            if resume == "auto":
                chosen, skipped = ckpt.newest_verified(self.output_dir)
                for path, why in skipped:
                    instead = f"resuming from {chosen.name} instead" if chosen else "no earlier one verifies: starting afresh"
                    print(f"skipping checkpoint {path.name} ({path}): {why}; {instead}", flush=True)
                code = int(chosen.name.split("-")[1]) if chosen else -1
            else:
                problem = ckpt.verify(Path(resume))
                code = -2 if problem else 0
        if self.world_size > 1:
            code = int(broadcast(torch.tensor([code], dtype=torch.long, device=self.device), from_process=0).item())
        if code == -2:
            raise ConfigError(f"run.resume={resume}: cannot resume from it: {problem or 'it does not verify'}")
        if resume != "auto":
            return Path(resume)
        return ckpt.checkpoint_root(self.output_dir) / f"step-{code}" if code >= 0 else None

    def _resume(self, method: Method, data) -> None:
        resume = self.run.resume
        if resume == "none":
            if ckpt.list_checkpoints(self.output_dir):
                raise ConfigError(f"{self.output_dir} already holds checkpoints; use --run.resume auto "
                                  f"to continue or choose another --run.output_dir")
            return
        path = self._checkpoint_to_resume(resume)
        if path is None:
            return
        state = ckpt.read_json(path / "trainer_state.json")
        if state["world_size"] != self.world_size:
            raise ConfigError(f"checkpoint {path} was written by {state['world_size']} processes, this run has "
                              f"{self.world_size}; resume with the same world size")
        for name, slot in self.slots.items():
            if self.uses_deepspeed:
                slot.model.load_checkpoint(str(path), tag=f"deepspeed-{name}")
            else:
                # safetensors knows "cpu" but not DDP-on-CPU's "cpu:0"
                load_model(self.accelerator.unwrap_model(slot.model), str(path / f"model-{name}.safetensors"),
                           device="cpu" if self.device.type == "cpu" else str(self.device))
                slot.optimizer.load_state_dict(load_state(path, f"optimizer-{name}"))
            slot.schedule.load_state_dict(state["schedules"][name])
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.accelerator.step = state.get("accumulation_counter", 0)
        own = path / f"rank{self.rank}"
        method.load_state_dict(load_state(own, "method"))
        set_rng_state(load_state(own, "rng"), self.device)
        if hasattr(data, "load_state_dict") and (own / "data.json").exists():
            data.load_state_dict(json.loads((own / "data.json").read_text()))
        self.step, self.history = state["step"], state["history"]
        self.accelerator.print(f"resumed from {path} at step {self.step}")
