"""Cached generation with thoughts (docs/ALGORITHM.md, section 12: Generation with thoughts).

For each new token the model thinks at the last position (start-of-thought,
`n_ahead - 3` sampled thought tokens, end-of-thought), mixes the end step's hidden
state with the last base hidden state (the mixing head), samples the next real token
from the mixed logits with the two thought ids masked out, appends it and discards
the thought. A thought never changes any real token's keys/values, so the real
tokens live in a key/value cache:

* prefill: one causal `lm.forward` over the left-padded prompts `[B, P]`, whose
  KV fill slots `0..P-1` of a fixed buffer `[layers, B, P + N, kv_heads, head_dim]`
  (with a validity mask `[B, P + N]` and the position id of every slot);
* per new token t: `think_at`, the thought of the last position (`n_ahead - 1`
  steps): the rollout's function of one position (`thought.thought_of_position`,
  vmapped over the rows by `thought.map_thoughts`) seeing the cache as its row's
  context and the thought's earlier tokens as own keys; then one call for the sampled
  real token (context = cache, own = itself), whose KV is written into slot `P + t`.
  The loop is a `jax.lax.while_loop` under `jax.jit`.

`generation.reference.generate_recompute` is the reference the authors' code
implements: for every new token it runs the whole parallel rollout
(`thought.rollout`, every position thinks) over the whole current sequence and reads
the last position's mixed logits.

`generate` is a pure function of the params: its jitted loop (`_generate_cached`) merges
the module once (`thought.merge_lm`) and everything inside (`think_at`, `_append_token`,
the gate) takes that module `lm`.

Random keys (`generation.sampling`): the key of new token t is `fold_in(rng, t)`;
thought token s of row b (the token fed on thought step s, 2 <= s <= n_ahead - 2) is
drawn with `thought.position_key(key_t, s, b)` (`fold_in(fold_in(key_t, s), b)`), and the real
token with `fold_in(key_t, 0)`. Both generators consume keys this way, so with the
same rng they draw the same tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from quietstar_jax import model
from quietstar_jax.generation.sampling import (
    SamplingConfig,
    _mask_real_logits,
    _token_key,
    sample_token,
)
from quietstar_jax.model import KV, CausalLM, ModelConfig, Params
from quietstar_jax.protocols import Tokenizer
from quietstar_jax.thought import (
    GatedQuietStarLM,
    PositionInputs,
    QuietStarLM,
    RowContext,
    ThoughtConfig,
    gate_outputs,
    map_thoughts,
    merge_lm,
    mix_step,
)
from quietstar_jax.thought import pad_id as thought_pad_id
from quietstar_jax.thought.schedule import ThoughtSchedule, window_visible
from quietstar_jax.thought.sparse import choose_length, stats_from_logits


class Generation(NamedTuple):
    """Output of `generate` / `generate_recompute` for B prompts and N new tokens.

    tokens: int32 `[B, N]`, the new tokens; after a row's first eos (kept) every
      token is `pad_id`.
    lengths: int32 `[B]`, new tokens up to and including the first eos.
    thoughts: int32 `[B, N, n_ahead - 3]` (with a gate of several lengths `[B, N,
      max(tc.lengths)]`, zero past each thought's length), the sampled thought tokens
      before each new token (None without thinking or unless asked for).
    mixing_weights: float32 `[B, N]`, the mixing head's weight w of each new token
      (None without thinking or unless asked for).
    thought_mask: bool `[B, N]`, whether a thought preceded each new token (with a
      think gate, `gate_threshold` or `gate_rate`; None otherwise).
    think_rate: float32 `[]`, the fraction of the live new tokens (those up to and
      including each row's first eos) before which a thought ran: 1 when thinking
      everywhere (also `generate_recompute`), 0 without thinking (`think_stats`).
    thought_tokens_per_token: float32 `[]`, thought tokens fed per live new token (a
      thought feeds its start, sampled tokens and end: `n_ahead - 1` with one length,
      each one model step); 0 without thinking.
    gate_thresholds: float32 `[N]`, the gate threshold in force before each new token
      (constant with `gate_threshold`, the running one with `gate_rate`; None without
      a gate).
    thought_lengths: int32 `[B, N]`, the sampled tokens of the thought before each new
      token (0: none; a gate of several lengths chooses one per token; None without
      thinking).
    """

    tokens: jax.Array
    lengths: jax.Array
    thoughts: jax.Array | None
    mixing_weights: jax.Array | None
    thought_mask: jax.Array | None = None
    think_rate: jax.Array | None = None
    thought_tokens_per_token: jax.Array | None = None
    gate_thresholds: jax.Array | None = None
    thought_lengths: jax.Array | None = None


def think_stats(
    thought_mask: jax.Array, lengths: jax.Array, sampled: jax.Array | int
) -> tuple[jax.Array, jax.Array]:
    """(think rate, thought tokens per new token), float32 scalars, over the live new
    tokens: token t of row b is live when t < lengths[b].

    thought_mask: bool `[B, N]`, a thought before new token (b, t); lengths: int `[B]`;
    sampled: int `[B, N]` (or one int for all): the sampled tokens of each thought; a
    thought feeds `sampled + 2` tokens (start, the sampled ones, end). A call with no
    live token has rate 0.
    """
    live = jnp.arange(thought_mask.shape[1])[None, :] < lengths[:, None]
    n_live = jnp.maximum(jnp.sum(live), 1)
    thinking = thought_mask & live
    rate = (jnp.sum(thinking) / n_live).astype(jnp.float32)
    fed = thought_tokens_fed(thinking, sampled)
    return rate, (jnp.sum(fed) / n_live).astype(jnp.float32)


def thought_tokens_fed(thought_mask: Any, sampled: Any) -> jax.Array:
    """Model steps each new token's thought fed `[...]`: its start, `sampled` tokens
    and end where `thought_mask` (bool `[...]`), else 0."""
    return jnp.where(jnp.asarray(thought_mask), jnp.asarray(sampled) + 2, 0)


# --------------------------------------------------------------------------- inputs


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token-id lists to one length (rounded up to `multiple`).

    Returns (ids int32 `[B, P]`, mask int32 `[B, P]`, 1 on real tokens).
    """
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    lens = [len(p) for p in prompts]
    if min(lens) == 0:
        raise ValueError(f"prompt {lens.index(0)} is empty: every prompt needs at least one token")
    width = -(-max(lens) // multiple) * multiple
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = np.asarray(p, np.int32)
        mask[b, width - len(p):] = 1
    return ids, mask


def _check_args(
    cfg: ModelConfig,
    tc: ThoughtConfig | None,
    think: bool,
    ids: np.ndarray,
    max_new_tokens: int,
) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size}), got "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    if think:
        if tc is None:
            raise ValueError("thinking generation needs a ThoughtConfig (or think=False)")
        tc.check_token_ids(cfg.vocab_size)


def _check_length(cfg: ModelConfig, prompt_len: int, max_new_tokens: int,
                  n_ahead: int | None = None) -> None:
    """The longest prompt and the new tokens must fit the model's positions, and so
    must the thoughts (`n_ahead`, when thinking): the thought before the last new
    token follows position `prompt_len + max_new_tokens - 2` by `n_ahead - 1` steps."""
    total = prompt_len + max_new_tokens
    limit = cfg.max_position_embeddings
    if total > limit:
        raise ValueError(f"a prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} = "
                         f"{total} positions exceeds the model's max_position_embeddings="
                         f"{limit}; shorten the prompt or generate fewer tokens")
    if n_ahead is None:
        return
    last = total - 2  # the position whose thought picks the last new token
    if last + n_ahead - 1 >= limit:
        raise ValueError(f"n_ahead={n_ahead}: a thought runs n_ahead - 1 = {n_ahead - 1} "
                         f"positions past its token, so after a prompt of {prompt_len} tokens "
                         f"+ max_new_tokens={max_new_tokens} it reaches position "
                         f"{last + n_ahead - 1}, past the model's max_position_embeddings="
                         f"{limit}; use n_ahead <= {limit - last}, a shorter prompt or fewer "
                         "new tokens")


def _finish(
    toks: jax.Array, eos_id: int | None, pad_id: int
) -> tuple[jax.Array, jax.Array]:
    """Replace everything after a row's first eos by pad; lengths up to that eos."""
    n = toks.shape[1]
    if eos_id is None:
        return toks, jnp.full((toks.shape[0],), n, jnp.int32)
    is_eos = toks == eos_id
    after = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0  # strictly after the first eos
    lengths = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, n)
    return jnp.where(after, pad_id, toks), lengths.astype(jnp.int32)


# --------------------------------------------------------------------------- cached


def think_at(
    lm: QuietStarLM,
    tc: ThoughtConfig,
    ctx_kv: KV,
    ctx_ok: jax.Array,
    ctx_pos: jax.Array,
    h_base: jax.Array,
    q_pos: jax.Array,
    key: jax.Array | None,
    rows: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Think at Q chosen positions per row (with the merged module `lm`) and return their
    mixed hidden states.

    ctx_kv: base KV `[layers, B, C, kv_heads, head_dim]` the thoughts may attend to
    (the real tokens); ctx_ok `[B, Q, C]` bool: which of them each query position sees
    (causal, valid; all False for a dummy query); ctx_pos `[B, C]` their position ids;
    h_base `[B, Q, hidden]` the base hidden states of the chosen positions; q_pos
    `[B, Q]` their position ids. This is `thought.thought_of_position` (the rollout's
    thought of one position) vmapped over the B x Q chosen positions
    (`thought.map_thoughts`) with the schedule up to the end token: thought step s
    (1 .. n_ahead - 1) is fed at position q_pos + s and sees the visible context (and
    the sliding window) plus its own earlier steps, exactly as position i of
    `thought.rollout`. Thought token s of chosen position (b, j) is drawn with key
    `thought.position_key(key, s, rows[b] * Q + j)`; rows `[B]` int: which rows of the
    whole batch these are (default 0 .. B - 1), so a subset of rows draws the thoughts
    it would draw in the whole batch.
    Returns (mixed hidden `[B, Q, hidden]`, thought tokens `[B, Q, n_ahead - 3]`,
    mixing weight `[B, Q]`).
    """
    b, q = q_pos.shape
    sch = ThoughtSchedule.of(tc, talk=False)  # start, n_ahead - 3 sampled tokens, end
    if rows is None:
        rows = jnp.arange(b)
    index = rows[:, None] * q + jnp.arange(q)[None, :]
    x = PositionInputs(pos=q_pos, at=None, index=index,
                       ctx_ok=ctx_ok, own_ok=jnp.any(ctx_ok, axis=-1), given=None)
    # A dummy query (ctx_ok all False) sees nothing, not even its own keys.
    out = map_thoughts(lm, tc, sch, RowContext(ctx_kv, ctx_pos, None), x, key)
    sampled = [out.fed[s - 1] for s in sch.sampled_steps]
    toks = jnp.stack(sampled, -1) if sampled else jnp.zeros((b, q, 0), jnp.int32)
    mixed, w = mix_step(lm.thought, tc, h_base, out.step_hidden[sch.end_step - 1], sch.end_step)
    return mixed, toks, w


def _append_token(
    lm: CausalLM,
    cache: KV,
    cache_valid: jax.Array,
    cache_pos: jax.Array,
    tok: jax.Array,
    pos: jax.Array,
    slot: jax.Array,
) -> tuple[jax.Array, KV, jax.Array, jax.Array]:
    """Run real token `tok` `[B]` at position `pos` `[B]` against the cache and write its
    KV into `slot`. Returns (its hidden `[B, hidden]`, cache, cache_valid, cache_pos)."""
    ctx_mask = cache_valid & window_visible(pos[:, None], cache_pos, lm.cfg.sliding_window)
    emb = lm.embed_tokens(tok[:, None])
    h, kv = lm.decoder(emb, pos[:, None], ctx=(cache, ctx_mask[:, None, :]))
    zero = jnp.zeros((), jnp.int32)
    start = (zero, zero, slot, zero, zero)
    cache = KV(
        jax.lax.dynamic_update_slice(cache.k, kv.k.astype(cache.k.dtype), start),
        jax.lax.dynamic_update_slice(cache.v, kv.v.astype(cache.v.dtype), start),
    )
    cache_valid = jax.lax.dynamic_update_slice(
        cache_valid, jnp.ones((tok.shape[0], 1), bool), (zero, slot))
    cache_pos = jax.lax.dynamic_update_slice(cache_pos, pos[:, None], (zero, slot))
    return h[:, 0], cache, cache_valid, cache_pos


GATE_RATE_STEP = 0.25  # default integral gain of the running threshold (`generate(gate_rate=)`)
GATE_RATE_MEMORY = 0.1  # weight of each new token in the running mean / variance of the logits
GATE_RATE_PROMPT_SLOTS = 64  # the last prompt slots whose gate logits start those estimates
GATE_RATE_MIN_SCALE = 1e-3  # floor of the running standard deviation (a constant gate)


def gate_logits_of(lm: GatedQuietStarLM, h: jax.Array) -> jax.Array:
    """The think gate's deciding logit `[...]` (float32) at base hidden states `h`
    `[..., hidden]`: `lm.think_gate` on `h` and its base logits' statistics
    (`sparse.stats_from_logits`); for a gate of several lengths the largest of its
    outputs (the one `sparse.choose_length` compares to the threshold)."""
    return _gate_logits_per_length(lm, h, lm.logits(h)).max(-1)


def _gate_logits_per_length(lm: GatedQuietStarLM, h: jax.Array, base: jax.Array) -> jax.Array:
    """The think gate's logits `[..., lengths]` (one per thought length, also for a
    one-output gate) at hidden `h` `[..., hidden]` whose base logits are `base`."""
    logits = lm.think_gate(h, stats_from_logits(base))
    return logits.reshape(*h.shape[:-1], -1)


class RateControl(NamedTuple):
    """State of the running threshold of `generate(gate_rate=r)` (float32 scalars): a
    running mean `mean` and variance `var` of the gate logits and an integral term
    `offset` (in standard deviations). The threshold is
    `mean + max(sqrt(var), GATE_RATE_MIN_SCALE) * (z + offset)` with z the standard
    normal's `1 - r` quantile (clipped to [-10, 10]): the `1 - r` quantile of the
    logits if they were normal, the offset correcting for their real shape."""

    mean: jax.Array
    var: jax.Array
    offset: jax.Array

    @staticmethod
    def start(logits: jax.Array, valid: jax.Array) -> RateControl:
        """From the gate logits `[B, W]` at the valid `[B, W]` prompt slots (all rows
        together): their mean and variance, offset 0."""
        x = logits.astype(jnp.float32)
        n = jnp.maximum(jnp.sum(valid), 1)
        mean = jnp.sum(jnp.where(valid, x, 0.0)) / n
        var = jnp.sum(jnp.where(valid, (x - mean) ** 2, 0.0)) / n
        return RateControl(mean, var, jnp.zeros((), jnp.float32))

    def threshold(self, rate: jax.Array) -> jax.Array:
        z = jnp.clip(jax.scipy.special.ndtri(1.0 - rate), -10.0, 10.0)
        scale = jnp.maximum(jnp.sqrt(self.var), GATE_RATE_MIN_SCALE)
        return (self.mean + scale * (z + self.offset)).astype(jnp.float32)

    def update(self, logits: jax.Array, fire: jax.Array, live: jax.Array, rate: jax.Array,
               step: jax.Array) -> RateControl:
        """After a token: logits `[B]` of the gate, fire `[B]`, live `[B]` (rows not yet
        done). offset += step * (fired share of the live rows - rate); mean and var move
        towards the live rows' logits with weight `GATE_RATE_MEMORY`. Summed over the
        steps the offset updates telescope: the share of thinking tokens (step means
        over live rows) differs from `rate` by (last offset - 0) / (step * steps)."""
        n = jnp.maximum(jnp.sum(live), 1)
        share = jnp.sum(fire & live) / n
        x = logits.astype(jnp.float32)
        a = GATE_RATE_MEMORY
        d_mean = jnp.sum(jnp.where(live, x - self.mean, 0.0)) / n
        d_var = jnp.sum(jnp.where(live, (x - self.mean) ** 2, 0.0)) / n
        return RateControl((self.mean + a * d_mean).astype(jnp.float32),
                           ((1 - a) * self.var + a * d_var).astype(jnp.float32),
                           (self.offset + step * (share - rate)).astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("cfg", "tc", "sc", "max_new_tokens", "think",
                                             "eos_id", "pad_id", "gate_mode"))
def _generate_cached(
    params: Params,
    ids: jax.Array,
    mask: jax.Array,
    rng: jax.Array,
    gate_value: jax.Array | None = None,
    gate_step: jax.Array | None = None,
    *,
    cfg: ModelConfig,
    tc: ThoughtConfig | None,
    sc: SamplingConfig,
    max_new_tokens: int,
    think: bool,
    eos_id: int | None,
    pad_id: int,
    gate_mode: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """gate_mode None: think before every token (with `think`); "threshold": think where
    the gate logit > gate_value; "rate": where it exceeds a running threshold that
    holds the fraction of thinking live rows at gate_value (`RateControl`).
    Returns (tokens, thoughts `[B, N, width]`, sampled tokens of each thought `[B, N]`
    (0: none), mixing weights, fired `[B, N]`, thresholds `[N]`); width is the longest
    length of `tc.lengths` with a gate, else `tc.num_sampled`. Merges the module of
    `params` once (`merge_lm`)."""
    lm = merge_lm(params, cfg)
    b, p = ids.shape
    n = max_new_tokens
    gated = think and gate_mode is not None
    n_thought = (max(tc.lengths) if gated else tc.num_sampled) if think else 0
    positions = model.default_positions(mask)
    h, kv = lm.forward(ids, mask, positions)
    pad_kv = [(0, 0), (0, 0), (0, n), (0, 0), (0, 0)]
    cache = KV(jnp.pad(kv.k, pad_kv), jnp.pad(kv.v, pad_kv))
    cache_valid = jnp.concatenate([mask.astype(bool), jnp.zeros((b, n), bool)], axis=1)
    cache_pos = jnp.concatenate([positions, jnp.zeros((b, n), positions.dtype)], axis=1)
    out_tok = jnp.full((b, n), pad_id, jnp.int32)
    out_thought = jnp.zeros((b, n, n_thought), jnp.int32)
    out_len = jnp.full((b, n), n_thought if think and not gated else 0, jnp.int32)
    out_w = jnp.zeros((b, n), jnp.float32)
    out_fire = jnp.full((b, n), think and not gated)
    out_thr = jnp.zeros((n,), jnp.float32)
    done = jnp.zeros((b,), bool)
    if gated and gate_mode == "rate":
        w = min(p, GATE_RATE_PROMPT_SLOTS)
        ctl = RateControl.start(gate_logits_of(lm, h[:, p - w:]),
                                mask[:, p - w:].astype(bool))
    else:  # a fixed threshold: the control's mean, never updated
        zero = jnp.zeros((), jnp.float32)
        ctl = RateControl(jnp.asarray(gate_value if gated else 0.0, jnp.float32), zero, zero)

    def cond(state):
        t, *_, done = state
        return (t < n) & ~jnp.all(done)

    def body(state):
        (t, cache, valid, cpos, h_last, pos_last, out_tok, out_thought, out_len, out_w,
         out_fire, ctl, out_thr, done) = state
        key = _token_key(rng, t)
        if gated:
            thr = ctl.threshold(gate_value) if gate_mode == "rate" else ctl.mean
            logits, thought, n_sampled, w, fire, gate = _gated_thought(
                lm, tc, cache, valid, cpos, h_last, pos_last, key, thr)
            out_thought = out_thought.at[:, t].set(thought)
            out_len = out_len.at[:, t].set(n_sampled)
            out_w = out_w.at[:, t].set(w)
            out_fire = out_fire.at[:, t].set(fire)
            out_thr = out_thr.at[t].set(thr)
            if gate_mode == "rate":
                ctl = ctl.update(gate, fire, ~done, gate_value, gate_step)
        elif think:
            mixed, thought, w = think_at(lm, tc, cache, valid[:, None, :], cpos,
                                         h_last[:, None, :], pos_last[:, None], key)
            logits = lm.logits(mixed[:, 0])
            out_thought = out_thought.at[:, t].set(thought[:, 0])
            out_w = out_w.at[:, t].set(w[:, 0])
        else:
            logits = lm.logits(h_last)
        tok = sample_token(jax.random.fold_in(key, 0), _mask_real_logits(logits, tc), sc)
        out_tok = out_tok.at[:, t].set(tok)
        if eos_id is not None:
            done = done | (tok == eos_id)
        pos_new = pos_last + 1
        h_new, cache, valid, cpos = _append_token(lm, cache, valid, cpos, tok, pos_new, p + t)
        return (t + 1, cache, valid, cpos, h_new, pos_new, out_tok, out_thought, out_len,
                out_w, out_fire, ctl, out_thr, done)

    state = (jnp.zeros((), jnp.int32), cache, cache_valid, cache_pos, h[:, -1], positions[:, -1],
             out_tok, out_thought, out_len, out_w, out_fire, ctl, out_thr, done)
    state = jax.lax.while_loop(cond, body, state)
    return state[6], state[7], state[8], state[9], state[10], state[12]


def thinking_row_buckets(batch: int) -> tuple[int, ...]:
    """The numbers of rows a gated generation step can think for: 0, the powers of two
    below `batch`, and `batch`. A step thinks for the smallest one that holds every row
    that fires, so its thought costs at most twice the firing rows' own."""
    sizes, m = [0], 1
    while m < batch:
        sizes.append(m)
        m *= 2
    return (*sizes, batch)


def _gated_thought(
    lm: GatedQuietStarLM,
    tc: ThoughtConfig,
    cache: KV,
    valid: jax.Array,
    cpos: jax.Array,
    h_last: jax.Array,
    pos_last: jax.Array,
    key: jax.Array,
    threshold: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """One step of gated thinking: the think gate (`lm.think_gate`) on the last
    hidden `[B, hidden]` and its base logits' statistics gives one logit per thought
    length of `tc.lengths` (a one-output gate: the one length). A row fires when its
    highest logit exceeds `threshold` and thinks (`think_at`) with the length of that
    logit (`sparse.choose_length`), taking the mixed logits; the others take the base
    logits. Only the firing rows think: per length, its rows are gathered (with their
    cache rows) into the smallest of `thinking_row_buckets(B)` that holds them
    (`lax.switch`; no row: no thought), each drawing the thought it would draw in the
    whole batch at that length.
    Returns (logits `[B, vocab]`, thought tokens `[B, max(tc.lengths)]` (0 where none
    and past the row's length), sampled tokens of the row's thought `[B]` (0: none),
    mixing weight `[B]`, fired `[B]`, the deciding gate logit `[B]`)."""
    b = h_last.shape[0]
    lengths = tc.lengths
    width = max(lengths)
    base = lm.logits(h_last)
    gates = _gate_logits_per_length(lm, h_last, base)  # [B, lengths]
    gate = jnp.max(gates, axis=-1)
    chosen = choose_length(gates, threshold)  # 0: no thought, else 1 + length index
    fire = chosen > 0
    logits, thought = base, jnp.zeros((b, width), jnp.int32)
    w, n_sampled = jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.int32)
    for li, length in enumerate(lengths):
        rows_l = chosen == li + 1
        lg, th, wl = _think_firing_rows(lm, tc.of_length(length), cache, valid, cpos, h_last,
                                        pos_last, key, rows_l, base)
        logits = jnp.where(rows_l[:, None], lg, logits)
        thought = jnp.where(rows_l[:, None], jnp.pad(th, ((0, 0), (0, width - length))),
                            thought)
        w = jnp.where(rows_l, wl, w)
        n_sampled = jnp.where(rows_l, length, n_sampled)
    return logits, thought, n_sampled, w, fire, gate


def _think_firing_rows(
    lm: QuietStarLM,
    tc: ThoughtConfig,
    cache: KV,
    valid: jax.Array,
    cpos: jax.Array,
    h_last: jax.Array,
    pos_last: jax.Array,
    key: jax.Array,
    fire: jax.Array,
    base: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The thoughts (one length, `tc`) of the rows where `fire` `[B]`: gathered into the
    smallest bucket of `thinking_row_buckets(B)` that holds them. Returns (logits
    `[B, vocab]`, thought tokens `[B, tc.num_sampled]`, mixing weight `[B]`), the base
    logits and zeros in the other rows."""
    b = h_last.shape[0]
    no_thought = jnp.zeros((b, tc.num_sampled), jnp.int32)
    firing_first = jnp.argsort(~fire, stable=True)  # firing rows first, in row order
    sizes = thinking_row_buckets(b)

    def think_rows(m: int):
        def run(_):
            if m == 0:
                return base, no_thought, jnp.zeros((b,), jnp.float32)
            rows = firing_first[:m]
            kv = KV(cache.k[:, rows], cache.v[:, rows])
            mixed, thought, w = think_at(lm, tc, kv, valid[rows][:, None, :], cpos[rows],
                                         h_last[rows][:, None, :], pos_last[rows][:, None], key,
                                         rows)
            logits = lm.logits(mixed[:, 0])
            return (base.at[rows].set(logits), no_thought.at[rows].set(thought[:, 0]),
                    jnp.zeros((b,), jnp.float32).at[rows].set(w[:, 0]))
        return run

    bucket = jnp.searchsorted(jnp.asarray(sizes), jnp.sum(fire))  # smallest size >= fired
    return jax.lax.switch(bucket, [think_rows(m) for m in sizes], None)


class Request(NamedTuple):
    """A generation request in the form both generators run: config, left-padded ids
    and mask `[B, P]`, the thought config to use, sampling, ids and rng."""

    cfg: ModelConfig
    tc: ThoughtConfig | None
    sc: SamplingConfig
    ids: jax.Array
    mask: jax.Array
    rng: jax.Array | None
    eos_id: int | None
    pad_id: int


def prepare_request(
    cfg: ModelConfig,
    tc: ThoughtConfig | None,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    rng: jax.Array | None,
    think: bool,
    greedy: bool,
    temperature: float,
    top_p: float,
    eos_token_id: int | None,
    pad_token_id: int | None,
    pad_to_multiple: int,
) -> Request:
    """Check the arguments of `generate` / `generate_recompute` and left-pad the prompts.

    The prompt pass uses the package's masked attention (`attention="xla"`): the fused
    kernel handles right padding only.
    """
    cfg = cfg.replace(attention="xla")
    sc = SamplingConfig(greedy=greedy, temperature=temperature, top_p=top_p)
    eos_id = cfg.eos_token_id if eos_token_id == -1 else eos_token_id
    pad_id = thought_pad_id(pad_token_id, None if tc is None else tc.pad_token_id, eos_id)
    ids, mask = left_pad(prompts, pad_id, pad_to_multiple)
    _check_args(cfg, tc, think, ids, max_new_tokens)
    longest = None if not think or tc is None else max(tc.n_ahead, max(tc.lengths) + 3)
    _check_length(cfg, max(len(p) for p in prompts), max_new_tokens, longest)
    rng = _need_rng(rng, sc, tc, think)
    run_tc = tc if (think or tc is None) else _mask_only(tc)
    return Request(cfg, run_tc, sc, jnp.asarray(ids), jnp.asarray(mask), rng, eos_id, pad_id)


def generate(
    params: Params,
    cfg: ModelConfig,
    tc: ThoughtConfig | None,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    rng: jax.Array | None = None,
    think: bool = True,
    greedy: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | None = -1,
    pad_token_id: int | None = None,
    return_thoughts: bool = False,
    pad_to_multiple: int = 16,
    gate_threshold: float | None = None,
    gate_rate: float | None = None,
    gate_rate_step: float = GATE_RATE_STEP,
) -> Generation:
    """Cached generation, with thoughts (`think=True`) or as the plain base LM.

    prompts: B token-id lists of any lengths >= 1 (left-padded here to a multiple of
      `pad_to_multiple`, so that nearby lengths share one compiled program).
    rng: key of all sampling (thoughts and real tokens); required unless everything is
      greedy (`greedy=True` and, when thinking, `tc.sampling == "greedy"`).
    greedy / temperature / top_p: how real tokens are drawn (see `SamplingConfig`);
      thought tokens follow `tc.sampling` and `tc.thought_temperature`.
    eos_token_id: stop a row after it (default -1: cfg.eos_token_id; None: never stop).
    pad_token_id: fills the prompt padding and the tokens after eos (default
      tc.pad_token_id, else eos, else 0).
    gate_threshold: with thinking, think only before the tokens where the think gate
      (`params["think_gate"]`, trained with sparse thoughts) gives a logit above this
      (sparse training's labels: a thought pays more than `gate_cost`); the others use
      the base prediction. None (default): think before every token.
    gate_rate: instead of a fixed threshold, a target share r in [0, 1] of thinking
      tokens, held by a running threshold shared by the rows (`RateControl`): running
      mean m and variance v of the gate logits (started on the prompts' last
      `GATE_RATE_PROMPT_SLOTS` tokens, then each new token's live rows with weight
      `GATE_RATE_MEMORY`) give threshold m + sqrt(v) * (z_r + offset), z_r the normal
      `1 - r` quantile; after each token offset += gate_rate_step * (share of the live
      rows that thought - r) (an integral controller), so the realised share over the
      call differs from r by exactly (last offset) / (gate_rate_step * steps).
    gate_rate_step: the offset's gain, in standard deviations of the logits (> 0).
    With a gate, only the rows whose gate fires think (`_gated_thought`: gathered
    into the smallest of `thinking_row_buckets(B)` that holds them); the others take
    the base prediction. A gate of several outputs (trained with
    `ThoughtConfig.think_lengths`; `tc.lengths` must match them) fires on its largest
    logit and thinks with that output's length (`sparse.choose_length`); the running
    threshold follows the largest logit.
    Returns a `Generation` (thoughts and mixing weights only with return_thoughts;
    `thought_mask` and `gate_thresholds` with a gate; `think_rate` and
    `thought_tokens_per_token` always).
    """
    if gate_threshold is not None and gate_rate is not None:
        raise ValueError(f"gate_threshold={gate_threshold} and gate_rate={gate_rate}: give "
                         "one of them (a fixed threshold, or a target rate that a running "
                         "threshold holds), not both")
    if gate_rate is not None and not 0.0 <= gate_rate <= 1.0:
        raise ValueError(f"gate_rate={gate_rate}: must be a share of tokens in [0, 1]")
    if gate_rate is not None and not gate_rate_step > 0:
        raise ValueError(f"gate_rate_step={gate_rate_step}: must be > 0")
    if gate_threshold is not None and np.isnan(gate_threshold):
        raise ValueError(f"gate_threshold={gate_threshold}: must be a number, not NaN")
    gate_mode = ("threshold" if gate_threshold is not None
                 else "rate" if gate_rate is not None else None)
    if gate_mode is not None and think and "think_gate" not in params:
        raise ValueError(f"gate_{gate_mode} needs a think gate: params have no 'think_gate' "
                         "(train with ThoughtConfig.think_k and gate_loss_weight > 0)")
    if (gate_mode is not None and think and tc is not None
            and gate_outputs(params["think_gate"]) != len(tc.lengths)):
        raise ValueError(
            f"gate_{gate_mode}: the think gate scores {gate_outputs(params['think_gate'])} "
            f"thought length(s) but the ThoughtConfig has {len(tc.lengths)} ({tc.lengths}): "
            "pass the config the gate was trained with (ThoughtConfig.think_lengths)")
    r = prepare_request(cfg, tc, prompts, max_new_tokens=max_new_tokens, rng=rng,
                        think=think, greedy=greedy, temperature=temperature, top_p=top_p,
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                        pad_to_multiple=pad_to_multiple)
    gated = think and gate_mode is not None
    value = (gate_threshold if gate_mode == "threshold" else gate_rate) if gated else None
    toks, thoughts, n_sampled, w, fired, thresholds = _generate_cached(
        params, r.ids, r.mask, r.rng,
        None if value is None else jnp.asarray(value, jnp.float32),
        jnp.asarray(gate_rate_step, jnp.float32) if gated else None,
        cfg=r.cfg, tc=r.tc, sc=r.sc, max_new_tokens=max_new_tokens, think=think,
        eos_id=r.eos_id, pad_id=r.pad_id, gate_mode=gate_mode if gated else None)
    toks, lengths = _finish(toks, r.eos_id, r.pad_id)
    rate, per_token = think_stats(fired, lengths, n_sampled)
    keep = think and return_thoughts
    return Generation(toks, lengths, thoughts if keep else None, w if keep else None,
                      fired if gated else None, rate, per_token,
                      thresholds if gated else None, n_sampled if think else None)


def _mask_only(tc: ThoughtConfig) -> ThoughtConfig | None:
    """Without thinking only the thought ids matter (to mask them); None if unset."""
    if tc.start_token_id is None or tc.end_token_id is None:
        return None
    return tc


def _need_rng(
    rng: jax.Array | None, sc: SamplingConfig, tc: ThoughtConfig | None, think: bool
) -> jax.Array:
    deterministic = sc.greedy and (not think or tc.sampling == "greedy" or tc.num_sampled == 0)
    if rng is None:
        if not deterministic:
            raise ValueError("sampling needs an rng (pass rng=jax.random.key(seed), or use "
                             "greedy=True and ThoughtConfig(sampling='greedy'))")
        rng = jax.random.key(0)
    return rng


# --------------------------------------------------------------------------- text


def generate_text(
    params: Params,
    cfg: ModelConfig,
    tc: ThoughtConfig | None,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """`generate` on strings: each text is encoded with the tokenizer's special tokens
    (BOS); returns per text {"prompt", "completion", "tokens", when thinking
    "thought_before" (per new token, whether a thought preceded it: all True without a
    gate) and "thought_lengths" (per new token, its thought's sampled tokens, 0: none),
    and with return_thoughts=True "thoughts": one decoded thought string per new token
    (empty: none), "thought_ids" (their token ids), "mixing_weights"}."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    gen = generate(params, cfg, tc, prompts, **kwargs)
    toks = np.asarray(gen.tokens)
    lengths = np.asarray(gen.lengths)
    out = []
    for i, text in enumerate(texts):
        new = toks[i, : lengths[i]].tolist()
        # decode with the prompt so that a leading space of the completion survives
        before = tokenizer.decode(prompts[i], skip_special_tokens=True)
        full = tokenizer.decode(list(prompts[i]) + new, skip_special_tokens=True)
        completion = (full[len(before):] if full.startswith(before)
                      else tokenizer.decode(new, skip_special_tokens=True))
        item: dict[str, Any] = {"prompt": text, "tokens": new, "completion": completion}
        if kwargs.get("think", True):
            item["thought_before"] = (np.asarray(gen.thought_mask)[i, : lengths[i]].tolist()
                                      if gen.thought_mask is not None else [True] * len(new))
        if gen.thought_lengths is not None:
            item["thought_lengths"] = np.asarray(gen.thought_lengths)[i, : lengths[i]].tolist()
        if gen.thoughts is not None:
            th = np.asarray(gen.thoughts)[i, : lengths[i]]
            ids = [row[:n].tolist() for row, n in zip(th, item["thought_lengths"], strict=True)]
            item["thoughts"] = [tokenizer.decode(t) for t in ids]
            item["thought_ids"] = ids
            item["mixing_weights"] = np.asarray(gen.mixing_weights)[i, : lengths[i]].tolist()
        out.append(item)
    return out
