"""The trainer: `run(config, workdir)` (see `quietstar_jax.train.loop`).

`run`, `SetupError` and `ExportError` are imported on first use, so that config files, which
import `quietstar_jax.train.config`, load without orbax and the rest.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ExportError", "SetupError", "run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("quietstar_jax.train.loop"), name)
    raise AttributeError(f"module 'quietstar_jax.train' has no attribute {name!r}")
