"""Codebook Features: the codebook layer (fused == reference), hooks on HF decoders, steering,
dead-code replacement, the Hub folder, exact resume, bad configs, and the tiny recipe end to end."""
import json

import pytest
import torch

from athanor import testing
from athanor.engine import Engine, read_metrics
from athanor.kernels import use_backend
from athanor.methods import codebook
from athanor.methods.codebook import CodebookLayer, CodebookModel
from athanor.methods.codebook.method import CodebookLM
from athanor.methods.codebook.config import CodebookPaperConfig
from athanor.methods.codebook.tokfsm import TokFSM, TokFSMConfig
from athanor.models import AthanorGPT, AthanorGPTConfig
from athanor.runner import run
from conftest import run_recipe


def tiny_gpt(vocab=11, seq=40, seed=0):
    torch.manual_seed(seed)
    return AthanorGPT(AthanorGPTConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, max_seq_len=seq, position="rotary"))


def tiny_llama(vocab=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def grads_after(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    (out.loss + model.recon_loss()).backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("k,reduce", [(1, "sum"), (3, "mean")])
def test_fused_topk_equals_reference_inside_the_model(k, reduce):
    """All sites, all heads of a layer in one grouped call: outputs and every gradient match the
    dense reference (codebooks, the LM's weights, through the straight-through path)."""
    model = CodebookModel(tiny_gpt(), sites=("heads", "attn", "mlp"), num_codes=24, k=k, reduce=reduce)
    ids = torch.randint(11, (3, 17))
    with use_backend("torch"):
        fused_logits, fused = grads_after(model, ids)
    with use_backend("reference"):
        ref_logits, ref = grads_after(model, ids)
    torch.testing.assert_close(fused_logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert fused.keys() == ref.keys() and any("codebooks" in n for n in fused)
    for name in fused:
        torch.testing.assert_close(fused[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_layer_straight_through_and_usage():
    layer = CodebookLayer(groups=2, dim=8, num_codes=16, k=2)
    x = torch.randn(2, 10, 8, requires_grad=True)
    out = layer(x)
    chosen = layer.last_indices  # (2, 10, 2)
    want = torch.stack([layer.codebook[g][chosen[g]].sum(1) for g in range(2)])
    torch.testing.assert_close(out, want)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the gradient passes the bottleneck
    assert layer.usage.sum() == 2 * 10 * 2  # every (token, chosen code) counted, on the device


def test_dead_codes_are_replaced_with_inputs():
    layer = CodebookLayer(groups=1, dim=4, num_codes=8, k=1)
    with torch.no_grad():
        layer.codebook.zero_()
        layer.codebook[0, 0] = torch.tensor([1.0, 0, 0, 0])  # the only direction anything matches
    layer(torch.tensor([[[1.0, -1.0, 0.5, 0.0]] * 6]))
    assert layer.usage[0, 0] == 6 and layer.usage[0, 1:].sum() == 0
    n = layer.replace_dead(1.0, torch.Generator().manual_seed(0))
    assert n == 7 and layer.usage.sum() == 0
    # the replaced codes are (layer-normed) inputs now, the used one is kept
    torch.testing.assert_close(layer.codebook[0, 0], torch.tensor([1.0, 0, 0, 0]))
    assert torch.allclose(layer.codebook[0, 1:], layer.last_input[0, 0].expand(7, 4))


def test_hooks_on_a_hf_decoder_and_the_hub_folder(tmp_path):
    """Llama (o_proj, grouped-query attention, tuple attention outputs): all sites attach; the folder
    reloads with the codebooks and gives the same logits; AutoModel alone loads the bare LM."""
    from transformers import AutoModelForCausalLM

    model = CodebookModel(tiny_llama(), sites=("heads", "attn", "mlp"), num_codes=16, k=2)
    assert set(model.codebooks) == {f"{s}{i}" for s in ("heads", "attn", "mlp") for i in (0, 1)}
    assert model.codebooks["heads0"].codebook.shape == (4, 16, 8)
    ids = torch.randint(64, (2, 12))
    model.train()
    out = model(input_ids=ids, labels=ids)
    (out.loss + model.recon_loss()).backward()
    assert model.codebooks["heads1"].codebook.grad.abs().sum() > 0
    model.eval()
    model.save_pretrained(tmp_path / "m")
    loaded = CodebookModel.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert not torch.allclose(AutoModelForCausalLM.from_pretrained(tmp_path / "m")(input_ids=ids).logits,
                              model(input_ids=ids).logits)  # the codebooks do change the model


def test_steering_changes_generations():
    model = CodebookModel(tiny_gpt(seed=1), sites=("heads",), num_codes=32).eval()
    prompt = torch.randint(10, (16, 9))
    plain = model.generate(prompt, 4)
    forced_codes = {f"heads{layer}/{h}": 5 + h for layer in (0, 1) for h in range(4)}
    forced = model.generate(prompt, 4, force_codes=forced_codes, force_at=[7, 8])
    assert torch.equal(forced[:, :9], prompt)
    assert (forced[:, 9:] != plain[:, 9:]).any(), "forcing every head's code changed no generation"
    with model.recording(), model.forcing({"heads1/2": 3}):
        model(input_ids=prompt)
    assert (model.codebooks["heads1"].last_indices[2, :, 0] == 3).all()
    assert not model.codebooks["heads1"].force  # the forcing ends with the block


def test_steering_patches_codes_at_the_state_positions_only():
    """The paper's intervention: a state's own codes patched at its own positions change nothing (the
    same as no patch); the steering report has every condition and control; the true next-token
    distribution of a state is its successors' first digits."""
    from athanor.methods.codebook import analysis as A
    from athanor.methods.codebook import steering as St

    fsm = TokFSM(TokFSMConfig(states=24, edges=4, seq_states=6, train_sequences=8, eval_sequences=8))
    assert fsm.vocab_size == 11  # plain digits by default: ten digits and BOS
    model = CodebookModel(tiny_gpt(vocab=fsm.vocab_size, seed=2), sites=("heads", "mlp"), num_codes=16).eval()
    walks = fsm.walks(12)
    src, last = fsm.encode(walks[:, :5]), walks[:, 4]
    at = torch.arange(1 + 4 * fsm.digits, 1 + 5 * fsm.digits)
    own = A.record_codes(model, src)
    keys = A.codebook_keys(model)
    codes = {k: own[k.split("/")[0]][:, at, int(k.split("/")[1]), 0] for k in keys}
    q = St.true_next_token(fsm, last)
    assert torch.allclose(q.sum(1), torch.ones(12)) and (q[:, 10] == 0).all()
    assert St._score(model, fsm, src, at, codes, last, q) == pytest.approx(St._score(model, fsm, src, at, {}, last, q), abs=1e-5)
    out = St.steer(model, fsm, walks, 5, seed=0)
    assert set(out["state_positions_only"]) == set(out["other_state_codes"]) == {"heads", "mlp", "both"}
    for block in (*out["state_positions_only"].values(), *out["other_state_codes"].values(), out["no_patch"]):
        assert set(block) == {"js_divergence", "valid_successor"} and 0 <= block["js_divergence"] <= 1
    assert out["patched_positions"] == at.tolist()


def test_features_count_every_position_and_need_recall():
    """A code that names the state but also fires at other positions loses precision; a rare,
    perfectly precise code cannot win the recall >= 0.5 pick."""
    from athanor.methods.codebook import features as F

    labels = torch.tensor([2, 0, 2, 1, 2, 0, 2, 1] * 4)  # 2 = "no state"
    select = torch.arange(32) < 16
    broad = torch.where(labels == 0, 7, torch.where(labels == 2, 7, 3))  # code 7 on state 0 AND on no-state
    got = F.discrete(broad, labels, select, 2)["precision_at_recall_0.5"]
    assert got["recall"][0] == 1 and abs(float(got["precision"][0]) - 1 / 3) < 1e-6
    rare = labels.clone() * 0 + 5
    rare[[1, 17]] = 9  # one occurrence of state 0 per half: precision 1, recall 1/4
    pick = F.discrete(rare, labels, select, 2)
    assert pick["precision_at_recall_0.5"]["value"][0] == 5 and pick["precision_at_recall_0.5"]["precision"][0] < 0.5
    assert F.position_labels(torch.tensor([[3, 4]]), 2, 24).tolist() == [[24, 24, 3, 24, 4]]


def test_tokfsm_walks_follow_edges():
    fsm = TokFSM(TokFSMConfig(states=100, edges=10, seq_states=12, train_sequences=8, eval_sequences=4))
    walks = fsm.walks(6)
    assert fsm.is_valid(walks[:, :-1], walks[:, 1:]).all()
    ids = fsm.encode(walks)
    assert ids.shape == (6, 1 + 12 * 2) and (ids[:, 0] == fsm.bos).all()
    back = fsm.decode_state(ids[:, 1:].reshape(6, 12, 2))
    assert torch.equal(back, walks)
    assert (fsm.valid.sum(1) == 10).all()


def test_exact_resume_mid_training(tmp_path):
    """Interrupted at step 6 and resumed to 12 == straight to 12 (losses, replacement included)."""
    fsm = TokFSM(TokFSMConfig(states=24, edges=4, seq_states=8, train_sequences=256, eval_sequences=32, batch_size=16))
    sets = fsm.datasets()

    def fit(out, stop):
        cfg = CodebookPaperConfig()
        cfg.run.output_dir, cfg.run.max_steps, cfg.run.progress, cfg.run.log_every = str(out), 12, False, 1
        engine = Engine(cfg)
        model = CodebookModel(tiny_gpt(vocab=fsm.vocab_size, seed=cfg.run.seed), sites=("heads",), num_codes=16)
        method = CodebookLM(model, sets["train"], {"input_ids": sets["eval"]["input_ids"]}, 16, seed=0,
                            replace_every=4, eval_batches=1)
        method.setup(engine)
        engine.fit(method, method.batches(engine), max_steps=stop)
        return method

    fit(tmp_path / "split", 6)
    resumed = fit(tmp_path / "split", 12)
    straight = fit(tmp_path / "straight", 12)
    rows = {name: [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r] for name in ("split", "straight")}
    assert len(rows["straight"]) == 12 and rows["split"] == rows["straight"]
    assert resumed.replaced_total == straight.replaced_total > 0


def test_bad_config_exits_2_before_compute(tmp_path):
    proc = run_recipe("codebook", "--codebook.sites", "[heads,mlpp]", "--run.output_dir", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "codebook.sites" in proc.stderr.strip().splitlines()[-1]
    # the same check in this process (no second torch import) for the other two values
    testing.check_bad_value(codebook.PAPER, tmp_path / "o", "--codebook.site_codes.mlpp", "64", key="site_codes")
    testing.check_bad_value(codebook.PAPER, tmp_path / "o", "--analysis.prompt_states", "99", key="prompt_states")
    assert not (tmp_path / "o").exists()


TINY = ["--run.max_steps", "250", "--run.progress", "false", "--data.fsm.states", "24", "--data.fsm.edges", "4",
        "--data.fsm.train_sequences", "4000", "--data.fsm.eval_sequences", "256", "--data.fsm.seq_states", "24",
        "--codebook.num_codes", "64", "--codebook.site_codes.mlp", "128", "--codebook.replace_every", "50",
        "--analysis.steering_prompts", "128", "--seeds", "[]"]


@pytest.mark.slow
def test_recipe_end_to_end_tiny(tmp_path):
    out = tmp_path / "run"
    report = run(codebook.PAPER, ["--run.output_dir", str(out), *TINY])
    saved = json.loads((out / "report.json").read_text())
    assert set(saved) >= {"transition_acc", "state_features", "steering", "dead_code_fraction", "checks"}
    assert set(saved["transition_acc"]) == {"baseline", "codebook"}
    for png in ("code_state_heatmap.png", "steering.png"):
        assert (out / png).stat().st_size > 1000
    loaded = CodebookModel.from_pretrained(out / "model")
    assert set(loaded.codebooks) == {"heads0", "mlp0", "heads1", "mlp1"} and (out / "model" / "README.md").exists()
    sf, st = report["state_features"], report["steering"]
    for kind in ("code", "tuple", "neuron"):
        assert {"precision", "recall", "f1"} <= set(sf[kind]["precision_at_recall_0.5"])
    both, other, none = st["state_positions_only"]["both"], st["other_state_codes"]["both"], st["no_patch"]
    # The paper's effects at this size, each against its control in the same run. Thresholds from
    # the spread (`python benchmarks/effect_spread.py codebook --seeds 0 1 2 --capabilities default
    # avx2`: run seeds 0-2 x ATEN_CPU_CAPABILITY default/avx2 (this AMD EPYC has no AVX-512, so avx2
    # is also its native path), 6 runs, loaded 2-core machine, 2026-12-03):
    #   JS(other state's codes) - JS(target codes)   mean 0.108  sd 0.011  min 0.090  max 0.122
    #   JS(no patch) - JS(target codes)              mean 0.128  sd 0.016  min 0.108  max 0.148
    #   baseline - codebook transition accuracy      mean 0.049  sd 0.031  min 0.020  max 0.094
    # Bounds: the JS margins at 0.03 (>= 5 sd below each mean, 0.06 below each min); the gap at
    # 0.45 (the previous place-marked spread reached 0.26). How they fail on the control: patching the other state's codes instead of
    # the target's (the control itself) or not patching makes `both` equal that control, a margin of 0
    # < 0.03; a model whose codes do not carry the state gives the same. A successor guessed at random
    # is valid 4/24 of the time (gap ~0.8). Codes beating neurons is not asserted: the neuron was as
    # precise or more at matched recall in every run (it does not reproduce; README).
    GAP, JS_MARGIN = 0.45, 0.03
    assert report["transition_acc"]["codebook"] >= report["transition_acc"]["baseline"] - GAP
    assert both["js_divergence"] <= other["js_divergence"] - JS_MARGIN
    assert both["js_divergence"] <= none["js_divergence"] - JS_MARGIN


@pytest.mark.slow
def test_text_option_on_a_saved_hf_model(tmp_path):
    """Any HF causal LM from a local folder (here a tiny Llama saved with save_pretrained) gets the
    codebooks on text; the report gives the LM-loss cost of the bottleneck."""
    tiny_llama(vocab=260).save_pretrained(tmp_path / "llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over {i % 7} lazy dogs.\n" for i in range(300)))
    out = tmp_path / "run"
    report = run(codebook.PAPER, ["--config", "recipes/configs/codebook/text.yaml", "--run.output_dir", str(out),
                                  "--model.name_or_path", str(tmp_path / "llama"), "--data.text.source", str(corpus),
                                  "--run.max_steps", "8", "--run.progress", "false", "--data.text.block_size", "32",
                                  "--codebook.num_codes", "32", "--codebook.k", "2", "--codebook.replace_every", "4"])
    assert report["lm_loss_cost"] == pytest.approx(report["eval_loss"]["codebook"] - report["eval_loss"]["baseline"])
    assert {"with_replacement", "without_replacement"} <= set(report["dead_code_fraction"])
    assert "transition_acc" not in report
    loaded = CodebookModel.from_pretrained(out / "model")
    assert type(loaded.lm).__name__ == "LlamaForCausalLM" and set(loaded.codebooks) == {"heads0", "heads1"}
