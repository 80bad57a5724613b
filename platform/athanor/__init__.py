"""Athanor: research training recipes on one engine, from one CPU to a GPU cluster.

Kept import-light so that ``athanor status`` / ``athanor cancel`` answer in well under a second:
the model architectures register with transformers' Auto classes when ``athanor.models`` (or
``athanor.methods``, which every recipe imports) is imported.
"""
__version__ = "0.1.0"
