"""Small-scale proxies for Transformer training instabilities (Wortsman et al. 2023): LR sweeps.

Every grid point (variant × width × depth × LR) is an ordinary ``recipes/pretrain.py`` run with its
own folder under ``run.output_dir``; the points run in parallel worker processes, and a killed
sweep run again skips the finished points. Then: LR sensitivity, optimal LR and probe scaling
per variant, a long-run log Z demonstration, report.json/md and plots.

    python recipes/stability.py                                 # CPU default, 5m20s on 2 idle cores
    python recipes/stability.py --sweep.variants [baseline,qk_layernorm,mup] --sweep.widths [64,128]
    python recipes/stability.py --config recipes/configs/stability/gpu.yaml
"""
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from athanor.cluster import register_sweep_executor
from athanor.config import (ConfigError, OptimConfig, RunConfig, TrainConfig, exit_on_config_error, load_config,
                            parse_or_exit, to_dict)
from athanor.data import TextDataConfig
from athanor.methods import stability
from athanor.methods.pretrain import GPTModelConfig
from athanor.methods.stability_report import write_stability_report
from athanor.sweep import Job, make_executor, run_sweep
from pretrain import PretrainConfig  # every point is exactly this recipe's run

register_sweep_executor()  # --sweep.executor slurm: the sweep as one SLURM job array
PRETRAIN_SCRIPT = Path(__file__).with_name("pretrain.py")


@dataclass
class StabilityConfig(TrainConfig):
    # run/optim/engine/model/data: the base pretrain config of every point (the paper's defaults,
    # with every fix off); run.output_dir holds the sweep, one folder per point.
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/stability", max_steps=400,
                                                             log_every=10, keep_last=1, progress=False))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4, independent_weight_decay=True, warmup_steps=20,
        schedule="cosine", min_lr_ratio=0.01, grad_clip=1.0))
    model: GPTModelConfig = field(default_factory=lambda: GPTModelConfig(bias=False, qk_layernorm=False))
    data: TextDataConfig = field(default_factory=lambda: TextDataConfig(block_size=64, batch_size=16,
                                                                        eval_batches=16))
    sweep: stability.SweepConfig = field(default_factory=stability.SweepConfig)
    analysis: stability.AnalysisConfig = field(default_factory=stability.AnalysisConfig)
    logz_demo: stability.LogZDemoConfig = field(default_factory=stability.LogZDemoConfig)


def make_jobs(cfg: StabilityConfig, points: list[dict]) -> list[Job]:
    """Check every point as a PretrainConfig (a bad override exits 2 before any compute), then
    write each point's config into its folder; a folder run with other settings is refused."""
    with tempfile.TemporaryDirectory() as tmp:
        for i, point in enumerate(points):
            path = Path(tmp) / f"{i}.yaml"
            path.write_text(OmegaConf.to_yaml(point["config"]))
            try:
                load_config(PretrainConfig, ["--config", str(path)])
            except ConfigError as e:
                raise ConfigError(f"sweep point {point['name']}: {e}") from None
    jobs = []
    for point in points:
        point_file = Path(cfg.run.output_dir) / point["name"] / "point.yaml"
        text = OmegaConf.to_yaml(point["config"])
        if point_file.exists() and point_file.read_text() != text:
            raise ConfigError(f"{point_file.parent} was run with other settings; choose another --run.output_dir")
        point_file.parent.mkdir(parents=True, exist_ok=True)
        point_file.write_text(text)
        jobs.append(Job(point["name"], cfg.run.output_dir, str(PRETRAIN_SCRIPT), ["--config", str(point_file)],
                        point["cost"]))
    return jobs


def describe(cfg: StabilityConfig) -> str:
    o, m, d = cfg.optim, cfg.model, cfg.data
    return (f"Base run: {'pre' if m.pre_ln else 'post'}-LN GPT, bias={m.bias}, tied embeddings={m.tie_embeddings}, "
            f"head dim {cfg.sweep.head_dim}, {cfg.run.max_steps} steps of {d.batch_size}×{d.block_size} tokens "
            f"({d.source}, {d.tokenizer}); AdamW β={tuple(o.betas)}, ε={o.eps:g}, clip {o.grad_clip:g}, weight decay "
            f"{o.weight_decay:g} ({'independent' if o.independent_weight_decay else 'LR-coupled'}), warm-up "
            f"{o.warmup_steps}, {o.schedule} to {o.min_lr_ratio:g}× peak; z-loss {m.z_loss_weight:g}, "
            f"qk-layernorm {m.qk_layernorm}, µParam base width {m.mup_base_width or 'off'}.")


def main(argv=None) -> dict:
    cfg = parse_or_exit(StabilityConfig, argv)
    with exit_on_config_error():
        base = {k: v for k, v in to_dict(cfg).items() if k in ("run", "optim", "engine", "model", "data")}
        points = stability.grid_points(base, cfg.sweep, cfg.logz_demo, cfg.run.output_dir)
        jobs = make_jobs(cfg, points)
    executor = make_executor(cfg.sweep.executor, workers=cfg.sweep.workers,
                             threads_per_worker=cfg.sweep.threads_per_worker, devices=cfg.sweep.devices)
    sweep = run_sweep(jobs, executor, desc="stability sweep")
    print(f"sweep: {sweep.ran} run(s) now, {sweep.skipped} finished earlier, {len(sweep.failed)} failed")
    for failed in sweep.failed:
        last_line = (failed.error or "").strip().splitlines()[-1:] or [""]
        print(f"FAILED {failed.name}: {last_line[0]} (log: {Path(cfg.run.output_dir) / failed.name / 'log.txt'})",
              file=sys.stderr)
    if sweep.failed:
        sys.exit(1)
    if not cfg.sweep.keep_checkpoints:  # finished points are skipped from now on: their checkpoints are dead weight
        for job in jobs:
            shutil.rmtree(job.output_dir / "checkpoints", ignore_errors=True)
    runs = [{**{k: p[k] for k in ("name", "variant", "width", "depth", "lr", "z_loss_weight")},
             **stability.summarize_run(Path(cfg.run.output_dir) / p["name"], sweep.outcomes[p["name"]].result)}
            for p in points]
    report = write_stability_report(cfg.run.output_dir, runs, cfg.analysis, cfg.logz_demo, describe(cfg))
    print(f"report: {Path(cfg.run.output_dir) / 'report.md'}")
    return report


if __name__ == "__main__":
    main()
