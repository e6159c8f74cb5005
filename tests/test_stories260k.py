"""Karpathy's stories260K (a real Llama-2-architecture model) through quietstar_jax.hf.

Reference values (shared/data/stories260K/reference_outputs.json) come from llama2.c's
run.c and an independent numpy port of it; see shared/data/PROVENANCE.md.
"""

from __future__ import annotations

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shared_path

from quietstar_jax import hf
from quietstar_jax.model import lm_logits

SENTENCE = "One day, a clever fox found a shiny key under the old oak tree."
NLL_REFERENCE = 54.404  # summed over the 34 next-token predictions of the 35 tokens


@pytest.fixture(scope="module")
def stories():
    path = shared_path("data", "stories260K-hf")
    reference = json.loads(shared_path("data", "stories260K", "reference_outputs.json")
                           .read_text())
    cfg, params, tok = hf.load_pretrained(path)
    return dict(path=path, ref=reference, cfg=cfg, params=params, tok=tok)


def summed_nll(params, cfg, ids: list[int]) -> float:
    """Sum over positions t of -log p(ids[t+1] | ids[:t+1])."""
    x = jnp.asarray([ids])
    logp = jax.nn.log_softmax(lm_logits(params, cfg, x)[0, :-1])
    return float(-jnp.take_along_axis(logp, x[0, 1:, None], -1).sum())


@partial(jax.jit, static_argnums=(1, 2))
def greedy(params, cfg, steps: int, bos: int = 1) -> jax.Array:
    """Greedy decoding of `steps` tokens after BOS, recomputing the causal forward
    over a fixed buffer `[1, steps + 1]` each step; returns the buffer."""
    buf = jnp.zeros((1, steps + 1), jnp.int32).at[0, 0].set(bos)

    def body(t, buf):
        logits = lm_logits(params, cfg, buf)  # position t only sees tokens <= t
        return buf.at[0, t + 1].set(jnp.argmax(logits[0, t]).astype(jnp.int32))

    return jax.lax.fori_loop(0, steps, body, buf)


def test_config_and_thought_tokens(stories):
    cfg, params, tok = stories["cfg"], stories["params"], stories["tok"]
    c = stories["ref"]["config"]
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (
        c["dim"], c["hidden_dim"], c["n_layers"])
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head) == (
        c["n_heads"], c["n_kv_heads"], c["head_dim"])
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (1e4, 1e-5, True)
    assert cfg.model_type == "llama" and cfg.max_position_embeddings == 512
    # two thought tokens added: vocab 512 -> 514, new rows = mean row
    assert cfg.vocab_size == 514 and len(tok) == 514 and params["embed"].shape == (514, 64)
    assert hf.thought_token_ids(tok) == {"start_token_id": 512, "end_token_id": 513,
                                         "pad_token_id": 2}
    mean = np.asarray(params["embed"][:512]).mean(0)
    np.testing.assert_allclose(params["embed"][512], mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(params["embed"][513], mean, rtol=1e-5, atol=1e-7)
    # thought embeddings start at the row of the first token of "---", divided by 100
    first = tok("---", add_special_tokens=False)["input_ids"][0]
    assert first == hf.thought_init_token_id(tok)
    np.testing.assert_allclose(params["thought"]["start_emb"], params["embed"][first] / 100,
                               rtol=1e-6)
    np.testing.assert_allclose(params["thought"]["end_emb"], params["embed"][first] / 100,
                               rtol=1e-6)


def test_teacher_forced_nll(stories):
    cfg, params, tok = stories["cfg"], stories["params"], stories["tok"]
    ids = tok(SENTENCE)["input_ids"]
    assert ids == stories["ref"]["computed_teacher_forced"]["token_ids_with_bos"]
    assert len(ids) == 35 and ids[0] == 1
    nll = summed_nll(params, cfg, ids)
    print(f"stories260K summed NLL over {len(ids) - 1} predictions: {nll:.5f}")
    assert abs(nll - NLL_REFERENCE) <= 0.01
    assert abs(nll - stories["ref"]["computed_teacher_forced"]["nll"]) <= 1e-3
    # perplexity as llama2.c reports it: exp(sum / 34)
    assert abs(np.exp(nll / 34) - stories["ref"]["upstream_teacher_forced"]["perplexity"]) < 1e-3


def test_teacher_forced_nll_matches_transformers(stories):
    torch = pytest.importorskip("torch")
    import transformers

    cfg, params, tok = stories["cfg"], stories["params"], stories["tok"]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(stories["path"]), dtype=torch.float32, attn_implementation="eager").eval()
    ids = tok(SENTENCE)["input_ids"]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids]))
    torch_sum = float(out.loss) * (len(ids) - 1)  # HF loss: mean over the 34 shifted targets
    assert abs(torch_sum - NLL_REFERENCE) <= 0.01
    ours = np.asarray(lm_logits(params, cfg, jnp.asarray([ids])))
    diff = np.abs(ours[..., :512] - out.logits.numpy()).max()
    print(f"stories260K max |logit diff| vs transformers: {diff:.2e}; torch NLL {torch_sum:.5f}")
    assert diff <= 1e-4


def test_greedy_200_steps(stories):
    cfg, params = stories["cfg"], stories["params"]
    expected = stories["ref"]["computed_greedy_200_steps_token_ids"]
    assert len(expected) == 201 and expected[0] == 1
    out = np.asarray(greedy(params, cfg, 200))[0].tolist()
    assert out == expected
    # the grown rows (mean rows) score the mean logit, so they are never the argmax
    logits = lm_logits(params, cfg, jnp.asarray([expected[:50]]))[0]
    np.testing.assert_allclose(logits[:, 512], logits[:, :512].mean(-1), atol=1e-5)
    assert bool((logits[:, 512:].max(-1) < logits[:, :512].max(-1)).all())


def test_without_thought_tokens(stories):
    cfg, params, tok = hf.load_pretrained(stories["path"], add_thought_tokens=False)
    assert cfg.vocab_size == 512 and len(tok) == 512 and params["embed"].shape == (512, 64)
    assert "thought" not in params
    np.testing.assert_array_equal(params["embed"], stories["params"]["embed"][:512])
    ids = tok(SENTENCE)["input_ids"]
    assert abs(summed_nll(params, cfg, ids) - NLL_REFERENCE) <= 0.01


def test_export_round_trip(stories, tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    cfg, params, tok = stories["cfg"], stories["params"], stories["tok"]
    out = hf.save_pretrained(tmp_path / "export", params, cfg, tok)
    assert (out / "tokenizer.json").is_file()
    cfg2, params2, tok2 = hf.load_pretrained(out)
    assert cfg2 == cfg and len(tok2) == 514
    assert hf.thought_token_ids(tok2) == hf.thought_token_ids(tok)
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert model.config.vocab_size == 514
    ids = tok(SENTENCE)["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits.numpy()
    assert np.abs(np.asarray(lm_logits(params, cfg, jnp.asarray([ids]))) - ref).max() <= 1e-4
