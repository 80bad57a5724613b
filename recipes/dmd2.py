"""DMD2: distil a class-conditional diffusion teacher into a 1-/few-step generator (athanor.methods.dmd2).

Stages (each one engine run in OUTPUT/<stage>, skipped when already finished):
teacher (EDM, diffusers DiT) -> feature classifier (for FD) -> DMD2 (the one-step generator) -> other DMD2
runs (the 4-step generator, ablations) -> evaluation, report, sample grids, FD curves, and a 1-step
diffusers pipeline with its model card.

    python recipes/dmd2.py                                         # sklearn digits, CPU, < 20 min
    python recipes/dmd2.py --config recipes/configs/dmd2/gpu.yaml  # same recipe, long enough to close the gap
    accelerate launch --config_file launch/zero2-cpu.yaml recipes/dmd2.py --run.max_steps 4
"""
from athanor.methods import dmd2
from athanor.runner import run

if __name__ == "__main__":
    run(dmd2.PAPER)
