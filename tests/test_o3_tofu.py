"""O3's TOFU path: the llama2-7b-tofu config end to end on a tiny folder in the locuslab/TOFU layout
(one JSON-lines file per config, named in the README's ``configs``) and a tiny random Llama saved
with ``save_pretrained``, sizes overridden; and TOFU's metrics on cases whose values are known."""
import json

import numpy as np
import pytest
import torch

from conftest import ROOT, run_recipe

from athanor.parts.fact_world import QA, QAData, build_word_tokenizer
from athanor.parts.tofu_metrics import (Scorer, TofuItem, forget_quality, item_scores, model_utility,
                                        truth_ratio_forget, truth_ratio_retain)

SPLITS = ("forget10_perturbed", "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed")
WORDS = ["red", "blue", "green", "tall", "short", "loud", "quiet", "old", "young", "kind"]


def tofu_rows(prefix: str, authors: int, per_author: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for a in range(authors):
        for q in range(per_author):
            answer, *wrong = [f"the author is {w}" for w in rng.choice(WORDS, 4, replace=False)]
            rows.append({"question": f"what is {prefix} author {a} like in way {q} ?", "answer": answer,
                         "paraphrased_answer": answer.replace("the author", "this writer"),
                         "paraphrased_question": f"in way {q} what is {prefix} author {a} like ?",
                         "perturbed_answer": wrong})
    return rows


def write_tofu_folder(folder) -> list[dict]:
    folder.mkdir()
    splits = {"forget10_perturbed": tofu_rows("a", 6, 3, 0), "retain_perturbed": tofu_rows("b", 2, 3, 1),
              "real_authors_perturbed": tofu_rows("c", 1, 3, 2), "world_facts_perturbed": tofu_rows("d", 1, 3, 3)}
    for name, rows in splits.items():
        (folder / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    configs = "".join(f"- config_name: {n}\n  data_files: {n}.json\n" for n in SPLITS)
    (folder / "README.md").write_text(f"---\nconfigs:\n{configs}---\n# tiny TOFU-format data\n")
    return [r for rows in splits.values() for r in rows]


def save_tiny_llama(folder, rows: list[dict]) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = [(r["question"], a) for r in rows
             for a in [r["answer"], r["paraphrased_answer"], *r["perturbed_answer"], r["paraphrased_question"]]]
    tokenizer = build_word_tokenizer(QAData([QA(q, a, "g") for q, a in texts], []),
                                     extra_words=("[INST]", "[/INST]", "I'm", "not", "able", "to", "answer", "that."))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# The 7B config with its sizes overridden: 6 authors x 3 questions, 2 requests of 2 authors, the base LM
# and the retain-only model fine-tuned here from the random Llama (run.max_steps > 0), the detectors on
# the target LM itself (no RoBERTa-large), every baseline for 2 steps, 2 seeds. ~25 s on an idle core.
def overrides(folder, llama) -> list[str]:
    return ["--config", str(ROOT / "recipes/configs/o3/llama2-7b-tofu.yaml"), "--data.source", str(folder),
            "--model.name_or_path", str(llama), "--model.dtype", "float32",
            "--data.group_size", "3", "--data.requests", "2", "--data.groups_per_request", "2",
            "--data.max_length", "48", "--data.batch_size", "4", "--run.max_steps", "20", "--run.eval_every", "0",
            "--unlearn.batch_size", "0", "--unlearn.max_steps", "3", "--unlearn.lr", "3e-3",
            "--detector.backbone", "target", "--detector.train_steps", "0", "--detector.max_length", "32",
            "--ablations.always_on", "false", "--ablations.per_request_gate", "false",
            "--ablations.gate_variants", "false", "--ablations.lambda0", "false",
            "--ablations.detector_untrained", "false", "--tofu.retain_model", "train", "--tofu.max_new_tokens", "6",
            "--tofu.seeds", "2", "--baselines.batch_size", "0", "--run.progress", "false",
            *[arg for m in ("grad_ascent", "grad_diff", "npo", "simnpo") for arg in (f"--baselines.{m}_steps", "2")]]


@pytest.mark.slow
def test_tofu_config_runs_end_to_end_on_a_tiny_tofu_folder(tmp_path, monkeypatch):
    rows = write_tofu_folder(tmp_path / "tofu")
    save_tiny_llama(tmp_path / "llama", rows)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    run_recipe("o3", "--run.output_dir", str(out), *overrides(tmp_path / "tofu", tmp_path / "llama"), timeout=600)
    report = json.loads((out / "report.json").read_text())
    tofu = report["tofu"]
    for name in ("o3", "retain_only", "base", "grad_ascent", "grad_diff", "npo", "simnpo"):
        assert len(tofu[name]["per_request"]) == 2, name
        for row in (*tofu[name]["per_request"], tofu[name]["final"]):
            assert {"forget_quality", "model_utility", "truth_ratio", "rouge_l"} <= set(row), (name, row)
            assert 0 <= row["forget_quality"] <= 1 and 0 <= row["model_utility"] <= 1, (name, row)
        assert len(tofu[name]["final"]["utility"]) == 2  # real authors and world facts
    assert tofu["retain_only"]["final"]["forget_quality"] == 1.0  # the reference against itself
    assert report["seeds"]["seeds"] == [0, 1] and report["seeds"]["o3"]["forget_quality"]["std"] is not None
    assert {"tofu_o3_forget_quality_ge_threshold", "tofu_base_forget_quality_below_threshold"} <= set(report["checks"])
    assert report["requests"][0]["forget_acc_heldout_templates"] is not None  # paraphrased_question: D.U. measured


class _Table(torch.nn.Module):
    """A 'model' whose next-token logits depend on the previous token only (a fixed table)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(logits)

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()

    def generate(self, input_ids, attention_mask=None, max_new_tokens=1, **_):
        out = input_ids
        for _ in range(max_new_tokens):
            out = torch.cat([out, self.table[out[:, -1]].argmax(-1, keepdim=True)], 1)
        return out


def test_truth_ratio_probability_and_rouge_on_a_known_model():
    """P(next | 'q') = softmax of a fixed row: the truth ratio is P(wrong) / P(true) per token, as TOFU defines it."""
    data = QAData([QA("q", a, "g") for a in ("x", "y", "z")], [])
    tok = build_word_tokenizer(data, extra_words=())
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("q", "x", "y", "z")}
    logits = torch.full((len(tok), len(tok)), -30.0)
    logits[ids["q"], ids["x"]], logits[ids["q"], ids["y"]], logits[ids["q"], ids["z"]] = 2.0, 1.0, 1.0
    for w in ("x", "y", "z"):
        logits[ids[w], tok.eos_token_id] = 0.0  # EOS certain after the answer
    scorer = Scorer(_Table(logits), tok)
    scores = item_scores(scorer, [TofuItem("q", "x", "x", ["y", "z"])], max_new_tokens=1)
    p = torch.softmax(logits[ids["q"]], -1)
    # per-token probability over (answer, EOS): sqrt(P(x) * 1)
    assert scores["probability"][0] == pytest.approx(float(p[ids["x"]].sqrt()), rel=1e-4)
    assert scores["truth_ratio"][0] == pytest.approx(float((p[ids["y"]] / p[ids["x"]]).sqrt()), rel=1e-4)
    assert scores["rouge_l"] == [1.0]  # the greedy answer is x
    options = item_scores(scorer, [TofuItem("q", "x", "x", ["y", "z"])], max_new_tokens=1, options=True)
    s = p[[ids["x"], ids["y"], ids["z"]]].sqrt()
    assert options["probability"][0] == pytest.approx(float(s[0] / s.sum()), rel=1e-4)


def test_aggregates_forget_quality_and_utility():
    assert truth_ratio_forget([1.0, 0.5, 2.0]) == pytest.approx(2 / 3)
    assert truth_ratio_retain([0.25, 2.0]) == pytest.approx(0.375)
    rng = np.random.default_rng(0)
    same = forget_quality(rng.uniform(size=200), rng.uniform(size=200))
    shifted = forget_quality(rng.uniform(size=200) * 0.3, rng.uniform(size=200))
    assert same > 0.05 > 1e-6 > shifted  # indistinguishable vs clearly different distributions
    assert model_utility([{"probability": 0.5, "rouge_l": 0.5, "truth_ratio": 0.5}]) == pytest.approx(0.5)
    assert model_utility([{"probability": 1.0, "rouge_l": 0.0, "truth_ratio": 1.0}]) == 0.0
