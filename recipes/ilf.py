"""ILF: a feedback module on a frozen DiT so that fewer sampling steps keep the teacher's quality.

Stages (each in OUTPUT/<stage>, skipped when already finished): teacher (EDM DiT, shared with DMD2) ->
feature classifier (FD) -> cached teacher trajectories -> ILF feedback module -> variants (the no-loop
control, other loop regions) -> evaluation (paired MSE vs counted block evaluations for plain sampling,
block caching, the no-loop control and ILF; FD of the key samplers; the diffusers ILFPipeline) -> report.

    python recipes/ilf.py                                           # sklearn digits, 12-block DiT, CPU
    python recipes/ilf.py --config recipes/configs/ilf/gpu.yaml     # longer, deeper, more samples
    python recipes/ilf.py --ilf.loop '[4,4]' --evaluation.variants '[once]'
    accelerate launch --config_file launch/ddp-cpu.yaml recipes/ilf.py

The pipeline in OUTPUT/evaluate/pipeline loads anywhere athanor is installed:
    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)([3, 7], num_inference_steps=10)
"""
from athanor.methods import ilf
from athanor.runner import run

if __name__ == "__main__":
    run(ilf.PAPER)
