"""Sparse thoughts in training (adaptive thinking): only `ThoughtConfig.think_k`
positions per sequence think.

The positions are the think gate's top positions (`thought.ThinkGate`, when the
params hold `think_gate`) plus a random share `think_explore` (all random without a
gate) among the positions that can carry a reward, the same positions for every pass
of a sequence (so the baseline over passes is
defined). Their thoughts are `thought.thought_of_position` mapped over the gathered
positions only (`thought.map_thoughts`, as generation's `think_at`), with the dense
rollout's keys (`position_key(rng, s, row * seq + i)`); nothing of a thought runs at
the other positions, so the cost falls with `think_k`. A position without a thought
keeps the base prediction: its gain is 0; the talk NLL, the rewards and REINFORCE run
over the gathered positions only (`loss.sparse_objective`). With `think_k` = the
sequence length every position is gathered and the objective is the dense one.

The gate reads the base pass's final hidden (gradient stopped) and two statistics of
its logits (entropy, top-1 probability; `logit_stats`). Its label at a gathered
position is gain > `gate_cost`, gain being the position's reward (the talk steps' NLL
without the thought minus with it, summed), and its loss the margin-weighted
(|gain - gate_cost|) logistic loss, weighted by `gate_loss_weight` in the total.

Thought lengths (`ThoughtConfig.think_lengths`): the gate has one output per length and
training runs one group of `think_k` positions per length (`loss.sparse_objective`),
each with its own positions (its gate output's top ones), keys (`length_keys`) and
labels (gain > `ThoughtConfig.thought_cost` of its length); `choose_length` is the
use-time rule.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from quietstar_jax import model
from quietstar_jax.thought import (
    PositionInputs,
    QuietStarLM,
    RowContext,
    ThoughtConfig,
    map_thoughts,
    reinforce_logps,
    replayed_hidden,
)
from quietstar_jax.thought.schedule import ThoughtSchedule

SELECT_SALT = 0x5E1EC7  # folded into the step's key for the random positions
LENGTH_SALT = 0x1E7C7  # folded (plus the length's index) into the key of a length's thoughts
_NEG = -1e30


def length_keys(rng: jax.Array, group: int) -> tuple[jax.Array, jax.Array]:
    """(selection key, thought key) of length group `group` (index into
    `ThoughtConfig.lengths`) of a step with key `rng`: group 0 has the keys of one
    length, `fold_in(rng, SELECT_SALT)` and `rng` itself; group g > 0 `fold_in` of
    those with g and with `LENGTH_SALT + g`."""
    select = jax.random.fold_in(rng, SELECT_SALT)
    if group == 0:
        return select, rng
    return jax.random.fold_in(select, group), jax.random.fold_in(rng, LENGTH_SALT + group)


def choose_length(logits: jax.Array, threshold: float = 0.0) -> jax.Array:
    """The thought length a multi-length think gate chooses at use time: logits `[...,
    n_lengths]` (`lm.think_gate`, column l: a thought of `think_lengths[l]` sampled
    tokens pays its cost) -> int32 `[...]`, an index into `(none, *think_lengths)`.

    Rule: 0 (no thought) when every column is at or below `threshold`; else 1 + the
    column with the largest logit (the length most confidently worth its cost; ties go
    to the shorter length)."""
    logits = jnp.asarray(logits)
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"choose_length: logits must be [..., n_lengths], got shape "
                         f"{tuple(logits.shape)}")
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jnp.where(jnp.max(logits, axis=-1) > threshold, best + 1, 0).astype(jnp.int32)


def logit_stats(lm: model.CausalLM, h: jax.Array) -> jax.Array:
    """Entropy and top-1 probability of the plain LM `lm`'s softmax at hidden `h` `[...,
    hidden]` -> float32 `[..., 2]`, no gradient; one walk over the vocabulary a chunk
    of `cfg.vocab_chunk` columns at a time (online max / sum / weighted sum), so no
    `[..., vocab]` logits exist."""
    cfg = lm.cfg
    h = jax.lax.stop_gradient(h)
    w = jax.lax.stop_gradient(lm.output_matrix())  # [H, V]
    hid, v = w.shape
    c = max(1, min(cfg.vocab_chunk, v))
    n_chunks = -(-v // c)
    w = jnp.pad(w, ((0, 0), (0, n_chunks * c - v))).astype(cfg.compute_dtype)
    hf = h.reshape(-1, hid).astype(cfg.compute_dtype)
    n = hf.shape[0]

    def body(carry, i):
        m, s, t = carry
        wc = jax.lax.dynamic_slice(w, (0, i * c), (hid, c))
        z = jnp.dot(hf, wc, preferred_element_type=jnp.float32)
        z = jnp.where((i * c + jnp.arange(c)) < v, z, _NEG)
        m_new = jnp.maximum(m, z.max(-1))
        scale = jnp.exp(m - m_new)
        e = jnp.exp(z - m_new[:, None])
        return (m_new, s * scale + e.sum(-1), t * scale + (e * z).sum(-1)), None

    init = (jnp.full((n,), _NEG, jnp.float32), jnp.zeros((n,), jnp.float32),
            jnp.zeros((n,), jnp.float32))
    (m, s, t), _ = jax.lax.scan(body, init, jnp.arange(n_chunks))
    entropy = jnp.log(s) - t / s + m  # lse - E[z]
    top1 = 1.0 / s  # exp(max - lse)
    return jnp.stack([entropy, top1], -1).reshape(h.shape[:-1] + (2,))


def stats_from_logits(logits: jax.Array) -> jax.Array:
    """`logit_stats` from logits already at hand `[..., vocab]` (generation's base
    logits) -> float32 `[..., 2]`: entropy and top-1 probability."""
    z = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(z, axis=-1)
    p = jnp.exp(z - lse[..., None])
    entropy = lse - jnp.sum(p * z, axis=-1)
    return jnp.stack([entropy, jnp.exp(z.max(-1) - lse)], -1)


def select_positions(
    tc: ThoughtConfig,
    valid: jax.Array,
    score: jax.Array | None,
    key: jax.Array,
) -> jax.Array:
    """The `tc.think_k` positions of each row that think, int32 `[rows, k]` ascending.

    valid: `[rows, seq]` bool, the candidates (the others are chosen only when a row
    has fewer candidates than k; `sparse_objective` passes the non-padding positions
    that can carry a reward); score: the gate's logits `[rows, seq]` (None: no gate, all
    random). `round(think_explore * k)` positions are drawn uniformly at random
    without replacement from those the gate did not take; the rest are the gate's top
    positions (ties broken at random).
    """
    rows, seq = valid.shape
    k = tc.think_k
    n_rand = k if score is None else int(round(tc.think_explore * k))
    n_gate = k - n_rand
    k_tie, k_rand = jax.random.split(key)
    parts, taken = [], jnp.zeros((rows, seq), bool)
    if n_gate:
        tie = jax.random.uniform(k_tie, (rows, seq))
        s = jax.lax.stop_gradient(score).astype(jnp.float32)
        # order: valid positions by score, ties at random; padding last
        s = jnp.where(valid, s + 1e-6 * tie, _NEG + tie)
        _, top = jax.lax.top_k(s, n_gate)
        parts.append(top)
        taken = jnp.zeros((rows, seq), bool).at[jnp.arange(rows)[:, None], top].set(True)
    if n_rand:
        r = jax.random.uniform(k_rand, (rows, seq))
        r = jnp.where(valid, r, r - 2.0)  # valid positions first
        r = jnp.where(taken, -10.0, r)
        _, rnd = jax.lax.top_k(r, n_rand)
        parts.append(rnd)
    idx = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    return jnp.sort(idx, axis=1).astype(jnp.int32)


class SparseThoughts(NamedTuple):
    """The thoughts of the gathered positions `positions` `[rows, K]`: per step hidden
    `step_hidden` (list, `[rows, K, hidden]`, index s - 1), the tokens fed `fed`
    `[S, rows, K]`, the sampled thought tokens `thought_tokens` `[T, rows, K]` and their
    REINFORCE log-probs `thought_logp` `[T, rows, K]` (`[0, rows, K]` for pause), and,
    when the backward pass is replayed, the differentiable base hidden `base_hidden`
    `[rows, seq, hidden]` (None otherwise: the caller's base pass is differentiated)."""

    positions: jax.Array
    step_hidden: list[jax.Array]
    fed: jax.Array
    thought_tokens: jax.Array
    thought_logp: jax.Array
    base_hidden: jax.Array | None = None


def take(a: jax.Array, idx: jax.Array) -> jax.Array:
    """`a[r, idx[r, j], ...]`: a `[rows, seq, ...]`, idx `[rows, K]` -> `[rows, K, ...]`."""
    return jax.vmap(lambda ar, ir: ar[ir])(a, idx)


def sparse_thoughts(
    lm: QuietStarLM,
    tc: ThoughtConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    positions: jax.Array,
    kv0: model.KV,
    idx: jax.Array,
    rng: jax.Array | None,
    thought_tokens: jax.Array | None = None,
    base_trace: model.LayerTrace | None = None,
) -> SparseThoughts:
    """The thoughts (and talk steps) of the gathered positions `idx` `[rows, K]` only:
    `thought.thought_of_position` vmapped over them (`map_thoughts`), each reading
    its row's base keys/values `kv0` and drawing its tokens with the key the dense
    rollout gives position (row, i): `position_key(rng, s, row * seq + i)`.
    thought_tokens: optional full-size `[T, rows, seq]`; the gathered ones are fed.
    base_trace: the trace of a base pass run without gradient (`lm.forward(...,
    trace=True)`): the thoughts then run without gradient too, and the backward pass
    replays each layer once over the base sequence and all gathered steps together
    (`thought.replayed_hidden`, as the dense rollout does with remat "full"): one
    weight-gradient pass instead of one per decoder call."""
    rows, seq = input_ids.shape
    valid = attention_mask.astype(bool)
    given = None
    if tc.sampling == "pause" and thought_tokens is None:
        given = jnp.full((rows, idx.shape[1], tc.num_sampled), tc.pause_token_id, jnp.int32)
    elif thought_tokens is not None:
        given = take(jnp.moveaxis(thought_tokens, 0, -1), idx)  # [rows, K, T]
    sch = ThoughtSchedule.of(tc, None, given=given is not None)
    ar = jnp.arange(seq)
    x = PositionInputs(
        pos=take(positions, idx), at=idx, index=idx + seq * jnp.arange(rows)[:, None],
        ctx_ok=(ar[None, None, :] <= idx[:, :, None]) & valid[:, None, :],
        own_ok=take(valid, idx), given=given)
    replay = base_trace is not None and sch.num_steps > 0
    run_lm = model.stop_gradient(lm) if replay else lm
    with jax.named_scope("sparse_thoughts"):
        mapped = map_thoughts(run_lm, tc, sch, RowContext(kv0, positions, input_ids), x, rng,
                              trace=replay)
    step_hidden, fed, draws = mapped.step_hidden, mapped.fed, mapped.draws
    base_hidden = None
    if replay:
        base_hidden, step_hidden = replayed_hidden(lm, tc, sch, input_ids, attention_mask,
                                                   positions, base_trace, mapped, x)
    logp = reinforce_logps(lm, tc, sch, step_hidden, fed, draws)
    empty = jnp.zeros((0,) + idx.shape, jnp.int32)
    toks = [fed[s - 1] for s in sch.sampled_steps]
    return SparseThoughts(
        positions=idx, step_hidden=list(step_hidden), fed=fed,
        thought_tokens=jnp.stack(toks) if toks else empty,
        thought_logp=jnp.stack(logp) if logp else empty.astype(jnp.float32),
        base_hidden=base_hidden)


def gate_loss_of(logit: jax.Array, gain: jax.Array, ok: jax.Array, cost: float
                 ) -> tuple[jax.Array, jax.Array]:
    """The gate's margin-weighted logistic loss at labelled positions `ok`: label gain >
    cost, weight |gain - cost| (both without gradient). Returns (loss, labels)."""
    gain = jax.lax.stop_gradient(gain)
    label = gain > cost
    margin = jnp.abs(gain - cost)
    bce = jax.nn.softplus(jnp.where(label, -logit, logit))
    m = ok.astype(jnp.float32)
    return jnp.sum(margin * bce * m) / jnp.maximum(jnp.sum(m), 1.0), label
