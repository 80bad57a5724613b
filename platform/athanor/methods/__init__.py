"""One package per paper, each with the same role files: ``config`` (its typed config), ``method``
(its Method(s), the algorithm testable alone, formulas cited), ``stages`` (its declared stages and
``PAPER``), ``report`` (its report), plus modules of its own algorithm. No paper imports another:
what two papers share is in ``athanor.parts``."""
from .. import models as _models  # noqa: F401  registers athanor's architectures with the Auto classes
