"""The training loop's bookkeeping on top of accelerate.

A ``Method`` owns what one step does; the ``Engine`` owns everything around it: devices and
distribution (accelerate), gradient accumulation, clipping, LR schedules, the eval/log/save
schedule, metrics, progress, checkpoints, exact resume and preemption signals.

Methods with several models (a generator and a critic) register each with its own optimizer and
call ``engine.optimize(name, loss)`` as often as their update rule says; ``engine.due(name)``
reads a model's ``every`` rate. Nothing in the engine knows which method it runs.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed
from tqdm.auto import tqdm

from .. import compat
from ..config import ConfigError, OptimConfig, TrainConfig
from . import fsdp, resume_config
from .checkpointer import Checkpointer
from .guard import NonFiniteGuard, NonFiniteStop
from .lock import OutputLock
from .metrics import MetricsLogger
from .mfu import peak_flops
from .api import Parallelism, Update, accelerator_parallelism, launch_settings
from .schedule import Schedule, build_optimizer, param_groups

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpoint written, run me again (SLURM requeues)
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C (128 + SIGINT), as a shell reports it; the first one checkpoints
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


class MetricsWindow:
    """The metrics of the micro-batches since the last logged row, and when that window began."""

    def __init__(self):
        self.values: dict[str, list] = {}
        self.start = time.perf_counter()

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            self.values.setdefault(k, []).append(v.detach().float() if torch.is_tensor(v) else float(v))

    def take(self) -> tuple[dict, float]:
        """(the window's values, its seconds), and a new window begins."""
        values, seconds = self.values, time.perf_counter() - self.start
        self.values, self.start = {}, time.perf_counter()
        return values, seconds


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
        cpu, deepspeed, distributed = launch_settings(engine.cpu)
        self.fsdp2 = fsdp.take_over()  # the engine shards the models itself (engine/fsdp.py)
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
        if self.fsdp2:
            fsdp.announce(engine, self.accelerator)
        self.output_dir = Path(output_dir or run.output_dir)
        if run.on_nonfinite == "skip" and self.uses_deepspeed:
            raise ConfigError("run.on_nonfinite=skip is not supported under DeepSpeed (its optimizer steps "
                              "inside backward); use stop")
        self._lock = OutputLock(self.output_dir)
        self._on_main_then_all(lambda: self._claim_output_dir(config))
        self.guard = NonFiniteGuard(self)
        self.slots: dict[str, Slot] = {}
        self.checkpointer = Checkpointer(self.output_dir, self.accelerator, self.slots, run.keep_last, self.fsdp2)
        self.frozen: dict[str, torch.nn.Module] = {}
        self._unwrapped: dict[str, tuple] = {}  # name -> (wrapped model, unwrapped model)
        self._after_step: dict[str, list[Callable[[], None]]] = {}  # name -> hooks run at the end of its steps
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

    @property
    def parallelism(self) -> Parallelism:
        """How this run distributes its models (``launch_parallelism`` before an engine exists)."""
        return Parallelism("fsdp2", world_size=self.world_size) if self.fsdp2 else accelerator_parallelism(self.accelerator)

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
        if self.engine_cfg.activation_checkpointing:
            compat.enable_activation_checkpointing(model)
        if self.uses_deepspeed:  # DeepSpeed wants a micro-batch size; ours come from no DataLoader
            ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
            if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
                ds["train_micro_batch_size_per_gpu"] = batch_size
        if self.fsdp2:  # before the optimizer: it must hold the sharded parameters
            model = fsdp.shard(model, self.device, self.engine_cfg.mixed_precision)
        optimizer = build_optimizer(param_groups(model, cfg, lr_scales), cfg)
        # The schedule holds the raw torch optimizer: wrappers (DeepSpeed's included) keep its
        # param_groups, and accelerate's scheduler wrapper would step once per process.
        schedule = Schedule(optimizer, cfg, max_steps or self.run.max_steps)
        model, optimizer = (model, self.accelerator.prepare(optimizer)) if self.fsdp2 else \
            self.accelerator.prepare(model, optimizer)  # FSDP2: not the model (accelerate would wrap it in DDP)
        self.slots[name] = Slot(model, optimizer, schedule, every, cfg.grad_clip)
        return model

    def due(self, name: str) -> bool:
        """Whether ``name`` updates at this step (its ``every`` rate, counted from step 1)."""
        return (self.step - 1) % self.slots[name].every == 0

    def optimize(self, name: str, loss: torch.Tensor) -> Update:
        """Backward ``loss`` into ``name``'s parameters; on the last micro-batch of a step, clip,
        step the optimizer and the schedule, zero the gradients, then run ``name``'s after-step
        hooks (``after_step``). Returns what it did: whether the step ended, the grad norm."""
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
            return Update(stepped=False)
        update = Update(stepped=True, grad_norm=self._step(name, slot))
        for hook in self._after_step.get(name, ()):
            hook()
        return update

    def _step(self, name: str, slot: Slot) -> torch.Tensor | None:
        """The end of a step: clip, step the optimizer and the schedule, zero the grads; the grad norm."""
        norm = None
        if not self.uses_deepspeed:  # DeepSpeed clips inside its engine step
            # The norm is taken even without clipping (max_norm=inf): a NaN/inf gradient must be seen
            # before the optimizer steps. Under fp16 the scaler owns inf gradients (guard.py).
            fp16 = self.accelerator.scaler is not None
            if slot.grad_clip or not fp16:
                clip = fsdp.clip_grad_norm_ if self.fsdp2 else self.accelerator.clip_grad_norm_
                norm = clip(slot.model.parameters(), slot.grad_clip or float("inf"))
            if not self.guard.step_is_finite(name, None if fp16 else norm) and not fp16:
                slot.optimizer.zero_grad(set_to_none=True)  # run.on_nonfinite=skip: drop this update
                slot.schedule.step()
                return norm
        slot.optimizer.step()
        slot.schedule.step()
        slot.schedule.apply_independent_decay()
        slot.optimizer.zero_grad(set_to_none=True)
        return norm

    def after_step(self, name: str, hook: Callable[[], None]) -> None:
        """Call ``hook()`` at the end of every step of ``name`` (EMAs, SeND's schedule); from ``Method.setup``."""
        self._after_step.setdefault(name, []).append(hook)

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """``tensor`` summed (``reduction="sum"``) or averaged (``"mean"``) over processes."""
        return self.accelerator.reduce(tensor, reduction=reduction)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` concatenated along the first dimension, on every process."""
        return self.accelerator.gather(tensor)

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
        if self.fsdp2 and name in self.slots:  # the full state dict gathered on the main process
            fsdp.save_pretrained(model, folder, self.is_main, **kwargs)
            self.accelerator.wait_for_everyone()
            return Path(folder)
        zero3 = self.parallelism.shards_parameters and not self.fsdp2
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
        logger = self._begin(method, data)
        previous_handlers = self._install_signal_handlers()
        bar = tqdm(total=max_steps, initial=self.step, disable=not (self.is_main and self.run.progress),
                   desc=self.output_dir.name, dynamic_ncols=True)
        window = MetricsWindow()
        try:
            while self.step < max_steps:
                self.step += 1
                lrs = self._train_step(method, data, window)
                is_last = self.step == max_steps
                self._log_and_evaluate(method, window, lrs, is_last, logger, bar)
                bar.update(1)
                stop = self._stop_requested()
                if (self.run.save_every and self.step % self.run.save_every == 0) or is_last or stop:
                    self._save(method, data, logger)
                if stop:
                    self._exit_on_signal(stop, bar, logger)
        except NonFiniteStop as nonfinite:
            bar.close()  # the line goes below the progress bar, not into it
            if self.is_main:
                print(f"error: {nonfinite.message}", file=sys.stderr, flush=True)
            raise
        finally:
            self._end(bar, logger, previous_handlers)
        self._pass_on_late_signal(previous_handlers)
        if "final_eval" not in self.history:  # resumed at max_steps: evaluate the loaded model
            self.history["final_eval"] = self._evaluate(method)
        return self.history["final_eval"]

    def _begin(self, method: Method, data) -> MetricsLogger:
        """Lock the folder, resume (the config's optimizer values put over the saved ones), open
        the metrics and, on a fresh start, evaluate once (step 0)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._on_main_then_all(self._lock.acquire)  # held since __init__ unless an earlier fit ended
        config_values = resume_config.optimizer_values(self.slots)
        resumed = self.checkpointer.resume(self.run.resume, method, data)
        if resumed is not None:
            self.step, self.history = resumed["step"], resumed["history"]
        resume_config.apply_optimizer_values(self.slots, config_values)  # the config's values, not the saved ones
        # Rows past the resumed step are dropped (they are redone), so each step is logged once; a
        # fresh start keeps none, not even an earlier attempt's step-0 eval.
        logger = MetricsLogger(self.output_dir, self.is_main, keep_up_to=self.step if self.step > 0 else -1,
                               trackers=tuple(self.run.trackers))
        if self.step == 0 and "initial_eval" not in self.history:
            self.history["initial_eval"] = self._evaluate(method)
            logger.log(0, {f"eval_{k}": v for k, v in self.history["initial_eval"].items()})
        return logger

    def _train_step(self, method: Method, data, window: "MetricsWindow") -> dict:
        """The micro-batches of one step (``engine.grad_accum``); returns the LR each model used."""
        lrs = {name: self.lr(name) for name in self.slots}  # the LR this step uses
        for _ in range(self.engine_cfg.grad_accum):
            batch = self._to_device(next(data))
            with self.accelerator.accumulate(*[s.model for s in self.slots.values()]):
                window.add(method.train_step(batch))
        return lrs

    def _log_and_evaluate(self, method: Method, window: "MetricsWindow", lrs: dict, is_last: bool,
                          logger: MetricsLogger, bar) -> None:
        """The step's metrics row, on the log and eval schedules (and at the last step)."""
        row = {}
        if self.step % self.run.log_every == 0 or is_last:
            row = self._reduce_window(*window.take(), method, lrs)
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

    def _save(self, method: Method, data, logger: MetricsLogger) -> None:
        self.guard.check_weights()  # no checkpoint of non-finite weights, whatever the policy
        logger.flush()  # buffered metrics lines of the steps this checkpoint holds
        self.save_checkpoint(method, data)

    def _exit_on_signal(self, stop: int, bar, logger: MetricsLogger) -> None:
        bar.close()
        logger.close()
        self.accelerator.print(f"signal {stop}: checkpoint at step {self.step} written, exiting")
        raise SystemExit(INTERRUPTED_EXIT_CODE if stop == signal.SIGINT else PREEMPTED_EXIT_CODE)

    def _end(self, bar, logger: MetricsLogger, previous_handlers: dict) -> None:
        """At every exit of ``fit``: close the bar and the metrics, give the signals back, unlock."""
        bar.close()
        logger.close()
        self._restore_signal_handlers(previous_handlers)
        if self.is_main:
            self._lock.release()

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
        peak = peak_flops(self.device, self.engine_cfg.mixed_precision)
        flops_per_token = method.flops_per_token
        if peak and flops_per_token and "tokens_per_s" in row:
            row["mfu"] = row["tokens_per_s"] * flops_per_token / (peak * self.world_size)
        return row

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
        """Write ``checkpoints/step-N`` of the current step (what it holds: ``Checkpointer.save``)."""
        return self.checkpointer.save(self.step, self.history, method, data)
