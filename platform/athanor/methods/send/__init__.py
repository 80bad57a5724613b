"""SeND: sensitive-neuron dropout, with exact and efficient EigenScore."""
