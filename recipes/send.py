"""SeND (athanor.methods.send): sensitive-neuron dropout vs normal training and random-neuron dropout, from
scratch through the phase where answers flip between checkpoints, measured on held-out phrasings, with
exact EigenScore (INSIDE's centring) and efficient (Chebyshev/KPM) EES.

    python recipes/send.py                                   # tiny default on a CPU: 5 seeds × 3 arms
    python -m athanor.methods.send.tune                      # how the defaults were tuned (dev world, data.seed 1)
    accelerate launch --config_file launch/zero2.yaml recipes/send.py --config recipes/configs/send/pythia_1b.yaml

Outputs in run.output_dir: report.json (per arm and seed: per_checkpoint heldout_hallucination_rate and
eigenscore_heldout, their spread across checkpoints; paired SeND − normal / random − normal / SeND − random
95% intervals), report.md, hallucination.png, and one folder per stage (base, <arm>_s<seed>).
"""
from athanor.methods import send
from athanor.runner import run

if __name__ == "__main__":
    run(send.PAPER)
