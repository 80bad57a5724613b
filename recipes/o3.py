"""O3 continual LLM unlearning: an orthogonal LoRA per request + an OOD detector that gates it.

    accelerate launch recipes/o3.py       # tiny default: fictitious facts, 3 requests, CPU, < 10 min
    accelerate launch --config_file launch/zero3.yaml recipes/o3.py --config recipes/configs/o3/llama2-7b-tofu.yaml

Stages (each resumable; a finished one is skipped when the recipe runs again):
base LM -> for each request: LoRA, detector, evaluation -> ablations -> publish (OUTPUT/o3) -> report.
"""
import os
import time
from dataclasses import dataclass, field

import torch

from athanor.config import OptimConfig, RunConfig, TrainConfig, exit_on_config_error, parse_or_exit
from athanor.engine import process_state
from athanor.methods.o3.detector import DetectorConfig, check_backbone
from athanor.methods.o3.lm import ModelConfig
from athanor.methods.o3.lora import UnlearnConfig
from athanor.methods.o3.model import O3Model
from athanor.methods.o3.pipeline import (AblationConfig, EvalSets, adapter_overlap, evaluate_base, evaluate_request,
                                         load_scores, plain_loading, run_ablations, train_base,
                                         train_detector, unlearn_request)
from athanor.methods.o3.summary import checks, markdown, plot, plot_gate, publish, samples
from athanor.methods.o3.world import DataConfig, load_data, request_groups, retained_groups
from athanor.report import write_report
from athanor.stages import Stages


@dataclass
class O3Config(TrainConfig):
    # run.max_steps and optim: the base LM that memorises the facts (0 steps: use model.name_or_path as is)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/o3", max_steps=500, eval_every=250,
                                                             log_every=10))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=20, weight_decay=0.1))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    ablations: AblationConfig = field(default_factory=AblationConfig)


def main(argv=None) -> dict:
    start = time.time()
    cfg = parse_or_exit(O3Config, argv)
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # Tiny models on a shared CPU: one thread per process. Two threads on two loaded cores
        # measured 16x slower per step (7.4 s vs 0.46 s) from oversubscription.
        torch.set_num_threads(1)
    with exit_on_config_error():
        check_backbone(cfg.detector.backbone)  # a missing encoder fails now, not after training
        data = load_data(cfg.data)
        requests = request_groups(data, cfg.data)
        sets = EvalSets.build(data, requests, retained_groups(data, requests))
        state = process_state(cfg.engine.cpu)
        stages = Stages(cfg.run.output_dir)
        base = stages.run("base", lambda d: train_base(cfg, data, d))
    base_dir = str(stages.dir("base") / "model") if base["steps"] else base["model_dir"]  # relative: movable
    base_eval = stages.run("base_eval", lambda d: evaluate_base(cfg, data, sets, base_dir))

    adapters, detectors, scores, results = [], [], [], []
    for t in range(1, len(requests) + 1):
        forget = [data.records[i] for i in sets.forget_train[t - 1]]  # trained phrasings only
        request = stages.run(f"request_{t}", lambda d: unlearn_request(cfg, data, t, base_dir, adapters, forget, d,
                                                                       cfg.unlearn.orth_lambda))
        detector = stages.run(f"detector_{t}", lambda d: train_detector(cfg, t, forget, base_dir, data, d))
        adapters.append(str(stages.dir(f"request_{t}") / "adapter"))
        detectors.append(str(stages.dir(f"detector_{t}") / "detector"))
        scores.append(str(stages.dir(f"detector_{t}") / "scores.safetensors"))
        result = stages.run(f"eval_{t}", lambda d: evaluate_request(cfg, data, sets, t, base_dir, adapters, scores))
        results.append({**result, "target_rate": request["target_rate"], "detector_tau": detector["tau"],
                        "orth_penalty_last": request["orth_penalty_last"]})

    ablations = run_ablations(cfg, stages, data, sets, base_dir, adapters, scores)
    report = {"world": f"{len(data.groups)} groups, {len(data.records)} records, {len(requests)} requests of "
                       f"{cfg.data.groups_per_request}", "gate": cfg.unlearn.gate,
              "orth_lambda": cfg.unlearn.orth_lambda,
              "base": {**base_eval, "steps": base["steps"]}, "requests": results, "ablations": ablations,
              "checks": checks(base_eval, results, ablations), "adapter_overlap": adapter_overlap(adapters),
              "adapter_overlap_lambda0": ablations.get("lambda0", {}).get("adapter_overlap"),
              "detector_parts": {k: v for k, v in results[-1].items() if k.startswith("auroc")},
              "world_size": state.num_processes, "o3_dir": f"{cfg.run.output_dir}/o3"}
    if state.is_main_process:
        folder = publish(stages.root, cfg, base_dir, bool(base["steps"]), adapters, detectors,
                         {k: v for k, v in results[-1].items() if isinstance(v, float)})
        with plain_loading():  # main process only: no ZeRO-3 collectives
            reloaded = O3Model.from_pretrained(folder)  # the published folder, as a user would load it
            report["samples"] = samples(reloaded, data, sets)
        plot(stages.root, base_eval, results, ablations)
        plot_gate(stages.root, load_scores(scores)["logit"], sets)
        report["seconds"] = time.time() - start
        write_report(stages.root, report, "O3 continual unlearning", markdown(report))
        unmet = [name for name, check in report["checks"].items() if not check["met"]]
        print(f"O3: {len(report['checks']) - len(unmet)}/{len(report['checks'])} checks met"
              + (f" (not met: {', '.join(unmet)})" if unmet else "") + f"; report: {stages.root / 'report.md'}")
    return report


if __name__ == "__main__":
    main()
