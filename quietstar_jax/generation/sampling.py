"""How the real tokens are drawn in generation (greedy, temperature, top-p), and the
random key of each new token.

The key of new token t is `fold_in(rng, t)`; the real token is drawn with
`fold_in(key_t, 0)`. Thought tokens are drawn inside the thought of their position
(`thought.thought_of_position`, key `thought.position_key(key_t, s, index)`). The
cached generator and the recompute reference both draw through these functions, so
with the same rng they draw the same tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from quietstar_jax.thought import ThoughtConfig, mask_thought_logits
from quietstar_jax.vocab import sample_categorical

_NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the real (non-thought) tokens are drawn.

    greedy: argmax (temperature and top_p are then ignored).
    temperature: logits are divided by it (> 0).
    top_p: nucleus sampling; keep the smallest set of most likely tokens whose
      probability reaches top_p (1.0 keeps all).
    """

    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0 (use greedy=True)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """Keep the most likely tokens whose cumulative probability first reaches top_p.

    logits: `[..., vocab]` float32; the other entries become -1e30. The most likely
    token is always kept; ties at the threshold are kept.
    """
    if top_p >= 1.0:
        return logits
    desc = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
    keep = before < top_p
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, _NEG_INF)


def sample_token(key: jax.Array, logits: jax.Array, sc: SamplingConfig) -> jax.Array:
    """One token per row: logits `[B, vocab]` float32 -> int32 `[B]`."""
    if sc.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample_categorical(key, top_p_filter(logits / sc.temperature, sc.top_p))


def _token_key(rng: jax.Array, t: jax.Array | int) -> jax.Array:
    return jax.random.fold_in(rng, t)


def _mask_real_logits(logits: jax.Array, tc: ThoughtConfig | None) -> jax.Array:
    return logits if tc is None else mask_thought_logits(logits, tc)
