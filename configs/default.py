"""The self-contained demo: a tiny Llama learns arithmetic word problems with thoughts.

Needs no download and no file outside the repository: a byte-level tokenizer, a
2-layer Llama from random init, text generated from a seed. Finishes in about two
minutes on 2 CPU cores (compile included). The config lives in the package
(`quietstar_jax/train/demo_config.py`) so that an installed `quietstar-train` runs it
with no `--config`; this file names it for `--config configs/default.py`.
"""

from quietstar_jax.train.demo_config import get_config  # noqa: F401
