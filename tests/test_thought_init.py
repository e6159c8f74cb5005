"""`ThoughtConfig.init_token`: the text the start/end-of-thought embeddings start from
(the authors' "---"), or zeros, through the trainer's model set-up and
`hf.load_pretrained`. The expected rows are read from the embedding matrix by the
tokenizer's own encoding, not by the code under test."""

from __future__ import annotations

import numpy as np
import pytest

from quietstar_jax import sharding
from quietstar_jax.thought import ThoughtConfig
from quietstar_jax.train import config as train_config
from quietstar_jax.train import model_setup


def _inline(init_token: str | None, scale: float = 100.0):
    c = train_config.base_config()
    c.model.hidden_size, c.model.num_layers = 16, 1
    c.model.num_heads, c.model.num_kv_heads, c.model.intermediate_size = 2, 1, 24
    c.thought.init_token = init_token
    c.thought.embedding_scale = scale
    mesh = sharding.make_mesh((1, 1, 1))
    loaded = model_setup.model_for_training(c, mesh)
    return loaded.params, c


@pytest.mark.parametrize("text, byte", [("---", ord("-")), ("x y", ord("x"))])
def test_trainer_starts_thought_embeddings_from_the_init_text(text, byte):
    params, _ = _inline(text, scale=4.0)
    row = np.asarray(params["embed"][byte], np.float32) / 4.0
    for name in ("start_emb", "end_emb"):
        np.testing.assert_allclose(np.asarray(params["thought"][name]), row, rtol=1e-6)


@pytest.mark.parametrize("text", ["", None])
def test_empty_init_text_gives_zero_thought_embeddings(text):
    params, c = _inline(text)
    for name in ("start_emb", "end_emb"):
        assert not np.any(np.asarray(params["thought"][name]))
    assert train_config.thought_config(c, {"start_token_id": 1, "end_token_id": 2,
                                           "pad_token_id": 0}).init_token is None


def test_load_pretrained_reads_init_token(shared):
    from quietstar_jax import hf

    path = shared("data", "stories260K-hf")
    _, dashed, tok = hf.load_pretrained(path)  # the authors' "---", scale 100
    first = tok("---", add_special_tokens=False)["input_ids"][0]
    np.testing.assert_allclose(np.asarray(dashed["thought"]["start_emb"]),
                               np.asarray(dashed["embed"][first], np.float32) / 100.0, rtol=1e-6)
    _, other, _ = hf.load_pretrained(path, init_token="Once", embedding_scale=2.0)
    once = tok("Once", add_special_tokens=False)["input_ids"][0]
    assert once != first
    np.testing.assert_allclose(np.asarray(other["thought"]["end_emb"]),
                               np.asarray(other["embed"][once], np.float32) / 2.0, rtol=1e-6)
    _, zero, _ = hf.load_pretrained(path, init_token=None)
    assert not np.any(np.asarray(zero["thought"]["start_emb"]))


def test_empty_string_is_rejected_by_thought_config():
    with pytest.raises(ValueError, match="init_token"):
        ThoughtConfig(init_token="")
