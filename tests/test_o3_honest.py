"""O3 measured on what it was not built from: paraphrases that are no trained template, the
check on questions no detector stored, the InfoNCE loss that rewards the matching view, and the
low-rank (Woodbury) Mahalanobis statistics that keep a detector's memory off d x d."""
import pytest
import torch

from athanor.methods.o3.detector import entropy_contrastive, info_nce
from athanor.methods.o3.layer_stats import LayerStats, _precision
from athanor.methods.o3.evaluation import EvalSets
from athanor.methods.o3.report import checks
from athanor.parts.fact_world import (ATTRIBUTES, PATTERNS, DataConfig, generate_world, partial_groups, request_facts,
                                      request_groups)


def _pattern(r):
    return r.question.replace(r.group, "X")


@pytest.mark.parametrize("train_retained", [False, True])
def test_paraphrases_are_no_trained_template_and_never_stored(train_retained):
    cfg = DataConfig(people=20, requests=2, groups_per_request=4, countries=4, paraphrase_train_retained=train_retained)
    data = generate_world(cfg)
    requests = request_groups(data, cfg)
    sets = EvalSets.build(data, request_facts(data, cfg), partial_groups(data, cfg))
    facts = data.select()
    trained_patterns = {_pattern(r) for r in facts if not r.heldout and not r.paraphrase}
    paraphrases = [data.records[i] for s in sets.forget_paraphrase for i in s]
    assert len(paraphrases) == 2 * 4 * 4 * 3  # requests x people x attributes x paraphrases
    assert all(r.paraphrase and r.heldout for r in paraphrases)  # never trained, never stored by a detector
    assert not {_pattern(r) for r in paraphrases} & trained_patterns  # no trained template, for any attribute
    generic = {p.replace("{name}", "X") for p in PATTERNS}
    assert not {_pattern(r).replace(ATTRIBUTES[r.attribute][0], "{noun}") for r in paraphrases} & generic
    words = {w for r in facts if not r.heldout and not r.paraphrase for w in r.question.split()}
    assert {w for r in paraphrases for w in r.question.split()} <= words  # new word orders of known words
    stored = {i for s in sets.forget_train for i in s}  # what detectors store and adapters train on
    assert not stored & {i for s in sets.forget_paraphrase for i in s}
    retained_trained = [r for r in facts if r.paraphrase and not r.heldout]
    assert bool(retained_trained) == train_retained  # only retained people's paraphrases may be trained
    requested = {g for r in requests for g in r}
    assert not any(r.group in requested for r in retained_trained)


def test_info_nce_prefers_the_matching_view_where_entropy_does_not():
    torch.manual_seed(0)
    clean = [torch.randn(8, 16)]
    matching = [clean[0] + 0.05 * torch.randn(8, 16)]
    shuffled = [matching[0][torch.roll(torch.arange(8), 1)]]  # each masked view nearest to another's clean view
    assert info_nce(matching, clean, 0.05) < 0.1 < 2.0 < info_nce(shuffled, clean, 0.05)
    assert torch.isclose(entropy_contrastive(matching, clean), entropy_contrastive(shuffled, clean))


def test_checks_use_questions_no_detector_stored():
    base = {"forget_acc_train": [1.0], "forget_acc_heldout_templates": [1.0], "retain_acc": 1.0}
    request = {"request": 1, "forget_acc_train": 0.0, "forget_acc_heldout_templates": 0.0, "retain_acc": 1.0,
               "earlier_requests_forget_acc": None, "auroc": 1.0, "auroc_heldout_templates": 0.9,
               "paraphrase": {"base_accuracy": 0.8, "forget_accuracy": 0.1}}
    out = checks(base, [request], {})
    assert "auroc_ge_0_95" not in out  # the pooled figure (stored questions score 1) is not checked
    assert not out["auroc_heldout_templates_ge_0_95"]["met"]
    assert out["paraphrase_base_ge_0_5"]["met"] and not out["paraphrase_forget_le_10pct_of_base"]["met"]
    request["paraphrase"]["forget_accuracy"] = 0.08
    assert checks(base, [request], {})["paraphrase_forget_le_10pct_of_base"]["met"]


def test_low_rank_mahalanobis_equals_the_dense_ledoit_wolf_precision():
    torch.manual_seed(0)
    mix = torch.randn(48, 48) * 0.2
    feats = torch.randn(3, 20, 48) @ mix + 1.0  # n = 20 < d = 48, as forget sets are
    queries = torch.randn(3, 7, 48) @ mix + 1.0
    stats = LayerStats.fit(feats, "ledoit_wolf")
    assert stats.precision is None  # nothing d x d is kept...
    assert all(v.shape[-2:] != (48, 48) for v in stats.tensors().values())
    dense = torch.stack([_precision(f, "ledoit_wolf") for f in feats]).double()
    for x in (queries, feats):
        centred = (x - stats.mean[:, None]).double()
        reference = torch.einsum("lnd,lde,lne->ln", centred, dense, centred)
        torch.testing.assert_close(stats.mahalanobis(x).double(), reference, rtol=1e-3, atol=1e-3)  # ...same values
    reloaded = LayerStats.from_tensors(stats.tensors())
    torch.testing.assert_close(reloaded.mahalanobis(queries), stats.mahalanobis(queries))


def test_tuning_scores_a_grid_point_by_its_worst_margin_to_the_checks():
    from types import SimpleNamespace

    from athanor.methods.o3.tune import margins

    sets = SimpleNamespace(forget_heldout=[[0, 1]], forget_paraphrase=[[2, 3]], retain=[4, 5], retain_paraphrase=[],
                           utility=[6])
    base = {"retain": 1.0, "utility": 1.0, "paraphrase": 0.8}
    good = {"forget_train": 0.0, "forget_heldout": 0.0, "forget_paraphrase": 0.0, "retain": 0.99, "utility": 1.0}
    w = torch.tensor([1.0, 1.0, 0.9, 1.0, 0.0, 0.1, 0.0])
    margin, separation = margins(good, base, w, sets)
    assert abs(margin - 0.04) < 1e-9 and separation > 0.7  # retain 0.99 vs the 0.95 bar is the tightest
    leaky = {**good, "forget_paraphrase": 0.1}  # 0.1 > 10% of the base's 0.8: below the bar
    assert margins(leaky, base, w, sets)[0] < 0
