"""SeND (athanor.methods.send): sensitive-neuron dropout vs normal continued training of a converged LM
on a stream of new facts, with exact (Gram) and efficient (Chebyshev/KPM) EigenScore.

    python recipes/send.py                                   # tiny default on a CPU (report.md, PNGs)
    python recipes/send.py --experiment.seeds '[0,1,2,3,4]' --send.fraction 0.1
    accelerate launch --config_file launch/zero2.yaml recipes/send.py --config recipes/configs/send/pythia_1b.yaml

Outputs in run.output_dir: report.json (eigenscore, normal, send), report.md, accuracy.png,
hallucination.png, and one folder per stage (base, normal_s<seed>, send_s<seed>).
"""
from athanor.methods import send
from athanor.runner import run

if __name__ == "__main__":
    run(send.PAPER)
