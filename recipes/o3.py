"""O3 continual LLM unlearning: an orthogonal LoRA per request + an OOD detector that gates it
(athanor.methods.o3).

    accelerate launch recipes/o3.py       # tiny default: fictitious facts, 3 requests, CPU, < 10 min
    accelerate launch --config_file launch/zero3.yaml recipes/o3.py --config recipes/configs/o3/llama2-7b-tofu.yaml

Stages (each resumable; a finished one is skipped when the recipe runs again):
base LM -> for each request: LoRA, detector, evaluation -> ablations -> report and the O3 folder (OUTPUT/o3).
"""
from athanor.methods import o3
from athanor.runner import run

if __name__ == "__main__":
    run(o3.PAPER)
