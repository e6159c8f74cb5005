"""Model-side scoring for evaluation: base and thinking predictions of whole prompts.

docs/ALGORITHM.md, section 11 (Evaluation with thoughts): `n_ahead_talk = 1`,
`n_passes = 1`; the thinking prediction
at position i is the mixed logits after the end token (n_ahead - 1 thought steps:
start, sampled tokens, end), the base prediction the step-0 logits (the model with
no thought). Perplexity needs every position: one `thought.rollout` (all positions
think in parallel). Direct answering needs only the few answer positions: one causal
forward, then thoughts only there (`generation.cached.think_at`, the same computation as the
rollout's at those positions). Prompts are right-padded into batches bucketed by
length, one compiled program per bucket shape. The jitted functions (`answer_logits`,
`token_nlls`) are pure functions of the params: each merges the module once
(`thought.merge_lm`) and the helpers below take that module `lm`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from quietstar_jax import model
from quietstar_jax.generation.cached import think_at
from quietstar_jax.model import CausalLM, ModelConfig, Params
from quietstar_jax.thought import QuietStarLM, ThoughtConfig, merge_lm, mix_step, run_rollout
from quietstar_jax.thought.loss import hidden_nll
from quietstar_jax.thought.schedule import ThoughtSchedule


def eval_thought_config(tc: ThoughtConfig) -> ThoughtConfig:
    """The evaluation setting of a training ThoughtConfig: n_ahead_talk = n_passes = 1."""
    return tc.replace(n_ahead_talk=1, n_passes=1)


def thinking_hidden(
    lm: QuietStarLM,
    tc: ThoughtConfig,
    ids: jax.Array,
    mask: jax.Array,
    rng: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(base hidden, mixed hidden after the end token, mixing weight) of every position.

    ids, mask: `[B, L]`. Returns `[B, L, hidden]`, `[B, L, hidden]`, `[B, L]`; position i
    predicts ids[i + 1] from both hiddens."""
    sch = ThoughtSchedule.of(tc, talk=False)  # the thought, up to its end token
    ro = run_rollout(lm, tc, ids, mask, rng, num_steps=sch.num_steps)
    mixed, w = mix_step(lm.thought, tc, ro.base_hidden, ro.step_hidden[-1], sch.end_step)
    return ro.base_hidden, mixed, w


def _subset_logits(lm: CausalLM, h: jax.Array, ids: jax.Array) -> jax.Array:
    """Logits of the token ids `[K]` only: `[..., hidden]` -> float32 `[..., K]`."""
    dt = lm.cfg.compute_dtype
    w = jnp.take(lm.output_matrix(), ids, axis=1).astype(dt)
    return model.dense(h.astype(dt), w, preferred_element_type=jnp.float32)


def thinking_at_positions(
    lm: QuietStarLM,
    tc: ThoughtConfig,
    ids: jax.Array,
    mask: jax.Array,
    rng: jax.Array | None,
    q_index: jax.Array,
    q_ok: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Base and mixed hidden states at Q chosen positions only.

    One causal forward over ids/mask `[B, L]`, then thoughts only at the positions
    `q_index` `[B, Q]` (q_ok `[B, Q]` False marks padding entries): position i's
    thought sees the base keys j <= i and its own tokens, so this equals the
    corresponding positions of the full parallel rollout at a fraction of the cost.
    Returns (base hidden `[B, Q, hidden]`, mixed hidden `[B, Q, hidden]`, w `[B, Q]`).
    """
    positions = model.default_positions(mask)
    h0, kv0 = lm.forward(ids, mask, positions)
    hq = jnp.take_along_axis(h0, q_index[:, :, None], axis=1)
    q_pos = jnp.take_along_axis(positions, q_index, axis=1)
    causal = jnp.arange(ids.shape[1])[None, None, :] <= q_index[:, :, None]
    ctx_ok = causal & mask.astype(bool)[:, None, :] & q_ok[:, :, None]
    mixed, _, w = think_at(lm, tc, kv0, ctx_ok, positions, hq, q_pos, rng)
    return hq, mixed, w


@functools.partial(jax.jit, static_argnames=("cfg", "tc"))
def answer_logits(
    params: Params,
    ids: jax.Array,
    mask: jax.Array,
    rng: jax.Array | None,
    valid_ids: jax.Array,
    q_index: jax.Array,
    q_ok: jax.Array,
    *,
    cfg: ModelConfig,
    tc: ThoughtConfig | None,
) -> tuple[jax.Array, jax.Array | None]:
    """Logits of the valid answer tokens `[K]` at the positions q_index `[B, Q]`:
    (base `[B, Q, K]`, thinking `[B, Q, K]` or None when tc is None)."""
    lm = merge_lm(params, cfg)
    if tc is None:
        h, _ = lm.forward(ids, mask)
        hq = jnp.take_along_axis(h, q_index[:, :, None], axis=1)
        return _subset_logits(lm, hq, valid_ids), None
    base, mixed, _ = thinking_at_positions(lm, tc, ids, mask, rng, q_index, q_ok)
    return _subset_logits(lm, base, valid_ids), _subset_logits(lm, mixed, valid_ids)


@functools.partial(jax.jit, static_argnames=("cfg", "tc"))
def token_nlls(
    params: Params,
    ids: jax.Array,
    mask: jax.Array,
    rng: jax.Array | None,
    *,
    cfg: ModelConfig,
    tc: ThoughtConfig | None,
) -> tuple[jax.Array, jax.Array | None]:
    """Per-token NLL of ids[:, 1:] (nats): (base `[B, L - 1]`, thinking `[B, L - 1]` or
    None when tc is None)."""
    targets = ids[:, 1:]
    lm = merge_lm(params, cfg)
    if tc is None:
        h, _ = lm.forward(ids, mask)
        return hidden_nll(lm, h[:, :-1], targets), None
    base, mixed, _ = thinking_hidden(lm, tc, ids, mask, rng)
    return hidden_nll(lm, base[:, :-1], targets), hidden_nll(lm, mixed[:, :-1], targets)


def length_batches(
    lengths: Sequence[int], batch_tokens: int, multiple: int = 64
) -> Iterator[tuple[np.ndarray, int, int]]:
    """Group examples by padded length: yields (example indices, width, rows).

    width is the length rounded up to `multiple`; rows = batch_tokens // width (at
    least 1, at most the number of examples of that width) is fixed per width (the
    last batch of a width is padded up to it by the caller), so each width compiles
    once.
    """
    if batch_tokens < 1 or multiple < 1:
        raise ValueError(f"batch_tokens={batch_tokens} and multiple={multiple} must be >= 1")
    lengths = np.asarray(lengths)
    widths = -(-lengths // multiple) * multiple
    for width in np.unique(widths):
        idx = np.flatnonzero(widths == width)
        rows = max(1, min(batch_tokens // int(width), len(idx)))
        for k in range(0, len(idx), rows):
            yield idx[k:k + rows], int(width), rows


def right_pad(
    seqs: Sequence[Sequence[int]], width: int, rows: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """`[rows, width]` ids (pad_id) and mask; rows beyond len(seqs) are all padding."""
    ids = np.full((rows, width), pad_id, np.int32)
    mask = np.zeros((rows, width), np.int32)
    for r, s in enumerate(seqs):
        if len(s) > width:
            raise ValueError(f"sequence of {len(s)} tokens does not fit width {width}")
        ids[r, :len(s)] = s
        mask[r, :len(s)] = 1
    return ids, mask
