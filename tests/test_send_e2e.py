"""SeND end to end: exact resume mid-run (interrupted + resumed == uninterrupted), the dropped neurons
during training are the top-K% by the sensitivity formula, local from_pretrained/load_dataset paths,
the paper-scale YAMLs, and the tiny recipe run (slow)."""
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
            for i, p in enumerate(people) for j, tag in enumerate(["now", "today", "really"])]
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
                              "--data.tracking_every", "3", "--data.batch_size", "8", "--base.max_steps", "20",
                              "--base.min_accuracy", "0", "--run.max_steps", "8", "--run.eval_every", "4",
                              "--send.record_every", "2", "--send.reestimate_every", "4", "--send.points", "2",
                              "--experiment.seeds", "[0]", "--eigenscore.samples", "3", "--run.progress", "false"])
    assert len(report["send"]) == len(report["normal"]) == 1
    assert (tmp_path / "out" / "base" / "model" / "config.json").exists()


@pytest.mark.slow
def test_tiny_recipe_end_to_end(tmp_path):
    """The recipe on a reduced default: report keys, exact EigenScore, one entry per seed, plots, verdict."""
    out = tmp_path / "send"
    report = run(send.PAPER, ["--run.output_dir", str(out), "--base.max_steps", "250", "--run.max_steps", "60",
                              "--data.old_people", "30", "--data.new_people", "18", "--data.batch_size", "16",
                              "--experiment.seeds", "[0,1]", "--eigenscore.samples", "6"])
    assert report["eigenscore"]["max_rel_error"] <= 1e-6
    assert {e["seed"] for e in report["send"]} == {e["seed"] for e in report["normal"]} == {0, 1}
    assert report["base"]["acc_old"] >= 0.98  # continued training starts from a converged base
    for entry in report["send"] + report["normal"]:
        assert set(entry) >= {"acc_old", "acc_new", "oscillation_std", "eigenscore_auroc"}
        assert entry["acc_old"] > 0.5 and entry["acc_new"] > 0.3  # forgetting, not collapse; new facts learnt
    # the EigenScore claim this recipe can check: sampled answers' spread flags wrong answers
    aurocs = [e["eigenscore_auroc"] for e in report["send"] + report["normal"] if e["eigenscore_auroc"] is not None]
    assert aurocs and sum(aurocs) / len(aurocs) > 0.6
    assert (out / "accuracy.png").exists() and (out / "hallucination.png").exists()
    assert "Did SeND help here?" in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text()).keys() >= {"eigenscore", "send", "normal"}
