"""DMD2's report: every sampler (teacher@N, dmd2@K of each run) scored by FD and class accuracy
against held-out images over several noise seeds, the acceptance checks, FD curves, sample grids,
and the main run's one-step diffusers pipeline with its model card."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ...engine import read_metrics
from ...hub import write_model_card
from ...parts.diffusion import EDM, TeacherConfig, euler_sample, guided_nfe, load_denoiser, save_pipeline
from ...parts.fd import evaluate_sampler, load_evaluator, save_sample_grid
from ...report import plt, write_report
from ...runner import StageContext
from .config import DMD2RecipeConfig, all_runs, stage_name
from .method import MULTISTEP, VARIANTS, DMD2Pipeline, few_step_sample, images


def build_samplers(teacher_cfg: TeacherConfig, teacher_dir: str, runs: dict) -> dict:
    """name -> (sample_fn(noise, labels, generator), NFE). ``runs`` maps "" (the main run) or a variant name
    to its stage result. Each run gives ``dmd2@1:<run>`` and, for a K-step generator, ``dmd2@K:<run>``; the
    main run and the 4-step run's 4-step output go without suffix (``dmd2@1``, ``dmd2@4``)."""
    teacher, edm = load_denoiser(teacher_dir, EDM.from_config(teacher_cfg))
    w, n = teacher_cfg.guidance, teacher_cfg.sample_steps
    samplers = {f"teacher@{k}": (lambda noise, y, gen, k=k: euler_sample(edm, teacher, noise, y, k, w), guided_nfe(k, w))
                for k in dict.fromkeys((1, 4, n))}

    def generator(path: str, sigmas: list, steps: int):
        model, _ = load_denoiser(path, edm)
        sigmas = torch.tensor(sigmas[:steps])

        @torch.no_grad()
        def sample(noise, y, gen):
            return few_step_sample(edm, model, noise, y, sigmas.to(noise.device), gen)
        return sample, steps

    for name, result in runs.items():
        sigmas = result["generator_sigmas"]
        for steps in dict.fromkeys((1, len(sigmas))):
            plain = name == "" or (name == MULTISTEP and steps > 1)
            samplers.setdefault(f"dmd2@{steps}" + ("" if plain else f":{name}"),
                                generator(result["generator"], sigmas, steps))
        if name == "" and result["generator_raw"] != result["generator"]:
            samplers["dmd2@1:no_ema"] = generator(result["generator_raw"], sigmas, 1)
    return samplers


def must_show(table: dict, teacher_n: str) -> dict:
    """The issue's acceptance checks, each with the numbers it compares."""
    fd, acc = table["fd"], table["class_acc"]
    d = fd["dmd2@1"]
    return {
        "dmd2@1 FD <= 1/2 teacher@1": (d <= 0.5 * fd["teacher@1"], f"{d:.2f} vs {0.5 * fd['teacher@1']:.2f}"),
        "dmd2@1 FD < teacher@4": (d < fd["teacher@4"], f"{d:.2f} vs {fd['teacher@4']:.2f}"),
        f"dmd2@1 FD <= 2x {teacher_n}": (d <= 2 * fd[teacher_n], f"{d:.2f} vs {2 * fd[teacher_n]:.2f}"),
        f"dmd2@1 class acc within 10 points of {teacher_n}":
            (acc["dmd2@1"] >= acc[teacher_n] - 0.10, f"{acc['dmd2@1']:.3f} vs {acc[teacher_n]:.3f}"),
    }


def fd_curve(stage_dir: Path) -> list[tuple[float, float]]:
    """(generator step, FD) points logged by ``DMD2.evaluate`` during a run."""
    return sorted({r["eval_generator_step"]: r["eval_fd"] for r in read_metrics(stage_dir) if "eval_fd" in r}.items())


def shortfall_note(checks: dict, curve: list, updates: int) -> list[str]:
    """What limited a run that missed a check: the FD trend over its last quarter of updates."""
    if all(ok for ok, _ in checks.values()) or len(curve) < 3:
        return []
    tail = [fd for step, fd in curve if step >= 0.75 * curve[-1][0]]
    trend = ("still falling: more generator updates should lower it further" if tail[-1] < 0.95 * tail[0]
             else "flat: more updates alone may not close the gap (teacher quality, FD noise, hyperparameters)")
    return [f"Not every check was met within {updates} generator updates. The one-step FD over the last quarter "
            f"of the run went {tail[0]:.2f} -> {tail[-1]:.2f} ({trend}). recipes/configs/dmd2/gpu.yaml runs "
            f"the same recipe for 6000 updates on one GPU."]


def training_seed_spread(table: dict, runs: dict, main_seed: int, teacher_n: str) -> dict:
    """dmd2@1 (table FD, noise seeds averaged) of the main config over its training seeds: the main
    run and the ``seed<N>`` runs; mean, sample sd, and the ratio of the mean to ``teacher_n``'s FD."""
    seeds = {main_seed: table["fd"]["dmd2@1"]}
    seeds.update({runs[n]["seed"]: table["fd"][f"dmd2@1:{n}"] for n in runs if n.startswith("seed")})
    fds = list(seeds.values())
    mean = statistics.fmean(fds)
    return {"seeds": list(seeds), "fd": fds, "mean": mean, "sd": statistics.stdev(fds) if len(fds) > 1 else None,
            "min": min(fds), "max": max(fds), f"mean_over_{teacher_n}": mean / table["fd"][teacher_n]}


def plot_fd_curves(curves: dict, table: dict, path: Path, eval_samples: int, table_samples: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, pts in curves.items():
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=f"dmd2@1{':' + name if name else ''}")
    for key, style in zip([k for k in table["fd"] if k.startswith("teacher@")], (":", "--", "-.")):
        ax.axhline(table["fd"][key], color="gray", linestyle=style, label=key)
    ax.set_xlabel("generator step")
    ax.set_ylabel("FD vs held-out images")
    ax.set_title(f"one-step FD during training ({eval_samples} samples, one noise seed)"
                 + (f"\nteacher lines and the report's table: {table_samples}" if table_samples else ""), fontsize=9)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ablation_reference(name: str, table: dict) -> str:
    """no_backsim (a 4-step generator) is judged by its 4-step output against dmd2@4; the others by
    their one-step output against dmd2@1."""
    return "dmd2@4" if name == "no_backsim" and "dmd2@4" in table["fd"] else "dmd2@1"


def ablation_verdict(row: dict, ref_fd: float, ref_sd: float, training_sd: float | None) -> str:
    """Lower/higher FD only when the difference exceeds the spread: the two noise-seed sds plus the main
    config's training-seed sd (an ablation is one training seed); otherwise no difference is shown."""
    spread = row["fd_std"] + ref_sd + (training_sd or 0.0)
    diff = row["fd"] - ref_fd
    if abs(diff) <= spread:
        return f"within the spread ({diff:+.2f}, spread {spread:.2f}): no difference shown"
    return f"{'lower (better)' if diff < 0 else 'higher (worse)'} beyond the spread ({diff:+.2f}, spread {spread:.2f})"


def ablation_lines(ablations: dict) -> list[str]:
    """Each ablation's FD against its reference (``ablation_reference``) with the verdict."""
    return [f"- ablation {name}: FD {row['fd']:.2f} ± {row['fd_std']:.2f} vs {row['reference']} {row['reference_fd']:.2f}: "
            f"{row['verdict']} (± is the noise-seed sd; spread = both noise-seed sds + dmd2@1's training-seed sd)."
            for name, row in ablations.items() if name != MULTISTEP]


def ablation_table(runs: dict, table: dict, training_sd: float | None) -> dict:
    """report.json's ``ablations``: each extra run's FD (the K-step output of a K-step generator; the
    4-step run's own is dmd2@4), its reference sampler and the verdict."""
    out = {}
    for name in (n for n in runs if n and not n.startswith("seed")):
        sampler = f"dmd2@{len(runs[name]['generator_sigmas'])}" + ("" if name == MULTISTEP else f":{name}")
        row = {k: table[k][sampler] for k in ("fd", "fd_std", "class_acc")}
        if name != MULTISTEP:
            ref = ablation_reference(name, table)
            row.update(reference=ref, reference_fd=table["fd"][ref],
                       verdict=ablation_verdict(row, table["fd"][ref], table["fd_std"][ref], training_sd))
        out[name] = row
    return out


def sampler_table(samplers: dict, evaluator, data, samples: int, seeds: int, grids: Path) -> dict:
    """FD (mean and sd over noise seeds), class accuracy and NFE of every sampler; a sample grid of
    each in ``grids``."""
    labels = torch.arange(samples) % data.num_classes
    table = {"fd": {}, "fd_std": {}, "class_acc": {}, "nfe": {}}
    grids.mkdir(parents=True, exist_ok=True)
    for name, (fn, nfe) in samplers.items():
        scores, images = evaluate_sampler(fn, evaluator, labels, data.image_shape, seeds, "cpu")
        for key in ("fd", "fd_std", "class_acc"):
            table[key][name] = scores[key]
        table["nfe"][name] = nfe
        save_sample_grid(images, labels, grids / f"{name.replace('@', '_at_').replace(':', '_')}.png",
                         title=f"{name}: FD {scores['fd']:.2f}, class acc {scores['class_acc']:.2f}")
    return table


def write_dmd2_report(cfg: DMD2RecipeConfig, data, teacher: dict, classifier: dict, runs: dict, evaluator, output_dir: Path,
                      seconds: float) -> dict:
    """Main process: the sampler table (report.json/md), sample grids, FD curves, the 1-step diffusers
    pipeline of the main run and its model card."""
    ev = cfg.evaluation
    samplers = build_samplers(cfg.teacher, teacher["pipeline"], runs)
    table = sampler_table(samplers, evaluator, data, ev.samples, ev.seeds, output_dir / "samples")
    teacher_n = f"teacher@{cfg.teacher.sample_steps}"
    checks = must_show(table, teacher_n)
    curves = {name: fd_curve(output_dir / ("dmd2" + (f"-{name}" if name else ""))) for name in runs}
    plot_fd_curves(curves, table, output_dir / "fd_curve.png", cfg.dmd2.eval_samples,
                   f"{ev.samples} samples x {ev.seeds} noise seeds")
    spread = training_seed_spread(table, runs, cfg.run.seed, teacher_n)

    main = runs[""]
    model, edm = load_denoiser(main["generator"])
    pipe_dir = output_dir / "pipeline"
    save_pipeline(DMD2Pipeline(denoiser=model, scheduler=edm.scheduler(),
                               generator_sigmas=main["generator_sigmas"]), pipe_dir)
    report = {**table, "checks": {k: bool(v[0]) for k, v in checks.items()}, "dmd2@1_training_seeds": spread,
              "ablations": ablation_table(runs, table, spread["sd"]),
              "held_out_images": len(data.held_out_images), "train_images": len(data.train_images),
              "teacher": teacher, "classifier_held_out_accuracy": classifier["held_out_accuracy"],
              "runs": {name or "main": {k: v for k, v in r.items() if k != "final_eval"} for name, r in runs.items()},
              "pipeline": str(pipe_dir), "seconds_this_invocation": seconds}
    rows = ["| sampler | NFE | FD vs held-out (mean ± sd over seeds) | class acc |", "|---|---|---|---|"]
    rows += [f"| {n} | {table['nfe'][n]} | {table['fd'][n]:.2f} ± {table['fd_std'][n]:.2f} | "
             f"{table['class_acc'][n]:.3f} |" for n in samplers]
    verdict = [f"- {'met' if ok else 'NOT met'}: {name} ({numbers})" for name, (ok, numbers) in checks.items()]
    lines = [f"{len(data.train_images)} training / {len(data.held_out_images)} held-out images ({cfg.data.source}); "
             f"{ev.samples} samples per sampler, {ev.seeds} noise seeds; feature classifier held-out accuracy "
             f"{classifier['held_out_accuracy']:.3f}. Main run: {cfg.run.max_steps} generator updates of a "
             f"{cfg.dmd2.generator_steps}-step generator (critic ratio {cfg.dmd2.critic_updates_per_generator_step}, "
             f"GAN weight {cfg.dmd2.gan_weight}, EMA {cfg.dmd2.ema_decay}); other runs change only: "
             + "; ".join(f"{n}: {VARIANTS.get(n, 'training seed ' + n[4:])}" for n in runs if n)
             + ". Backward simulation "
             f"{cfg.dmd2.backward_simulation} for multi-step generators.", "", *rows, "",
             f"dmd2@1 over training seeds {spread['seeds']}: FD " + ", ".join(f"{v:.2f}" for v in spread["fd"])
             + f"; mean {spread['mean']:.2f}" + (f" ± {spread['sd']:.2f} (sd)" if spread["sd"] is not None else
                                                  " (one seed: no spread; add --evaluation.train_seeds)")
             + f"; mean / {teacher_n} = {spread[f'mean_over_{teacher_n}']:.2f} (the paper's one-step generator beats "
             "its teacher: < 1).", "",
             *ablation_lines(report["ablations"]), "", "Acceptance checks:", *verdict,
             *shortfall_note(checks, curves[""], cfg.run.max_steps), "",
             "FD vs generator step: fd_curve.png. Sample grids (one row per class): samples/*.png. "
             f"1-step pipeline: {pipe_dir} (DiffusionPipeline.from_pretrained(path, trust_remote_code=True)).",
             f"Wall time of this invocation: {seconds:.0f} s (finished stages are skipped on re-runs)."]
    write_report(output_dir, report, "DMD2 distillation report", lines)
    write_model_card(pipe_dir, title="DMD2 few-step class-conditional generator (athanor)",
                     summary=(f"Distilled with DMD2 from an EDM teacher trained on {cfg.data.source}. Load with "
                              f"`DiffusionPipeline.from_pretrained(path, trust_remote_code=True)` (needs athanor "
                              f"installed) and call `pipe(class_labels=[0, 1, 2], num_inference_steps=1)`.\n\n"
                              + "\n".join(rows)),
                     metrics={f"FD {k}": v for k, v in table["fd"].items()}, library="diffusers",
                     tags=["dmd2", "distillation", "class-conditional", "image-generation"])
    return report


def report(ctx: StageContext, results: dict) -> dict:
    """The runner's report of the DMD2 paper (main process)."""
    cfg = ctx.cfg
    data = images(cfg.data)
    evaluator = load_evaluator(results["classifier"]["model"], data.held_out_images)
    runs = {run: results[stage_name(run)] for run in all_runs(cfg)}
    return write_dmd2_report(cfg, data, results["teacher"], results["classifier"], runs, evaluator, ctx.root,
                             time.time() - ctx.started)
