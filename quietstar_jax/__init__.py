"""quietstar-jax: Quiet-STaR (language models that think before each token) in JAX/Flax.

The notebook API. Heavier entry points (Hugging Face I/O, generation,
evaluation) are imported lazily on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from quietstar_jax.model import CausalLM, ModelConfig, init_params, lm_logits
from quietstar_jax.thought import QuietStarLM, ThoughtConfig, init_thought_params, rollout
from quietstar_jax.thought.loss import quietstar_details, quietstar_loss

_LAZY = {
    "load_pretrained": "quietstar_jax.hf",
    "load_model": "quietstar_jax.hf",
    "save_pretrained": "quietstar_jax.hf",
    "load_tokenizer": "quietstar_jax.hf",
    "thought_token_ids": "quietstar_jax.hf",
    "generate": "quietstar_jax.generation.cached",
    "evaluate_gsm8k": "quietstar_jax.evaluation.tasks",
    "evaluate_csqa": "quietstar_jax.evaluation.tasks",
    "evaluate_perplexity": "quietstar_jax.evaluation.tasks",
    "evaluate_cot": "quietstar_jax.evaluation.tasks",
}

__all__ = [
    "CausalLM",
    "ModelConfig",
    "QuietStarLM",
    "ThoughtConfig",
    "init_params",
    "init_thought_params",
    "lm_logits",
    "quietstar_details",
    "quietstar_loss",
    "rollout",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quietstar_jax' has no attribute {name!r}")
