"""Quiet-STaR thoughts: ThoughtConfig, thought embeddings, mixing head, parallel rollout."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from quietstar_jax.model import ModelConfig, Params


def thought_param_shapes(cfg: ModelConfig) -> Params:
    """Shapes of the thought params (`params["thought"]`)."""
    h = cfg.hidden_size
    return {
        "start_emb": (h,),
        "end_emb": (h,),
        "mix": {"w0": (2 * h, h), "b0": (h,), "w1": (h, h), "b1": (h,), "w2": (h, 1)},
    }


def thought_logical_axes() -> Params:
    """Logical axis names of the thought params."""
    return {
        "start_emb": ("embed",),
        "end_emb": ("embed",),
        "mix": {"w0": ("mix_in", "embed"), "b0": ("embed",), "w1": ("mix_in", "embed"),
                "b1": ("embed",), "w2": ("embed", "mix_out")},
    }


def init_thought_params(
    params: Params,
    cfg: ModelConfig,
    rng: jax.Array,
    init_token_id: int,
    embedding_scale: float = 100.0,
) -> Params:
    """Fresh thought params, as the authors initialise them.

    start/end embeddings: the embedding row of `init_token_id` (the first token of
    "---"), stored divided by `embedding_scale`. Mixing head: torch-Linear default
    init (uniform +-1/sqrt(fan_in)) for the two hidden layers, zeros for the last,
    so the model starts as the base LM.
    """
    h = cfg.hidden_size
    dtype = jnp.dtype(cfg.param_dtype)
    row = params["embed"][init_token_id].astype(jnp.float32) / embedding_scale
    k0, k1, k2, k3 = jax.random.split(rng, 4)

    def uniform(key, shape, fan_in):
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return {
        "start_emb": row.astype(dtype),
        "end_emb": row.astype(dtype),
        "mix": {
            "w0": uniform(k0, (2 * h, h), 2 * h),
            "b0": uniform(k1, (h,), 2 * h),
            "w1": uniform(k2, (h, h), h),
            "b1": uniform(k3, (h,), h),
            "w2": jnp.zeros((h, 1), dtype),
        },
    }


def mixing_weight(mix: Params, base_h: jax.Array, thought_h: jax.Array) -> jax.Array:
    """The mixing head: `[..., hidden]` x2 -> scalar weight `[...]` (float32, no sigmoid)."""
    x = jnp.concatenate([base_h, thought_h], axis=-1).astype(jnp.float32)
    x = jax.nn.relu(x @ mix["w0"].astype(jnp.float32) + mix["b0"].astype(jnp.float32))
    x = jax.nn.relu(x @ mix["w1"].astype(jnp.float32) + mix["b1"].astype(jnp.float32))
    return (x @ mix["w2"].astype(jnp.float32))[..., 0]


_ = Any
