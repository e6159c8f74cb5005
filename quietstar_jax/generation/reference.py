"""Reference generator: recompute the whole sequence with thoughts for every token.

The authors' approach (their code reruns the model over the whole prefix for each
new token): `thought.rollout`, in which every position thinks, over the current
sequence, then the last position's mixed logits. Used to check the cached generator
(`quietstar_jax.generation.cached.generate`) and as the baseline of the generation benchmark.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from quietstar_jax.generation.cached import Generation, _finish, prepare_request, think_stats
from quietstar_jax.generation.sampling import (
    SamplingConfig,
    _mask_real_logits,
    _token_key,
    sample_token,
)
from quietstar_jax.model import CausalLM, ModelConfig, Params
from quietstar_jax.thought import (
    QuietStarLM,
    Rollout,
    ThoughtConfig,
    draw_thought,
    merge_lm,
    mix_step,
    position_key,
    run_rollout,
)
from quietstar_jax.thought.schedule import ThoughtSchedule
from quietstar_jax.vocab import fits_one_chunk


def _last_mixed_logits(
    lm: QuietStarLM, tc: ThoughtConfig, ro: Rollout, last: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Mixed logits `[B, vocab]` and weight `[B]` at index `last` after the end step."""
    base = jax.lax.dynamic_index_in_dim(ro.base_hidden, last, axis=1, keepdims=True)
    end = jax.lax.dynamic_index_in_dim(ro.step_hidden[-1], last, axis=1, keepdims=True)
    mixed, w = mix_step(lm.thought, tc, base, end, ThoughtSchedule.of(tc).end_step)
    return lm.logits(mixed[:, 0]), w[:, 0]


def _draw_last(
    lm: CausalLM, tc: ThoughtConfig, h: jax.Array, key: jax.Array, s: int
) -> jax.Array:
    """Thought token s of each row's last position from its hidden `[B, hidden]` ->
    `[B]`: the draw of `generate.think_at` (one position's draw, `draw_thought`, mapped
    over the B rows, with key `position_key(key, s, b)`)."""
    one_chunk = fits_one_chunk(h.shape[0], lm.cfg.vocab_size)
    one = lambda hb, b: draw_thought(lm, tc, hb[None], position_key(key, s, b),  # noqa: E731
                                     one_chunk).tok[0]
    return jax.vmap(one)(h, jnp.arange(h.shape[0]))


@functools.partial(jax.jit, static_argnames=("cfg", "tc", "sc", "max_new_tokens", "think",
                                             "exact_rng"))
def _generate_recompute(
    params: Params,
    ids: jax.Array,
    mask: jax.Array,
    rng: jax.Array,
    *,
    cfg: ModelConfig,
    tc: ThoughtConfig | None,
    sc: SamplingConfig,
    max_new_tokens: int,
    think: bool,
    exact_rng: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(new tokens `[B, N]`, thoughts `[B, N, n_ahead - 3]`, mixing weights `[B, N]`) of
    `generate_recompute`; merges the module of `params` once (`merge_lm`)."""
    lm = merge_lm(params, cfg)
    b, p = ids.shape
    n = max_new_tokens
    n_thought = tc.num_sampled if think else 0
    sch = ThoughtSchedule.of(tc, talk=False) if think else None  # up to the end token
    buf = jnp.concatenate([ids, jnp.zeros((b, n), ids.dtype)], axis=1)
    bmask = jnp.concatenate([mask, jnp.zeros((b, n), mask.dtype)], axis=1)
    out_thought = jnp.zeros((b, n, n_thought), jnp.int32)
    out_w = jnp.zeros((b, n), jnp.float32)

    def body(t, state):
        buf, bmask, out_thought, out_w = state
        key = _token_key(rng, t)
        last = p + t - 1  # index of the newest real token; later slots are masked out
        if not think:
            h, _ = lm.forward(buf, bmask)
            hl = jax.lax.dynamic_index_in_dim(h, last, axis=1, keepdims=False)
            logits = lm.logits(hl)
        elif not exact_rng:
            # The authors' way: one rollout in which every position thinks.
            ro = run_rollout(lm, tc, buf, bmask, jax.random.fold_in(key, 1),
                             num_steps=sch.num_steps)
            logits, w = _last_mixed_logits(lm, tc, ro, last)
            thought = jax.lax.dynamic_index_in_dim(ro.thought_tokens, last, axis=2,
                                                   keepdims=False).T
            out_thought = out_thought.at[:, t].set(thought)
            out_w = out_w.at[:, t].set(w)
        else:
            # Same computation, but each thought token is drawn from the last position's
            # [B, vocab] logits with the cached generator's key: one rollout per step.
            fed = jnp.zeros((tc.num_sampled,) + buf.shape, jnp.int32)
            for s in sch.sampled_steps:  # drawn from the output of step s - 1
                ro = run_rollout(lm, tc, buf, bmask, None, fed, num_steps=s - 1)
                h = jax.lax.dynamic_index_in_dim(ro.step_hidden[-1], last, axis=1,
                                                 keepdims=False)
                tok = _draw_last(lm, tc, h, key, s)
                fed = jax.lax.dynamic_update_slice(
                    fed, tok[None, :, None], (sch.sampled_index(s), 0, last))
            ro = run_rollout(lm, tc, buf, bmask, None, fed, num_steps=sch.num_steps)
            logits, w = _last_mixed_logits(lm, tc, ro, last)
            thought = jax.lax.dynamic_index_in_dim(fed, last, axis=2, keepdims=False).T
            out_thought = out_thought.at[:, t].set(thought)
            out_w = out_w.at[:, t].set(w)
        tok = sample_token(jax.random.fold_in(key, 0), _mask_real_logits(logits, tc), sc)
        buf = jax.lax.dynamic_update_slice(buf, tok[:, None].astype(buf.dtype), (0, p + t))
        bmask = jax.lax.dynamic_update_slice(bmask, jnp.ones((b, 1), bmask.dtype), (0, p + t))
        return buf, bmask, out_thought, out_w

    buf, _, out_thought, out_w = jax.lax.fori_loop(0, n, body, (buf, bmask, out_thought, out_w))
    return buf[:, p:].astype(jnp.int32), out_thought, out_w


def generate_recompute(
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
    exact_rng: bool = True,
    pad_to_multiple: int = 16,
) -> Generation:
    """Reference generator that recomputes the whole sequence for every new token.

    Arguments as `generate`. Each new token runs `thought.rollout` over the full
    buffer `[B, P + max_new_tokens]` (slots not generated yet are masked out, so they
    change nothing) and samples from the last real position's mixed logits.
    exact_rng=False: one rollout per token, thoughts sampled by the rollout itself at
      every position (the authors' approach); equals `generate` token for token only
      when thought sampling is greedy.
    exact_rng=True: thought tokens are drawn one step at a time from the last
      position's logits with `generate`'s keys (n_ahead - 2 rollouts per token), so the
      same rng gives the same tokens as `generate` in sample mode too.
    Thoughts and mixing weights are always returned when thinking.
    """
    r = prepare_request(cfg, tc, prompts, max_new_tokens=max_new_tokens, rng=rng,
                        think=think, greedy=greedy, temperature=temperature, top_p=top_p,
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                        pad_to_multiple=pad_to_multiple)
    toks, thoughts, w = _generate_recompute(
        params, r.ids, r.mask, r.rng, cfg=r.cfg, tc=r.tc, sc=r.sc,
        max_new_tokens=max_new_tokens, think=think, exact_rng=exact_rng)
    toks, lengths = _finish(toks, r.eos_id, r.pad_id)
    rate, per_token = think_stats(jnp.full(toks.shape, think), lengths,
                                  r.tc.num_sampled if think else 0)
    return Generation(toks, lengths, thoughts if think else None, w if think else None,
                      think_rate=rate, thought_tokens_per_token=per_token)
