"""Data: generated or package-shipped tiny sets, local files, ``datasets``; stateful streams."""
from .batches import ShuffledBatches, sharded_batches
from .sources import open_text_data
from .text import TextData, TextDataConfig, load_text_data

__all__ = ["ShuffledBatches", "sharded_batches", "TextData", "TextDataConfig", "load_text_data", "open_text_data"]
