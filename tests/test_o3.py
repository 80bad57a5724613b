"""O3 pieces on tiny models: world, orthogonality penalty, per-row gating, detector, config errors."""
import math

import pytest
import torch

from athanor.methods.o3.detector import (Detector, DetectorConfig, DetectorTraining, entropy_contrastive,
                                          extract_features)
from athanor.parts.lm import encode_records
from athanor.methods.o3.method import OrthogonalPenalty, UnlearnConfig, earlier_lora_A, lora_config, unlearning_answers
from athanor.methods.o3.model import O3Model, load_adapted_lm
from athanor.parts.fact_world import DataConfig, build_word_tokenizer, generate_world, request_groups, retained_groups
from conftest import run_recipe


def tiny_lm(vocab=200, hidden=32, layers=2):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                            num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))


@pytest.fixture(scope="module")
def world():
    cfg = DataConfig(people=20, requests=2, groups_per_request=4, countries=4)
    return cfg, generate_world(cfg)


def test_world_is_seeded_with_disjoint_requests_and_heldout_phrasings(world):
    cfg, data = world
    assert [r.question for r in generate_world(cfg).records] == [r.question for r in data.records]
    requests = request_groups(data, cfg)
    assert len(requests) == 2 and all(len(r) == 4 for r in requests) and not set(requests[0]) & set(requests[1])
    assert len(retained_groups(data, requests)) == 12
    facts = [r for r in data.select() if not r.paraphrase]  # paraphrases: tests/test_o3_honest.py
    assert sum(r.heldout for r in facts) == 20 * 4 * 2  # 2 of 6 phrasings held out per attribute
    trained = {r.question.replace(r.group, "X") for r in facts if not r.heldout}
    held = {r.question.replace(r.group, "X") for r in facts if r.heldout}
    assert not trained & held  # held-out phrasings are never trained for that attribute...
    words = {w for q in trained for w in q.split()}
    assert {w for q in held for w in q.split()} <= words  # ...but use only words the LM has seen


def test_answers_are_one_token_and_labels_cover_only_the_answer(world):
    _, data = world
    tok = build_word_tokenizer(data)
    batch = encode_records(tok, data.records[:5], "{question}", 32)
    for row in range(5):
        answer_positions = batch["answer_mask"][row].nonzero().flatten()
        assert len(answer_positions) == 1
        assert tok.decode(batch["input_ids"][row, answer_positions]) == data.records[row].answer
        labelled = (batch["labels"][row] != -100).nonzero().flatten().tolist()
        assert labelled == [answer_positions.item(), answer_positions.item() + 1]  # answer + EOS


def test_relabelling_never_keeps_the_true_answer(world):
    _, data = world
    records = data.select()[:50]
    answers = unlearning_answers(records, UnlearnConfig(target="relabel"), data, seed=0)
    assert all(a != r.answer and a in data.answer_choices[r.attribute] for a, r in zip(answers, records))


def test_orthogonal_penalty_is_the_sum_of_squared_overlaps(tmp_path):
    from peft import get_peft_model

    first = get_peft_model(tiny_lm(), lora_config(UnlearnConfig(r=4)))
    for name, p in first.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(p)
    first.save_pretrained(tmp_path / "r1")
    earlier = earlier_lora_A([tmp_path / "r1"])
    current = get_peft_model(tiny_lm(), lora_config(UnlearnConfig(r=4)))
    penalty = OrthogonalPenalty(current, "default", earlier)
    assert penalty.matched == len(earlier) == 2 * 4  # every linear layer of both blocks
    current(input_ids=torch.randint(0, 200, (2, 5)))
    value = penalty.pop()
    modules = dict(current.named_modules())
    expected = sum((a_prev @ modules[f"{path}.lora_A.default"].weight.T).pow(2).sum()
                   for path, a_prev in earlier.items())
    assert torch.allclose(value, expected)
    value.backward()
    grads = {n for n, p in current.named_parameters() if p.grad is not None}
    assert grads and all("lora_A" in n for n in grads)  # only the current A is pushed away


def test_gate_scales_each_adapter_per_row(tmp_path):
    from peft import get_peft_model

    for name in ("r1", "r2"):
        m = get_peft_model(tiny_lm(), lora_config(UnlearnConfig(r=4)))
        for n, p in m.named_parameters():
            if "lora_" in n:
                torch.nn.init.normal_(p, std=0.5)
        m.save_pretrained(tmp_path / name)
    lm = load_adapted_lm(tiny_lm(), [tmp_path / "r1", tmp_path / "r2"], ["request_1", "request_2"])
    o3 = O3Model(lm, None, [], ["request_1", "request_2"])
    ids = torch.randint(0, 200, (1, 6)).repeat(4, 1)
    weights = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    with torch.no_grad(), o3.gated(weights):
        gated = lm(input_ids=ids).logits
        with lm.disable_adapter():
            base = lm(input_ids=ids[:1]).logits
    with torch.no_grad():
        both = lm(input_ids=ids[:1]).logits  # outside the block: every adapter at full strength
        lm.base_model.set_adapter(["request_1"])
        first = lm(input_ids=ids[:1]).logits
    assert torch.allclose(gated[0], base[0], atol=1e-5)
    assert torch.allclose(gated[1], both[0], atol=1e-5)
    assert torch.allclose(gated[2], first[0], atol=1e-5)
    assert not torch.allclose(gated[3], gated[1], atol=1e-3) and not torch.allclose(gated[3], gated[0], atol=1e-3)
    assert torch.allclose(o3.adapter_weights(torch.tensor([[-50.0, 50.0]])), torch.ones(1, 2))  # max over requests


def test_contrastive_entropy_is_low_for_matching_views_and_log_b_for_identical_rows():
    distinct = [torch.eye(4) * 50]
    assert entropy_contrastive(distinct, distinct) < 1e-3
    same = [torch.ones(4, 3)]
    assert math.isclose(float(entropy_contrastive(same, same)), math.log(4), rel_tol=1e-3)
    # ...and just as low when every masked view picks the *wrong* clean one: why training uses InfoNCE
    wrong = [torch.eye(4)[[1, 2, 3, 0]] * 50]
    assert entropy_contrastive(wrong, distinct) < 1e-3


@pytest.fixture(scope="module")
def target_backbone(tmp_path_factory, world):
    """A tiny causal LM + word tokenizer saved as a folder: the detector's ``target`` backbone."""
    _, data = world
    folder = tmp_path_factory.mktemp("target")
    tok = build_word_tokenizer(data)
    tiny_lm(vocab=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, data


def test_masked_view_masks_real_tokens_only(target_backbone):
    from athanor.engine import Engine
    from athanor.config import TrainConfig

    folder, data = target_backbone
    texts = [r.question for r in data.select(groups=data.groups[:4])]
    method = DetectorTraining(str(folder), DetectorConfig(backbone="target", batch_size=8), texts)
    engine = Engine(TrainConfig(), output_dir=folder.parent / "det")
    method.setup(engine)
    ids, attention = method.data["input_ids"][:8], method.data["attention_mask"][:8]
    masked, labels = method.masked_view(ids, attention, torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert chosen.any(1).all() and not (chosen & (attention == 0)).any()
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    contrastive, mlm = method.losses({"input_ids": ids, "attention_mask": attention})
    assert torch.isfinite(contrastive) and torch.isfinite(mlm)


def test_detector_separates_calibrates_and_round_trips(target_backbone, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, data = target_backbone
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    forget = [r.question for r in data.select(groups=data.groups[:4], heldout=False)]
    others = [r.question for r in data.select(kind="utility")]
    detector = Detector(model, tok, DetectorConfig(backbone="target", cv_folds=4), "target")
    detector.fit(extract_features(model, tok, forget, 32))
    w_forget, w_other = detector.weight(forget), detector.weight(others)
    assert ((0 <= w_other) & (w_other <= 1)).all() and (w_forget > 0.5).float().mean() > 0.9
    assert w_forget.mean() > w_other.mean() + 0.5  # questions of another kind look far even to a random LM
    detector.save(tmp_path / "det")
    assert sorted(p.name for p in (tmp_path / "det").iterdir()) == ["detector.json", "detector.safetensors"]
    loaded = Detector.load(tmp_path / "det", target_dir=folder)
    assert torch.allclose(loaded.weight(others + forget[:5]), torch.cat([w_other, w_forget[:5]]), atol=1e-5)


def test_bad_key_exits_2_with_one_line_from_the_command_line(tmp_path):
    proc = run_recipe("o3", "--unlearn.orth_lamda", "1", "--run.output_dir", str(tmp_path / "o"), check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "unlearn.orth_lambda" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--data.requests", "9"], "retained people"),
    (["--data.source", "/nonexistent/qa.jsonl"], "no such file"),
    (["--detector.backbone", "/nonexistent/encoder"], "detector backbone"),
    (["--unlearn.gate", "min"], "unlearn.gate"),
    (["--data.templates", "7"], "data.templates"),
])
def test_bad_input_exits_2_with_one_line_before_compute(tmp_path, capsys, args, message):
    from athanor.methods import o3
    from athanor.runner import run

    with pytest.raises(SystemExit) as exit_info:
        run(o3.PAPER, [*args, "--run.output_dir", str(tmp_path / "o")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "o").exists()
