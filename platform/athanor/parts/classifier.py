"""Small building blocks a paper uses instead of writing them again: an MLP that saves and loads
itself, and a ``Method`` that trains a classifier on labelled rows.

``MLP`` is a plain torch module with the Hub mixin (``PyTorchModelHubMixin``): ``save_pretrained``
writes ``config.json`` (its constructor arguments) and ``model.safetensors``, ``from_pretrained``
builds it back, and the folder is what ``athanor publish`` uploads (card kind ``torch``,
``model_class="athanor.parts.classifier:MLP"``).

``Classifier`` minimises the cross-entropy of ``model(x)`` against the labels,

    ℒ = −(1/B) Σ_i log softmax(f(x_i))_{y_i},

and reports the held-out accuracy and cross-entropy at every evaluation. ``loss(batch, logits)``
is the one thing a paper overrides for another objective (a distillation loss, label smoothing);
everything else (registering the model, the batches that resume at the same sample, the
evaluation) stays. Its ``batch_size`` is per process, as every ``batch_size`` in athanor (README,
"Batch sizes"): under N processes a step sees N × batch_size rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..config import ConfigError, OptimConfig, positive
from ..data.batches import ShuffledBatches
from ..engine import Engine, Method


@dataclass
class MLPConfig:
    """A config section for an ``MLP`` (its input and output sizes come from the data)."""

    hidden: int = 64  # width of each hidden layer
    layers: int = 1  # hidden layers (0: a linear model)
    dropout: float = 0.0  # dropout after each hidden layer, in training

    def validate(self, section: str = "model") -> None:  # section: where the config holds it (teacher, student)
        positive(self.hidden, f"{section}.hidden")
        positive(self.layers, f"{section}.layers", allow_zero=True)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{section}.dropout={self.dropout} must be in [0, 1)")

    def build(self, inputs: int, outputs: int) -> "MLP":
        return MLP(inputs, outputs, self.hidden, self.layers, self.dropout)


class MLP(nn.Module, PyTorchModelHubMixin):
    """``inputs`` → ``layers`` × (Linear, ReLU, Dropout) of width ``hidden`` → ``outputs`` logits.
    Inputs of any shape are flattened after the batch dimension (8×8 images: ``inputs=64``)."""

    def __init__(self, inputs: int = 64, outputs: int = 10, hidden: int = 64, layers: int = 1, dropout: float = 0.0):
        super().__init__()
        sizes = [inputs] + [hidden] * layers
        blocks: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(sizes[:-1], sizes[1:]):
            blocks += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
        self.net = nn.Sequential(*blocks, nn.Linear(sizes[-1], outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Classifier(Method):
    """Trains ``build()`` (called in ``setup``, after the engine has seeded every process) on
    ``train`` rows — a dict of equal-length tensors with ``inputs`` and ``labels`` keys — and
    evaluates it on ``held_out`` rows. Registered under ``name``; ``optim``/``max_steps``: that
    model's own optimizer settings (default: the run's)."""

    def __init__(self, build: Callable[[], nn.Module], train: dict, held_out: dict, batch_size: int, seed: int,
                 *, name: str = "model", inputs: str = "images", labels: str = "labels",
                 optim: OptimConfig | None = None, max_steps: int | None = None, eval_batch: int = 1024):
        self.build, self.train, self.held_out, self.batch_size, self.seed = build, train, held_out, batch_size, seed
        self.name, self.inputs, self.labels, self.optim, self.max_steps = name, inputs, labels, optim, max_steps
        self.eval_batch = eval_batch

    def setup(self, engine: Engine) -> None:
        self.engine = engine
        self.model = engine.register(self.name, self.build(), optim=self.optim, max_steps=self.max_steps,
                                     batch_size=self.batch_size)

    def batches(self, engine: Engine) -> ShuffledBatches:
        """Shuffled rows of ``train``, this process's share of each step; resumes at the same batch."""
        return ShuffledBatches(self.train, self.batch_size, self.seed, engine.rank, engine.world_size)

    def loss(self, batch: dict, logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(loss, extra metrics) of one batch: the cross-entropy. Override for another objective."""
        return nn.functional.cross_entropy(logits, batch[self.labels]), {}

    def train_step(self, batch: dict) -> dict:
        logits = self.model(batch[self.inputs])
        loss, extra = self.loss(batch, logits)
        self.engine.optimize(self.name, loss)
        accuracy = (logits.argmax(-1) == batch[self.labels]).float().mean()
        return {"loss": loss.detach(), "accuracy": accuracy, "samples": len(logits), **extra}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out accuracy and cross-entropy (every process scores all of ``held_out``: the same numbers)."""
        model = self.engine.unwrap(self.name)
        was_training = model.training
        model.eval()
        logits = predict(model, self.held_out[self.inputs], self.engine.device, self.eval_batch)
        model.train(was_training)
        labels = self.held_out[self.labels]
        return {"accuracy": (logits.argmax(-1) == labels).float().mean().item(),
                "ce": nn.functional.cross_entropy(logits, labels).item()}


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, device: torch.device | str = "cpu", batch: int = 1024) -> torch.Tensor:
    """``model``'s logits for ``inputs`` (on the CPU), computed ``batch`` rows at a time."""
    return torch.cat([model(chunk.to(device)).float().cpu() for chunk in inputs.split(batch)])


def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of ``inputs`` that ``model`` (in eval mode) labels right."""
    model.eval()
    return (predict(model, inputs).argmax(-1) == labels).float().mean().item()
