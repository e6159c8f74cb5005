"""The Quiet-STaR authors' checkpoint layout of the thought params.

The authors' released model keeps `start_embedding` and `end_embedding` as `[2, H]`
tensors (row 0 is the stored value, row 1 unused) and the mixing head as the torch
`nn.Sequential` `talk_head.0` (Linear 2H->H, ReLU, Linear H->H, ReLU, Linear H->1,
no last bias). They map to `params["thought"]` (`thought.ThoughtParams`):
`start_emb`, `end_emb` `[H]` and `mix` `w0 [2H, H]`, `b0`, `w1 [H, H]`, `b1`,
`w2 [H, 1]`. transformers ignores these tensors (with a warning) when it loads the
checkpoint as a plain causal LM.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from quietstar_jax.hf.spec import TensorSpec, same, transpose
from quietstar_jax.model import ModelConfig

# Thought params in the authors' layout (torch names).
AUTHORS_THOUGHT_KEYS = (
    "start_embedding",
    "end_embedding",
    "talk_head.0.0.weight",
    "talk_head.0.0.bias",
    "talk_head.0.2.weight",
    "talk_head.0.2.bias",
    "talk_head.0.4.weight",
)


def _emb_to_hf(v: np.ndarray) -> np.ndarray:
    """Our `[H]` embedding as the authors' `[2, H]` (row 1 zero)."""
    return np.stack([v, np.zeros_like(v)])


def _first_row(w: np.ndarray) -> np.ndarray:
    """The stored row of the authors' `[2, H]` embedding."""
    return w[0]


def thought_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """The authors' thought tensors of `cfg`, in `AUTHORS_THOUGHT_KEYS` order."""
    h = cfg.hidden_size
    return [
        TensorSpec("start_embedding", (2, h), ("thought", "start_emb"), None,
                   _first_row, _emb_to_hf),
        TensorSpec("end_embedding", (2, h), ("thought", "end_emb"), None, _first_row, _emb_to_hf),
        TensorSpec("talk_head.0.0.weight", (h, 2 * h), ("thought", "mix", "w0"), None,
                   transpose, transpose),
        TensorSpec("talk_head.0.0.bias", (h,), ("thought", "mix", "b0"), None, same, same),
        TensorSpec("talk_head.0.2.weight", (h, h), ("thought", "mix", "w1"), None,
                   transpose, transpose),
        TensorSpec("talk_head.0.2.bias", (h,), ("thought", "mix", "b1"), None, same, same),
        TensorSpec("talk_head.0.4.weight", (1, h), ("thought", "mix", "w2"), None,
                   transpose, transpose),
    ]


def has_thought_tensors(keys: Collection[str], source: str) -> bool:
    """Whether a checkpoint with tensor names `keys` holds the authors' thought tensors
    (all or none: some of them is a KeyError naming `source`)."""
    found = [k for k in AUTHORS_THOUGHT_KEYS if k in keys]
    if found and len(found) != len(AUTHORS_THOUGHT_KEYS):
        missing = [k for k in AUTHORS_THOUGHT_KEYS if k not in keys]
        raise KeyError(f"{source}: incomplete Quiet-STaR thought tensors: has {found} but "
                       f"lacks {missing}")
    return bool(found)
