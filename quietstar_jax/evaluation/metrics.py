"""Evaluation metrics as pure numpy functions (no model, no data files).

* `answer_score`: the authors' direct-answer metric: the product over the scored
  answer tokens of the true token's probability renormalised over the valid answer
  tokens, and beside it exact match (every scored token is the argmax over the valid
  tokens).
* `extract_first_integer`, `majority_vote`: the chain-of-thought answer extraction
  and vote of the authors' `zero-shotcot-eval.py`.
* `nll_bins`: the thought's NLL improvement as a function of how hard each token is
  for the base model.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_NLL_EDGES = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, math.inf)


def renormalise(valid_logits: np.ndarray) -> np.ndarray:
    """Softmax over the valid tokens only: `[..., K]` logits -> `[..., K]` probabilities.

    Equal to the full-vocabulary softmax restricted to the K valid ids and divided by
    its sum there (the full normaliser cancels)."""
    z = np.asarray(valid_logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def answer_score(valid_logits: np.ndarray, targets: Sequence[int]) -> tuple[float, bool]:
    """One example: valid_logits `[T, K]` at the T scored positions, targets `[T]`
    (indices into the K valid tokens). Returns (product of renormalised true-token
    probabilities, whether every position's argmax is its target)."""
    t = np.asarray(targets, np.int64)
    if valid_logits.shape[0] != t.shape[0]:
        raise ValueError(f"{valid_logits.shape[0]} scored positions but {t.shape[0]} targets")
    p = renormalise(valid_logits)
    rows = np.arange(t.shape[0])
    score = float(np.prod(p[rows, t]))
    exact = bool(np.all(np.argmax(p, axis=-1) == t))
    return score, exact


def extract_first_integer(text: str) -> int | None:
    """First run of digits after removing commas (the authors' extraction: no sign)."""
    m = re.search(r"\d+", text.replace(",", ""))
    return int(m.group()) if m else None


def majority_vote(answers: Sequence[Any]) -> Any:
    """Most common answer; ties go to the one seen first (None counts as an answer)."""
    if not answers:
        raise ValueError("majority_vote of no answers")
    return collections.Counter(answers).most_common(1)[0][0]


def nll_bins(
    base_nll: np.ndarray,
    thought_nll: np.ndarray,
    edges: Sequence[float] = DEFAULT_NLL_EDGES,
) -> list[dict[str, float]]:
    """Bin tokens by base NLL (`edges[i] <= nll < edges[i + 1]`) and report per bin
    the token count and share, mean base NLL, mean thought-mixed NLL and mean
    improvement (base - thought; positive = the thought helps). Flat arrays `[n]`."""
    base = np.asarray(base_nll, np.float64).ravel()
    th = np.asarray(thought_nll, np.float64).ravel()
    if base.shape != th.shape:
        raise ValueError(f"base_nll {base.shape} and thought_nll {th.shape} differ in size")
    if list(edges) != sorted(edges) or len(edges) < 2:
        raise ValueError(f"bin edges must be increasing, got {list(edges)}")
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (base >= lo) & (base < hi)
        n = int(sel.sum())
        row = {"lo": float(lo), "hi": float(hi), "tokens": n,
               "share": n / max(base.size, 1)}
        if n:
            row |= {"base_nll": float(base[sel].mean()), "thought_nll": float(th[sel].mean()),
                    "improvement": float((base[sel] - th[sel]).mean())}
        else:
            row |= {"base_nll": math.nan, "thought_nll": math.nan, "improvement": math.nan}
        out.append(row)
    return out
