"""The parallel rollout equals a naive sequential computation, position by position.

For every position i the oracle runs the plain causal model (`model.decoder` with an
ordinary causal mask, no context/own blocks) on the prefix x[0..i] followed by the
tokens that position i was fed on steps 1..S (start/end as their learned embeddings),
with position ids pos[i] + s, and reads off the hidden state of each step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quietstar_jax import model
from quietstar_jax.thought import (
    ThoughtConfig,
    init_thought_params,
    mixed_hidden,
    mixing_weight,
    thought_embedding,
)
from quietstar_jax.thought import rollout as _rollout

VOCAB, START, END, PAD = 61, 59, 60, 0
rollout = jax.jit(_rollout, static_argnums=(1, 2))


def tiny(sliding_window=None, bias=False, tied=False):
    cfg = model.ModelConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
        num_kv_heads=2, sliding_window=sliding_window, attention_bias=bias,
        tie_word_embeddings=tied, model_type="mistral" if sliding_window else "llama",
        initializer_range=0.2,
    )
    params = model.init_params(cfg, jax.random.key(1))
    params["thought"] = init_thought_params(params, cfg, jax.random.key(2), init_token_id=5)
    # A non-zero mixing head and start/end embeddings unlike any row, so mistakes show.
    params["thought"]["mix"]["w2"] = 0.3 * jax.random.normal(jax.random.key(3), (32, 1))
    params["thought"]["start_emb"] = 0.01 * jax.random.normal(jax.random.key(4), (32,))
    params["thought"]["end_emb"] = 0.01 * jax.random.normal(jax.random.key(5), (32,))
    if bias:
        params["layers"]["attn"]["q_bias"] = 0.1 * jax.random.normal(
            jax.random.key(6), params["layers"]["attn"]["q_bias"].shape)
    return cfg, params


def naive_step_hidden(params, cfg, tc, ids, mask, fed):
    """Hidden states `[rows, seq, S, hidden]`, one plain causal forward per (row, i).

    Sequence (r, i) is x[r, 0..i], then the S tokens position i was fed, then padding
    up to seq + S (masked, after everything that matters, so causality ignores it).
    """
    rows, seq = ids.shape
    steps = fed.shape[0]
    total = seq + steps
    pos0 = np.asarray(model.default_positions(mask))
    tok_emb = np.array(model.embed_tokens(params, cfg, ids))  # [rows, seq, H]
    fed_emb = np.array(model.embed_tokens(params, cfg, fed))  # [S, rows, seq, H]
    fed_emb[0] = np.asarray(thought_embedding(params, tc, "start_emb"))
    fed_emb[tc.n_ahead - 2] = np.asarray(thought_embedding(params, tc, "end_emb"))
    n = rows * seq
    emb = np.zeros((n, total, cfg.hidden_size), np.float32)
    pos = np.zeros((n, total), np.int32)
    valid = np.zeros((n, total), bool)
    for r in range(rows):
        for i in range(seq):
            j = r * seq + i
            emb[j, : i + 1] = tok_emb[r, : i + 1]
            emb[j, i + 1 : i + 1 + steps] = fed_emb[:, r, i]
            pos[j, : i + 1] = pos0[r, : i + 1]
            pos[j, i + 1 : i + 1 + steps] = pos0[r, i] + np.arange(1, steps + 1)
            valid[j, : i + 1] = np.asarray(mask[r, : i + 1]).astype(bool)
            valid[j, i + 1 : i + 1 + steps] = True

    @jax.jit
    def plain(emb, pos, valid):
        causal = model.causal_mask(pos, valid, cfg.sliding_window)
        return model.decoder(params, cfg, emb, pos, self_mask=causal)[0]

    h = np.asarray(plain(emb, pos, valid)).reshape(rows, seq, total, -1)
    out = np.zeros((rows, seq, steps, cfg.hidden_size), np.float32)
    for i in range(seq):
        out[:, i] = h[:, i, i + 1 : i + 1 + steps]
    return out


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(sliding_window=4),
        dict(bias=True, tied=True),
    ],
    ids=["llama", "mistral-window4", "qwen-bias-tied"],
)
def test_parallel_rollout_matches_sequential(variant):
    cfg, params = tiny(**variant)
    tc = ThoughtConfig(n_ahead=5, n_ahead_talk=3, n_passes=1, start_token_id=START,
                       end_token_id=END, pad_token_id=PAD)
    rng = np.random.RandomState(0)
    seq = 10
    ids = rng.randint(1, 59, size=(3, seq))
    mask = np.ones((3, seq), np.int32)
    ids[1, 7:] = PAD  # right padding
    mask[1, 7:] = 0
    ids[2, :3] = PAD  # left padding
    mask[2, :3] = 0
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    ro = rollout(params, cfg, tc, ids, mask, jax.random.key(7))
    assert ro.step_hidden.shape == (tc.num_steps, 3, seq, cfg.hidden_size)
    want = naive_step_hidden(params, cfg, tc, ids, mask, ro.fed_tokens)  # [r, i, S, H]
    real = np.asarray(mask).astype(bool)
    got = np.moveaxis(np.asarray(ro.step_hidden), 0, 2)
    worst_h = float(np.max(np.abs(want - got)[real]))
    assert worst_h < 1e-5, worst_h
    # The same thoughts given as tokens: every step then runs in one block call.
    given = rollout(params, cfg, tc, ids, mask, None, ro.thought_tokens)
    got_given = np.moveaxis(np.asarray(given.step_hidden), 0, 2)
    assert float(np.max(np.abs(want - got_given)[real])) < 1e-5
    np.testing.assert_allclose(np.asarray(given.thought_logp)[:, real],
                               np.asarray(ro.thought_logp)[:, real], atol=1e-5)

    h0 = np.asarray(ro.base_hidden)
    mix = params["thought"]["mix"]
    worst_logits = 0.0
    for s in range(1, tc.num_steps + 1):
        k = max(0, s - (tc.n_ahead - 1))
        # Naive: the base hidden that predicts the same target, mixed with the naive h_s.
        b = np.concatenate([h0[:, k:], np.zeros_like(h0[:, :k])], axis=1)
        w = np.asarray(mixing_weight(mix, b, want[:, :, s - 1]))[..., None]
        naive = model.logits_from_hidden(params, cfg, (1 - w) * b + w * want[:, :, s - 1])
        mixed, _ = mixed_hidden(params, tc, ro.base_hidden, ro.step_hidden[s - 1], s)
        par = model.logits_from_hidden(params, cfg, mixed)
        scored = real.copy()
        scored[:, seq - k :] = False  # i + k past the end has no target
        diff = np.abs(np.asarray(naive) - np.asarray(par))[scored]
        worst_logits = max(worst_logits, float(diff.max()))
    assert worst_logits < 1e-5, worst_logits


def test_fed_tokens_follow_the_schedule():
    cfg, params = tiny()
    tc = ThoughtConfig(n_ahead=6, n_ahead_talk=3, n_passes=1, start_token_id=START,
                       end_token_id=END, pad_token_id=PAD)
    ids = jnp.asarray(np.random.RandomState(1).randint(1, 59, size=(2, 9)))
    ro = rollout(params, cfg, tc, ids, jnp.ones_like(ids), jax.random.key(0))
    fed = np.asarray(ro.fed_tokens)
    assert (fed[0] == START).all() and (fed[tc.n_ahead - 2] == END).all()
    sampled = fed[1 : tc.n_ahead - 2]
    np.testing.assert_array_equal(sampled, np.asarray(ro.thought_tokens))
    assert not np.isin(sampled, [START, END]).any()
    for s in range(tc.n_ahead, tc.num_steps + 1):
        shift = s - tc.n_ahead + 1
        want = np.concatenate([np.asarray(ids)[:, shift:], np.full((2, shift), PAD)], axis=1)
        np.testing.assert_array_equal(fed[s - 1], want)


def test_same_rng_same_thoughts_and_greedy_is_argmax():
    cfg, params = tiny()
    tc = ThoughtConfig(n_ahead=6, n_ahead_talk=2, n_passes=1, start_token_id=START,
                       end_token_id=END, pad_token_id=PAD)
    ids = jnp.asarray(np.random.RandomState(2).randint(1, 59, size=(2, 8)))
    mask = jnp.ones_like(ids)
    a = rollout(params, cfg, tc, ids, mask, jax.random.key(3)).thought_tokens
    b = rollout(params, cfg, tc, ids, mask, jax.random.key(3)).thought_tokens
    c = rollout(params, cfg, tc, ids, mask, jax.random.key(4)).thought_tokens
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).any()
    g = rollout(params, cfg, tc.replace(sampling="greedy"), ids, mask, None)
    first = model.logits_from_hidden(params, cfg, g.step_hidden[0])
    first = first.at[..., START].set(-1e10).at[..., END].set(-1e10)
    np.testing.assert_array_equal(g.thought_tokens[0], jnp.argmax(first, axis=-1))


def test_sample_categorical_matches_the_distribution():
    from quietstar_jax.vocab import sample_categorical

    logits = jnp.log(jnp.array([0.5, 0.0, 0.2, 0.3]))  # id 1 has probability 0
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = np.asarray(jax.vmap(sample_categorical, in_axes=(0, None))(keys, logits))
    freq = np.bincount(draws, minlength=4) / draws.size
    assert freq[1] == 0.0
    np.testing.assert_allclose(freq, [0.5, 0.0, 0.2, 0.3], atol=0.015)
