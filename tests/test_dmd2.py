"""DMD2 and its diffusion teacher: formulas against references, every switch for a few steps, exact
resume with two models, the pipeline in a fresh process, the recipe end to end (1 and 2 processes)."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from athanor.config import OptimConfig, RunConfig, TrainConfig
from athanor.data.images import ImageDataConfig, load_image_data
from athanor.engine import Engine, read_metrics
from athanor.parts.diffusion import (EDM, EDMClassPipeline, TeacherConfig, build_denoiser, edm_loss, euler_sample,
                                       load_denoiser, save_pipeline)
from athanor.methods.dmd2 import (Critic, DMD2, DMD2Config, DMD2Pipeline, check_launch, distribution_matching_loss,
                                  few_step_sample, generator_sigmas, train_dmd2)
from athanor.parts.fd import FeatureClassifier, FrechetEvaluator, frechet_distance, gaussian_stats
from conftest import ROOT, run_recipe

TINY_TEACHER = TeacherConfig(width=16, layers=1, heads=2, patch_size=4)
TINY = ["--run.progress", "false", "--teacher.width", "16", "--teacher.layers", "1", "--teacher.heads", "2",
        "--teacher.steps", "10", "--teacher.batch_size", "32", "--teacher.sample_steps", "5",
        "--classifier.steps", "10", "--run.max_steps", "3", "--run.eval_every", "1", "--dmd2.batch_size", "8",
        "--dmd2.eval_samples", "50", "--evaluation.samples", "100", "--evaluation.seeds", "1"]


@pytest.fixture(scope="module")
def data():
    return load_image_data(ImageDataConfig(held_out=200, max_train=256))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, data):
    torch.manual_seed(0)
    model = build_denoiser(TINY_TEACHER, data.image_shape, data.num_classes)
    folder = tmp_path_factory.mktemp("teacher") / "pipeline"
    save_pipeline(EDMClassPipeline(denoiser=model, scheduler=EDM().scheduler()), folder)
    return str(folder)


@pytest.fixture(scope="module")
def evaluator(data):
    torch.manual_seed(0)
    return FrechetEvaluator(FeatureClassifier(data.image_shape, data.num_classes, 32, 16), data.held_out_images)


def recipe_config(tmp_path, max_steps=2, **run):
    return TrainConfig(run=RunConfig(output_dir=str(tmp_path), max_steps=max_steps, eval_every=1, log_every=1,
                                     progress=False, **run),
                       optim=OptimConfig(lr=1e-4, betas=(0.0, 0.99), schedule="constant", grad_clip=10.0))


# ------------------------------------------------------------------------------------ formulas
def test_edm_matches_diffusers_scheduler():
    edm = EDM()
    scheduler = edm.scheduler()
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0])
    c_skip, c_out, c_in, c_noise = edm.precondition(sigma)
    x, f = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    s = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(c_in * x, scheduler.precondition_inputs(x, s))
    torch.testing.assert_close(c_noise, scheduler.precondition_noise(sigma))
    torch.testing.assert_close(c_skip * x + c_out * f, scheduler.precondition_outputs(x, f, s))
    for steps in (1, 4, 40):
        scheduler.set_timesteps(steps)
        torch.testing.assert_close(edm.karras_sigmas(steps), scheduler.sigmas)


def test_one_step_samplers_are_the_denoiser_at_sigma_max(data):
    model = build_denoiser(TINY_TEACHER, data.image_shape, data.num_classes).eval()
    edm, noise, labels = EDM(), torch.randn(6, 1, 8, 8), torch.arange(6)
    with torch.no_grad():
        direct = edm.denoise(model, noise * edm.sigma_max, torch.full((6,), edm.sigma_max), labels)
        # x + (0 − σ)(x − D)/σ = D up to rounding of x ~ 80
        torch.testing.assert_close(euler_sample(edm, model, noise, labels, 1), direct, atol=1e-4, rtol=0)
        torch.testing.assert_close(few_step_sample(edm, model, noise, labels, generator_sigmas(edm, 1)), direct)
    assert generator_sigmas(edm, 4)[0] == edm.sigma_max and generator_sigmas(edm, 4).diff().lt(0).all()


def test_distribution_matching_gradient_is_the_normalised_score_difference():
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    real, fake = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    distribution_matching_loss(x, real, fake).backward()
    expected = (fake - real) / (x.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(x.grad * x.numel(), expected)


def test_frechet_distance_against_scipy():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(500, 12, generator=gen)
    b = torch.randn(500, 12, generator=gen) @ torch.randn(12, 12, generator=gen) * 0.3 + 0.5
    (mu1, c1), (mu2, c2) = gaussian_stats(a), gaussian_stats(b)
    covmean = scipy_linalg.sqrtm(c1.numpy() @ c2.numpy()).real
    reference = float((mu1 - mu2).square().sum() + c1.trace() + c2.trace() - 2 * covmean.trace())
    assert math.isclose(frechet_distance(mu1, c1, mu2, c2), reference, rel_tol=1e-6)
    assert abs(frechet_distance(mu1, c1, mu1, c1)) < 1e-8


@pytest.mark.parametrize("arch", ["dit", "unet"])
def test_both_architectures_train_and_give_critic_features(arch, data):
    model = build_denoiser(dataclasses.replace(TINY_TEACHER, arch=arch, unet_channels=[16, 32]),
                           data.image_shape, data.num_classes)
    loss = edm_loss(EDM(), model, data.train_images[:8], data.train_labels[:8], -1.2, 1.2, torch.Generator())
    loss.backward()
    assert torch.isfinite(loss)
    critic = Critic(model, head_hidden=8)
    out = critic(data.train_images[:5], torch.zeros(5), class_labels=data.train_labels[:5], with_logits=True)
    assert out.logits.shape == (5,) and out.sample.shape == (5, 1, 8, 8)


def test_zero3_is_refused_before_compute(monkeypatch):
    from athanor.config import ConfigError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigError, match="ZeRO-3"):
        check_launch()


def test_bad_run_name_exits_2_with_one_line(tmp_path):
    proc = run_recipe("dmd2", "--evaluation.runs", "[ratio2]", "--run.output_dir", str(tmp_path / "o"),
                      check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "ratio1" in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ switches
SWITCHES = {
    "ratio1": {"critic_updates_per_generator_step": 1},
    "ratio3": {"critic_updates_per_generator_step": 3},
    "no_gan": {"gan_weight": 0.0},
    "strong_gan": {"gan_weight": 0.1, "critic_gan_weight": 0.1},
    "no_ema": {"ema_decay": 0.0},
    "no_backsim": {"backward_simulation": False},
    "one_step_generator": {"generator_steps": 1},
    "real_guidance": {"real_guidance": 2.0},
}


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_each_switch_runs_a_few_steps(switch, tmp_path, data, teacher_dir, evaluator):
    cfg = dataclasses.replace(DMD2Config(batch_size=8, eval_samples=50, critic_updates_per_generator_step=2),
                              **SWITCHES[switch])
    result = train_dmd2(tmp_path, recipe_config(tmp_path), cfg, TINY_TEACHER, teacher_dir, data, evaluator)
    ratio = cfg.critic_updates_per_generator_step
    state = json.loads((tmp_path / "checkpoints" / f"step-{2 * ratio}" / "trainer_state.json").read_text())
    assert state["schedules"]["generator"]["last_epoch"] == 2  # two generator updates ...
    assert state["schedules"]["critic"]["last_epoch"] == 2 * ratio  # ... and `ratio` critic updates per one
    rows = read_metrics(tmp_path)
    dm = [r["generator_dm_loss"] for r in rows if "generator_dm_loss" in r]
    assert len(dm) == 2 and all(math.isfinite(v) for v in dm)
    assert any("critic_gan_loss" in r for r in rows) == (cfg.gan_weight > 0)
    assert [r["eval_generator_step"] for r in rows if "eval_fd" in r] == [0, 1, 2]
    assert (tmp_path / "generator_ema").is_dir() == (cfg.ema_decay > 0)
    generator, _ = load_denoiser(result["generator_raw"])
    teacher, _ = load_denoiser(teacher_dir)
    assert any(not torch.equal(a, b) for a, b in zip(generator.parameters(), teacher.parameters()))


@pytest.mark.parametrize("backward_simulation", [True, False])
def test_backward_simulation_feeds_the_generator_its_own_samples(backward_simulation, tmp_path, data, teacher_dir):
    cfg = DMD2Config(batch_size=8, backward_simulation=backward_simulation, generator_steps=4)
    engine = Engine(recipe_config(tmp_path), output_dir=tmp_path)
    method = DMD2(cfg, TINY_TEACHER, teacher_dir, 2, engine.optim_cfg)
    method.setup(engine)
    batch = {"images": data.train_images[:8], "labels": data.train_labels[:8]}
    state = method.rng.get_state()
    before = method._generator_input(batch, 2)
    with torch.no_grad():  # a different generator
        for p in engine.unwrap("generator").parameters():
            p.add_(0.05)
    method.rng.set_state(state)
    after = method._generator_input(batch, 2)
    # with backward simulation step 2's input is the generator's own 2-step sample (re-noised), so it
    # changes with the generator; without it, it is a re-noised real image
    assert torch.equal(before, after) != backward_simulation
    method.rng.set_state(state)
    torch.testing.assert_close(method._generator_input(batch, 0).std(), torch.tensor(80.0), rtol=0.2, atol=0)


def test_exact_resume_with_two_models_and_ema(tmp_path, data, teacher_dir, evaluator):
    cfg = DMD2Config(batch_size=8, eval_samples=50, critic_updates_per_generator_step=2)
    full, split = tmp_path / "full", tmp_path / "split"
    train_dmd2(full, recipe_config(full, 4), cfg, TINY_TEACHER, teacher_dir, data, evaluator)
    train_dmd2(split, recipe_config(split, 2), cfg, TINY_TEACHER, teacher_dir, data, evaluator)
    train_dmd2(split, recipe_config(split, 4), cfg, TINY_TEACHER, teacher_dir, data, evaluator)

    def losses(d):
        return [(r["step"], r.get("generator_dm_loss"), r["critic_denoise_loss"]) for r in read_metrics(d)
                if "critic_denoise_loss" in r]

    assert len(losses(full)) == 8 and losses(full) == losses(split)  # bit for bit
    full_ema, _ = load_denoiser(full / "generator_ema")
    split_ema, _ = load_denoiser(split / "generator_ema")
    assert all(torch.equal(a, b) for a, b in zip(full_ema.parameters(), split_ema.parameters()))


def test_pipeline_loads_and_samples_in_a_fresh_process(tmp_path, data):
    torch.manual_seed(0)
    model = build_denoiser(TINY_TEACHER, data.image_shape, data.num_classes)
    edm = EDM()
    folder = save_pipeline(DMD2Pipeline(denoiser=model, scheduler=edm.scheduler(),
                                        generator_sigmas=generator_sigmas(edm, 4).tolist()), tmp_path / "pipe")
    expected = DMD2Pipeline.from_pretrained(folder, trust_remote_code=True)(
        class_labels=[0, 5, 9], generator=torch.Generator().manual_seed(3), output_type="np").images
    code = ("import torch; from diffusers import DiffusionPipeline;"
            f"pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True);"
            "out = pipe(class_labels=[0, 5, 9], num_inference_steps=1, generator=torch.Generator().manual_seed(3),"
            " output_type='np').images;"
            "print(type(pipe).__name__, out.shape, repr(out.sum().item()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, *_, total = proc.stdout.strip().splitlines()[-1].split()
    assert name == "DMD2Pipeline" and float(total) == float(expected.sum())
    assert len(DMD2Pipeline.from_pretrained(folder, trust_remote_code=True)(class_labels=[1, 2],
                                                                             num_inference_steps=4).images) == 2


# ------------------------------------------------------------------------------------ end to end
SAMPLERS = ["teacher@1", "teacher@4", "teacher@5", "dmd2@1", "dmd2@4", "dmd2@1:4step", "dmd2@1:no_ema", "dmd2@1:ratio1",
            "dmd2@1:no_gan"]


@pytest.mark.slow
def test_recipe_end_to_end(tmp_path):
    out = tmp_path / "run"
    run_recipe("dmd2", "--run.output_dir", str(out), *TINY)
    report = json.loads((out / "report.json").read_text())
    for key in ("fd", "class_acc", "nfe"):
        assert set(SAMPLERS) <= set(report[key]), report[key]
        assert all(math.isfinite(v) for v in report[key].values())
    assert report["nfe"]["teacher@5"] == 5 and report["nfe"]["dmd2@1"] == 1
    assert set(report["checks"]) and "dmd2@1" in (out / "report.md").read_text()
    for png in ["fd_curve.png", "samples/dmd2_at_1.png", "samples/teacher_at_5.png"]:
        assert (out / png).stat().st_size > 1000
    card = (out / "pipeline" / "README.md").read_text()
    assert "library_name: diffusers" in card and "dmd2" in card  # the pipeline is diffusers' (its generator a DiT)
    from athanor.methods import dmd2
    from athanor.testing import check_upload

    published = check_upload(dmd2.PAPER, out)  # the declared main model (pipeline/) on top, its card's kind
    assert published.data.library_name == "diffusers" and "trust_remote_code=True" in published.text
    assert "classifier" not in published.text.split("## Use")[1].split("##")[0]  # not the FD classifier
    assert (out / "teacher" / "pipeline" / "model_index.json").exists()  # the reusable teacher
    stages = ["teacher", "classifier", "dmd2", "dmd2-4step", "dmd2-ratio1", "dmd2-no_gan", "dmd2-no_backsim", "dmd2-seed1"]
    assert all((out / stage / "STAGE.json").exists() for stage in stages)  # a re-run skips them all
    assert report["ablations"]["no_backsim"]["fd"] == report["fd"]["dmd2@4:no_backsim"]
    assert report["ablations"]["no_backsim"]["reference"] == "dmd2@4" and report["ablations"]["no_gan"]["verdict"]
    seeds = report["dmd2@1_training_seeds"]
    assert seeds["seeds"] == [0, 1] and seeds["fd"] == [report["fd"]["dmd2@1"], report["fd"]["dmd2@1:seed1"]]


def test_a_short_distillation_beats_the_teachers_one_step_sample(tmp_path):
    """The paper's effect in small: a tiny teacher trained briefly samples badly in one step (its
    σ_max denoising is a class-mean blur); 30 DMD2 generator updates from it lower the one-step FD
    (table figure: held-out images, same samples and noise for both) and the FD curve falls."""
    from athanor.methods import dmd2
    from athanor.runner import run

    out = tmp_path / "run"
    run(dmd2.PAPER, ["--run.output_dir", str(out), "--run.progress", "false", "--teacher.width", "32",
                     "--teacher.layers", "2", "--teacher.heads", "2", "--teacher.steps", "300",
                     "--teacher.batch_size", "64", "--teacher.sample_steps", "10", "--classifier.steps", "200",
                     "--run.max_steps", "30", "--run.eval_every", "10", "--dmd2.batch_size", "32",
                     "--dmd2.eval_samples", "300", "--evaluation.samples", "300", "--evaluation.seeds", "1",
                     "--evaluation.runs", "[]", "--evaluation.train_seeds", "[]"])
    fd = json.loads((out / "report.json").read_text())["fd"]
    assert fd["dmd2@1"] < 0.95 * fd["teacher@1"], fd  # measured: 164.6 vs 192.9
    curve = [r["eval_fd"] for r in read_metrics(out / "dmd2") if "eval_fd" in r]
    assert curve[-1] < curve[0], curve


@pytest.mark.slow
def test_deepspeed_zero2_two_processes(tmp_path):
    out = tmp_path / "ds"
    run_recipe("dmd2", "--run.output_dir", str(out), *TINY, "--evaluation.runs", "[]", launch="zero2-cpu")
    report = json.loads((out / "report.json").read_text())
    assert report["runs"]["main"]["world_size"] == 2
    checkpoint = out / "dmd2" / "checkpoints" / "step-15"
    assert (checkpoint / "deepspeed-generator").is_dir() and (checkpoint / "deepspeed-critic").is_dir()  # both engines
    assert all(math.isfinite(r["generator_dm_loss"]) for r in read_metrics(out / "dmd2") if "generator_dm_loss" in r)
    assert math.isfinite(report["fd"]["dmd2@1"])


@pytest.mark.parametrize("config", sorted((ROOT / "recipes" / "configs" / "dmd2").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(config):
    from athanor.config import load_config
    from athanor.data.images import FASHION_MNIST_DIR

    if "fashion" in config.name and not FASHION_MNIST_DIR.is_dir():
        pytest.skip("needs apt-get install dataset-fashion-mnist")
    from athanor.methods.dmd2 import DMD2RecipeConfig

    cfg = load_config(DMD2RecipeConfig, ["--config", str(config)])
    assert cfg.run.max_steps >= 1000 and cfg.dmd2.generator_steps == 1 and "4step" in cfg.evaluation.runs


def test_report_says_what_limited_a_missed_check():
    from athanor.methods.dmd2 import shortfall_note

    met = {"a": (True, "1 vs 2")}
    missed = {"a": (True, "1 vs 2"), "b": (False, "9 vs 8")}
    falling = [(0, 200.0), (100, 30.0), (200, 20.0), (300, 15.0), (400, 12.0)]
    assert shortfall_note(met, falling, 400) == []
    assert "still falling" in shortfall_note(missed, falling, 400)[0] and "15.00 -> 12.00" in shortfall_note(
        missed, falling, 400)[0]
    assert "flat" in shortfall_note(missed, falling[:-1] + [(400, 15.1)], 400)[0]


def test_an_ablation_is_called_better_or_worse_only_beyond_the_spread():
    """Figures from a default run: no_backsim 19.83 ± 1.77 vs dmd2@4 19.64 ± 2.06 is no difference;
    ratio1 13.81 ± 0.34 vs dmd2@1 12.30 ± 0.31 (training-seed sd 0.09) is worse."""
    from athanor.methods.dmd2.report import ablation_table

    table = {"fd": {"dmd2@1": 12.30, "dmd2@4": 19.64, "dmd2@4:no_backsim": 19.83, "dmd2@1:ratio1": 13.81},
             "fd_std": {"dmd2@1": 0.31, "dmd2@4": 2.06, "dmd2@4:no_backsim": 1.77, "dmd2@1:ratio1": 0.34},
             "class_acc": {"dmd2@1": 1.0, "dmd2@4": 1.0, "dmd2@4:no_backsim": 1.0, "dmd2@1:ratio1": 1.0}}
    runs = {"": {"generator_sigmas": [80.0]}, "ratio1": {"generator_sigmas": [80.0]},
            "no_backsim": {"generator_sigmas": [80.0, 9.7, 0.8, 0.03]}, "seed1": {"generator_sigmas": [80.0]}}
    ablations = ablation_table(runs, table, training_sd=0.09)
    assert set(ablations) == {"ratio1", "no_backsim"} and ablations["no_backsim"]["reference"] == "dmd2@4"
    assert ablations["no_backsim"]["verdict"].startswith("within the spread")
    assert ablations["ratio1"]["verdict"].startswith("higher (worse) beyond the spread")


def test_teacher_from_a_pipeline_or_a_model_folder(teacher_dir):
    from pathlib import Path

    from athanor.parts.diffusion import null_label

    from_pipeline, edm = load_denoiser(teacher_dir)
    from_model, fallback = load_denoiser(Path(teacher_dir) / "denoiser", EDM(sigma_data=0.6))
    assert edm == EDM() and fallback.sigma_data == 0.6 and null_label(from_model) == 10
    assert all(torch.equal(a, b) for a, b in zip(from_pipeline.parameters(), from_model.parameters()))
