"""O3Model: the frozen target LM + one LoRA per request + one detector per request, gated per input.

Inference (Gao et al., ICLR 2025, Sec. 3.4): every adapted projection computes

    h' = W h + w(x) · Σ_t B_t A_t h,        w(x) = max_t w_t(x)

with w_t the soft weight of request t's detector (``detector.py``). ``gate="per_request"``
instead scales adapter t by w_t(x) alone; ``always_on`` (w = 1) and ``off`` (w = 0) are the
ablation and the base model. The weight is applied per row of a batch, so one batch can mix
forget and retain questions.

Cost independent of the number of requests T (``from_parts``, the default ``stack=True``):

- under ``max`` and ``always_on`` every adapter has the same weight, so all T adapters are applied
  as one stacked LoRA (``lora.StackedLoRA``: one extra product per projection); ``per_request``
  keeps peft's T adapters, each scaled by forward hooks on its ``lora_B`` modules;
- detectors on the same encoder share one copy of it and one forward pass per batch of questions
  (``detector.SharedEncoder``); only their request-specific part (stored features, Mahalanobis,
  SVM) runs per request. A detector whose encoder LoRA changes the features (a trained one) adds
  its adapter to the shared copy and costs one encoder pass of its own.

A saved O3 folder holds ``o3.json`` (what to load), ``adapters/request_t/`` (peft),
``detectors/request_t/`` (safetensors + JSON), the base LM (``base_model/``, unless it is named
by hub id) and a model card; ``O3Model.from_pretrained(folder)`` loads it back.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
from peft import PeftModel

from ...parts.fact_world import QA
from ...parts.lm import answer_matches, encode_records, load_lm, load_tokenizer
from .detector import Detector
from .method import StackedLoRA, adapter_name

GATES = ("max", "per_request", "always_on", "off")


def load_adapted_lm(base, adapter_dirs: list[Path], names: list[str]):
    """A PeftModel with every adapter loaded and active at once (a base LM if there are none)."""
    if not adapter_dirs:
        return base
    lm = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name=names[0])
    for folder, name in zip(adapter_dirs[1:], names[1:]):
        lm.load_adapter(folder, adapter_name=name)
    lm.base_model.set_adapter(names, inference_mode=True)
    return lm.eval()


class O3Model:
    def __init__(self, lm, tokenizer, detectors: list[Detector], adapters: list[str], gate: str = "max",
                 prompt_template: str = "{question}", max_length: int = 64, stacked: StackedLoRA | None = None):
        """``lm`` is a PeftModel holding ``adapters`` (peft's path), or the plain base LM with
        ``stacked`` holding them (one shared weight per row: gates ``max`` and ``always_on``)."""
        if gate not in GATES:
            raise ValueError(f"gate={gate!r} is not one of {GATES}")
        if stacked is not None and gate == "per_request":
            raise ValueError("gate=per_request weighs each adapter on its own: it cannot use a stacked LoRA")
        self.lm, self.tokenizer, self.detectors, self.adapters = lm, tokenizer, detectors, adapters
        self.gate, self.prompt_template, self.max_length = gate, prompt_template, max_length
        self.stacked = stacked
        self._lora_b = {} if stacked is not None else {
            name: [m[name] for n, m in lm.named_modules() if n.endswith("lora_B") and name in m] for name in adapters}

    # ------------------------------------------------------------------ gating
    def detector_logits(self, questions: list[str]) -> torch.Tensor:
        """[n, T]: each detector's logit (w_t = sigmoid of it). Detectors sharing an encoder (and
        adapter) share one pass over the questions; only their scoring runs per request."""
        feats: dict[tuple, torch.Tensor] = {}
        logits = []
        for d in self.detectors:
            key = d.feature_key()
            if key not in feats:
                feats[key] = d.features(questions)
            logits.append(d.logit_from_features(feats[key]))
        return torch.stack(logits, dim=1)

    def to(self, device) -> "O3Model":
        """Move the LM and every detector encoder (shared ones once) to ``device``."""
        self.lm.to(device)
        for d in self.detectors:
            if d.shared is not None:
                d.shared.model.to(device)
            d.model.to(device)
        return self

    def adapter_weights(self, logits: torch.Tensor | None, n: int | None = None) -> torch.Tensor:
        """[n, A] scales of the adapters from detector logits [n, T] under this model's gate."""
        n = len(logits) if logits is not None else n
        if self.gate == "always_on":
            return torch.ones(n, len(self.adapters))
        if self.gate == "off" or not self.adapters:
            return torch.zeros(n, len(self.adapters))
        w = torch.sigmoid(logits)
        if self.gate == "max":
            return w.max(1, keepdim=True).values.expand(n, len(self.adapters)).contiguous()
        return w[:, :len(self.adapters)]

    def weights_for(self, questions: list[str]) -> torch.Tensor:
        needs_detectors = self.gate in ("max", "per_request") and self.adapters
        return self.adapter_weights(self.detector_logits(questions) if needs_detectors else None, len(questions))

    @contextlib.contextmanager
    def gated(self, weights: torch.Tensor):
        """Scale adapter a's output by ``weights[:, a]`` row by row while inside the block."""
        if self.stacked is not None:  # every column is the same weight (max / always_on / off)
            self.stacked.row_weight = weights[:, 0] if weights.shape[1] else None
            try:
                yield
            finally:
                self.stacked.row_weight = None
            return
        handles = []

        def scaler(column: torch.Tensor):
            def hook(_module, _inputs, out):
                w = column.to(out)
                if out.shape[0] != len(w):  # beam search / sampling expand the batch row-wise
                    w = w.repeat_interleave(out.shape[0] // len(w))
                return out * w.view(-1, *([1] * (out.dim() - 1)))
            return hook

        try:
            for a, name in enumerate(self.adapters):
                for module in self._lora_b[name]:
                    handles.append(module.register_forward_hook(scaler(weights[:, a])))
            yield
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ use
    @torch.no_grad()
    def answer_matches(self, records: list[QA], weights: torch.Tensor | None = None,
                       answers: list[str] | None = None) -> torch.Tensor:
        """Bool per record: the gated LM still gives the answer (``answers`` overrides the truth)."""
        if not records:
            return torch.zeros(0, dtype=torch.bool)
        weights = self.weights_for([r.question for r in records]) if weights is None else weights
        batch = encode_records(self.tokenizer, records, self.prompt_template, self.max_length, answers)
        return answer_matches(self.lm, batch, gate=lambda rows: self.gated(weights[rows]))

    @torch.no_grad()
    def generate(self, questions: list[str], max_new_tokens: int = 8, weights: torch.Tensor | None = None,
                 **generate_kwargs) -> list[str]:
        """Gated generation: w(x) from each question, then the LM continues the prompts."""
        weights = self.weights_for(questions) if weights is None else weights
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.tokenizer([self.prompt_template.format(question=q) for q in questions], padding=True,
                                 return_tensors="pt")
        finally:
            self.tokenizer.padding_side = side
        device = next(self.lm.parameters()).device
        generate_kwargs.setdefault("synced_gpus", False)  # an O3Model is whole on each process, never ZeRO-3 sharded
        with self.gated(weights):
            out = self.lm.generate(input_ids=enc["input_ids"].to(device),
                                   attention_mask=enc["attention_mask"].to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=self.tokenizer.pad_token_id, **generate_kwargs)
        new = out[:, enc["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_parts(cls, base: str | Path, adapter_dirs: list[Path], detector_dirs: list[Path], gate: str = "max",
                   prompt_template: str = "{question}", max_length: int = 64, dtype: str = "float32",
                   detectors: list[Detector] | None = None, stack: bool = True) -> "O3Model":
        """``stack=False``: peft's T hooked adapters and one encoder copy per detector, as before
        the stacked path existed (kept to check that both give the same outputs)."""
        names = [adapter_name(t + 1) for t in range(len(adapter_dirs))]
        stacked = None
        if stack and adapter_dirs and gate in ("max", "always_on"):
            lm = load_lm(base, dtype).eval()
            stacked = StackedLoRA(lm, [Path(d) for d in adapter_dirs])
        else:
            lm = load_adapted_lm(load_lm(base, dtype), [Path(d) for d in adapter_dirs], names)
        if detectors is None:
            encoders = {} if stack else None  # one shared copy per encoder, or one copy per detector
            detectors = [Detector.load(d, target_dir=base, encoders=encoders) for d in detector_dirs]
        return cls(lm, load_tokenizer(str(base)), detectors, names, gate, prompt_template, max_length, stacked)

    @classmethod
    def from_pretrained(cls, folder: str | Path, gate: str | None = None, stack: bool = True) -> "O3Model":
        folder = Path(folder)
        meta = json.loads((folder / "o3.json").read_text())
        base = folder / meta["base_model"] if (folder / meta["base_model"]).is_dir() else meta["base_model"]
        return cls.from_parts(base, [folder / a for a in meta["adapters"]], [folder / d for d in meta["detectors"]],
                              gate or meta["gate"], meta["prompt_template"], meta["max_length"], meta["dtype"],
                              stack=stack)

    @staticmethod
    def assemble(folder: str | Path, base: str | Path, adapter_dirs: list[Path], detector_dirs: list[Path],
                 gate: str, prompt_template: str, max_length: int, dtype: str, copy_base: bool) -> Path:
        """Collect stage outputs into one publishable folder (``o3.json`` + copies)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        entry = {"adapters": [], "detectors": [], "gate": gate, "prompt_template": prompt_template,
                 "max_length": max_length, "dtype": dtype}
        if copy_base:
            shutil.copytree(base, folder / "base_model", dirs_exist_ok=True)
        entry["base_model"] = "base_model" if copy_base else str(base)
        for kind, dirs in (("adapters", adapter_dirs), ("detectors", detector_dirs)):
            for t, src in enumerate(dirs, start=1):
                shutil.copytree(src, folder / kind / f"request_{t}", dirs_exist_ok=True)
                entry[kind].append(f"{kind}/request_{t}")
        (folder / "o3.json").write_text(json.dumps(entry, indent=2) + "\n")
        return folder
