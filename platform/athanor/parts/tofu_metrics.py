"""TOFU's unlearning metrics (Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs", 2024,
Sec. 2.5), as locuslab/open-unlearning computes them (``src/evals/metrics/memorization.py``):

- answer probability: ``P(a|q)^(1/|a|) = exp(-mean token NLL of a)`` (answer tokens and EOS);
  on option sets (TOFU's real authors / world facts) normalised against the wrong options,
  ``P(a) / (P(a) + Σ_k P(ã_k))``;
- truth ratio: ``R = mean_k P(ã_k|q)^(1/|ã_k|) / P(â|q)^(1/|â|)`` with â the paraphrased correct
  answer and ã_k the perturbed (wrong) answers; the perturbed side averages the per-token NLLs
  first (``exp(-mean_k NLL_k)``), as open-unlearning does. Aggregated on the forget set as
  ``mean(min(R, 1/R))`` (closer to 1 is better: true and false equally likely) and elsewhere as
  ``mean(max(0, 1 - R))`` (the truth more likely is better);
- ROUGE-L recall of the greedy answer against the true one (``rouge-score``, stemmed);
- forget quality: the p-value of the two-sample Kolmogorov–Smirnov test between the forget-set
  truth ratios of a model and of the retain-only model (``scipy.stats.ks_2samp``): high = not
  distinguishable from a model that never saw the forget set;
- model utility: the harmonic mean (``scipy.stats.hmean``) of probability, ROUGE-L and truth ratio
  on every non-forget set (TOFU: retain, real authors, world facts).

A ``Scorer`` wraps any HF causal LM and tokenizer; ``gate(rows)`` (optional) is a context factory
given the item index of every row of a batch, so a model whose adapters are scaled per input
(O3's w(x)) is scored with the same code.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .fact_world import encode_qa


@dataclass
class TofuItem:
    question: str
    answer: str
    paraphrased_answer: str  # a rewording of the correct answer (the answer itself where none exists)
    perturbed_answers: list[str]  # wrong answers of the same form


@dataclass
class Scorer:
    model: Any
    tokenizer: Any
    prompt_template: str = "{question}"
    max_length: int = 64
    gate: Callable[[torch.Tensor], Any] | None = None  # item indices of a batch's rows -> context manager
    batch_size: int = 128

    def _context(self, rows: torch.Tensor):
        return self.gate(rows) if self.gate is not None else contextlib.nullcontext()

    def _prompts(self, questions: list[str]) -> list[str]:
        return [self.prompt_template.format(question=q) for q in questions]

    @torch.no_grad()
    def mean_nll(self, item_of_row: list[int], questions: list[str], answers: list[str]) -> np.ndarray:
        """Per row: the mean NLL of the answer tokens and EOS given the prompt (teacher forced)."""
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(answers), self.batch_size):
            rows = slice(start, start + self.batch_size)
            batch = encode_qa(self.tokenizer, self._prompts(questions[rows]), answers[rows], self.max_length)
            with self._context(torch.tensor(item_of_row[rows])):
                logits = self.model(input_ids=batch["input_ids"].to(device),
                                    attention_mask=batch["attention_mask"].to(device)).logits.float()
            labels = batch["labels"][:, 1:].to(device)
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")
            mask = (labels != -100).float()
            out.append((nll.sum(1) / mask.sum(1).clamp(min=1)).cpu())
        return torch.cat(out).numpy() if out else np.zeros(0)

    @torch.no_grad()
    def generate(self, questions: list[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of the prompts (left padded), decoded without special tokens."""
        device = next(self.model.parameters()).device
        tok, texts = self.tokenizer, []
        for start in range(0, len(questions), self.batch_size):
            side = tok.padding_side
            tok.padding_side = "left"
            try:
                enc = tok(self._prompts(questions[start:start + self.batch_size]), padding=True, return_tensors="pt")
            finally:
                tok.padding_side = side
            with self._context(torch.arange(start, start + len(enc["input_ids"]))):
                out = self.model.generate(input_ids=enc["input_ids"].to(device),
                                          attention_mask=enc["attention_mask"].to(device), do_sample=False,
                                          max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
            texts += [t.strip() for t in tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
        return texts


def rouge_l_recall(predictions: list[str], references: list[str]) -> np.ndarray:
    """ROUGE-L recall of each prediction against its reference (TOFU's ``rougeL_recall``)."""
    from rouge_score import rouge_scorer  # imported when scoring only

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([scorer.score(ref, pred)["rougeL"].recall for pred, ref in zip(predictions, references)])


def item_scores(scorer: Scorer, items: list[TofuItem], max_new_tokens: int, options: bool = False) -> dict:
    """Per item: probability, truth ratio and ROUGE-L recall (lists). ``options``: TOFU's real-authors
    / world-facts form (probability normalised over the options; the truth ratio against the answer
    itself instead of a paraphrase)."""
    if not items:
        return {"probability": [], "truth_ratio": [], "rouge_l": []}
    if any(not it.perturbed_answers for it in items):
        raise ValueError("every item needs at least one perturbed answer")
    n, questions = len(items), [it.question for it in items]
    nll_answer = scorer.mean_nll(list(range(n)), questions, [it.answer for it in items])
    if options or all(it.paraphrased_answer == it.answer for it in items):
        nll_true = nll_answer
    else:
        nll_true = scorer.mean_nll(list(range(n)), questions, [it.paraphrased_answer for it in items])
    owner = [i for i, it in enumerate(items) for _ in it.perturbed_answers]
    nll_wrong = scorer.mean_nll(owner, [questions[i] for i in owner], [a for it in items for a in it.perturbed_answers])
    owner = np.array(owner)
    counts = np.bincount(owner, minlength=n)
    mean_wrong = np.bincount(owner, weights=nll_wrong, minlength=n) / counts  # mean of per-token NLLs
    truth_ratio = np.exp(-mean_wrong) / (np.exp(-nll_true) + 1e-10)
    probability = np.exp(-nll_answer)
    if options:
        wrong_mass = np.bincount(owner, weights=np.exp(-nll_wrong), minlength=n)
        probability = probability / (probability + wrong_mass + 1e-10)
    rouge = rouge_l_recall(scorer.generate(questions, max_new_tokens), [it.answer for it in items])
    return {"probability": probability.tolist(), "truth_ratio": truth_ratio.tolist(), "rouge_l": rouge.tolist()}


def truth_ratio_forget(ratios) -> float:
    """open-unlearning's ``closer_to_1_better``: mean(min(R, 1/R))."""
    r = np.asarray(ratios, dtype=float)
    return float(np.mean(np.minimum(r, 1 / (r + 1e-10))))


def truth_ratio_retain(ratios) -> float:
    """open-unlearning's ``true_better``: mean(max(0, 1 - R))."""
    return float(np.mean(np.maximum(0.0, 1 - np.asarray(ratios, dtype=float))))


def aggregate(scores: dict, forget: bool) -> dict:
    """Set-level values of ``item_scores``: mean probability, mean ROUGE-L, aggregated truth ratio."""
    if not scores["probability"]:
        return {"probability": None, "rouge_l": None, "truth_ratio": None}
    tr = truth_ratio_forget if forget else truth_ratio_retain
    return {"probability": float(np.mean(scores["probability"])), "rouge_l": float(np.mean(scores["rouge_l"])),
            "truth_ratio": tr(scores["truth_ratio"])}


def forget_quality(ratios, reference_ratios) -> float | None:
    """KS-test p-value between a model's and the retain-only model's forget-set truth ratios."""
    from scipy.stats import ks_2samp  # scipy.stats is slow to import; only the report's last step needs it

    if len(ratios) == 0 or len(reference_ratios) == 0:
        return None
    return float(ks_2samp(np.asarray(ratios, dtype=float), np.asarray(reference_ratios, dtype=float)).pvalue)


def model_utility(aggregates: list[dict]) -> float | None:
    """Harmonic mean of probability, ROUGE-L and truth ratio over the non-forget sets (0 if any is 0)."""
    from scipy.stats import hmean  # as above: imported when a report is made

    values = [a[k] for a in aggregates for k in ("probability", "rouge_l", "truth_ratio") if a[k] is not None]
    if not values:
        return None
    return 0.0 if min(values) <= 0 else float(hmean(values))
