"""One module per paper: the algorithm, testable alone, its formulas cited in the docstring."""
from .. import models as _models  # noqa: F401  registers athanor's architectures with the Auto classes
