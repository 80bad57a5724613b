"""One module per paper: the algorithm, testable alone, its formulas cited in the docstring."""
