"""The parallel rollout of Quiet-STaR's thoughts: one position's thought
(`thought_of_position`), mapped over positions and rows with `jax.vmap` (`map_thoughts`),
the rollout of a batch (`rollout`) and the mixed prediction (`mixed_hidden`).

`rollout` and `mixed_hidden` are pure functions of the params; `rollout` merges the
module once (`params.merge_lm`) and runs `run_rollout` on it, and everything below takes
that module `lm` (a `QuietStarLM`; `lm.cfg` its ModelConfig) and calls its methods."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from quietstar_jax import model, vocab
from quietstar_jax.axes import constrain
from quietstar_jax.model import KV, CausalLM, ModelConfig, Params, window_visible
from quietstar_jax.thought.config import ThoughtConfig
from quietstar_jax.thought.params import QuietStarLM, ThoughtParams, merge_lm, thought_module
from quietstar_jax.thought.replay import JointGeometry, replay_layers
from quietstar_jax.thought.schedule import END, SAMPLED, START, ThoughtSchedule

THOUGHT_LOGIT_MASK = -1e10


def mask_thought_logits(logits: jax.Array, tc: ThoughtConfig) -> jax.Array:
    """Give the two thought ids (and `tc.masked_token_ids`) logit -1e10: never sampled.
    `[..., vocab]`."""
    for i in tc.sampled_masked_ids:
        logits = logits.at[..., i].set(THOUGHT_LOGIT_MASK)
    return logits


def given_token_logp(lm: CausalLM, tc: ThoughtConfig, h: jax.Array, tok: jax.Array
                     ) -> jax.Array:
    """REINFORCE log-prob of thought token `tok` `[...]` drawn from the plain LM logits
    of hidden `h` `[..., hidden]`: `log softmax(r / reinforce_temperature)[tok]` with the
    thought ids masked, float32 `[...]` (fused: no `[..., vocab]` logits kept)."""
    cfg = lm.cfg
    return vocab.logp_from_hidden(
        h, lm.vocab_table(), tok, temperature=tc.reinforce_temperature,
        masked_ids=tc.sampled_masked_ids, chunk_size=cfg.vocab_chunk, dtype=cfg.dtype)


class Rollout(NamedTuple):
    """Everything the losses, generation and analysis read from one rollout.

    rows = batch * n_passes (or the batch given); S = tc.num_steps; T = tc.num_sampled.
    base_hidden: `[rows, seq, hidden]` final hidden of the base step (h0).
    base_kv: the base step's KV `[layers, rows, seq, kv_heads, head_dim]`.
    step_hidden: `[S, rows, seq, hidden]`, h_s for s = 1..S (index s - 1).
    thought_tokens: `[T, rows, seq]` int, the tokens fed on steps 2..n_ahead-2.
    thought_logp: `[T, rows, seq]` float32, log softmax(r / reinforce_temperature) of
      each fed thought token under the logits it was drawn from (with gradient);
      `[0, rows, seq]` for pause thoughts (nothing to reinforce).
    fed_tokens: `[S, rows, seq]` int, the token id fed on every step (start/end ids
      for the learned embeddings), for analysis.
    """

    base_hidden: jax.Array
    base_kv: KV
    step_hidden: jax.Array
    thought_tokens: jax.Array
    thought_logp: jax.Array
    fed_tokens: jax.Array


def position_key(rng: jax.Array | None, s: Any, index: Any) -> jax.Array | None:
    """The key of the thought token drawn on step `s` by the position with flat index
    `index` among those thinking together (`row * positions + position`):
    `fold_in(fold_in(rng, s), index)`; None (greedy) when rng is None."""
    if rng is None:
        return None
    return jax.random.fold_in(jax.random.fold_in(rng, s), index)


def draw_thought(
    lm: CausalLM,
    tc: ThoughtConfig,
    h: jax.Array,
    key: jax.Array | None,
    one_chunk: bool,
) -> vocab.Draw:
    """One position's next thought token from its previous step's hidden `h` `[...,
    hidden]` (e.g. `[1, 1, hidden]`, mapped over positions by `jax.vmap`): the plain LM
    logits with the thought ids masked, a sample at `tc.thought_temperature` (or the
    argmax, `tc.sampling == "greedy"`), with the statistics of its REINFORCE log-prob
    (`vocab.draw`: a chunked vocabulary pass, no logits kept, mapped). `one_chunk`: walk
    the vocabulary in one step, which the caller decides for all the positions it maps
    (`vocab.fits_one_chunk`)."""
    greedy, cfg = tc.sampling == "greedy", lm.cfg
    return vocab.draw(h, lm.vocab_table(), None if greedy else key,
                      sample_temperature=tc.thought_temperature, greedy=greedy,
                      logp_temperature=tc.reinforce_temperature,
                      masked_ids=tc.sampled_masked_ids, chunk_size=cfg.vocab_chunk,
                      dtype=cfg.dtype, one_chunk=one_chunk, mapped=True)


def step_embedding(
    lm: QuietStarLM, tc: ThoughtConfig, sch: ThoughtSchedule, s: int, tok: jax.Array
) -> jax.Array:
    """The input embedding of step `s` fed token(s) `tok` `[...]` -> `[..., hidden]` in
    compute dtype: the learned start/end embedding, else the token's table row."""
    kind = sch.kind(s)
    if kind in (START, END):
        emb = lm.thought.embedding("start_emb" if kind == START else "end_emb",
                                   tc.embedding_scale)
        emb = jnp.broadcast_to(emb, tok.shape + emb.shape)
    else:
        emb = lm.embed_tokens(tok)
    return emb.astype(lm.cfg.compute_dtype)


class RowContext(NamedTuple):
    """What the thoughts of one row read from it: its base keys/values `kv` (`[layers,
    C, kv_heads, head_dim]` per row), their position ids `pos` `[C]`, and its token ids
    `ids` `[C]` (the teacher-forced talk tokens; None without talk steps)."""

    kv: KV
    pos: jax.Array
    ids: jax.Array | None


class PositionInputs(NamedTuple):
    """One thinking position: position id `pos` `[]`, index `at` `[]` in its row (its
    talk tokens are `ids[at + talk_shift]`), flat index `index` `[]` (its keys), which
    context keys it sees `ctx_ok` `[C]` (causal, padding; the window is applied per
    step), whether it sees its own keys `own_ok` `[]` (False for padding), and the
    thought tokens to feed `given` `[n_ahead - 3]` (None: drawn)."""

    pos: jax.Array
    at: jax.Array | None
    index: jax.Array
    ctx_ok: jax.Array
    own_ok: jax.Array
    given: jax.Array | None


class PositionThought(NamedTuple):
    """One position's thought: the final hidden of each decoder call (`[1, t,
    hidden]`: t = 1 for a sequential step, the block's size for the block), the token fed
    on every step `fed` `[1, steps]`, the draws of its sampled tokens (`vocab.Draw` of
    `[1, drawn]`, None when none is drawn), and with `trace` each call's `LayerTrace`."""

    hidden: tuple[jax.Array, ...]
    fed: jax.Array
    draws: vocab.Draw | None
    traces: tuple[model.LayerTrace, ...]


def thought_of_position(
    lm: QuietStarLM,
    tc: ThoughtConfig,
    sch: ThoughtSchedule,
    row: RowContext,
    x: PositionInputs,
    rng: jax.Array | None,
    *,
    one_chunk: bool,
    trace: bool = False,
) -> PositionThought:
    """The thought of ONE position: every step of `sch`, its start token, sampled tokens
    (drawn here, `draw_thought` with `position_key`), end token and teacher-forced talk
    tokens; its queries read the base keys/values of its row (`row.kv` with a unit
    batch axis, `[layers, 1, C, kv_heads, head_dim]`; mask: `x.ctx_ok` and the sliding
    window at its step's position id) and its own earlier keys.

    The steps before the last sampled token run one `lm.position_decoder` call each
    (a drawn token needs the step before it); the rest (`sch.block_steps`) have known
    inputs and run as one call of `t = len(block)` queries, causal among themselves.
    `thought.map_thoughts` maps it over positions and rows with `jax.vmap`; `one_chunk`
    (the draws' vocabulary walk, `draw_thought`) is decided there for all of them.
    """
    window = lm.cfg.sliding_window
    fed: list[jax.Array] = []
    draws: list[vocab.Draw] = []
    hidden: list[jax.Array] = []
    traces: list[model.LayerTrace] = []

    def token(s: int, prev_h: jax.Array | None) -> jax.Array:  # [1, 1] int32
        kind = sch.kind(s)
        if kind == START:
            return jnp.full((1, 1), tc.start_token_id, jnp.int32)
        if kind == END:
            return jnp.full((1, 1), tc.end_token_id, jnp.int32)
        if kind == SAMPLED:
            if x.given is not None:
                return x.given[sch.sampled_index(s)].astype(jnp.int32).reshape(1, 1)
            with jax.named_scope("sampling"):
                d = draw_thought(lm, tc, prev_h, position_key(rng, s, x.index), one_chunk)
            draws.append(d)
            return d.tok
        j = x.at + sch.talk_shift(s)  # teacher forcing: x[i + shift], pad past the end
        n = row.ids.shape[-1]
        tok = jnp.where(j < n, row.ids[jnp.minimum(j, n - 1)], tc.pad_token_id)
        return tok.astype(jnp.int32).reshape(1, 1)

    def ctx_mask(s: int) -> jax.Array:  # [C]
        if window is None:
            return x.ctx_ok
        return x.ctx_ok & window_visible(x.pos + sch.position_offset(s), row.pos, window)

    def run(steps: tuple[int, ...], toks: list[jax.Array], own: list[KV], own_mask: jax.Array):
        emb = jnp.concatenate([step_embedding(lm, tc, sch, s, t)
                               for s, t in zip(steps, toks, strict=True)], axis=1)
        offsets = jnp.asarray([sch.position_offset(s) for s in steps])
        pos = (x.pos + offsets)[None]  # [1, t]
        cm = jnp.stack([ctx_mask(s) for s in steps])[None]  # [1, t, C]
        out = lm.position_decoder(emb, pos, (row.kv, cm), own, own_mask, trace=trace)
        hidden.append(out[0])
        if trace:
            traces.append(out[2])
        return out

    own: list[KV] = []
    prev_h = None
    for s in sch.sequential_steps:
        tok = token(s, prev_h)
        fed.append(tok)
        # Own keys: steps 1..s-1, then the step's own new key; none for a padding query.
        own_mask = x.own_ok & sch.own_visible(s, jnp.arange(1, s + 1), window)
        with jax.named_scope("thought_steps"):
            out = run((s,), [tok], own, own_mask[None, None])  # [1, 1, s]
        own.append(out[1])
        prev_h = out[0]
    block = sch.block_steps
    if block:
        toks = [token(s, prev_h if s == block[0] else None) for s in block]
        fed.extend(toks)
        own_mask = x.own_ok & sch.own_block_mask(block, sch.steps, window)  # [t, slots + t]
        with jax.named_scope("thought_block"):
            run(block, toks, own, own_mask[None, None])
    d = (vocab.Draw(*(jnp.concatenate(f, axis=1) for f in zip(*draws, strict=True)))
         if draws else None)
    return PositionThought(tuple(hidden), jnp.concatenate(fed, axis=1), d, tuple(traces))


class MappedThoughts(NamedTuple):
    """`thought_of_position` mapped over P positions of R rows: `step_hidden` (per step
    `[R, P, hidden]`, kept apart: slicing a stack would cost a padded cotangent per
    step in the backward pass), `fed` `[steps, R, P]` int, `draws` (`vocab.Draw` of `[drawn, R, P]`,
    in the order of `sch.sampled_steps`; None when none is drawn), `traces` (per decoder
    call: a sequential step's `[layers, R, P, hidden]`, the block's position-major
    `[layers, R, P, block, hidden]`)."""

    step_hidden: list[jax.Array]
    fed: jax.Array
    draws: vocab.Draw | None
    traces: list[model.LayerTrace]


def map_thoughts(
    lm: QuietStarLM,
    tc: ThoughtConfig,
    sch: ThoughtSchedule,
    row: RowContext,
    x: PositionInputs,
    rng: jax.Array | None,
    *,
    trace: bool = False,
) -> MappedThoughts:
    """`thought_of_position` vmapped over positions, then rows.

    row: per-row `RowContext` with a leading rows axis (kv `[layers, R, C, kv_heads,
    head_dim]`, pos/ids `[R, C]`); x: `PositionInputs` with leading `[R, P]` axes.
    The context is per row, shared by the row's positions (not copied per position);
    every projection is a 2-D matmul over all R x P positions' queries, and each draw a
    chunked vocabulary pass over all of them (one step when `vocab.fits_one_chunk(R * P,
    vocab)`).

    The unit batch axis of one position is added (and removed) outside the vmap: a
    reshape of a mapped array inside would make the vmap move the mapped axes to the
    front (a transposed copy of every key/value array on every step).
    """
    rows, n_pos = x.pos.shape
    one_chunk = vocab.fits_one_chunk(rows * n_pos, lm.cfg.vocab_size)
    one = functools.partial(thought_of_position, lm, tc, sch, one_chunk=one_chunk, trace=trace)
    n_calls = len(sch.sequential_steps) + (1 if sch.block_steps else 0)
    tr_axes = tuple(model.LayerTrace(1, 0) for _ in range(n_calls)) if trace else ()
    out_axes = PositionThought(0, 0, 0, tr_axes)
    over_positions = jax.vmap(one, in_axes=(RowContext(None, None, None), 0, None),
                              out_axes=out_axes)
    over_rows = jax.vmap(over_positions, in_axes=(RowContext(1, 0, 0), 0, None),
                         out_axes=out_axes)
    kv1 = KV(row.kv.k[:, :, None], row.kv.v[:, :, None])  # [layers, R, 1, C, kv, d]
    out = over_rows(row._replace(kv=kv1), x, rng)
    step_hidden = []
    for h in out.hidden:  # [R, P, 1, t, hidden]
        h = constrain(h[:, :, 0], model.STEP_HIDDEN_AXES)
        step_hidden.extend(jnp.moveaxis(h, 2, 0))
    traces = []
    for i, tr in enumerate(out.traces):  # [layers, R, P, 1, t, hidden], [R, P, 1, t, hidden]
        ins, last = tr.inputs[:, :, :, 0], tr.last[:, :, 0]
        if i < len(sch.sequential_steps):  # t = 1: one step's trace
            ins, last = ins[:, :, :, 0], last[:, :, 0]
        traces.append(model.LayerTrace(ins, last))
    fed = jnp.moveaxis(out.fed[:, :, 0], -1, 0)
    draws = (None if out.draws is None else
             vocab.Draw(*(jnp.moveaxis(f[:, :, 0], -1, 0) for f in out.draws)))
    return MappedThoughts(step_hidden, fed, draws, traces)


def reinforce_logps(
    lm: CausalLM,
    tc: ThoughtConfig,
    sch: ThoughtSchedule,
    step_hidden: Sequence[jax.Array],
    fed: Sequence[jax.Array],
    draws: Any,
) -> list[jax.Array]:
    """The REINFORCE log-probs of the sampled thought tokens, one `[...]` array per sampled
    step (the token fed on step s was drawn from step s - 1's hidden state): all drawn
    steps in one call and all given ones in another, so one backward vocabulary pass (and
    one output-matrix gradient) each. `draws`: the stacked `vocab.Draw` of the sampled
    steps, or None when the tokens were given. Pause thoughts have no policy."""
    drawn, cfg = () if draws is None else sch.sampled_steps, lm.cfg
    w_grad = lm.vocab_table()
    logp: list[jax.Array] = []
    if drawn:
        hs = jnp.stack([step_hidden[s - 2] for s in drawn])
        with jax.named_scope("reinforce_logp"):
            logp.extend(vocab.logp_of_draws(
                hs, w_grad, draws, logp_temperature=tc.reinforce_temperature,
                masked_ids=tc.sampled_masked_ids, chunk_size=cfg.vocab_chunk, dtype=cfg.dtype))
    given = [s for s in sch.sampled_steps if s not in drawn]
    if given and tc.sampling != "pause":
        hs = jnp.stack([step_hidden[s - 2] for s in given])
        toks = jnp.stack([fed[s - 1] for s in given])
        with jax.named_scope("reinforce_logp"):
            logp.extend(given_token_logp(lm, tc, hs, toks))
    return logp


def replayed_hidden(
    lm: QuietStarLM,
    tc: ThoughtConfig,
    sch: ThoughtSchedule,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    positions: jax.Array,
    base_trace: model.LayerTrace,
    mapped: MappedThoughts,
    x: PositionInputs,
) -> tuple[jax.Array, list[jax.Array]]:
    """The differentiable outputs of a base pass and its thoughts that ran without
    gradient, traced (`lm.forward(..., trace=True)`, `map_thoughts(..., trace=True)`):
    the traced values, with the backward pass that replays every layer once over the
    base sequence and all steps of the P thinking positions together
    (`replay_layers`). The dense rollout passes every position (P = seq), the
    sparse objective its gathered ones.

    input_ids, attention_mask, positions: `[rows, seq]`; x: the thinking positions'
    `PositionInputs` (`[rows, P]`, ctx_ok `[rows, P, seq]`). Returns the base hidden
    `[rows, seq, hidden]` and per step `[rows, P, hidden]`, after the final norm.
    """
    rows, n_pos = x.pos.shape
    cfg = lm.cfg
    window, n = cfg.sliding_window, sch.num_steps

    def ctx_mask_at(s: int) -> jax.Array:  # [rows, P, seq]
        if window is None:
            return x.ctx_ok
        q_pos = x.pos[:, :, None] + sch.position_offset(s)
        return x.ctx_ok & window_visible(q_pos, positions[:, None, :], window)

    offsets = jnp.asarray([sch.position_offset(s) for s in sch.steps])
    geo = JointGeometry(
        base_positions=positions,
        base_mask=model.self_attention_mask(cfg, positions, attention_mask),
        step_positions=(x.pos[:, None, :] + offsets[None, :, None]).reshape(rows, -1),
        ctx_mask=jnp.concatenate([ctx_mask_at(s) for s in sch.steps], 1),
        own_mask=(x.own_ok[:, :, None, None]
                  & sch.own_block_mask(sch.steps, sch.steps, window)[None, None]),
    )
    emb_steps = jnp.stack([step_embedding(lm, tc, sch, s, mapped.fed[s - 1])
                           for s in sch.steps], 1)
    with jax.named_scope("replayed_backward"):
        out_b, out_s = replay_layers(
            cfg, model.to_params(lm.layers), lm.embed_tokens(input_ids).astype(cfg.compute_dtype),
            emb_steps.reshape(rows, n * n_pos, -1), base_trace, mapped.traces, geo)
    norm = lm.final_norm
    return norm(out_b), list(jnp.moveaxis(norm(out_s).reshape(rows, n, n_pos, -1), 1, 0))


def rollout(
    params: Params,
    cfg: ModelConfig,
    tc: ThoughtConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    rng: jax.Array | None,
    thought_tokens: jax.Array | None = None,
    *,
    num_steps: int | None = None,
) -> Rollout:
    """The parallel thought rollout: all positions think at once.

    input_ids, attention_mask: `[rows, seq]` (already repeated over passes).
    thought_tokens: optional int `[n_ahead - 3, rows, seq]` to feed instead of sampling.
    num_steps: how many thought/talk steps to run (default tc.num_steps).

    Step 0 is one causal forward over the sequence. On step s every position i is fed
    one token (start, a sampled token, end, or the true token `x[i + s - n_ahead + 1]`)
    at position id `pos[i] + s`; its query sees the base keys j <= i (causal mask,
    padding, sliding window) and position i's own keys from steps 1..s.

    The thought of one position is one function, `thought_of_position`: its start
    token, its sampled tokens (drawn inside it, from its own previous step, with its
    own key `position_key(rng, s, row * seq + i)`), its end token and its teacher-forced
    talk tokens; its queries read the base keys/values of its row and its own earlier
    keys. `map_thoughts` maps it over the positions and rows with `jax.vmap`;
    generation's `think_at` maps the same function over its chosen positions. The step
    schedule (which step feeds what, which run one by one and which as one block) is
    `schedule.ThoughtSchedule`.

    Inside the function a step whose token is sampled needs the previous step's output,
    so the steps up to the one before the last sampled token run one after another (one
    `lm.position_decoder` call each); the remaining steps (the last sampled token,
    end, talk; all steps when `thought_tokens` are given) have known inputs and run as
    one call of the position's `block` queries, causal among themselves. Under the vmap
    each draw is one chunked vocabulary pass over all positions.

    A pure function of the params: merges the module once (`merge_lm`) and runs
    `run_rollout` on it.
    """
    return run_rollout(merge_lm(params, cfg), tc, input_ids, attention_mask, rng,
                       thought_tokens, num_steps=num_steps)


def run_rollout(
    lm: QuietStarLM,
    tc: ThoughtConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    rng: jax.Array | None,
    thought_tokens: jax.Array | None = None,
    *,
    num_steps: int | None = None,
) -> Rollout:
    """`rollout` of a merged module `lm`: input_ids, attention_mask `[rows, seq]`;
    thought_tokens `[n_ahead - 3, rows, seq]` or None (drawn with `rng`)."""
    rows, seq = input_ids.shape
    if tc.sampling == "pause" and thought_tokens is None:
        thought_tokens = jnp.full((tc.num_sampled, rows, seq), tc.pause_token_id, jnp.int32)
    sch = ThoughtSchedule.of(tc, num_steps, given=thought_tokens is not None)
    # With full rematerialisation the steps run without gradient and the backward pass
    # replays all of them together, layer by layer (`replay_layers`).
    replay = lm.cfg.remat == "full" and sch.num_steps > 0
    run_lm = model.stop_gradient(lm) if replay else lm
    valid = attention_mask.astype(bool)
    positions = model.default_positions(attention_mask)
    with jax.named_scope("base_pass"):
        base = run_lm.forward(input_ids, attention_mask, positions, trace=replay)
    h0, kv0 = base[:2]

    idx = jnp.arange(seq)
    base_ctx = (idx[None, :] <= idx[:, None])[None] & valid[:, None, :]  # [rows, q, k]

    # Every position's thought is one function (`thought_of_position`: its steps, its
    # draws, its queries on its row's base keys and its own keys), vmapped over the
    # positions and rows (`map_thoughts`).
    if sch.num_steps > 0:
        at = jnp.broadcast_to(idx[None, :], (rows, seq))
        x = PositionInputs(
            pos=positions, at=at, index=at + seq * jnp.arange(rows)[:, None], ctx_ok=base_ctx,
            own_ok=valid,
            given=None if thought_tokens is None else jnp.moveaxis(thought_tokens, 0, -1))
        # (named scopes inside: thought_steps, sampling, thought_block)
        mapped = map_thoughts(run_lm, tc, sch, RowContext(kv0, positions, input_ids), x, rng,
                              trace=replay)
        step_hidden, fed, draws = mapped.step_hidden, list(mapped.fed), mapped.draws
    else:
        step_hidden, fed, draws = [], [], None
    if replay:  # the differentiable outputs: the traced ones, with the replayed backward
        h0, step_hidden = replayed_hidden(lm, tc, sch, input_ids, attention_mask, positions,
                                          base[2], mapped, x)

    thought_logp = reinforce_logps(lm, tc, sch, step_hidden, fed, draws)

    empty = jnp.zeros((0, rows, seq), jnp.int32)
    thought_toks = [fed[s - 1] for s in sch.sampled_steps]
    return Rollout(
        base_hidden=h0,
        base_kv=kv0,
        step_hidden=jnp.stack(step_hidden),
        thought_tokens=jnp.stack(thought_toks) if thought_toks else empty,
        thought_logp=jnp.stack(thought_logp) if thought_logp else empty.astype(jnp.float32),
        fed_tokens=jnp.stack(fed),
    )


def shift_left(x: jax.Array, k: int, axis: int = 1) -> jax.Array:
    """`x[i + k]` along `axis`, zeros past the end (same shape)."""
    if k == 0:
        return x
    x = jnp.moveaxis(x, axis, 0)
    out = jnp.concatenate([x[k:], jnp.zeros_like(x[:k])], axis=0)
    return jnp.moveaxis(out, 0, axis)


def mixed_hidden(
    params: Params, tc: ThoughtConfig, base_hidden: jax.Array, step_hidden: jax.Array, step: int
) -> tuple[jax.Array, jax.Array]:
    """Mix step `step`'s hidden with the base hidden that predicts the same target.

    base_hidden, step_hidden: `[rows, seq, hidden]`. With k = max(0, step - (n_ahead - 1)),
    b = h0[i + k]; w = mixing_head([b, h_s]); returns ((1 - w) b + w h_s `[rows, seq,
    hidden]`, w `[rows, seq]` float32). Positions with i + k past the end get b = 0.
    A pure function of the params (`params["thought"]`); the package calls `mix_step`.
    """
    return mix_step(thought_module(params), tc, base_hidden, step_hidden, step)


def mix_step(thought: ThoughtParams, tc: ThoughtConfig, base_hidden: jax.Array,
             step_hidden: jax.Array, step: int) -> tuple[jax.Array, jax.Array]:
    """`mixed_hidden` with the merged thought params `thought` (`lm.thought`): base_hidden,
    step_hidden `[rows, seq, hidden]` -> (mixed `[rows, seq, hidden]`, w `[rows, seq]`)."""
    b = shift_left(base_hidden, ThoughtSchedule.of(tc).base_shift(step))
    return thought.blend(b, step_hidden, tc.mixing_weight_offset)
