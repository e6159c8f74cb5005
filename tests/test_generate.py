"""Generation with thoughts: the cached generator against recomputing everything.

The reference (`generate_recompute`) runs `thought.rollout` over the whole current
sequence for every new token, as the authors' code does; the cached generator keeps
a KV cache of the real tokens and thinks only at the last position.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quietstar_jax.generation import cached as G
from quietstar_jax.generation import reference as R
from quietstar_jax.generation import sampling as S
from quietstar_jax.model import ModelConfig, init_params, lm_logits
from quietstar_jax.thought import ThoughtConfig, init_thought_params

N_NEW = 64
PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 3], list(range(20, 41))]  # 7, 2 and 21 tokens


def _tiny(sliding_window: int | None = None, seed: int = 0):
    """A tiny random model whose logits differ clearly between tokens, with a random
    (non-zero) mixing head so that the thought changes the prediction."""
    cfg = ModelConfig(vocab_size=67, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, eos_token_id=None,
                      sliding_window=sliding_window, model_type="llama")

    @jax.jit
    def make(key):
        k0, k1, k2 = jax.random.split(key, 3)
        params = init_params(cfg, k0)
        params = jax.tree.map(lambda x: 5 * x if x.ndim > 1 else x, params)
        th = init_thought_params(params, cfg, k1, 5)
        th["mix"]["w2"] = 0.3 * jax.random.normal(k2, th["mix"]["w2"].shape)
        return params | {"thought": th}

    params = make(jax.random.key(seed))
    tc = ThoughtConfig(n_ahead=5, n_ahead_talk=1, n_passes=1, start_token_id=65,
                       end_token_id=66, pad_token_id=0)
    return cfg, params, tc


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def _same(a: G.Generation, b: G.Generation, thoughts: bool = True) -> None:
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.lengths), np.asarray(b.lengths))
    if thoughts:
        np.testing.assert_array_equal(np.asarray(a.thoughts), np.asarray(b.thoughts))
        np.testing.assert_allclose(np.asarray(a.mixing_weights), np.asarray(b.mixing_weights),
                                   atol=1e-4)


def test_cached_equals_recompute_greedy_tiny(tiny):
    """Greedy thoughts and tokens: the authors' one-rollout-per-token approach."""
    cfg, params, tc = tiny
    tc = tc.replace(sampling="greedy")
    cached = G.generate(params, cfg, tc, PROMPTS, max_new_tokens=N_NEW, greedy=True,
                        return_thoughts=True)
    ref = R.generate_recompute(params, cfg, tc, PROMPTS, max_new_tokens=N_NEW, greedy=True,
                               exact_rng=False)
    _same(cached, ref)
    assert cached.tokens.shape == (3, N_NEW) and cached.thoughts.shape == (3, N_NEW, 2)
    # the thought matters: the mixing weight is far from 0 and the tokens differ from
    # the base model's
    assert np.abs(np.asarray(cached.mixing_weights)).mean() > 0.1
    base = G.generate(params, cfg, tc, PROMPTS, max_new_tokens=N_NEW, greedy=True, think=False)
    assert (np.asarray(base.tokens) != np.asarray(cached.tokens)).any()


def test_cached_equals_recompute_sampled_tiny(tiny):
    """Sampled thoughts (temperature 1) and top-p sampled tokens with the same rng."""
    cfg, params, tc = tiny
    rng = jax.random.key(7)
    kw = dict(max_new_tokens=N_NEW, rng=rng, temperature=0.8, top_p=0.9)
    cached = G.generate(params, cfg, tc, PROMPTS, return_thoughts=True, **kw)
    ref = R.generate_recompute(params, cfg, tc, PROMPTS, exact_rng=True, **kw)
    _same(cached, ref)
    other = G.generate(params, cfg, tc, PROMPTS, **(kw | {"rng": jax.random.key(8)}))
    assert (np.asarray(other.tokens) != np.asarray(cached.tokens)).any()


def test_cached_equals_recompute_sliding_window():
    """A sliding window shorter than the sequence masks the cache and the thought."""
    cfg, params, tc = _tiny(sliding_window=6, seed=3)
    tc = tc.replace(sampling="greedy")
    kw = dict(max_new_tokens=24, greedy=True)
    cached = G.generate(params, cfg, tc, PROMPTS, return_thoughts=True, **kw)
    _same(cached, R.generate_recompute(params, cfg, tc, PROMPTS, exact_rng=False, **kw))


def test_base_generation_matches_full_forward(tiny):
    """think=False: greedy argmax of the full-sequence LM logits, token by token (the
    sequence right-padded to a fixed width so that one compiled forward serves)."""
    cfg, params, tc = tiny
    n = 12
    gen = G.generate(params, cfg, tc, PROMPTS, max_new_tokens=n, greedy=True, think=False)
    width = max(map(len, PROMPTS)) + n
    full = jax.jit(lm_logits, static_argnums=1)
    for b, prompt in enumerate(PROMPTS):
        seq = list(prompt)
        for _ in range(n):
            ids = np.zeros((1, width), np.int32)
            mask = np.zeros((1, width), np.int32)
            ids[0, :len(seq)], mask[0, :len(seq)] = seq, 1
            logits = np.array(full(params, cfg, jnp.asarray(ids), jnp.asarray(mask)))[0]
            logits = logits[len(seq) - 1]
            logits[[tc.start_token_id, tc.end_token_id]] = -np.inf
            seq.append(int(np.argmax(logits)))
        assert np.asarray(gen.tokens)[b].tolist() == seq[len(prompt):]


def test_eos_stops_rows_and_pads(tiny):
    cfg, params, tc = tiny
    tcg = tc.replace(sampling="greedy")
    free = np.asarray(G.generate(params, cfg, tcg, PROMPTS, max_new_tokens=N_NEW,
                                 greedy=True, return_thoughts=True).tokens)[:, :16]
    eos = int(free[0, 3])  # a token row 0 emits at step 3
    gen = G.generate(params, cfg, tcg, PROMPTS, max_new_tokens=16, greedy=True,
                     eos_token_id=eos, pad_token_id=0)
    toks, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
    for b in range(len(PROMPTS)):
        hits = np.flatnonzero(free[b] == eos)
        n = hits[0] + 1 if hits.size else 16
        assert lengths[b] == n
        np.testing.assert_array_equal(toks[b, :n], free[b, :n])
        assert (toks[b, n:] == 0).all()


def test_top_p_filter_hand_computed():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]]))
    kept = lambda p: np.asarray(S.top_p_filter(logits, p)) > -1e29
    assert kept(0.5).tolist() == [[False, True, False, False]]
    assert kept(0.7).tolist() == [[False, True, False, True]]
    assert kept(0.81).tolist() == [[False, True, True, True]]
    assert kept(1.0).tolist() == [[True, True, True, True]]


def test_sampling_frequencies_follow_temperature():
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    logits = jnp.log(jnp.asarray(np.tile(probs, (4000, 1))))
    sc = S.SamplingConfig(temperature=0.5)
    draws = np.asarray(S.sample_token(jax.random.key(0), logits, sc))
    want = probs ** 2 / (probs ** 2).sum()  # temperature 0.5 squares the probabilities
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / draws.size, want, atol=0.03)


def test_package_generate_is_the_generation_function():
    """The notebook API's `quietstar_jax.generate` is `generation.cached.generate`, also
    once the generation modules are imported (no module shares its name)."""
    import quietstar_jax
    import quietstar_jax.generation
    import quietstar_jax.generation.cli  # noqa: F401

    assert quietstar_jax.generate is G.generate
    assert quietstar_jax.generation.generate is G.generate


def test_bad_inputs(tiny):
    cfg, params, tc = tiny
    with pytest.raises(ValueError, match="empty"):
        G.generate(params, cfg, tc, [[1, 2], []], max_new_tokens=2, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        G.generate(params, cfg, tc, [[1, 2]], max_new_tokens=0, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="needs an rng"):
        G.generate(params, cfg, tc, [[1, 2]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 67\)"):
        G.generate(params, cfg, tc, [[1, 99]], max_new_tokens=2, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="top_p"):
        G.generate(params, cfg, tc, [[1, 2]], max_new_tokens=2, rng=jax.random.key(0), top_p=0)
    with pytest.raises(ValueError, match="start_token_id"):
        G.generate(params, cfg, tc.replace(start_token_id=None), [[1, 2]], max_new_tokens=2,
                   rng=jax.random.key(0))


# --------------------------------------------------------------------------- stories260K


def shared_path_str(*parts: str) -> str:
    from conftest import shared_path

    return str(shared_path(*parts))


@pytest.fixture(scope="module")
def stories(request):
    from conftest import shared_path

    from quietstar_jax import hf

    path = shared_path("data", "stories260K-hf")
    cfg, params, tok = hf.load_pretrained(path)
    ref = json.loads(shared_path("data", "stories260K", "reference_outputs.json").read_text())
    return cfg, params, tok, ref


def test_stories260k_base_greedy_matches_llama2c(stories):
    """Cached base generation from BOS reproduces llama2.c's greedy 199 tokens."""
    cfg, params, tok, ref = stories
    want = ref["computed_greedy_200_steps_token_ids"]
    gen = G.generate(params, cfg, None, [want[:1]], max_new_tokens=len(want) - 1, greedy=True,
                     think=False, eos_token_id=None)
    assert np.asarray(gen.tokens)[0].tolist() == want[1:]


@pytest.mark.slow
def test_stories260k_cached_equals_recompute(stories):
    """64 new tokens with thoughts (n_ahead 6), greedy and sampled, on stories260K with
    a random mixing head (the loaded one starts at w = 0, where thoughts change nothing)."""
    from quietstar_jax import hf

    cfg, params, tok, _ = stories
    params = dict(params)
    mix = dict(params["thought"]["mix"])
    mix["w2"] = 0.5 * jax.random.normal(jax.random.key(0), mix["w2"].shape)
    params["thought"] = dict(params["thought"], mix=mix)
    tc = ThoughtConfig(n_ahead=6, n_ahead_talk=1, n_passes=1, **hf.thought_token_ids(tok))
    prompts = [tok(t)["input_ids"] for t in ("Once upon a time", "Lily and Tom went to the park.")]
    g = tc.replace(sampling="greedy")
    kw = dict(max_new_tokens=N_NEW, eos_token_id=None)
    cached = G.generate(params, cfg, g, prompts, greedy=True, return_thoughts=True, **kw)
    _same(cached, R.generate_recompute(params, cfg, g, prompts, greedy=True, exact_rng=False,
                                       **kw))
    rng = jax.random.key(1)
    cached = G.generate(params, cfg, tc, prompts, rng=rng, return_thoughts=True, **kw)
    _same(cached, R.generate_recompute(params, cfg, tc, prompts, rng=rng, exact_rng=True, **kw))


def test_generate_text_shows_thoughts(stories):
    cfg, params, tok, _ = stories
    from quietstar_jax import hf

    tc = ThoughtConfig(n_ahead=5, n_ahead_talk=1, n_passes=1, **hf.thought_token_ids(tok))
    out = G.generate_text(params, cfg, tc, tok, ["Once upon a time"], max_new_tokens=8,
                          rng=jax.random.key(0), return_thoughts=True, eos_token_id=None)
    assert len(out) == 1 and len(out[0]["tokens"]) == 8
    assert len(out[0]["thoughts"]) == 8 and all(isinstance(t, str) for t in out[0]["thoughts"])
    prompt = tok("Once upon a time")["input_ids"]
    full = tok.decode(prompt + out[0]["tokens"], skip_special_tokens=True)
    assert full == "Once upon a time" + out[0]["completion"]


def test_generate_cli_from_training_checkpoint(stories, tmp_path, capsys):
    """A training workdir (orbax `checkpoints/<step>/state` + config.json): the restored
    params (with a random mixing head) and the config's n_ahead are used."""
    import orbax.checkpoint as ocp

    from quietstar_jax import hf
    from quietstar_jax.cli_common import load_cli_model
    from quietstar_jax.generation.cli import main

    cfg, params, tok, _ = stories
    hf_dir = shared_path_str("data", "stories260K-hf")
    params = dict(params)
    mix = dict(params["thought"]["mix"])
    mix["w2"] = 0.5 * jax.random.normal(jax.random.key(3), mix["w2"].shape)
    params["thought"] = dict(params["thought"], mix=mix)
    wd = tmp_path / "wd"
    (wd / "checkpoints").mkdir(parents=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save((wd / "checkpoints" / "5" / "state").resolve(), {"params": params, "step": 5})
    ckpt.wait_until_finished()
    (wd / "config.json").write_text(json.dumps({
        "model": {"hf_path": hf_dir, "param_dtype": "float32"},
        "thought": {"n_ahead": 4, "n_ahead_talk": 4, "n_passes": 2, "sampling": "sample",
                    "start_token_id": None, "end_token_id": None, "pad_token_id": None}}))
    cfg2, params2, tok2, tc2 = load_cli_model(wd)
    assert tc2.n_ahead == 4 and tc2.start_token_id == hf.thought_token_ids(tok)["start_token_id"]
    np.testing.assert_array_equal(np.asarray(params2["thought"]["mix"]["w2"]),
                                  np.asarray(mix["w2"]))
    out = tmp_path / "gen.json"
    assert main([str(wd), "--prompt", "Once upon a time", "--max-new-tokens", "6", "--greedy",
                 "--thought-sampling", "greedy", "--show-thoughts", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_ahead"] == 4 and res["thought_tokens"] == 1
    (item,) = res["thinking"]
    tc = tc2.replace(n_ahead_talk=1, n_passes=1, sampling="greedy")
    want = G.generate(params, cfg, tc, [tok("Once upon a time")["input_ids"]], max_new_tokens=6,
                      greedy=True, return_thoughts=True)
    assert item["tokens"] == np.asarray(want.tokens)[0].tolist()
    np.testing.assert_allclose(item["mixing_weights"], np.asarray(want.mixing_weights)[0],
                               rtol=1e-5, atol=1e-6)
    assert np.abs(item["mixing_weights"]).max() > 1e-3
    assert "<|startthought|>" in capsys.readouterr().out
    assert main([str(wd)]) == 2  # no prompt
    with pytest.raises(FileNotFoundError):
        load_cli_model(tmp_path / "nowhere")
