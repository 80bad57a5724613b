"""O3 continual unlearning (Gao et al., "On Large Language Model Continual Unlearning", ICLR 2025):
orthogonal LoRA per request and the unlearning Methods (``method``), an OOD detector per request
(``detector``), gated inference (``model``), on QA data (``athanor.parts.fact_world``); ``config``
has ``O3Config``, ``stages`` the stages and ``PAPER``, ``evaluation`` the metrics, ``report`` the
report and the O3 folder; ``tune`` picks the detector's knobs on a dev world
(``python -m athanor.methods.o3.tune``)."""
from ...parts.fact_world import QA, DataConfig, QAData, load_data
from .config import AblationConfig, O3Config
from .detector import Detector, DetectorConfig, DetectorTraining
from .evaluation import EvalSets, world
from .method import GradientAscent, OrthogonalPenalty, UnlearnConfig, UnlearnRequest
from .model import O3Model
from .stages import PAPER

__all__ = ["PAPER", "O3Config", "AblationConfig", "Detector", "DetectorConfig", "DetectorTraining", "GradientAscent",
           "OrthogonalPenalty", "UnlearnConfig", "UnlearnRequest", "O3Model", "QA", "DataConfig", "QAData", "load_data",
           "EvalSets", "world"]
