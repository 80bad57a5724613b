"""Training an LM on facts, normally or with SeND, as one engine ``Method`` (from scratch by default).

SeND (Mohammadzadeh et al. 2024, Algorithm 1), as run here, counted in optimizer steps (the
``random_control`` arm runs the same schedule but drops a random set of the same size, to tell
the choice of *sensitive* neurons from dropout as such; the normal arm runs the schedule with
``drop`` off, so the stopping rule is the same for every arm):
- every ``record_every`` steps the chosen layer's embeddings of the tracking split are recorded
  (full network, no dropout; the last token of the prompt);
- every ``reestimate_every`` steps, from the last ``points`` records, the sensitivity S_i
  (athanor.methods.send.neurons) is computed and the top ``fraction`` of neurons are zeroed in
  training forwards for the next ``drop_window`` steps (deterministic dropout through a hook;
  evaluation always uses the full network);
- stopping rule: at a re-estimation point, training stops once the mean training loss since the
  previous point is ≤ ``stop_loss`` and the tracking split's mean EigenScore is ≤ ``stop_eigenscore``
  (both must be set; 0 disables). The engine still counts to ``run.max_steps``; later steps do
  nothing and the report reads ``stopped_at``.
All of this state (records, dropped neurons, window end, losses, stop step, evaluation memory) is
tensors or JSON values in ``state_dict``, so a resumed run continues exactly.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ...config import ConfigError, positive
from ...engine import Engine, Method
from ...parts.lm import answer_matches, lm_inputs
from .eigenscore import eigenscore
from .neurons import decoder_layers, dropped_neurons, layer_embeddings, last_prompt_position, sensitivity, top_sensitive


@dataclass
class SendConfig:
    layer: int = -2  # decoder layer whose output is tracked and dropped (-2: penultimate, as in the paper)
    # defaults tuned on the dev world (data.seed 1; methods/send/tune.py), never on the report's world (seed 0)
    fraction: float = 0.1  # top fraction of that layer's neurons dropped
    record_every: int = 10  # steps between recorded tracking embeddings
    reestimate_every: int = 30  # steps between sensitivity re-estimations
    points: int = 3  # records used per estimate
    drop_window: int = 30  # steps the chosen neurons stay dropped
    stop_loss: float = 0.01  # stopping rule: mean training loss <= this ...
    # ... and tracking EigenScore <= this (both 0: never stop); the dev normal runs' median final held-out EigenScore
    stop_eigenscore: float = -5.6333
    drop: bool = True  # False: the schedule records and applies the stopping rule only (the normal arm)

    def validate(self) -> None:
        if not 0 < self.fraction < 1:
            raise ConfigError(f"send.fraction={self.fraction} must be in (0, 1)")
        for key in ("record_every", "reestimate_every", "drop_window"):
            positive(getattr(self, key), f"send.{key}")
        if self.points < 2:
            raise ConfigError(f"send.points={self.points} must be >= 2 (sensitivity compares points)")
        if (self.stop_loss > 0) != (self.stop_eigenscore != 0):
            raise ConfigError("send.stop_loss and send.stop_eigenscore must be set together (0 disables both)")


@dataclass
class EigenScoreConfig:
    samples: int = 10  # K sampled answers per question
    temperature: float = 1.0
    alpha: float = 1e-3  # α of log det(C + αI)
    layer: int = -1  # hidden_states index of the embedding; -1: the middle layer (INSIDE)
    max_new_tokens: int = 1  # answer tokens sampled (1: the world's one-word answers)
    questions_per_batch: int = 32
    # features (INSIDE / the SeND reference: K×K covariance, each embedding centred over its dims) | samples
    centring: str = "features"
    heldout_questions: int = 64  # test-split prompts whose EigenScore is tracked at every checkpoint

    def validate(self) -> None:
        if self.centring not in ("features", "samples"):
            raise ConfigError(f"eigenscore.centring={self.centring!r} is not one of: features, samples")
        positive(self.heldout_questions, "eigenscore.heldout_questions")
        if self.samples < 2:
            raise ConfigError(f"eigenscore.samples={self.samples} must be >= 2")
        for key in ("temperature", "alpha", "max_new_tokens", "questions_per_batch"):
            positive(getattr(self, key), f"eigenscore.{key}")


@torch.no_grad()
def sampled_eigenscores(model, batch: dict, cfg: EigenScoreConfig, eos_id: int | None, seed: int) -> torch.Tensor:
    """EigenScore per question: K answers sampled at ``cfg.temperature`` after each prompt, each
    embedded as the hidden state (layer ``cfg.layer``) of its last answer token. Questions whose
    prompts have the same length are batched together (no padding inside a prompt)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    prompt_len = last_prompt_position(batch) + 1
    n_layers = len(decoder_layers(model))
    layer = n_layers // 2 if cfg.layer == -1 else cfg.layer
    scores = torch.zeros(len(prompt_len), dtype=torch.float64)
    k = cfg.samples
    for length in sorted(set(prompt_len.tolist())):
        idx = (prompt_len == length).nonzero().flatten()
        for start in range(0, len(idx), cfg.questions_per_batch):
            rows = idx[start:start + cfg.questions_per_batch]
            ids = batch["input_ids"][rows, :length].repeat_interleave(k, 0).to(device)
            ended = torch.zeros(len(ids), dtype=torch.bool, device=device)
            last = torch.full((len(ids),), length - 1, device=device)
            for _ in range(cfg.max_new_tokens):
                logits = model(input_ids=ids).logits[:, -1].float() / cfg.temperature
                probs = torch.softmax(logits, -1).cpu()
                token = torch.multinomial(probs, 1, generator=gen).to(device)
                ids = torch.cat([ids, token], 1)
                last = torch.where(ended, last, torch.full_like(last, ids.shape[1] - 1))
                if eos_id is not None:
                    is_eos = token[:, 0] == eos_id
                    last = torch.where(~ended & is_eos & (last > length), last - 1, last)
                    ended |= is_eos
                    if ended.all():
                        break
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer]
            emb = hidden[torch.arange(len(ids), device=device), last].float().cpu().view(len(rows), k, -1)
            for j, row in enumerate(rows.tolist()):
                scores[row] = eigenscore(emb[j], cfg.alpha, cfg.centring)
    return scores


def auroc(scores: torch.Tensor, wrong: torch.Tensor) -> float | None:
    """AUROC of ``scores`` at flagging wrong answers (None when one class is missing)."""
    from sklearn.metrics import roc_auc_score  # scikit-learn: a second of import, only when evaluating

    if wrong.all() or not wrong.any():
        return None
    return float(roc_auc_score(wrong.numpy().astype(int), scores.numpy()))


class ContinuedTraining(Method):
    """Answer-only cross-entropy on the open fact pool, under SeND's schedule (``send``; None: no schedule).

    ``evals``: encoded ``train`` (trained phrasings of every fact), ``test`` (held-out phrasings) and
    ``tracking`` records; ``chunk_of[split]`` gives each row its addition index (−1: an old fact) and
    ``phase_len`` (micro-batches per addition) says which additions are open, so the hallucination rates
    are measured on the facts taught so far."""

    def __init__(self, model, evals: dict, chunk_of: dict, phase_len: int, send: SendConfig | None,
                 grad_accum: int = 1, batch_size: int = 32, eigenscore_cfg: EigenScoreConfig | None = None,
                 eos_id: int | None = None, random_control: bool = False, seed: int = 0):
        self.model_unprepared, self.evals, self.chunk_of = model, evals, chunk_of
        # control arm: the same schedule and fraction, but neurons drawn at random (seeded by seed and step)
        self.random_control, self.seed = random_control, seed
        # the stopping rule's tracking EigenScore and the held-out one: how answers are sampled and embedded
        self.eigenscore_cfg, self.eos_id = eigenscore_cfg or EigenScoreConfig(), eos_id
        self.phase_len, self.send, self.grad_accum, self.batch_size = phase_len, send, grad_accum, batch_size
        self.records: list[torch.Tensor] = []  # tracking embeddings at recorded points (≤ points kept)
        self.dropped = torch.zeros(0, dtype=torch.long)
        self.drop_until = 0
        self.window_losses: list[float] = []
        self.stopped_at = -1
        self.estimates: list[dict] = []  # one entry per re-estimation (for the report)
        self.previous: dict | None = None  # correctness at the previous evaluation (flip rates)
        self.tracking_positions = last_prompt_position(evals["tracking"])

    def setup(self, engine: Engine) -> None:
        self.engine = engine
        self.model = engine.register("model", self.model_unprepared, batch_size=self.batch_size)
        if self.send is not None:
            engine.after_step("model", lambda: self._send_schedule(engine.step))

    # ------------------------------------------------------------------ training
    def train_step(self, batch: dict) -> dict:
        if self.stopped_at >= 0:
            return {"stopped": 1.0}
        step = self.engine.step
        active = self.send is not None and self.send.drop and step <= self.drop_until and self.dropped.numel() > 0
        with dropped_neurons(self.model, self.send.layer, self.dropped) if active else contextlib.nullcontext():
            loss = self.model(**lm_inputs(batch)).loss
        self.window_losses.append(float(loss.detach()))
        out = {"loss": loss.detach(), "samples": len(batch["input_ids"]), "dropped": float(active) * self.dropped.numel()}
        self.engine.optimize("model", loss)  # at a step's end the after-step hook runs SeND's schedule (setup)
        return out

    def _send_schedule(self, step: int) -> None:
        cfg = self.send
        if step % cfg.record_every == 0:
            self.model.eval()
            emb = layer_embeddings(self.model, self.evals["tracking"], cfg.layer, self.tracking_positions)
            self.model.train()
            self.records = (self.records + [emb])[-cfg.points:]
        if step % cfg.reestimate_every == 0 and len(self.records) >= cfg.points:
            scores = sensitivity(torch.stack(self.records))
            self.dropped = top_sensitive(scores, cfg.fraction) if cfg.drop else torch.zeros(0, dtype=torch.long)
            if self.random_control and cfg.drop:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
                self.dropped = torch.randperm(len(scores), generator=gen)[:len(self.dropped)].sort().values
            self.drop_until = step + cfg.drop_window
            mean_loss = sum(self.window_losses) / max(len(self.window_losses), 1)
            entry = {"step": step, "dropped": self.dropped.tolist(), "mean_loss": mean_loss,
                     "top_score": float(scores.max()), "median_score": float(scores.median())}
            if cfg.stop_loss > 0:
                self.model.eval()
                rows = torch.arange(min(self.eigenscore_cfg.heldout_questions, len(self.tracking_positions)))
                tracking = {k: v[rows] for k, v in self.evals["tracking"].items()}
                es = sampled_eigenscores(self.model, tracking, self.eigenscore_cfg, self.eos_id, step)
                self.model.train()
                entry["tracking_eigenscore"] = float(es.mean())
                if mean_loss <= cfg.stop_loss and entry["tracking_eigenscore"] <= cfg.stop_eigenscore:
                    self.stopped_at = step
            self.estimates.append(entry)
            self.window_losses = []

    # ------------------------------------------------------------------ evaluation
    def open_chunks(self, step: int) -> int:
        """Additions whose facts had been trained on by the end of ``step``."""
        served = step * self.grad_accum
        n = int(self.chunk_of["train"].max()) + 1
        return 0 if served == 0 else min(n, (served - 1) // self.phase_len + 1)

    def evaluate(self) -> dict:
        """Hallucination = wrong greedy answer; on trained phrasings (``halluc``) and held-out test
        phrasings (``heldout_halluc``) of the facts taught so far; flips between checkpoints; the mean
        EigenScore of a fixed set of held-out prompts (``eigenscore_heldout``, same sampling seed at
        every checkpoint, so its changes come from the model)."""
        opened = self.open_chunks(self.engine.step)
        correct, taught = {}, {}
        for split in ("train", "test"):  # at step 0 (nothing taught yet): the first addition's facts
            correct[split] = answer_matches(self.model, self.evals[split])
            taught[split] = self.chunk_of[split] < max(opened, 1)
        old, new = self.chunk_of["train"] < 0, self.chunk_of["train"] >= 0
        ok = correct["train"]
        out = {"halluc": _wrong(ok, taught["train"]), "heldout_halluc": _wrong(correct["test"], taught["test"]),
               "open": float(opened), "acc_new_all": ok[new].float().mean().item()}
        if old.any():
            out["acc_old"] = ok[old].float().mean().item()
        if (new & taught["train"]).any():
            out["acc_new"] = ok[new & taught["train"]].float().mean().item()
        if self.previous is not None:  # flips among facts taught at both evaluations
            for split, key in (("train", "flips"), ("test", "heldout_flips")):
                both = taught[split] & self.previous["taught"][split]
                if both.any():
                    out[key] = (correct[split][both] != self.previous["correct"][split][both]).float().mean().item()
        self.previous = {"correct": correct, "taught": taught}
        rows = torch.arange(min(self.eigenscore_cfg.heldout_questions, len(correct["test"])))
        subset = {k: v[rows] for k, v in self.evals["test"].items()}
        self.model.eval()
        out["eigenscore_heldout"] = float(sampled_eigenscores(self.model, subset, self.eigenscore_cfg, self.eos_id,
                                                              self.seed).mean())
        self.model.train()
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = {"records": torch.stack(self.records) if self.records else torch.zeros(0),
                 "dropped": self.dropped, "drop_until": self.drop_until, "window_losses": list(self.window_losses),
                 "stopped_at": self.stopped_at, "estimates": list(self.estimates)}
        if self.previous is not None:
            for split in ("train", "test"):
                state[f"previous_correct_{split}"] = self.previous["correct"][split]
                state[f"previous_taught_{split}"] = self.previous["taught"][split]
        return state

    def load_state_dict(self, state: dict) -> None:
        records = state["records"]
        self.records = list(records.unbind(0)) if records.numel() else []
        self.dropped, self.drop_until = state["dropped"].long(), int(state["drop_until"])
        self.window_losses, self.stopped_at = list(state["window_losses"]), int(state["stopped_at"])
        self.estimates = list(state["estimates"])
        if "previous_correct_train" in state:
            self.previous = {kind: {split: state[f"previous_{kind}_{split}"].bool() for split in ("train", "test")}
                             for kind in ("correct", "taught")}


def _wrong(correct: torch.Tensor, taught: torch.Tensor) -> float:
    return 1 - correct[taught].float().mean().item() if taught.any() else 0.0
