"""The opt-in fused attention of the plain causal pass (`ModelConfig.attention="cudnn"`).

cuDNN needs a GPU; here the same `jax.nn.dot_product_attention` call runs with its XLA
implementation, which checks what this package controls: the mask semantics handed to
the kernel (causal, right padding through key lengths, the sliding window), GQA and
the scale. Oracle: the package's own masked attention (`attention="xla"`), itself
checked against transformers in test_model_parity.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quietstar_jax import model
from quietstar_jax.model import ModelConfig


@pytest.fixture
def xla_kernel(monkeypatch):
    monkeypatch.setattr(model, "FUSED_IMPLEMENTATION", "xla")


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                num_heads=4, num_kv_heads=2, model_type="mistral")
    return ModelConfig(**(base | kw))


def _batch():
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(1, 64, size=(4, 12)))
    lengths = np.array([12, 9, 5, 0])  # right padding; the last row is all padding
    mask = jnp.asarray((np.arange(12)[None] < lengths[:, None]).astype(np.int32))
    return ids, mask


@pytest.mark.parametrize("window", [None, 4])
def test_fused_causal_pass_matches_masked_attention(xla_kernel, window):
    cfg = _cfg(sliding_window=window)
    params = model.init_params(cfg, jax.random.key(1))
    ids, mask = _batch()
    valid = np.asarray(mask).astype(bool)

    def loss(p, c):
        h, kv = model.forward(p, c, ids, mask)
        logits = model.logits_from_hidden(p, c, h)
        w = jnp.asarray(valid, jnp.float32)[..., None]
        return jnp.sum(logits * w) + jnp.sum(kv.k[:, valid] ** 2), (logits, kv)

    fused_cfg = cfg.replace(attention="cudnn")
    (lf, (logits_f, kv_f)), g_f = jax.value_and_grad(loss, has_aux=True)(params, fused_cfg)
    (lx, (logits_x, kv_x)), g_x = jax.value_and_grad(loss, has_aux=True)(params, cfg)
    # Real positions agree; padded query positions are never read.
    np.testing.assert_allclose(np.asarray(logits_f)[valid], np.asarray(logits_x)[valid],
                               atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(kv_f.v)[:, valid], np.asarray(kv_x.v)[:, valid],
                               atol=2e-5)
    assert np.isfinite(np.asarray(logits_f)).all()
    np.testing.assert_allclose(float(lf), float(lx), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_x), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_window_is_not_ignored(xla_kernel):
    """The fused path must apply the sliding window: without it the logits differ."""
    ids, mask = _batch()
    cfg = _cfg(sliding_window=3, attention="cudnn")
    params = model.init_params(cfg, jax.random.key(2))
    windowed = model.lm_logits(params, cfg, ids, mask)
    full = model.lm_logits(params, cfg.replace(sliding_window=None), ids, mask)
    assert float(jnp.max(jnp.abs(windowed[0, 5:] - full[0, 5:]))) > 1e-4


def test_bad_attention_value_is_rejected():
    with pytest.raises(ValueError, match="ModelConfig.attention"):
        _cfg(attention="flash")
