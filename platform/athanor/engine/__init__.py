"""The loop's bookkeeping on accelerate; methods plug in through ``Method``."""
from .engine import PREEMPTED_EXIT_CODE, Engine, Method, process_state
from .metrics import read_metrics
from .schedule import build_optimizer, lr_multiplier, param_groups

__all__ = ["Engine", "Method", "PREEMPTED_EXIT_CODE", "read_metrics", "build_optimizer", "lr_multiplier", "param_groups",
           "process_state"]
