"""Reproducible experiments built on quietstar_jax (run them from the repository root)."""
