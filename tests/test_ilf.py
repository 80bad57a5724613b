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


TINY = ["--run.progress", "false", "--teacher.layers", "4", "--teacher.width", "16", "--teacher.heads", "2",
        "--teacher.steps", "150", "--teacher.batch_size", "64", "--classifier.steps", "30",
        "--ilf.loop", "[2,2]", "--ilf.trajectories", "128", "--ilf.dev_trajectories", "32", "--ilf.batch_size", "32",
        "--ilf.steps", "60", "--ilf.train_steps", "[2,3]", "--evaluation.plain_steps", "[2,3,4,6]",
        "--evaluation.ilf_steps", "[2,3]", "--evaluation.cache_steps", "[3,6]", "--evaluation.cache_blocks", "[1,2]",
        "--evaluation.key_steps", "3", "--evaluation.reference_steps", "6", "--evaluation.converged_steps", "12", "--evaluation.curve_samples", "100",
        "--evaluation.fd_samples_per_seed", "100", "--evaluation.seeds", "2", "--run.eval_every", "20"]


@pytest.mark.slow
def test_recipe_end_to_end(tmp_path):
    report = run(PAPER, ["--run.output_dir", str(tmp_path), *TINY])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert {"paired_mse", "equal_cost"} <= set(saved)
    assert {"plain", "caching", "ilf", "once"} <= set(saved["equal_cost"]["curves"])
    assert saved["equal_cost"]["ilf_blocks"] == 3 * (4 + 1 + 1)
    for name in ("quality_vs_blocks.png", "quality_vs_time.png", "evaluate/pipeline/model_index.json"):
        assert (tmp_path / name).exists(), name
    # The paper's effect at this size: one trained ILF step matches the teacher's 2-step jump better
    # than the frozen backbone's own step (dev trajectories, noise unseen in training).
    training = report["training"]["ilf"]
    assert training["dev_loss"] < training["dev_backbone_loss"]
    assert report["paired_mse"]["ilf@3"]["mse"] < report["paired_mse"]["teacher@3"]["mse"]
