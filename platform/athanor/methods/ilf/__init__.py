"""ILF: "Accelerate High-Quality Diffusion Models with Inner Loop Feedback" (Gwilliam et al. 2025).

A feedback block with the backbone's own settings reads the output of a loop region of a frozen DiT;
its output times a learnable scale s (initialised at 0, so s = 0 is the backbone exactly) is added to
the loop's input and the loop runs again (``feedback``). Only the feedback block and s are trained,
so that one ILF step matches the teacher's ``jump``-step jump on cached teacher trajectories
(``method``). The headline is the paper's: speed-up at equal quality (``speedup``) — how much more
compute (counted block evaluations, wall time per batch) plain Euler sampling and the strongest
diffusers DPM-Solver++ need to reach ILF@N's FD to held-out images and paired MSE to the converged
teacher@40, for every feedback seed, beside the no-loop control and every loop placement tried
(``evaluation``, ``report``). ``latent``: the same on a diffusers latent DiT (facebook/DiT-XL-2-256:
``DiTTransformer2DModel`` + ``AutoencoderKL``, ε-prediction on DDPM's schedule).

Stages: teacher (shared with DMD2: ``athanor.parts.diffusion.teacher_stage``) -> classifier (FD features) ->
trajectories (cached, safetensors) -> ilf -> ilf-<variant> (no-loop control, other loops) -> evaluate
(curve, FD, the diffusers ``ILFPipeline``) -> report (report.json/md, PNG plots).

``config``: the typed config; ``method``: ILF's config section, the trajectories and the Method;
``feedback``: the feedback block and its hooks; ``samplers``: plain, DPM-Solver++, caching, ILF and
their timing; ``evaluation``: the curves; ``speedup``: cost at equal quality; ``latent``: DiT + VAE;
``diffusers_pipeline``: samplers on the ILF grid and ``ILFPipeline``; ``stages``: the stages and
``PAPER``; ``report``: the report.
"""
from .config import ILFRecipeConfig, variant_stage_name
from .diffusers_pipeline import ILFPipeline
from .evaluation import EvaluationConfig
from .feedback import FeedbackModule, attach_feedback
from .method import FeedbackDistillation, ILFConfig
from .stages import PAPER

__all__ = ["PAPER", "ILFRecipeConfig", "ILFConfig", "EvaluationConfig", "FeedbackDistillation", "FeedbackModule",
           "attach_feedback", "ILFPipeline", "variant_stage_name"]
