"""ILF: a feedback module on a frozen DiT so that fewer sampling steps keep the teacher's quality.

Stages (each in OUTPUT/<stage>, skipped when already finished): teacher (EDM DiT, shared with DMD2) ->
feature classifier (FD) -> cached teacher trajectories -> ILF feedback module -> variants (feedback
seeds 1 and 2, the no-loop control at 3 seeds, other loop placements, a copy-initialised block) ->
evaluation (FD to held-out images and paired MSE to teacher@40 against counted block evaluations and
wall time, for plain Euler, diffusers' DPM-Solver++ 2M/3M, block caching and every feedback run) ->
report (report.json ``speedup_at_equal_quality``, ``placements``).

    python recipes/ilf.py                                           # sklearn digits, 8-block DiT at patch 2, CPU
    python recipes/ilf.py --config recipes/configs/ilf/gpu.yaml     # latent DiT-XL/2 (facebook/DiT-XL-2-256)
    python recipes/ilf.py --ilf.loop '[4,4]' --ilf.init_block 4 --evaluation.variants '[once,seed=1]'
    accelerate launch --config_file launch/ddp-cpu.yaml recipes/ilf.py

The pipeline in OUTPUT/evaluate/pipeline loads anywhere athanor is installed:
    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)([3, 7], num_inference_steps=10)
"""
from athanor.methods import ilf
from athanor.runner import run

if __name__ == "__main__":
    run(ilf.PAPER)
