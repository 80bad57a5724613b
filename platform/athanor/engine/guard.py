"""Non-finite losses, gradients and weights: found before they reach a checkpoint.

A NaN or inf loss or gradient norm is looked for at every optimizer step, *before* the optimizer
steps, so the weights in memory are still those of the last finite step. The policy is
``run.on_nonfinite``:

- ``stop`` (default): one line naming the step and the value, then exit ``NONFINITE_EXIT_CODE``
  (3). No checkpoint is written and none is pruned: the last finite checkpoint stays the newest,
  and a rerun with ``--run.resume auto`` and a lower LR continues from it.
- ``skip``: the step's update is dropped (its gradients zeroed, the optimizer not stepped; the LR
  schedule still advances, so step ``t`` keeps LR ``t``) and counted; ``run.nonfinite_limit``
  dropped steps in a row of one model stop the run as ``stop`` does.

Finite gradients can still carry weights to inf (an LR of 1e38), so every checkpoint is preceded
by a check of the weights themselves; non-finite weights stop the run whatever the policy.

Under fp16 the gradient scaler owns non-finite *gradients* (an overflow there is routine: the
scaler skips the step and lowers its scale), so only the loss is checked. Under DeepSpeed the
optimizer steps inside ``backward``, so the loss is checked before backward (``skip`` is refused
there: skipping DeepSpeed's backward would desynchronise its accumulation counter).
"""
from __future__ import annotations

import torch

from .. import compat

NONFINITE_EXIT_CODE = 3  # a non-finite loss/gradient/weight stopped the run; no checkpoint written for it


class NonFiniteStop(SystemExit):
    """Exit code 3, with ``message`` (one line: the step and the value; ``Engine.fit`` prints it).
    Callers that expect divergence (an LR sweep) may catch it and record the run as diverged."""

    def __init__(self, message: str):
        super().__init__(NONFINITE_EXIT_CODE)
        self.message = message


class NonFiniteGuard:
    """Per-engine state of the non-finite checks: the losses seen since the last optimizer step,
    the dropped-step streak per model and the total dropped."""

    def __init__(self, engine):
        self.engine = engine
        self.policy = engine.run.on_nonfinite
        self.limit = engine.run.nonfinite_limit
        self.pending_loss: dict[str, torch.Tensor] = {}  # name -> bool tensor: a non-finite loss since the last step
        self.streak: dict[str, int] = {}
        self.skipped = 0  # dropped steps in this process's part of the run

    # ------------------------------------------------------------------ checks
    def note_loss(self, name: str, loss: torch.Tensor) -> None:
        """Remember whether ``loss`` was finite, without a device sync (read at the step)."""
        bad = ~torch.isfinite(loss.detach()).all()
        self.pending_loss[name] = bad if name not in self.pending_loss else self.pending_loss[name] | bad

    def step_is_finite(self, name: str, grad_norm: torch.Tensor | None) -> bool:
        """At an optimizer step of ``name``: True to step. Otherwise stops (policy ``stop``) or
        returns False after counting the dropped step (policy ``skip``). All processes agree: the
        flags are summed over processes (one small collective, only when there are several)."""
        loss_bad = self.pending_loss.pop(name, torch.tensor(False))
        flags = torch.stack([loss_bad.to(self.engine.device).float(),
                             torch.tensor(0.0, device=self.engine.device) if grad_norm is None
                             else (~torch.isfinite(grad_norm.detach())).float().to(self.engine.device)])
        if self.engine.world_size > 1:
            flags = self.engine.accelerator.reduce(flags, reduction="sum")
        loss_flag, norm_flag = flags.tolist()  # the one device sync per step
        if not (loss_flag or norm_flag):
            self.streak[name] = 0
            return True
        what = "loss" if loss_flag else f"gradient norm ({float(grad_norm)})"
        self.streak[name] = self.streak.get(name, 0) + 1
        if self.policy == "stop":
            self.stop(f"non-finite {what} of '{name}'")
        self.skipped += 1
        if self.streak[name] >= self.limit:
            self.stop(f"non-finite {what} of '{name}' for {self.streak[name]} steps in a row "
                      f"(run.nonfinite_limit={self.limit})")
        return False

    def check_loss_before_backward(self, name: str, loss: torch.Tensor) -> None:
        """DeepSpeed's backward also steps: the loss is the last thing that can be checked."""
        self.note_loss(name, loss)
        self.step_is_finite(name, None)

    def check_weights(self) -> None:
        """Before a checkpoint: every trainable model's weights (local shards under ZeRO-3/FSDP)
        finite on every process, or stop."""
        bad = []
        for name, slot in self.engine.slots.items():
            tensors = [compat.local_shard(p) for p in slot.model.parameters()]
            tensors = [t for t in tensors if t.numel()]
            flag = torch.stack([~torch.isfinite(t).all() for t in tensors]).any().float() if tensors else \
                torch.tensor(0.0)
            bad.append(flag.to(self.engine.device))
        if not bad:
            return
        flags = torch.stack(bad)
        if self.engine.world_size > 1:
            flags = self.engine.accelerator.reduce(flags, reduction="sum")
        names = [n for n, f in zip(self.engine.slots, flags.tolist()) if f]
        if names:
            self.stop(f"non-finite weights in {', '.join(repr(n) for n in names)} (finite gradients, "
                      f"an update too large)")

    # ------------------------------------------------------------------ the stop
    def stop(self, what: str) -> None:
        from . import checkpoint as ckpt

        latest = ckpt.latest_checkpoint(self.engine.output_dir)
        message = (f"step {self.engine.step}: {what}; stopped without writing a checkpoint (newest finite "
                   f"checkpoint: {latest or 'none'}). Lower optim.lr, set optim.grad_clip, or use "
                   f"--run.on_nonfinite skip")
        raise NonFiniteStop(message)  # Engine.fit prints it (main process), below the progress bar
