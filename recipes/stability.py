"""Small-scale proxies for Transformer training instabilities (Wortsman et al. 2023): LR sweeps
(athanor.methods.stability).

Every grid point (variant × width × depth × LR) is an ordinary pretrain run (athanor.methods.pretrain,
the run of recipes/pretrain.py) with its own folder under ``run.output_dir``; the points run in parallel
worker processes, and a killed sweep run again skips the finished points. Then: LR sensitivity, optimal
LR and probe scaling per variant, a long-run log Z demonstration, report.json/md and plots.

    python recipes/stability.py                                 # CPU default: 107 runs, ~13.5 min of CPU time on 2 cores
    python recipes/stability.py --sweep.variants [baseline,qk_layernorm,mup] --sweep.widths [64,128]
    python recipes/stability.py --config recipes/configs/stability/gpu.yaml
    python recipes/stability.py --sweep.executor slurm          # the points as one SLURM job array
"""
from athanor.methods import stability
from athanor.runner import run

if __name__ == "__main__":
    run(stability.PAPER)
