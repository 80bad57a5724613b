"""Causal-LM pretraining: next-token cross-entropy (+ optional z-loss) on packed text blocks.

The vehicle the stability recipe sweeps: besides the loss it reports the probes of Wortsman et
al. 2023 on logging steps only, so they cost nothing in between:

- ``max_attn_logit`` (max over layers; ``_l{i}`` per layer): the largest pre-softmax attention
  logit q·k/√d_h over a sample of sequences (attention logit growth, Dehghani et al. 2023);
- ``attn_entropy`` (min over layers; ``_l{i}`` per layer): mean attention entropy in nats,
  near 0 when attention collapses to one-hot;
- ``act_rms`` (max over layers; ``_l{i}``): RMS of the residual stream after each block;
- ``log_z_mean`` / ``log_z_max`` (every step): output log Z = logsumexp of the logits;
- ``grad_norm`` and ``grad_rms`` = ‖g‖₂ / √n_params (global, before clipping);
- ``diverged``: 1 when the training loss is non-finite or above ℓ0, the eval loss at
  initialisation.
"""
from __future__ import annotations

import math
import torch

from ...data import TextData, sharded_batches
from ...engine import Engine, Method
from ...models import AthanorGPT
from ...parts.gpt import GPTModelConfig, build_model


PROBE_ROWS = 16  # sequences the attention/activation probes look at: cheap at any batch size


class Pretrain(Method):
    def __init__(self, model_cfg: GPTModelConfig, data: TextData, batch_size: int, eval_batches: int,
                 probe_every: int = 100):
        self.model_cfg, self.data = model_cfg, data
        self.batch_size, self.eval_batches = batch_size, eval_batches
        self.probe_every = probe_every

    def setup(self, engine: Engine) -> None:
        self.engine = engine
        seq_len = self.data.eval_blocks.shape[1]  # block_size + 1, in memory or streamed
        model = build_model(self.model_cfg, len(self.data.tokenizer), seq_len)
        n_params = sum(p.numel() for p in model.parameters())
        layers, width = model.config.num_hidden_layers, model.config.hidden_size
        self.flops_per_token = 6 * n_params + 12 * layers * width * seq_len  # Kaplan et al. + attention
        self.n_params = n_params
        # µParam: per-layer LR multipliers (empty when off); a Hub model has none
        lr_scales = model.mup_lr_scales() if isinstance(model, AthanorGPT) else None
        self.model = engine.register("model", model, lr_scales=lr_scales, batch_size=self.batch_size)
        # Looked up once: accelerate's unwrap_model reads package metadata on every call (~30 ms of
        # CPU, a tenth of a tiny step), and the unwrapped module never changes after prepare.
        self.raw_model = engine.unwrap("model")

    def batches(self, engine: Engine):
        """Shuffled in-memory blocks, or this process's part of a streamed corpus (data.streaming)."""
        return self.data.train_batches(self.batch_size, engine.run.seed, engine.rank, engine.world_size)

    def _unwrapped(self):
        return self.raw_model

    def train_step(self, batch: torch.Tensor) -> dict:
        probe_step = bool(self.probe_every) and self.engine.step % max(self.engine.run.log_every, self.probe_every) == 0
        probe = probe_step and isinstance(self._unwrapped(), AthanorGPT)
        if probe:
            self._unwrapped().set_probes(True, PROBE_ROWS)
        out = self.model(input_ids=batch, labels=batch)
        norm = self.engine.optimize("model", out.loss).grad_norm
        metrics = {"loss": out.loss.detach(), "tokens": batch[:, 1:].numel()}
        if isinstance(self._unwrapped(), AthanorGPT):  # its output carries log Z statistics
            metrics.update(out.stats)
        if probe:
            model = self._unwrapped()
            probes = {"max_attn_logit": (model.max_attention_logits(), max),
                      "attn_entropy": (model.attention_entropies(), min),
                      "act_rms": (model.activation_rms(), max)}
            model.set_probes(False)
            for key, (per_layer, reduce) in probes.items():
                for i, v in enumerate(per_layer):
                    metrics[f"{key}_l{i}"] = v
                if per_layer:
                    metrics[key] = reduce(per_layer)
            if norm is not None:
                metrics["grad_norm"] = norm
                metrics["grad_rms"] = float(norm) / math.sqrt(self.n_params)
        if self.engine.step % self.engine.run.log_every == 0:
            metrics["diverged"] = float(self._diverged(float(metrics["loss"])))
        return metrics

    def _diverged(self, loss: float) -> bool:
        initial = self.engine.history.get("initial_eval", {}).get("loss", math.inf)
        return not math.isfinite(loss) or loss > initial

    def evaluate(self) -> dict:
        total = torch.zeros(2, dtype=torch.float64, device=self.engine.device)
        for batch in sharded_batches(self.data.eval_blocks, self.batch_size, self.eval_batches,
                                     self.engine.rank, self.engine.world_size):
            batch = batch.to(self.engine.device)
            loss = self.model(input_ids=batch, labels=batch).loss
            total += torch.stack([loss.double() * len(batch), torch.tensor(len(batch), dtype=torch.float64,
                                                                            device=total.device)])
        total = self.engine.reduce(total, reduction="sum")
        loss = (total[0] / total[1]).item()
        return {"loss": loss, "ppl": math.exp(min(loss, 50))}
