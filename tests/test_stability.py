"""Stability method: the paper's formulas, interventions, probes and µParam, in process (fast)."""
import json
import math

import pytest
import torch

from athanor.config import ConfigError, OptimConfig, RunConfig, to_dict
from athanor.engine import lr_multiplier, param_groups
from athanor.engine.schedule import Schedule, build_optimizer
from athanor.methods import stability
from athanor.methods.pretrain import GPTModelConfig
from athanor.models import AthanorGPT, AthanorGPTConfig


def test_lr_sensitivity_is_eq_1_with_diverged_runs_capped_at_initial_loss():
    l0 = 5.0
    losses = [3.0, 2.0, 2.5, float("nan"), 7.0]  # nan and 7.0 (above l0) both count as l0
    expected = ((3.0 - 2.0) + 0.0 + 0.5 + 3.0 + 3.0) / 5
    assert stability.lr_sensitivity(losses, l0) == pytest.approx(expected)
    assert stability.lr_sensitivity([2.0, 2.0], l0) == 0.0
    assert stability.lr_sensitivity([float("inf")] * 3, l0) == 0.0  # everything diverged: flat at l0


def run(variant, width, lr, loss, attn=1.0, log_z=5.0, depth=2, initial=5.5):
    return dict(variant=variant, width=width, depth=depth, lr=lr, final_eval_loss=loss, initial_eval_loss=initial,
                max_attn_logit=attn, max_log_z=log_z, diverged=not math.isfinite(loss) or loss > initial)


def test_sensitivity_tables_and_optimal_lr():
    runs = [run("baseline", 64, 0.01, 3.0), run("baseline", 64, 0.1, 2.5), run("baseline", 64, 1.0, float("nan")),
            run("qk_layernorm", 64, 0.01, 3.0), run("qk_layernorm", 64, 0.1, 2.4), run("qk_layernorm", 64, 1.0, 2.6)]
    sens, best = stability.sensitivity_tables(runs)
    assert sens["baseline"]["64"] == pytest.approx((0.5 + 0 + 3.0) / 3)
    assert sens["qk_layernorm"]["64"] == pytest.approx((0.6 + 0 + 0.2) / 3)
    assert best["baseline"]["64"]["lr"] == 0.1 and best["qk_layernorm"]["64"]["loss"] == 2.4
    # several depths per width: models are keyed width x depth
    sens, _ = stability.sensitivity_tables(runs + [run("baseline", 64, 0.1, 2.0, depth=4)])
    assert set(sens["baseline"]) == {"64xL2", "64xL4"}


def test_power_law_extrapolation_predicts_the_held_out_width_and_the_crossing():
    # max attention logit = 0.5 * width^1.5 at LR 0.1; width 256 is held out
    runs = [run("baseline", w, 0.1, 2.0, attn=0.5 * w**1.5) for w in (32, 64, 128, 256)]
    fit = stability.extrapolate(runs, "baseline", 0.1, "max_attn_logit", threshold=1e4, predict_widths=[1024])
    assert fit["exponent"] == pytest.approx(1.5) and fit["fit_widths"] == [32, 64, 128]
    assert fit["held_out"]["predicted"] == pytest.approx(0.5 * 256**1.5)
    assert fit["predicted_crossing_width"] == pytest.approx((1e4 / 0.5) ** (1 / 1.5))
    assert fit["predicted"]["1024"] == pytest.approx(0.5 * 1024**1.5)
    flat = [run("qk", w, 0.1, 2.0, attn=20.0) for w in (32, 64)]
    assert stability.extrapolate(flat, "qk", 0.1, "max_attn_logit", 1e4)["predicted_crossing_width"] is None


def test_variant_overrides_compose_and_resolve():
    base = {"optim": {"warmup_steps": 20, "lr": 1e-3}, "model": {"qk_layernorm": False, "mup_base_width": 0}}
    out = stability.variant_overrides("qk_layernorm+long_warmup+mup", base, mup_base_width=32)
    assert out == {"model.qk_layernorm": True, "optim.warmup_steps": 80, "model.mup_base_width": 32}
    custom = {"my_eps": {"optim.eps": 1e-12}}
    assert stability.variant_overrides("my_eps", base, 32, custom) == {"optim.eps": 1e-12}
    with pytest.raises(ConfigError, match="unknown variant 'nope'"):
        stability.variant_overrides("baseline+nope", base, 32)
    with pytest.raises(ConfigError, match="optim.nope"):
        stability.point_config(base, {"optim.nope": 1})


def test_grid_points_cover_the_grid_and_name_their_folders():
    base = {"run": to_dict(RunConfig(max_steps=10)), "optim": to_dict(OptimConfig()), "model": to_dict(GPTModelConfig())}
    sweep = stability.SweepConfig(variants=["baseline", "qk_layernorm"], widths=[32, 64], depths=[2], lrs=[0.01, 0.1],
                                  head_dim=16, seeds=[0], width_lrs=[])
    demo = stability.LogZDemoConfig(steps=50, z_loss_weights=[0.0, 1e-4])
    points = stability.grid_points(base, sweep, demo, "/sweep")
    assert len(points) == 2 * 2 * 2 + 2
    assert len({p["name"] for p in points}) == len(points)
    p = next(p for p in points if p["name"] == "qk_layernorm/w64_L2/lr1e-01")
    model = p["config"]["model"]
    assert (model["d_model"], model["n_layers"], model["n_heads"], model["qk_layernorm"]) == (64, 2, 4, True)
    assert base["model"]["qk_layernorm"] is False  # the base is not modified
    assert p["config"]["optim"]["lr"] == 0.1 and p["config"]["run"]["output_dir"] == f"/sweep/{p['name']}"
    demo_point = next(p for p in points if p["name"] == "logz_demo/z0.0001")
    assert demo_point["config"]["optim"]["weight_decay"] == 0.0 and demo_point["config"]["run"]["max_steps"] == 50
    assert demo_point["cost"] > p["cost"]  # long runs start first
    paired = stability.SweepConfig(widths=[32, 64], depths=[2, 4], pair_depths=True, lrs=[0.1], variants=["baseline"])
    models = {(p["width"], p["depth"]) for p in stability.grid_points(base, paired, stability.LogZDemoConfig(enabled=False), "/s")}
    assert models == {(32, 2), (64, 4)}


def test_default_grid_puts_every_intervention_in_the_table_with_two_seeds_and_widths_for_the_fit():
    base = {"run": to_dict(RunConfig(max_steps=10)), "optim": to_dict(OptimConfig()), "model": to_dict(GPTModelConfig())}
    sweep = stability.SweepConfig()
    points = stability.grid_points(base, sweep, stability.LogZDemoConfig(enabled=False), "/sweep")
    table = {(p["variant"], p["lr"], p["seed"]) for p in points if p["width"] == sweep.table_width}
    assert table == {(v, lr, s) for v in sweep.variants for lr in sweep.lrs for s in sweep.seeds}
    assert {"z_loss", "coupled_wd", "no_warmup", "long_warmup", "mup", "eps_1e-15"} <= set(sweep.variants)
    assert len(sweep.seeds) >= 2
    off_table = {(p["variant"], p["width"], p["lr"]) for p in points if p["width"] != sweep.table_width}
    assert {v for v, _, _ in off_table} == set(sweep.width_variants)
    assert {lr for _, _, lr in off_table} == set(sweep.width_lrs)
    assert len({w for _, w, _ in off_table} | {sweep.table_width}) >= 4  # >= 3 fit widths + the held-out one
    coupled = next(p for p in points if p["variant"] == "coupled_wd")["config"]["optim"]
    assert coupled["independent_weight_decay"] is False and coupled["weight_decay"] * 1e-3 == pytest.approx(1e-4)
    assert points[0]["config"]["run"]["seed"] == points[0]["seed"]


def test_seed_sensitivity_and_the_spread_verdict():
    from athanor.methods.stability.report import spread_verdict

    runs = [dict(run(v, 64, lr, loss), seed=s) for v, s, losses in
            (("baseline", 0, (3.0, 2.0, 5.5)), ("baseline", 1, (3.2, 2.1, 5.5)),
             ("qk_layernorm", 0, (2.6, 2.0, 2.4)), ("qk_layernorm", 1, (2.7, 2.1, 2.5)))
            for lr, loss in zip((0.01, 0.1, 1.0), losses)]
    sens = stability.seed_sensitivity(runs + [dict(run("baseline", 128, 0.1, 2.0), seed=0)])
    assert set(sens["baseline"]) == {"64"}  # width 128 ran one LR only: no LR sensitivity for it
    b, q = sens["baseline"]["64"], sens["qk_layernorm"]["64"]
    assert b["per_seed"] == pytest.approx([(1.0 + 0 + 3.5) / 3, (1.1 + 0 + 3.4) / 3]) and b["seeds"] == [0, 1]
    assert b["mean"] == pytest.approx(sum(b["per_seed"]) / 2)
    assert spread_verdict(b, q).startswith("lower, beyond")
    assert spread_verdict(b, {**b, "mean": b["mean"] - 1e-3}).startswith("lower on the seed mean only")
    assert spread_verdict(q, b).startswith("higher")


def test_independent_decay_is_judged_against_coupled_decay():
    """The base config decays independently, so its row (the baseline's runs) is compared with the
    LR-coupled arm — the paper's question — and every other variant with the baseline."""
    from athanor.methods.stability.report import sensitivity_verdicts

    def row(per_seed):
        return {"64": {"per_seed": per_seed, "mean": sum(per_seed) / len(per_seed), "min": min(per_seed),
                       "max": max(per_seed)}}
    base = row([0.3, 0.32])
    sens = {"baseline": base, "coupled_wd": row([0.5, 0.55]), "z_loss": row([0.33, 0.31]),
            "independent_wd": {"64": {**base["64"], "same_runs_as": "baseline"}}}
    verdicts = sensitivity_verdicts(sens)
    assert verdicts["independent_wd"]["64"] == "vs coupled_wd: lower, beyond the seed spread"
    assert verdicts["coupled_wd"]["64"] == "vs baseline: higher, beyond the seed spread"
    assert verdicts["z_loss"]["64"].startswith("vs baseline: not lower") and "baseline" not in verdicts


def test_width_fit_over_seeds_has_an_error_estimate():
    rng = torch.Generator().manual_seed(0)
    runs = [dict(run("baseline", w, 0.01, 2.0, attn=2.0 * w**0.8 * float(1 + 0.05 * torch.randn(1, generator=rng))),
                 seed=s) for w in (32, 64, 96, 128) for s in (0, 1)]
    fit = stability.extrapolate(runs, "baseline", 0.01, "max_attn_logit", threshold=1e3)
    assert fit["fit_widths"] == [32, 64, 96] and fit["fit_points"] == 6
    assert fit["exponent"] == pytest.approx(0.8, abs=0.2) and 0 < fit["exponent_se"] < 0.2
    ci = fit["crossing_interval_90"]
    assert ci["p05"] < fit["predicted_crossing_width"] < ci["p95"]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_independent_weight_decay_is_lambda_times_schedule_not_times_lr(optimizer):
    """θ ← θ − λ·s_t·θ after each step, s_t the multiplier of that step's LR; the optimizer's own decay off."""
    cfg = OptimConfig(name=optimizer, lr=0.5, weight_decay=0.1, independent_weight_decay=True, warmup_steps=3,
                      schedule="cosine")
    model = torch.nn.Linear(4, 4, bias=False)
    norm = torch.nn.LayerNorm(4)
    both = torch.nn.ModuleDict({"w": model, "n": norm})
    opt = build_optimizer(param_groups(both, cfg), cfg)
    sched = Schedule(opt, cfg, max_steps=10)
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)  # no lr-coupled decay
    w, gain = model.weight.detach().clone(), norm.weight.detach().clone()
    for t in range(6):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * lr_multiplier(t, cfg, 10))
        opt.zero_grad()
        for p in both.parameters():
            p.grad = torch.zeros_like(p)  # the update is exactly 0: only the decay moves θ
        opt.step()
        sched.step()
        sched.apply_independent_decay()
        w = w * (1 - 0.1 * lr_multiplier(t, cfg, 10))
        assert torch.allclose(model.weight, w, atol=1e-7)
    assert torch.equal(norm.weight, gain)  # gains and biases are not decayed


def tiny_gpt(**kw):
    cfg = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=2, max_seq_len=16)
    return AthanorGPT(AthanorGPTConfig(**{**cfg, **kw}))


def test_probes_entropy_max_logit_and_activation_rms():
    torch.manual_seed(0)
    model = tiny_gpt()
    x = torch.randint(0, 40, (6, 16))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * 32].zero_()  # q = k = 0: uniform causal attention, logits 0
    model.set_probes(True, sample_rows=4)
    model(x, labels=x)
    uniform = sum(math.log(t) for t in range(1, 17)) / 16  # entropy of row t is log(t)
    assert model.attention_entropies() == pytest.approx([uniform, uniform], rel=1e-5)
    assert model.max_attention_logits() == [0.0, 0.0]
    rms = model.activation_rms()
    assert len(rms) == 2 and all(v > 0 for v in rms)
    model.set_probes(False)
    assert model.blocks[0].attn.probe is False


def test_mup_init_lr_scales_and_readout():
    base, wide = tiny_gpt(mup_base_width=32), tiny_gpt(d_model=128, n_heads=4, mup_base_width=32)
    assert tiny_gpt().mup_lr_scales() == {} and tiny_gpt().output_mult == 1.0
    scales = wide.mup_lr_scales()
    hidden = {n for n, p in wide.named_parameters() if any(k in n for k in ("qkv", "proj", "mlp")) and p.ndim == 2}
    assert set(scales) == hidden and set(scales.values()) == {32 / 128}
    assert wide.output_mult == 32 / 128 and base.output_mult == 1.0
    assert wide.blocks[0].attn.qkv.weight.std().item() == pytest.approx(128**-0.5, rel=0.05)
    assert wide.blocks[0].mlp[2].weight.std().item() == pytest.approx(512**-0.5, rel=0.05)
    assert wide.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)  # embeddings keep the standard init
    groups = param_groups(wide, OptimConfig(lr=0.1), scales)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(wide.blocks[1].mlp[0].weight)] == pytest.approx(0.1 * 32 / 128)
    assert lr_of[id(wide.wte.weight)] == pytest.approx(0.1)


def test_sweep_config_rejects_bad_variants_and_widths():
    with pytest.raises(ConfigError, match="nope"):
        stability.SweepConfig(variants=["qk_layernorm+nope"]).validate()
    with pytest.raises(ConfigError, match="head_dim"):
        stability.SweepConfig(widths=[48], head_dim=32).validate()
    stability.SweepConfig(variants=["mine"], custom_variants={"mine": {"optim.eps": 1e-12}}).validate()
    with pytest.raises(ConfigError, match="table_width"):
        stability.SweepConfig(widths=[32, 128]).validate()


def test_post_ln_normalises_the_residual_stream():
    model = tiny_gpt(pre_ln=False)
    x = torch.randint(0, 40, (3, 16))
    model.set_probes(True)
    model(x, labels=x)
    assert model.activation_rms() == pytest.approx([1.0, 1.0], abs=1e-3)  # LN(x + f(x)) after every block
    assert tiny_gpt().config.pre_ln is True


def test_every_variant_builds_a_valid_pretrain_run():
    from athanor.config import load_config
    from athanor.methods.pretrain import PretrainConfig, build_model

    base = to_dict(PretrainConfig())
    for name in stability.VARIANTS:
        overrides = stability.variant_overrides(name, base, mup_base_width=16)
        overrides.update({"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2})
        cfg = load_config(PretrainConfig, [arg for k, v in overrides.items() for arg in (f"--{k}", str(v))])
        for key, value in overrides.items():
            assert stability.get_dotted(to_dict(cfg), key) == value, (name, key)
        model = build_model(cfg.model, vocab_size=40, seq_len=16)
        x = torch.randint(0, 40, (2, 16))
        assert torch.isfinite(model(x, labels=x).loss), name


@pytest.mark.parametrize("tail, drifts", [(lambda i: 5.0, False), (lambda i: 5.0 + 0.02 * i, True)])
def test_log_z_drift_is_measured_on_window_means_not_the_last_point(tmp_path, tail, drifts):
    """Flat log Z with one spike at the last logged step is no drift; a steady climb is."""
    from athanor.methods.stability import series
    from athanor.methods.stability.report import DRIFT, logz_summary, logz_verdict

    values = [5.0] * 100 + [tail(i) for i in range(100)]
    values[-1] += 4.0  # one spike, as logged probes show
    rows = [{"step": 10 * (i + 1), "log_z_mean": v} for i, v in enumerate(values)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = logz_summary(*series(tmp_path, "log_z_mean"), {"name": "z0", "final_eval_loss": 2.5, "z_loss_weight": 0.0})
    assert (abs(summary["late_drift"]) > DRIFT) == drifts, summary
    assert summary["log_z_final"] == values[-1] and summary["log_z_end_mean"] < values[-1]
    (verdict,) = logz_verdict([summary])
    assert ("a drift (threshold ±1) away from 0" in verdict) == drifts and ("did NOT drift" in verdict) != drifts
    stopped = {**summary, "z_loss_weight": 1e-4, "late_drift": 0.1, "log_z_end_mean": 4.5}
    assert ("z-loss stopped the drift" in logz_verdict([summary, stopped])[1]) == drifts
