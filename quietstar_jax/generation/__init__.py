"""Generation with thoughts.

* `cached`: the generator (a key/value cache of the real tokens; each new token is
  preceded by a thought at the last position): `generate` (token ids), `generate_text`.
* `sampling`: how real and thought tokens are drawn, and their random keys.
* `reference`: the recompute-everything reference (`generate_recompute`).
* `cli` / `python -m quietstar_jax.generation`: the command line.
"""

from quietstar_jax.generation.cached import Generation, generate, generate_text
from quietstar_jax.generation.sampling import SamplingConfig

__all__ = ["Generation", "SamplingConfig", "generate", "generate_text"]
