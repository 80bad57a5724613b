"""Athanor: research training recipes on one engine, from one CPU to a GPU cluster."""
__version__ = "0.1.0"

from . import models as _models  # noqa: F401,E402  registers the architectures with transformers' Auto classes
