"""Causal-LM pretraining on packed text — the run the stability recipe sweeps (athanor.methods.pretrain).

    python recipes/pretrain.py                                   # tiny default, CPU, < 3 min
    accelerate launch --config_file launch/ddp-cpu.yaml recipes/pretrain.py --run.max_steps 40
    python recipes/pretrain.py --config recipes/configs/pretrain/gpt-small.yaml
    python recipes/pretrain.py --hub.push_to_hub true --hub.repo_id you/tiny-gpt   # publish at the end

Writes OUTPUT/model (a Hub-ready folder with tokenizer and model card), report.json/md, loss.png.
"""
from athanor.methods import pretrain
from athanor.runner import run

if __name__ == "__main__":
    run(pretrain.PAPER)
