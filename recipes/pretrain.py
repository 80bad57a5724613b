"""Causal-LM pretraining on packed text — the run the stability recipe sweeps.

    python recipes/pretrain.py                                   # tiny default, CPU, < 3 min
    accelerate launch --config_file launch/ddp-cpu.yaml recipes/pretrain.py --run.max_steps 40
    python recipes/pretrain.py --config recipes/configs/pretrain/gpt-small.yaml
    python recipes/pretrain.py --hub.push_to_hub true --hub.repo_id you/tiny-gpt   # publish at the end
"""
from dataclasses import dataclass, field

from athanor.config import RunConfig, TrainConfig, OptimConfig, exit_on_config_error, parse_or_exit
from athanor.data import TextDataConfig, load_text_data
from athanor.engine import Engine
from athanor.hub import HubConfig, maybe_publish
from athanor.methods.pretrain import GPTModelConfig, Pretrain, save_pretrain_outputs


@dataclass
class PretrainConfig(TrainConfig):
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/pretrain", max_steps=400,
                                                             eval_every=50, log_every=1))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=50, weight_decay=0.1))
    model: GPTModelConfig = field(default_factory=GPTModelConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    hub: HubConfig = field(default_factory=HubConfig)


def main(argv=None) -> dict:
    cfg = parse_or_exit(PretrainConfig, argv)
    with exit_on_config_error():
        engine = Engine(cfg)
        data = load_text_data(cfg.data)
        method = Pretrain(cfg.model, data, cfg.data.batch_size, cfg.data.eval_batches)
        method.setup(engine)
        engine.fit(method, method.batches(cfg.run.seed))
    report = save_pretrain_outputs(engine, method, cfg)
    maybe_publish(cfg.hub, engine.output_dir, is_main=engine.is_main)
    if engine.is_main:
        print(f"eval loss {report['initial_eval_loss']:.3f} -> {report['final_eval_loss']:.3f}; "
              f"report: {engine.output_dir / 'report.md'}")
    return report


if __name__ == "__main__":
    main()
