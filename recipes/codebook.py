"""Codebook Features (athanor.methods.codebook): codebook bottlenecks in a transformer, the codes
as state features of a finite-state machine (TokFSM), and steering by forcing codes.

    python recipes/codebook.py                                   # tiny TokFSM default (CPU, minutes)
    python recipes/codebook.py --codebook.sites [attn]           # one codebook on the whole attention output
    python recipes/codebook.py --config recipes/configs/codebook/text.yaml --model.name_or_path FOLDER_OR_HUB_ID

Stages: baseline, codebook, codebook_no_replace, analysis; OUTPUT/report.md, OUTPUT/*.png and
OUTPUT/model (load with CodebookModel.from_pretrained to keep the codebooks).
"""
from athanor.methods import codebook
from athanor.runner import run

if __name__ == "__main__":
    run(codebook.PAPER)
