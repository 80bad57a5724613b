"""The loop's bookkeeping on accelerate; methods plug in through ``Method``."""
from .api import Parallelism, Update, launch_parallelism, process_state
from .engine import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, Engine, Method
from .guard import NONFINITE_EXIT_CODE, NonFiniteStop
from .metrics import read_metrics
from .schedule import build_optimizer, lr_multiplier, param_groups

__all__ = ["Engine", "Method", "PREEMPTED_EXIT_CODE", "INTERRUPTED_EXIT_CODE", "NONFINITE_EXIT_CODE", "NonFiniteStop",
           "read_metrics", "build_optimizer", "lr_multiplier", "param_groups",
           "process_state", "Parallelism", "Update", "launch_parallelism"]
