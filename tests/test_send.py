"""SeND unit tests: exact EigenScore, EES convergence, the sensitivity formula and its top-K%, hook
dropout, the fact stream, the stopping rule and config errors (fast)."""
import math

import pytest
import torch

from athanor.methods.send.eigenscore import (cholesky_logdet, dense_covariance, ees_eigenscore, ees_logdet,
                                             eigenscore, eigvalsh_logdet, gram_logdet, random_eigenscore_check)
from athanor.methods.send.facts import FactsConfig, FactStream, load_facts
from athanor.methods.send.neurons import decoder_layers, dropped_neurons, sensitivity, top_sensitive


def wigner(n: int, seed: int = 0) -> torch.Tensor:
    """3I + W/(2√n): spectrum ≈ [2, 4] (well conditioned)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=g, dtype=torch.float64)
    return 3 * torch.eye(n, dtype=torch.float64) + (w + w.T) / math.sqrt(2) / (2 * math.sqrt(n))


@pytest.mark.parametrize("k,d", [(10, 64), (10, 300), (5, 5), (12, 8)])
def test_gram_identity_is_exact(k, d):
    z = torch.randn(k, d, generator=torch.Generator().manual_seed(k * d), dtype=torch.float64)
    a = dense_covariance(z, 1e-3)
    dense = cholesky_logdet(a)
    assert abs(gram_logdet(z, 1e-3) - dense) / abs(dense) < 1e-10
    assert abs(eigvalsh_logdet(a) - dense) / abs(dense) < 1e-10
    assert eigenscore(z, 1e-3, centring="samples") == pytest.approx(dense / d, rel=1e-10)


def test_feature_centring_is_inside_and_the_reference():
    """INSIDE's getEigenIndicator_v0: torch.cov of the K×d embeddings (K×K), mean log of the
    eigenvalues of Σ + αI; the SeND reference: Zᵀ J_d Z with J_d = I − 11ᵀ/d (Z stored d×K)."""
    k, d, alpha = 6, 40, 1e-3
    z = torch.randn(k, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    j = torch.eye(d, dtype=torch.float64) - torch.ones(d, d, dtype=torch.float64) / d
    sigma = z @ j @ z.T / (d - 1)
    expected = float(torch.log(torch.linalg.eigvalsh(sigma + alpha * torch.eye(k, dtype=torch.float64))).mean())
    assert eigenscore(z, alpha) == pytest.approx(expected, rel=1e-10)
    assert eigenscore(z, alpha) != pytest.approx(eigenscore(z, alpha, centring="samples"), rel=1e-3)
    # one answer repeated K times: centring over features keeps a rank-1 Σ = var(z)·11ᵀ (eigenvalue K·var),
    # where centring over samples leaves nothing but α
    same = z[:1].repeat(k, 1)
    var = float(z[0].var())
    assert eigenscore(same, alpha) == pytest.approx((math.log(k * var + alpha) + (k - 1) * math.log(alpha)) / k, rel=1e-6)
    assert eigenscore(same, alpha, centring="samples") == pytest.approx(math.log(alpha), rel=1e-6)


def test_random_check_meets_the_bar():
    assert random_eigenscore_check(trials=2, dims=(32, 256))["max_rel_error"] <= 1e-6


def test_ees_converges_to_exact_as_degree_grows():
    """Truncation error alone (exact trace): falls with M; with a λ_min bound, geometrically."""
    a = wigner(120)
    exact = cholesky_logdet(a)
    def err(m, lam):
        return abs(ees_logdet(lambda v: a @ v, 120, m, 0, lambda_min=lam, dtype=torch.float64,
                              exact_trace=True) - exact) / abs(exact)
    bounded = [err(m, 1.0) for m in (2, 4, 8, 16)]
    assert all(b < a_ for a_, b in zip(bounded, bounded[1:]))
    assert bounded[-1] < 1e-9
    unbounded = [err(m, None) for m in (4, 16, 64)]
    assert unbounded[0] > unbounded[1] > unbounded[2] and unbounded[-1] < 1e-3


def test_ees_with_probes_is_close_on_a_well_conditioned_matrix():
    a = wigner(200, seed=1)
    exact = cholesky_logdet(a)
    est = ees_logdet(lambda v: a.float() @ v, 200, 30, 200, lambda_min=1.0)  # float32, Hutchinson
    assert abs(est - exact) / abs(exact) < 5e-3


def test_ees_eigenscore_matches_exact_when_alpha_keeps_it_conditioned():
    z = 0.1 * torch.randn(10, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for centring in ("samples", "features"):
        exact = eigenscore(z, alpha=0.1, centring=centring)
        est = ees_eigenscore(z, alpha=0.1, degree=50, probes=200, dtype=torch.float64, centring=centring)
        assert est == pytest.approx(exact, rel=5e-3)


def test_sensitivity_is_net_change_times_variance_per_input():
    e = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(0))
    expected = torch.zeros(16, dtype=torch.float64)
    for x in range(5):
        for i in range(16):
            series = [float(e[t, x, i]) for t in range(4)]
            change = sum(abs(b - a) for a, b in zip(series, series[1:]))
            mean = sum(series) / 4
            var = sum((s - mean) ** 2 for s in series) / 4
            expected[i] += change * var / 5
    scores = sensitivity(e)
    assert torch.allclose(scores, expected, rtol=1e-6)
    dropped = top_sensitive(scores, 0.25)
    assert dropped.tolist() == sorted(sorted(range(16), key=lambda i: -expected[i])[:4])


def test_top_sensitive_breaks_ties_to_the_lower_index():
    assert top_sensitive(torch.tensor([1.0, 3.0, 3.0, 3.0, 0.0]), 0.4).tolist() == [1, 2]
    assert top_sensitive(torch.ones(10), 0.3).tolist() == [0, 1, 2]


def tiny_lm(layers: int = 3):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50, hidden_size=32, num_hidden_layers=layers,
                                            num_attention_heads=4, intermediate_size=64,
                                            max_position_embeddings=64)).eval()


def test_hook_zeroes_exactly_the_chosen_dims_and_is_removed():
    model = tiny_lm()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    plain = model(input_ids=ids).logits
    dims = torch.tensor([1, 5, 30])
    with dropped_neurons(model, -2, dims):
        dropped = model(input_ids=ids).logits
    captured = []  # what the last layer receives: the dropped layer's output
    handle = decoder_layers(model)[-1].register_forward_pre_hook(
        lambda m, args, kwargs: captured.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    with dropped_neurons(model, -2, dims):
        model(input_ids=ids)
    handle.remove()
    assert torch.count_nonzero(captured[0][..., dims]) == 0
    assert torch.count_nonzero(captured[0][..., [0, 2, 3]]) > 0
    assert not torch.allclose(plain, dropped)
    assert torch.equal(model(input_ids=ids).logits, plain)  # hook gone


def test_world_split_and_stream_open_chunks_in_order_and_resume():
    cfg = FactsConfig(old_people=6, new_people=6, additions=3, replay_fraction=0.5, attributes=2, templates=4,
                      tracking_templates=1, test_templates=1, batch_size=4)
    _, split = load_facts(cfg)
    assert len(split.old) == 6 * 2 * 2 and len(split.tracking) == len(split.test) == 12 * 2 and len(split.replay) == 12
    assert [len(c) for c in split.chunks] == [8, 8, 8]
    trained = set(split.old + split.new)
    assert set(split.replay) <= set(split.old) and not (set(split.tracking) | set(split.test)) & trained
    assert not set(split.tracking) & set(split.test)
    # every fact has exactly one tracking and one test phrasing, distinct wordings of the same answer
    by_fact = {}
    for i in split.tracking + split.test + sorted(trained):
        by_fact.setdefault(split.records[i].fact, []).append(split.records[i])
    assert len(by_fact) == 24 and all(len(v) == 4 and len({r.question for r in v}) == 4 and len({r.answer for r in v}) == 1
                                      for v in by_fact.values())


def test_default_split_is_from_scratch_with_held_out_test_phrasings():
    _, split = load_facts(FactsConfig())
    assert not split.old and len(split.chunks) == 1
    questions = {split.records[i].question for i in split.new}
    assert not questions & {split.records[i].question for i in split.test}


def test_stream():
    data = {"x": torch.arange(100)}
    stream = FactStream(data, list(range(10)), [list(range(10, 20)), list(range(20, 30))], phase_len=3,
                        batch_size=4, seed=0)
    batches = [next(stream)["x"] for _ in range(6)]
    assert all(b.max() < 20 for b in batches[:3]) and all(b.max() < 30 for b in batches[3:])
    again = FactStream(data, list(range(10)), [list(range(10, 20)), list(range(20, 30))], 3, 4, 0)
    next(again)
    state = again.state_dict()
    resumed = FactStream(data, list(range(10)), [list(range(10, 20)), list(range(20, 30))], 3, 4, 0)
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed)["x"], b) for b in batches[1:])


def test_bad_config_exits_2_with_one_line(tmp_path, capsys):
    from athanor.methods import send
    from athanor.runner import run

    with pytest.raises(SystemExit) as e:
        run(send.PAPER, ["--run.output_dir", str(tmp_path), "--send.fraction", "1.5"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "send.fraction" in err[0]
    with pytest.raises(SystemExit) as e:
        run(send.PAPER, ["--run.output_dir", str(tmp_path), "--send.layer", "9"])
    assert e.value.code == 2
