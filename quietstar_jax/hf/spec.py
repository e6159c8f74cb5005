"""`TensorSpec`: one checkpoint tensor, its torch name and where it lives in our params.

The decoder's names (`hf.layout`) and the authors' thought names (`hf.authors`) are
lists of these; reading (`hf.loading`) and writing (`hf.pretrained`) only walk them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: its torch name and shape, where it lives in params
    (`dest`, with `layer` the index on the stacked axis or None), and the two layout
    conversions (`to_ours(torch_array)`, `to_hf(our_slice)`)."""

    key: str
    hf_shape: tuple[int, ...]
    dest: tuple[str, ...]
    layer: int | None
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def same(x: np.ndarray) -> np.ndarray:
    """The identity conversion (norms, biases, the embedding)."""
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    """torch `[out, in]` <-> our `[in, out]`."""
    return x.T


def path_str(path: tuple[str, ...]) -> str:
    """`params['layers']['attn']['q']`: a param's path as error messages name it."""
    return "params" + "".join(f"[{k!r}]" for k in path)
