"""The replayed backward pass (`replay.replay_layers`, used with remat="full") gives the
gradients that plain autodiff of the step-by-step rollout gives (remat="none")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quietstar_jax import model
from quietstar_jax.thought import ThoughtConfig, init_thought_params
from quietstar_jax.thought.loss import quietstar_loss

VOCAB = 67
TC = ThoughtConfig(n_ahead=6, n_ahead_talk=3, n_passes=2, start_token_id=65, end_token_id=66,
                   pad_token_id=0)
CASES = {
    "mistral_window": dict(model_type="mistral", sliding_window=4),
    "qwen2_bias_tied": dict(model_type="qwen2", attention_bias=True, tie_word_embeddings=True),
}


def _setup(extra):
    cfg = model.ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                            num_layers=3, num_heads=4, num_kv_heads=2, initializer_range=0.2,
                            **extra)
    params = model.init_params(cfg, jax.random.key(0))
    params["thought"] = init_thought_params(params, cfg, jax.random.key(1), init_token_id=7)
    params["thought"]["mix"]["w2"] = 0.5 * jax.random.normal(jax.random.key(2), (32, 1))
    ids = np.random.RandomState(0).randint(1, 65, size=(2, 10))
    mask = np.ones_like(ids)
    ids[1, 7:], mask[1, 7:] = 0, 0  # right padding
    ids[0, :2], mask[0, :2] = 0, 0  # left padding
    return cfg, params, jnp.asarray(ids), jnp.asarray(mask)


GREEDY_SHORT = TC.replace(sampling="greedy", n_ahead=4, n_ahead_talk=4)


# one case in the default run, the other three in the slow tier
@pytest.mark.parametrize("case,tc", [
    pytest.param("qwen2_bias_tied", TC, id="sampled-qwen2_bias_tied"),
    pytest.param("mistral_window", TC, id="sampled-mistral_window", marks=pytest.mark.slow),
    pytest.param("mistral_window", GREEDY_SHORT, id="greedy_short-mistral_window",
                 marks=pytest.mark.slow),
    pytest.param("qwen2_bias_tied", GREEDY_SHORT, id="greedy_short-qwen2_bias_tied",
                 marks=pytest.mark.slow),
])
def test_replayed_gradients_equal_plain_autodiff(case, tc):
    cfg, params, ids, mask = _setup(CASES[case])
    grad = jax.jit(jax.value_and_grad(quietstar_loss, has_aux=True), static_argnums=(1, 2))
    (loss_plain, _), g_plain = grad(params, cfg, tc, ids, mask, jax.random.key(5))
    (loss_replay, _), g_replay = grad(params, cfg.replace(remat="full"), tc, ids, mask,
                                      jax.random.key(5))
    np.testing.assert_allclose(float(loss_replay), float(loss_plain), rtol=1e-6)
    flat = jax.tree_util.tree_flatten_with_path(g_plain)[0]
    for (path, a), b in zip(flat, jax.tree.leaves(g_replay), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a).max() > 0, jax.tree_util.keystr(path)  # the check can fail
        np.testing.assert_allclose(b, a, atol=1e-5 * np.abs(a).max(), rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


def test_replay_without_gradient_is_the_rollout():
    from quietstar_jax.thought import rollout

    cfg, params, ids, mask = _setup(CASES["mistral_window"])
    run = jax.jit(rollout, static_argnums=(1, 2))
    plain = run(params, cfg, TC, ids, mask, jax.random.key(3))
    replay = run(params, cfg.replace(remat="full"), TC, ids, mask, jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(replay.fed_tokens), np.asarray(plain.fed_tokens))
    for name in ("base_hidden", "step_hidden", "thought_logp"):
        np.testing.assert_allclose(np.asarray(getattr(replay, name)),
                                   np.asarray(getattr(plain, name)), atol=1e-5, err_msg=name)
