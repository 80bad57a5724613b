"""O3 continual unlearning (Gao et al., "On Large Language Model Continual Unlearning", ICLR 2025):
orthogonal LoRA per request (``lora``), an OOD detector per request (``detector``), gated
inference (``model``), on QA data (``world``); ``pipeline`` has the stages and ``O3Config``, ``paper``
lists the stages for the runner and writes the report (``PAPER``); ``tune`` picks the detector's
knobs on a dev world (``python -m athanor.methods.o3.tune``)."""
from .detector import Detector, DetectorConfig, DetectorTraining
from .lora import GradientAscent, OrthogonalPenalty, UnlearnConfig, UnlearnRequest
from .model import O3Model
from .paper import PAPER
from .pipeline import AblationConfig, O3Config
from ...parts.fact_world import QA, DataConfig, QAData, load_data

__all__ = ["PAPER", "O3Config", "AblationConfig", "Detector", "DetectorConfig", "DetectorTraining", "GradientAscent",
           "OrthogonalPenalty", "UnlearnConfig", "UnlearnRequest", "O3Model", "QA", "DataConfig", "QAData", "load_data"]
