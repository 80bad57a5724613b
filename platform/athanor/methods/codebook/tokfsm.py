"""TokFSM (Tamkin et al. 2024, §4.1): sequences walked on a random finite-state machine.

S states, each with E distinct out-edges chosen at random; a walk picks one out-edge uniformly at
every step. A state is written as its decimal digits (state 7 of 100 -> tokens "0", "7"), so
a state spans several tokens and "the model is in state s" is a feature the network has to
build; a BOS token starts every sequence, and every sequence starts at a state boundary.

Plain digits (the default, the paper's TokFSM: an 11-token vocabulary, ten digits and BOS): where a
state starts is not in the tokens, so the model must work out the digit parity from context, and a
digit token alone says nothing about the state. ``place_tokens`` (an option): each decimal place has
its own ten digit tokens (tens 0-9, units 10-19), which removes that inference -- with it a baseline
neuron was as perfect a state detector as any code, so codes could not beat neurons there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from athanor.config import ConfigError, positive


@dataclass
class TokFSMConfig:
    states: int = 100  # the paper's setting
    edges: int = 10  # out-edges per state
    seq_states: int = 32  # states per sequence (tokens = 1 + states * digits)
    train_sequences: int = 20000
    eval_sequences: int = 512  # held out: analysis, steering and transition accuracy use these
    batch_size: int = 64
    # The FSM and its walks (independent of run.seed, which drives training). 1234 is the dev FSM the
    # knobs were chosen on (analysis.dev_fsm_seed); the default seeds run on 100 + run seed.
    seed: int = 100
    place_tokens: bool = False  # true: a separate set of ten digit tokens per decimal place (plain digits: the paper's)

    def validate(self) -> None:
        for key in ("states", "edges", "seq_states", "train_sequences", "eval_sequences", "batch_size"):
            positive(getattr(self, key), f"data.{key}")
        if not 1 <= self.edges < self.states:
            raise ConfigError(f"data.edges={self.edges} must be in [1, data.states={self.states})")
        if self.batch_size > self.train_sequences:
            raise ConfigError(f"data.batch_size={self.batch_size} > data.train_sequences={self.train_sequences}")


class TokFSM:
    def __init__(self, cfg: TokFSMConfig):
        self.cfg = cfg
        self.digits = max(1, math.ceil(math.log10(cfg.states)))
        self.place = cfg.place_tokens
        self.bos = 10 * self.digits if self.place else 10
        self.vocab_size = self.bos + 1
        gen = torch.Generator().manual_seed(cfg.seed)
        # E distinct successors per state (self-loops allowed, as any random graph would have them)
        self.successors = torch.stack([torch.randperm(cfg.states, generator=gen)[: cfg.edges] for _ in range(cfg.states)])
        self.valid = torch.zeros(cfg.states, cfg.states, dtype=torch.bool)
        self.valid[torch.arange(cfg.states)[:, None], self.successors] = True
        self._gen = gen

    @property
    def seq_len(self) -> int:
        return 1 + self.cfg.seq_states * self.digits

    def walks(self, n: int) -> torch.Tensor:
        """(n, seq_states) state indices."""
        states = torch.empty(n, self.cfg.seq_states, dtype=torch.long)
        states[:, 0] = torch.randint(self.cfg.states, (n,), generator=self._gen)
        for t in range(1, self.cfg.seq_states):
            pick = torch.randint(self.cfg.edges, (n,), generator=self._gen)
            states[:, t] = self.successors[states[:, t - 1], pick]
        return states

    def encode(self, states: torch.Tensor) -> torch.Tensor:
        """(n, S) states -> (n, 1 + S*digits) tokens, BOS first, most significant digit first."""
        powers = 10 ** torch.arange(self.digits - 1, -1, -1)
        digits = (states[..., None] // powers) % 10
        if self.place:
            digits = digits + 10 * torch.arange(self.digits)
        tokens = digits.reshape(states.shape[0], -1)
        return torch.cat([torch.full((states.shape[0], 1), self.bos), tokens], dim=1)

    def decode_state(self, digit_tokens: torch.Tensor) -> torch.Tensor:
        """(..., digits) digit tokens -> state index; -1 where a token is no digit or the number
        is no state."""
        powers = 10 ** torch.arange(self.digits - 1, -1, -1, device=digit_tokens.device)
        if self.place:
            digit_tokens = digit_tokens - 10 * torch.arange(self.digits, device=digit_tokens.device)
        ok = ((digit_tokens >= 0) & (digit_tokens < 10)).all(-1)
        value = (digit_tokens.clamp(0, 9) * powers).sum(-1)
        return torch.where(ok & (value < self.cfg.states), value, torch.full_like(value, -1))

    def state_end_positions(self) -> torch.Tensor:
        """Token positions of each state's last digit: where the model 'is in' that state."""
        return torch.arange(self.cfg.seq_states) * self.digits + self.digits

    def is_valid(self, current: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        ok = (current >= 0) & (nxt >= 0)
        return ok & self.valid[current.clamp(min=0), nxt.clamp(min=0)]

    def datasets(self) -> dict:
        """Train and held-out walks (both from the same FSM; disjoint draws)."""
        train = self.walks(self.cfg.train_sequences)
        held = self.walks(self.cfg.eval_sequences)
        return {"train": {"input_ids": self.encode(train)}, "eval": {"input_ids": self.encode(held), "states": held}}
