"""Codebook Features (Tamkin et al., ICML 2024): sparse, discrete, steerable transformer features."""
