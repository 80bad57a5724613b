"""SeND end to end: exact resume mid-run (interrupted + resumed == uninterrupted), the dropped neurons
during training are the top-K% by the sensitivity formula, local from_pretrained/load_dataset paths,
``model.revision`` through a local Hub cache, the paper-scale YAMLs, and the recipe's machinery
detecting a planted effect (slow)."""
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from athanor.config import load_config
from athanor.methods import send
from athanor.methods.send import stages as send_paper
from athanor.methods.send.facts import FactStream
from athanor.methods.send.neurons import sensitivity, top_sensitive
from athanor.methods.send.config import SendPaperConfig
from athanor.runner import StageContext, run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model.hidden_size", "32", "--model.num_layers", "3", "--model.num_heads", "4",
        "--model.intermediate_size", "64", "--data.old_people", "8", "--data.new_people", "6",
        "--data.additions", "2", "--data.templates", "3", "--data.batch_size", "8", "--run.progress", "false"]


def tiny_base(tmp_path: Path) -> tuple[SendPaperConfig, Path]:
    """A config with small sizes and a base model saved with save_pretrained (not trained: exactness
    does not need a converged base)."""
    cfg = load_config(SendPaperConfig, TINY + ["--run.max_steps", "12", "--run.eval_every", "4",
                                               "--send.record_every", "2", "--send.reestimate_every", "4",
                                               "--send.points", "2", "--send.drop_window", "3",
                                               "--send.fraction", "0.25", "--eigenscore.samples", "3"])
    from athanor.parts.lm import build_lm
    from athanor.methods.send.facts import load_facts, make_tokenizer

    data, _ = load_facts(cfg.data)
    tokenizer = make_tokenizer(cfg.data, data, "")
    torch.manual_seed(0)
    model = build_lm(cfg.model, len(tokenizer), cfg.data.max_length)
    base = tmp_path / "base_model"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    return cfg, base


def arm_losses(folder: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


class InterruptingStream(FactStream):
    """Sends itself SIGUSR1 while serving micro-batch ``at``: the engine checkpoints after that step
    and exits 75, as a preempted job would."""
    at = 7

    def __next__(self):
        if self.served == self.at - 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return super().__next__()


def test_resume_mid_run_is_exact_and_drops_the_top_k(tmp_path, monkeypatch):
    cfg, base = tiny_base(tmp_path)
    results = {"base": {"model_dir": str(base)}}
    full = send_paper.continued_training(StageContext(cfg, tmp_path / "full", "send_s0", results), "send", 0)
    monkeypatch.setattr(send_paper, "FactStream", InterruptingStream)
    with pytest.raises(SystemExit) as stop:
        send_paper.continued_training(StageContext(cfg, tmp_path / "cut", "send_s0", results), "send", 0)
    assert stop.value.code == 75
    monkeypatch.setattr(send_paper, "FactStream", FactStream)
    resumed = send_paper.continued_training(StageContext(cfg, tmp_path / "cut", "send_s0", results), "send", 0)
    assert arm_losses(tmp_path / "cut" / "send_s0") == arm_losses(tmp_path / "full" / "send_s0")
    assert len(arm_losses(tmp_path / "full" / "send_s0")) == 12
    for key in ("final", "eigenscore_auroc", "dropped_last", "reestimations"):
        assert resumed[key] == full[key]
    assert full["reestimations"] == 3 and len(full["dropped_last"]) == 8  # 25% of 32 dims


def test_dropped_neurons_are_the_top_k_of_the_recorded_embeddings(tmp_path, monkeypatch):
    """Re-derive the dropped set from the recorded embeddings and check the layer output in training."""
    from athanor.methods.send import method as training

    cfg, base = tiny_base(tmp_path)
    seen = {}
    original = training.ContinuedTraining._send_schedule

    def spy(self, step):
        original(self, step)
        if step % self.send.reestimate_every == 0 and len(self.records) >= self.send.points:
            seen[step] = (torch.stack(self.records).clone(), self.dropped.clone())

    zeros = {}  # step -> the last layer's input in that step's training forward (the first forward)
    original_step = training.ContinuedTraining.train_step

    def watch(self, batch):
        from athanor.methods.send.neurons import decoder_layers

        def record(_module, args, kwargs):
            zeros.setdefault(self.engine.step, args[0] if args else kwargs["hidden_states"])

        handle = decoder_layers(self.model)[-1].register_forward_pre_hook(record, with_kwargs=True)
        try:
            return original_step(self, batch)
        finally:
            handle.remove()

    monkeypatch.setattr(training.ContinuedTraining, "_send_schedule", spy)
    monkeypatch.setattr(training.ContinuedTraining, "train_step", watch)
    send_paper.continued_training(StageContext(cfg, tmp_path, "send_s0", {"base": {"model_dir": str(base)}}), "send", 0)
    assert sorted(seen) == [4, 8, 12]
    for step, (records, dropped) in seen.items():
        scores = sensitivity(records)
        k = int(0.25 * scores.numel())
        assert dropped.tolist() == sorted(torch.argsort(scores, descending=True)[:k].tolist())
        assert torch.equal(dropped, top_sensitive(scores, 0.25))
    # steps 5..7 train with the set chosen at step 4: those dims are exactly zero, the others are not
    assert sorted(zeros) == list(range(1, 13))
    for step, hidden in zeros.items():
        if step in (5, 6, 7):
            assert torch.count_nonzero(hidden[..., seen[4][1]]) == 0
            assert torch.count_nonzero(hidden) > 0
        if step <= 4:
            assert torch.count_nonzero(hidden[..., seen[4][1]]) > 0


def test_stopping_rule_stops_updates(tmp_path):
    cfg, base = tiny_base(tmp_path)
    cfg.send.stop_loss, cfg.send.stop_eigenscore = 1e9, 1e9  # met at the first re-estimation (step 4)
    out = send_paper.continued_training(StageContext(cfg, tmp_path, "send_s0", {"base": {"model_dir": str(base)}}),
                                        "send", 0)
    assert out["stopped_at"] == 4
    assert [s for s, _ in arm_losses(tmp_path / "send_s0")] == [1, 2, 3, 4]


@pytest.mark.parametrize("name", ["pythia_1b", "llama3_8b"])
def test_paper_scale_configs_parse(name):
    cfg = load_config(SendPaperConfig, ["--config", str(ROOT / "recipes" / "configs" / "send" / f"{name}.yaml")])
    assert cfg.model.name_or_path and cfg.data.source != "world"


@pytest.mark.slow
def test_local_model_and_dataset_through_from_pretrained_and_load_dataset(tmp_path):
    """A tiny LM saved with save_pretrained and a local dataset folder read by datasets.load_dataset."""
    from athanor.parts.fact_world import QA, QAData, build_word_tokenizer
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    people = [f"person{i}" for i in range(12)]
    rows = [{"person": p, "question": f"where does {p} live {tag} ?", "answer": f"town{(i * 7 + j) % 9}"}
            for i, p in enumerate(people) for j, tag in enumerate(["now", "today", "really", "still"])]
    (tmp_path / "facts").mkdir()
    (tmp_path / "facts" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tokenizer = build_word_tokenizer(QAData([QA(r["question"], r["answer"], r["person"]) for r in rows], people))
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64, eos_token_id=2,
                                             pad_token_id=0, bos_token_id=None))
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    report = run(send.PAPER, ["--run.output_dir", str(tmp_path / "out"), "--model.name_or_path", str(tmp_path / "lm"),
                              "--data.source", str(tmp_path / "facts"), "--data.group_field", "person",
                              "--data.old_people", "6", "--data.new_people", "6", "--data.additions", "2",
                              "--data.tracking_every", "4", "--data.batch_size", "8", "--base.max_steps", "20",
                              "--base.min_accuracy", "0", "--run.max_steps", "8", "--run.eval_every", "4",
                              "--send.record_every", "2", "--send.reestimate_every", "4", "--send.points", "2",
                              "--experiment.seeds", "[0]", "--eigenscore.samples", "3", "--run.progress", "false"])
    assert len(report["send"]) == len(report["normal"]) == 1
    assert (tmp_path / "out" / "base" / "model" / "config.json").exists()


def test_revision_is_resolved_through_a_local_hub_cache(tmp_path):
    """``model.revision`` reaches from_pretrained: two "checkpoints" of one repo laid out as the Hub
    cache does it (snapshots/<commit>, refs/<branch>), Pythia-style branches step1 / step2, offline."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from athanor.methods.send.config import SendModelConfig
    from athanor.parts.fact_world import QA, QAData, build_word_tokenizer

    repo = tmp_path / "hub" / "models--org--tiny"
    tokenizer = build_word_tokenizer(QAData([QA("where is a ?", "b", "a")], ["a"]))
    weights = {}
    for n, (branch, commit) in enumerate((("step1", "a" * 40), ("step2", "b" * 40))):
        torch.manual_seed(n)
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32))
        model.save_pretrained(repo / "snapshots" / commit)
        tokenizer.save_pretrained(repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
        weights[branch] = model.gpt_neox.embed_in.weight.detach().clone()
    for branch in ("step1", "step2"):
        cfg = SendModelConfig(name_or_path="org/tiny", revision=branch)
        loaded = send_paper.load_pretrained(cfg, cache_dir=str(tmp_path / "hub"))
        assert torch.equal(loaded.gpt_neox.embed_in.weight, weights[branch])
        assert send_paper.load_pretrained_tokenizer(cfg, cache_dir=str(tmp_path / "hub")).eos_token == "[EOS]"
    from athanor.config import ConfigError

    with pytest.raises(ConfigError, match="step9"):
        send_paper.load_pretrained(SendModelConfig(name_or_path="org/tiny", revision="step9"),
                                   cache_dir=str(tmp_path / "hub"))


# The planted-effect test's setting: the recipe's default world and model, shortened.
EFFECT = ["--data.new_people", "24", "--run.max_steps", "120", "--run.eval_every", "20", "--eigenscore.samples", "4",
          "--eigenscore.heldout_questions", "16", "--run.progress", "false"]


@pytest.mark.slow
def test_recipe_detects_a_planted_effect(tmp_path):
    """SeND did not help in the recipe's report (its paired intervals include 0), so this test asserts
    what makes that "no" mean something: the same machinery (held-out phrasings, per-checkpoint
    hallucination rate and EigenScore, paired differences over seeds) flags a deliberately broken arm —
    SeND's schedule dropping 90% of the penultimate layer for the whole run — as worse.

    Threshold: measured on this setting over 3 seeds (loaded 2-core machine, 21 s): paired diffs of the
    mean held-out hallucination rate over checkpoints 0.372, 0.205, 0.347 (mean 0.308, std over seeds
    0.09; the 3-seed t-interval [0.084, 0.532] is too wide to be the gate). The test asks for every seed
    worse (> 0; the smallest measured is 0.205) and a mean > 0.1 (mean − 2 std over seeds = 0.13).
    Replaced by its control it fails: same-seed runs are bit-identical (checked: two runs of one seed give
    the same metrics.jsonl apart from throughput), so a planted arm equal to normal training gives diffs
    of exactly 0; random-neuron dropout at the default fraction gave paired diffs within ±0.25 of 0 in
    the recipe's run (mean −0.005)."""
    out = tmp_path / "send"
    report = run(send.PAPER, ["--run.output_dir", str(out), "--experiment.seeds", "[0,1,2]",
                              "--experiment.arms", "[normal,send]", "--send.fraction", "0.9",
                              "--send.drop_window", "1000", *EFFECT])
    assert report["eigenscore"]["max_rel_error"] <= 1e-6
    p = report["paired"]["send_minus_normal"]["heldout_halluc_mean"]
    assert min(p["diffs"]) > 0 and p["mean"] > 0.1, p
    assert report["send_helped"] is False
    for entry in report["normal"]:
        pc = entry["per_checkpoint"]
        assert len(pc["heldout_hallucination_rate"]) == len(pc["eigenscore_heldout"]) == len(pc["step"])
        assert pc["step"][0] == 0 and len(pc["step"]) >= 4
    assert (out / "hallucination.png").exists() and "Did SeND help here?" in (out / "report.md").read_text()
