"""ILF: inner-loop feedback for diffusion transformers."""
