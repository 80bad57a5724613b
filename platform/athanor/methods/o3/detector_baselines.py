"""Detector baselines that need no encoder, run through O3's gate and calibration: is the world
hard enough that *who* a question names, or which words it shares with a stored question, does not
decide what is forgotten?

* ``name_lookup``: a string match of the stored people's names. s(x) = max over the names of the
  request's forget questions of the share of that name's words found in x (1: the full name, ½:
  only a first or a last name).
* ``bag_of_words``: the nearest stored forget question by bag-of-words cosine (scikit-learn's
  ``CountVectorizer``, binary counts): s(x) = max_j cos(bow(x), bow(x_j)).

Both are calibrated as O3's detector is (``detector.calibrate``): scores of forget questions the
bank did not hold (cross-fitted by fact), plus the same people's retained questions when O3's
calibration uses them, give τ and the spread m, and w(x) = sigmoid(sharpness · (s(x) - τ) / m).
"""
from __future__ import annotations

import numpy as np
import torch

from .detector import DetectorConfig, calibrate, fact_folds


class NameLookup:
    name = "name_lookup"

    def fit(self, questions: list[str], groups: list[str]) -> "NameLookup":
        self.names = [name.split() for name in dict.fromkeys(groups)]
        return self

    def score(self, questions: list[str]) -> np.ndarray:
        out = np.zeros(len(questions))
        for i, q in enumerate(questions):
            words = set(q.split())
            out[i] = max((sum(w in words for w in name) / len(name) for name in self.names), default=0.0)
        return out


class BagOfWords:
    name = "bag_of_words"

    def fit(self, questions: list[str], groups: list[str]) -> "BagOfWords":
        from sklearn.feature_extraction.text import CountVectorizer  # scikit-learn: only when fitting

        self.vectorizer = CountVectorizer(binary=True, token_pattern=r"\S+").fit(questions)
        self.bank = self._unit(self.vectorizer.transform(questions))
        return self

    @staticmethod
    def _unit(matrix) -> np.ndarray:
        dense = matrix.toarray().astype(np.float64)
        return dense / np.maximum(np.linalg.norm(dense, axis=1, keepdims=True), 1e-12)

    def score(self, questions: list[str]) -> np.ndarray:
        return (self._unit(self.vectorizer.transform(questions)) @ self.bank.T).max(1)


BASELINES = {"name_lookup": NameLookup, "bag_of_words": BagOfWords}


def baseline_logits(kind: str, cfg: DetectorConfig, forget: list[tuple[str, str, str]], texts: list[str],
                    negatives: list[str], seed: int = 0) -> torch.Tensor:
    """Gate logits sharpness·(s - τ)/m of ``texts`` for one request. ``forget``: (question, group,
    fact) of its stored questions; ``negatives``: the calibration's retained questions (may be empty)."""
    questions, groups, facts = map(list, zip(*forget))
    f_cv = np.zeros(len(questions))
    for held in fact_folds(facts, cfg.cv_folds, seed):
        rest = np.setdiff1d(np.arange(len(questions)), held)
        detector = BASELINES[kind]().fit([questions[i] for i in rest], [groups[i] for i in rest])
        f_cv[held] = detector.score([questions[i] for i in held])
    detector = BASELINES[kind]().fit(questions, groups)
    f_neg = detector.score(negatives) if negatives else None
    tau, spread = calibrate(f_cv, f_neg, cfg)
    return torch.from_numpy(cfg.sharpness * (detector.score(texts) - tau) / spread).float()
