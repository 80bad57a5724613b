"""The template paper (athanor.methods.template): a linear model fitted, saved, reloaded, evaluated.

    python recipes/template.py                      # seconds on a CPU
    python recipes/template.py --optim.lr 0.1 --data.features 16
"""
from athanor.methods import template
from athanor.runner import run

if __name__ == "__main__":
    run(template.PAPER)
