"""The trainer: `run(config, workdir)` (see `quietstar_jax.train.loop`)."""

from quietstar_jax.train.loop import SetupError, run

__all__ = ["SetupError", "run"]
