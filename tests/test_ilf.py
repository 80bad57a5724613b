"""ILF: the feedback module on a frozen DiT (identity at s = 0, shapes, gradients, counted cost), block
caching, cached trajectories, distillation (frozen backbone, exact resume, the jump gets better), the
pipeline in a fresh process, config errors, and the recipe end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch

from athanor.config import OptimConfig, RunConfig, TrainConfig
from athanor.data.batches import ShuffledBatches
from athanor.engine import Engine, read_metrics
from athanor.parts.diffusion import EDM, EDMClassPipeline, TeacherConfig, build_denoiser, euler_sample, save_pipeline
from athanor.methods.ilf import PAPER
from athanor.methods.ilf.feedback import FeedbackModule, attach_feedback, block_caching, count_block_calls
from athanor.methods.ilf.diffusers_pipeline import ILFPipeline, euler_on_grid, fix_component_library, ilf_sigmas
from athanor.methods.ilf.method import FeedbackDistillation, ILFConfig, jump_pairs, teacher_trajectories
from athanor.runner import run
from conftest import ROOT

LAYERS = 6
TEACHER = TeacherConfig(width=16, layers=LAYERS, heads=2, patch_size=4)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return build_denoiser(TEACHER, (1, 8, 8), 10).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, backbone):
    folder = tmp_path_factory.mktemp("teacher") / "pipeline"
    save_pipeline(EDMClassPipeline(denoiser=backbone, scheduler=EDM().scheduler()), folder)
    return str(folder)


def inputs(n=5, sigma=2.0):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=gen) * sigma, torch.full((n,), sigma), torch.arange(n) % 10


# ------------------------------------------------------------------------------------ the module
@pytest.mark.parametrize("mode", ["loop", "once"])
@pytest.mark.parametrize("loop", [(0, 0), (2, 4), (5, 5), (0, 5)])
def test_zero_scale_is_the_backbone_exactly(backbone, mode, loop):
    edm, (x, sigma, y) = EDM(), inputs()
    plain = edm.denoise(backbone, x, sigma, y)
    torch.manual_seed(3)
    feedback = FeedbackModule.for_backbone(backbone, *loop, mode=mode)
    with torch.no_grad():  # a trained-looking block: only s = 0 may make it vanish
        for p in feedback.block.parameters():
            p.normal_(0, 0.5)
    hooks = attach_feedback(backbone, feedback)
    try:
        looped = edm.denoise(backbone, x, sigma, y)
        assert (looped - plain).abs().max().item() <= 1e-6
        feedback.scale.data.fill_(0.3)
        assert (edm.denoise(backbone, x, sigma, y) - plain).abs().max().item() > 1e-3  # the hooks do act
    finally:
        hooks.remove()
    assert torch.equal(edm.denoise(backbone, x, sigma, y), plain)  # removed hooks leave the backbone as it was


def test_feedback_shapes_and_gradients(backbone):
    torch.manual_seed(0)
    feedback = FeedbackModule.for_backbone(backbone, 2, 3)
    hidden = torch.randn(4, 4, 16)
    emb = {"timestep": torch.rand(4), "class_labels": torch.arange(4)}
    assert feedback(hidden, **emb).shape == hidden.shape
    assert feedback.block.norm1.__class__.__name__ == "AdaLayerNormZero"  # the backbone's own block kind
    # DiT's built-in label dropout would give the feedback block other labels than the backbone in training
    assert [m.dropout_prob for m in feedback.modules() if type(m).__name__ == "LabelEmbedding"] == [0.0]
    edm, (x, sigma, y) = EDM(), inputs()
    hooks = attach_feedback(backbone, feedback)
    try:
        # s = 0: only s gets a gradient (the block's output is multiplied by it); then everything does.
        edm.denoise(backbone, x, sigma, y).square().mean().backward()
        assert feedback.scale.grad.abs() > 0
        assert all(p.grad is None or p.grad.abs().max() == 0 for p in feedback.block.parameters())
        feedback.zero_grad()
        feedback.scale.data.fill_(0.1)
        edm.denoise(backbone, x, sigma, y).square().mean().backward()
        grads = [p.grad for p in feedback.block.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
        assert all(p.grad is None for p in backbone.parameters())
    finally:
        hooks.remove()


def test_counted_block_evaluations(backbone):
    edm, (x, sigma, y) = EDM(), inputs()
    for loop, mode, extra in [((2, 4), "loop", 3 + 1), ((5, 5), "loop", 1 + 1), ((2, 4), "once", 1)]:
        feedback = FeedbackModule.for_backbone(backbone, *loop, mode=mode)
        assert feedback.extra_blocks() == extra
        hooks = attach_feedback(backbone, feedback)
        with count_block_calls(backbone, feedback) as counter:
            edm.denoise(backbone, x, sigma, y)
        hooks.remove()
        assert counter["blocks"] == LAYERS + extra


def test_block_caching_costs_and_limits(backbone):
    edm, (x, _, y) = EDM(), inputs()
    noise = x / 2
    plain = euler_sample(edm, backbone, noise, y, 6)
    for every, expected in [(1, 6 * LAYERS), (2, 6 * LAYERS - 3 * 3), (3, 6 * LAYERS - 4 * 3)]:
        with count_block_calls(backbone) as counter, block_caching(backbone, range(1, 4)) as state:
            cached = euler_on_grid(edm, backbone, noise, y, edm.karras_sigmas(6),
                                   on_step=lambda i: state.update(refresh=i % every == 0))
        assert counter["blocks"] == expected
        if every == 1:
            torch.testing.assert_close(cached, plain, rtol=0, atol=1e-5)  # always refreshed: plain sampling
        else:
            assert (cached - plain).abs().max() > 0
    assert all(type(b).__name__ == "BasicTransformerBlock" for b in backbone.transformer_blocks)  # restored


def test_trajectories_are_the_teachers_euler_run(backbone):
    edm = EDM()
    t = teacher_trajectories(edm, backbone, 3, 2, 7, 10, seed=5, batch=4)
    assert t["states"].shape == (4, 7, 1, 8, 8)
    torch.testing.assert_close(t["sigmas"], ilf_sigmas(edm, 3, 2))
    gen = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 10, (7,), generator=gen)
    noise = torch.cat([torch.randn(4, 1, 8, 8, generator=gen), torch.randn(3, 1, 8, 8, generator=gen)])
    torch.testing.assert_close(t["states"][-1], euler_sample(edm, backbone, noise, labels, 6), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ distillation
@pytest.fixture(scope="module")
def trajectory_file(tmp_path_factory, backbone):
    from safetensors.torch import save_file

    edm, tensors = EDM(), {}
    for n in (2, 3):
        for split, count, seed in (("train", 32, 1), ("dev", 16, 2)):
            t = teacher_trajectories(edm, backbone, n, 2, count, 10, seed=seed * 10 + n)
            tensors.update({f"{split}/{n}/{k}": v.contiguous() for k, v in t.items()})
    path = tmp_path_factory.mktemp("traj") / "trajectories.safetensors"
    save_file(tensors, path)
    return str(path)


def distil(output_dir, teacher_dir, trajectory_file, steps, max_steps=None, lr=3e-3):
    cfg = ILFConfig(loop=[3, 3], train_steps=[2, 3], trajectories=32, batch_size=16, steps=steps,
                    optim=OptimConfig(lr=lr, betas=(0.9, 0.99), schedule="constant"))
    train = TrainConfig(run=RunConfig(output_dir=str(output_dir), max_steps=max_steps or steps, eval_every=0,
                                      log_every=1, progress=False))
    engine = Engine(train)
    method = FeedbackDistillation(cfg, teacher_dir, jump_pairs(trajectory_file, "dev", cfg.train_steps))
    method.setup(engine)
    batches = ShuffledBatches(jump_pairs(trajectory_file, "train", cfg.train_steps), 16, 0)
    final = engine.fit(method, batches)
    return engine, method, final


def test_training_moves_only_the_feedback_and_improves_the_jump(tmp_path, teacher_dir, trajectory_file, backbone):
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    engine, method, final = distil(tmp_path, teacher_dir, trajectory_file, steps=60)
    after = engine.frozen["backbone"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for p in engine.frozen["backbone"].parameters())
    assert engine.unwrap("feedback").scale.item() != 0
    initial = engine.history["initial_eval"]
    assert initial["loss"] == pytest.approx(initial["backbone_loss"], rel=1e-6)  # s = 0 at the start
    assert final["loss"] < 0.99 * final["backbone_loss"]  # one ILF step is closer to the teacher's 2-step jump


def test_exact_resume(tmp_path, teacher_dir, trajectory_file):
    distil(tmp_path / "straight", teacher_dir, trajectory_file, steps=6)
    distil(tmp_path / "resumed", teacher_dir, trajectory_file, steps=6, max_steps=3)
    distil(tmp_path / "resumed", teacher_dir, trajectory_file, steps=6)
    losses = [[r["loss"] for r in read_metrics(tmp_path / d) if "loss" in r] for d in ("straight", "resumed")]
    assert len(losses[0]) == 6 and losses[0] == losses[1]


# ------------------------------------------------------------------------------------ pipeline
def test_pipeline_reloads_in_a_fresh_process(tmp_path, backbone):
    torch.manual_seed(0)
    feedback = FeedbackModule.for_backbone(backbone, 1, 2)
    with torch.no_grad():
        feedback.scale.fill_(0.2)
    pipe = ILFPipeline(denoiser=backbone, feedback=feedback, scheduler=EDM().scheduler(), jump=2)
    folder = tmp_path / "pipe"
    save_pipeline(pipe, folder)
    fix_component_library(folder, "feedback", FeedbackModule)
    here = pipe([1, 2, 3], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent")
    pipe.hooks.remove()
    code = ("import sys, torch; from diffusers import DiffusionPipeline; "
            "p = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True); "
            "x = p([1, 2, 3], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type='latent')"
            ".images; print(type(p).__name__, type(p.feedback).__name__, x.flatten().tolist())")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    names, values = out.stdout.strip().split("[", 1)
    assert names.split() == ["ILFPipeline", "FeedbackModule"]
    there = torch.tensor(json.loads("[" + values))
    assert torch.equal(there, here.images.flatten())


# ------------------------------------------------------------------------------------ config and recipe
@pytest.mark.parametrize("args, message", [
    (["--ilf.loop", "[3,12]"], "outside the teacher's"),
    (["--ilf.mode", "twice"], "ilf.mode"),
    (["--evaluation.variants", "[loop=a]"], "loop=FIRST-LAST"),
    (["--evaluation.variants", "[twice]"], "once+seed=1"),
    (["--ilf.init_block", "9"], "ilf.init_block=9 is outside"),
    (["--ilf.backbone", "not a folder"], "neither a folder nor a Hub id"),
    (["--evaluation.solver_orders", "[4]"], "DPM-Solver++ orders"),
    (["--teacher.arch", "unet"], "teacher.arch=dit"),
])
def test_bad_config_exits_2_with_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        run(PAPER, ["--run.output_dir", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # nothing computed


@pytest.mark.parametrize("config", sorted((ROOT / "recipes" / "configs" / "ilf").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(config):
    from athanor.config import load_config
    from athanor.data.images import FASHION_MNIST_DIR

    if "fashion" in config.name and not FASHION_MNIST_DIR.is_dir():
        pytest.skip("needs apt-get install dataset-fashion-mnist")
    cfg = load_config(PAPER.config, ["--config", str(config)])
    PAPER.check(cfg)
    assert [s.name for s in PAPER.stages(cfg)][:4] == ["teacher", "classifier", "trajectories", "ilf"]


def flags(**sections) -> list[str]:
    """Command-line flags from ``section={key: value}``: ``flags(ilf={"steps": 40})`` -> ``--ilf.steps 40``."""
    return [item for section, values in sections.items() for key, value in values.items()
            for item in (f"--{section}.{key}", str(value))]


def tiny_flags(ilf: dict, evaluation: dict, **more) -> list[str]:
    """The recipe's flags with a tiny ``ilf`` and ``evaluation`` section (``[..]`` lists as the CLI takes them)."""
    return flags(run={"progress": "false"}, **more, ilf=ilf, evaluation=evaluation)


TINY = tiny_flags(
    teacher={"layers": 4, "width": 16, "heads": 2, "steps": 150, "batch_size": 64}, classifier={"steps": 30},
    ilf={"loop": "[1,2]", "trajectories": 96, "dev_trajectories": 32, "batch_size": 32, "steps": 40,
         "train_steps": "[2,3]"},
    evaluation={"plain_steps": "[2,3,4,6]", "solver_steps": "[2,3,4]", "solver_orders": "[2]", "ilf_steps": "[2,3]",
                "cache_steps": "[3,6]", "cache_blocks": "[1,2]", "key_steps": 3, "converged_steps": 12,
                "samples": 200, "batch_size": 100, "variants": "[seed=1,seed=2,once,init=2]"}) + ["--run.eval_every", "20"]

# Effect thresholds of the tiny recipe, from feedback seeds 0, 1, 2 measured on the loaded 2-core machine:
# ILF@3's paired MSE to the converged teacher over that of the frozen backbone on the same levels (s = 0,
# the plain control) was 0.985 / 0.977 / 0.981, the dev jump loss over the backbone's 0.842 / 0.817 / 0.845.
# Thresholds: the worst seed plus a margin (+0.01, +0.055). The plain control scores exactly 1.0 on both.
MSE_RATIO_MAX = 0.995
DEV_RATIO_MAX = 0.90


@pytest.mark.slow
def test_recipe_end_to_end(tmp_path):
    report = run(PAPER, ["--run.output_dir", str(tmp_path), *TINY])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert {"paired_mse", "equal_cost", "speedup_at_equal_quality", "placements"} <= set(saved)
    assert {"plain", "dpm++2m", "caching", "ilf", "once", "seed=1", "init=2"} <= set(saved["equal_cost"]["curves"])
    head = saved["speedup_at_equal_quality"]
    assert head["seeds"] == ["ilf", "seed=1", "seed=2"]
    for cost in ("blocks", "wall_time"):
        for against in ("vs_plain", "vs_strongest_scheduler"):
            for metric in ("fd", "mse_to_converged"):
                row = head[cost][against][metric]
                assert len(row["per_seed"]) == 3 and row["min"] <= row["mean"] <= row["max"]
    assert {r["name"] for r in saved["placements"]} == {"ilf", "seed=1", "seed=2", "once", "init=2"}
    ilf_point = next(p for p in saved["equal_cost"]["curves"]["ilf"] if p["steps"] == 3)
    assert ilf_point["blocks"] == 3 * (4 + 2 + 1)  # counted: backbone + the 2-block loop again + the feedback block
    for name in ("mse_vs_blocks.png", "fd_vs_blocks.png", "evaluate/pipeline/model_index.json"):
        assert (tmp_path / name).exists(), name
    # The effect, at every feedback seed: ILF@3 is closer to the converged teacher than the frozen backbone
    # on the same levels, and one ILF step closer to the teacher's 2-step jump (dev trajectories, unseen
    # noise). Replacing ILF by its plain control (s = 0: the backbone bit for bit, test_zero_scale_...) makes
    # ILF@3 the plain_ilf_grid point itself: both ratios are 1.0 and both asserts fail. The no-loop control
    # is NOT separated (the recipe's report measures it as good as ILF or better): no assert claims it.
    curves, grid = saved["equal_cost"]["curves"], saved["equal_cost"]["curves"]["plain_ilf_grid"][0]["mse"]
    for name in ("ilf", "seed=1", "seed=2"):
        ilf = next(p for p in curves[name] if p["steps"] == 3)
        training = report["training"]["ilf" if name == "ilf" else "ilf-" + name.replace("=", "")]
        assert ilf["mse"] / grid <= MSE_RATIO_MAX, (name, ilf["mse"] / grid)
        assert training["dev_loss"] / training["dev_backbone_loss"] <= DEV_RATIO_MAX, (name, training)


# ------------------------------------------------------------------------------------ baselines and the headline
def test_dpm_solver_first_order_is_euler_and_higher_orders_differ(backbone):
    """diffusers' EDM DPM-Solver++ at order 1 is DDIM, which on EDM's σ grid is exactly the Euler step."""
    from athanor.methods.ilf.samplers import dpm_solver_sample

    edm, (x, _, y) = EDM(), inputs()
    euler = euler_sample(edm, backbone, x / 2, y, 5)
    torch.testing.assert_close(dpm_solver_sample(edm, backbone, x / 2, y, 5, order=1), euler, rtol=0, atol=1e-4)
    assert (dpm_solver_sample(edm, backbone, x / 2, y, 5, order=2) - euler).abs().max() > 1e-3


def test_speedup_at_equal_quality_reads_the_baseline_curve():
    from athanor.methods.ilf.speedup import cost_at_quality, speedup

    plain = [{"blocks": 10, "mse": 1e-2, "fd": 4.0}, {"blocks": 20, "mse": 1e-3, "fd": 2.0},
             {"blocks": 40, "mse": 1e-4, "fd": 1.0}]
    assert cost_at_quality(plain, 1e-3, "mse", "blocks") == (20, None)
    assert cost_at_quality(plain, 10 ** -2.5, "mse", "blocks")[0] == pytest.approx(15)  # linear in log MSE
    assert cost_at_quality(plain, 3.0, "fd", "blocks")[0] == pytest.approx(15)  # linear in FD
    assert cost_at_quality(plain, 1e-1, "mse", "blocks") == (10, "at_most")
    assert cost_at_quality(plain, 1e-5, "mse", "blocks") == (40, "at_least")
    s = speedup({"blocks": 12, "mse": 1e-3}, plain, "mse", "blocks")
    assert s["speedup"] == pytest.approx(20 / 12) and s["bound"] is None


def test_feedback_block_initialised_as_a_copy(tmp_path, teacher_dir, trajectory_file, backbone):
    cfg = ILFConfig(loop=[3, 3], init_block=3, train_steps=[2, 3], trajectories=32, batch_size=16, steps=1)
    engine = Engine(TrainConfig(run=RunConfig(output_dir=str(tmp_path), max_steps=1, eval_every=0, progress=False)))
    method = FeedbackDistillation(cfg, teacher_dir, jump_pairs(trajectory_file, "dev", cfg.train_steps))
    method.setup(engine)
    copied = engine.unwrap("feedback").block.state_dict()
    original = backbone.transformer_blocks[3].state_dict()
    assert copied.keys() == original.keys() and all(torch.equal(copied[k], original[k]) for k in copied)
    assert engine.unwrap("feedback").scale.item() == 0.0  # still the backbone exactly at the start


# ------------------------------------------------------------------------------------ the latent path
@pytest.fixture(scope="module")
def tiny_dit_pipeline(tmp_path_factory):
    """A random DiT + VAE pair in facebook/DiT-XL-2-256's layout (DiTPipeline.save_pretrained): an ε-model
    with learned σ (out_channels = 2 x in) on DDPM's linear β schedule, 8x8 RGB -> 4x4x4 latents."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=3, sample_size=4, patch_size=2, num_embeds_ada_norm=10)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=8, layers_per_block=1, sample_size=8)
    folder = tmp_path_factory.mktemp("dit") / "tiny-dit"
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()).save_pretrained(folder)
    return folder


def test_latent_dit_parameterisation_is_diffusers_ddim(tiny_dit_pipeline):
    """Euler on the σ(t) of DDIM's timesteps, through the ε -> D conversion, equals diffusers' DDIM
    (η = 0) on the VP latents: the two are the same ODE step (Song et al. 2021; Karras et al. 2022)."""
    from diffusers import DDIMScheduler
    from athanor.methods.ilf.latent import load_dit

    transformer, vae, param = load_dit(tiny_dit_pipeline)
    # DDIM's default x0 clipping to [-1, 1] is a pixel-space device the ODE does not have
    scheduler = DDIMScheduler.from_pretrained(tiny_dit_pipeline, subfolder="scheduler", clip_sample=False)
    scheduler.set_timesteps(6)
    gen = torch.Generator().manual_seed(0)
    noise, y = torch.randn(3, 4, 4, 4, generator=gen), torch.tensor([1, 5, 9])
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = transformer(x, timestep=t.expand(3), class_labels=y).sample[:, :4]
            x = scheduler.step(eps, t, x).prev_sample
    ac = scheduler.alphas_cumprod[scheduler.timesteps]
    sigmas = torch.cat([((1 - ac) / ac).sqrt(), torch.zeros(1)])
    ours = euler_on_grid(param, transformer, noise, y, sigmas, start=noise * (1 + sigmas[0] ** 2).sqrt())
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-4)
    assert torch.equal(param.timestep(sigmas[:1]).round(), scheduler.timesteps[:1].float())


@pytest.mark.slow
def test_latent_dit_recipe_end_to_end(tmp_path, tiny_dit_pipeline):
    """The path users take with facebook/DiT-XL-2-256: ILF on a saved DiT + VAE (no teacher training),
    paired MSE to the converged sampler, DPM-Solver++ on the DiT's schedule, an ILF sample decoded."""
    from athanor.methods.ilf.latent import decode, load_dit

    args = ["--run.output_dir", str(tmp_path), "--ilf.backbone", str(tiny_dit_pipeline), *tiny_flags(
        ilf={"loop": "[1,1]", "trajectories": 32, "dev_trajectories": 16, "batch_size": 16, "steps": 10,
             "train_steps": "[2,3]"},
        evaluation={"plain_steps": "[2,3,6]", "solver_steps": "[2,3]", "solver_orders": "[2]", "ilf_steps": "[3]",
                    "cache_steps": "[4]", "cache_blocks": "[1,1]", "key_steps": 3, "converged_steps": 10,
                    "samples": 40, "batch_size": 20, "variants": "[once]"}), "--run.eval_every", "5"]
    report = run(PAPER, args)
    head = report["speedup_at_equal_quality"]
    assert set(head["blocks"]["vs_plain"]) == {"mse_to_converged"}  # FD needs an Inception net: not measured
    assert head["blocks"]["vs_strongest_scheduler"]["mse_to_converged"]["scheduler"] == "dpm++2m"
    assert report["training"]["ilf"]["dev_loss"] != report["training"]["ilf"]["dev_backbone_loss"]
    transformer, vae, param = load_dit(tiny_dit_pipeline)
    feedback = FeedbackModule.from_pretrained(report["training"]["ilf"]["feedback"])
    hooks = attach_feedback(transformer, feedback)
    latents = euler_on_grid(param, transformer, torch.randn(2, 4, 4, 4), torch.tensor([0, 7]), ilf_sigmas(param, 3, 2))
    hooks.remove()
    images = decode(vae, latents)
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
