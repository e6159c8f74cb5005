"""The fused, chunked vocabulary projections against the materialised `[N, V]` path.

The oracle is plain jax.numpy on full logits (`log_softmax`, `argmax`, autodiff);
the sampler's distribution is checked by a chi-square test against the exact
softmax probabilities.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from quietstar_jax import vocab
from quietstar_jax.model import ModelConfig


@pytest.fixture(autouse=True)
def _always_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """These shapes are small enough for the one-step shortcut: walk the chunks anyway."""
    monkeypatch.setattr(vocab, "SMALL_LOGITS", 0)


# (vocab, chunk): dividing, not dividing, larger than the vocab, one column per step,
# vocabularies with 16, 2 and 1 blocks.
CASES = [(64, 16), (64, 24), (514, 100), (514, 4096), (97, 10), (97, 1), (2048, 300)]


def _problem(v: int, n: int = 12, h: int = 8, seed: int = 0):
    k = jax.random.split(jax.random.key(seed), 3)
    hid = jax.random.normal(k[0], (3, n // 3, h))
    w = jax.random.normal(k[1], (h, v)) * 0.7
    ids = jax.random.randint(k[2], (3, n // 3), 0, v)
    return hid, w, ids


def _oriented(w, vocab_major: bool):
    """w `[H, V]` as the ops take it: as is, or stored vocabulary-major `[V, H]`."""
    return vocab.VocabMajor(w.T) if vocab_major else w


def _masked_logits(hid, w, scale, masked):
    z = jnp.einsum("...h,hv->...v", hid, w) * scale
    for m in masked:
        z = z.at[..., m].set(-1e10)
    return z


@pytest.mark.parametrize("vocab_major", [False, True], ids=["hv", "vocab_major"])
@pytest.mark.parametrize(("v", "chunk"), CASES)
def test_token_nll_value_and_grads_match_materialised(v: int, chunk: int,
                                                      vocab_major: bool) -> None:
    hid, w, ids = _problem(v)
    weight = jnp.arange(ids.size, dtype=jnp.float32).reshape(ids.shape) % 3  # 0 = padding

    def fused(hid, w):
        return jnp.sum(weight * vocab.nll_from_hidden(hid, _oriented(w, vocab_major), ids,
                                                chunk_size=chunk))

    def dense(hid, w):
        logp = jax.nn.log_softmax(jnp.einsum("...h,hv->...v", hid, w), axis=-1)
        return jnp.sum(weight * -jnp.take_along_axis(logp, ids[..., None], -1)[..., 0])

    (a, ga), (b, gb) = (jax.value_and_grad(f, argnums=(0, 1))(hid, w) for f in (fused, dense))
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for x, y in zip(ga, gb, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab_major", [False, True], ids=["hv", "vocab_major"])
@pytest.mark.parametrize(("v", "chunk"), CASES)
def test_token_logp_with_temperature_and_masked_ids(v: int, chunk: int,
                                                    vocab_major: bool) -> None:
    hid, w, ids = _problem(v, seed=1)
    masked = (v - 1, 3)
    ids = jnp.where(jnp.isin(ids, jnp.array(masked)), 0, ids)
    cot = jax.random.normal(jax.random.key(7), ids.shape)

    def fused(hid, w):
        lp = vocab.logp_from_hidden(hid, _oriented(w, vocab_major), ids, temperature=3.0,
                              masked_ids=masked, chunk_size=chunk)
        return jnp.sum(cot * lp)

    def dense(hid, w):
        logp = jax.nn.log_softmax(_masked_logits(hid, w, 1.0, masked) / 3.0, axis=-1)
        return jnp.sum(cot * jnp.take_along_axis(logp, ids[..., None], -1)[..., 0])

    (a, ga), (b, gb) = (jax.value_and_grad(f, argnums=(0, 1))(hid, w) for f in (fused, dense))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, gb, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab_major", [False, True], ids=["hv", "vocab_major"])
@pytest.mark.parametrize(("v", "chunk"), CASES)
def test_greedy_draw_is_the_masked_argmax_and_its_logp_has_the_right_gradient(
    v: int, chunk: int, vocab_major: bool
) -> None:
    hid, w, _ = _problem(v, seed=2)
    hid = jnp.round(hid * 2) / 2  # ties between columns: the first one wins, as argmax
    masked = (0, v // 2)
    cot = jax.random.normal(jax.random.key(3), hid.shape[:-1])
    want_tok = jnp.argmax(_masked_logits(hid, w, 1.0, masked), axis=-1)

    def fused(hid, w):
        kw = dict(logp_temperature=3.0, masked_ids=masked, chunk_size=chunk)
        d = vocab.draw(hid, _oriented(w, vocab_major), None, greedy=True, **kw)
        lp = vocab.logp_of_draws(hid, _oriented(w, vocab_major), d, **kw)
        return jnp.sum(cot * lp), d.tok

    def dense(hid, w):
        logp = jax.nn.log_softmax(_masked_logits(hid, w, 1.0, masked) / 3.0, axis=-1)
        return jnp.sum(cot * jnp.take_along_axis(logp, want_tok[..., None], -1)[..., 0])

    (a, tok), ga = jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)(hid, w)
    b, gb = jax.value_and_grad(dense, argnums=(0, 1))(hid, w)
    np.testing.assert_array_equal(tok, want_tok)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, gb, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("v", "chunk"), [(40, 3), (40, 40), (37, 5)])
def test_chunked_sampler_draws_from_the_exact_distribution(v: int, chunk: int) -> None:
    """Chi-square over 40,000 draws from softmax(z / 0.7) with two ids masked."""
    h = 6
    hid = jax.random.normal(jax.random.key(4), (1, h))
    w = jax.random.normal(jax.random.key(5), (h, v)) * 0.5
    masked = (1, v - 2)
    z = _masked_logits(hid, w, 1.0, masked)[0] / 0.7
    p = np.asarray(jax.nn.softmax(z.astype(jnp.float64) if jax.config.x64_enabled else z))
    draws = 40000
    keys = jax.random.split(jax.random.key(6), draws)

    @jax.jit
    def draw(keys):
        return jax.vmap(lambda k: vocab.sample(hid, w, k, temperature=0.7, masked_ids=masked,
                                               chunk_size=chunk))(keys)[:, 0]

    counts = np.bincount(np.asarray(draw(keys)), minlength=v)
    assert counts[list(masked)].sum() == 0
    keep = p * draws >= 5  # chi-square needs expected counts of at least ~5
    expected = p[keep] * draws
    observed = counts[keep]
    rest_e, rest_o = draws - expected.sum(), draws - observed.sum()
    chi2 = ((observed - expected) ** 2 / expected).sum() + (rest_o - rest_e) ** 2 / max(rest_e, 1)
    dof = int(keep.sum())  # the kept bins plus the pooled rest, minus one
    assert stats.chi2.sf(chi2, dof) > 1e-3, (chi2, dof)


def test_one_chunk_sampler_gives_the_unchunked_samplers_tokens() -> None:
    v, h = 514, 8
    hid = jax.random.normal(jax.random.key(8), (64, h))
    w = jax.random.normal(jax.random.key(9), (h, v))
    masked = (512, 513)
    for s in range(5):
        key = jax.random.key(s)
        z = jnp.dot(hid, w, preferred_element_type=jnp.float32)
        z = jnp.where(jnp.isin(jnp.arange(v), jnp.array(masked)), -1e30, z / 1.3)
        want = vocab.sample_categorical(key, z)
        got = vocab.sample(hid, w, key, temperature=1.3, masked_ids=masked, chunk_size=v)
        np.testing.assert_array_equal(got, want)


def test_sampled_logp_matches_the_logp_of_the_drawn_token() -> None:
    hid, w, _ = _problem(514, seed=10)
    kw = dict(logp_temperature=3.0, masked_ids=(512, 513), chunk_size=77)
    d = vocab.draw(hid, w, jax.random.key(0), sample_temperature=1.0, **kw)
    tok, lp = d.tok, vocab.logp_of_draws(hid, w, d, **kw)
    want = vocab.logp_from_hidden(hid, w, tok, temperature=3.0, masked_ids=(512, 513),
                                  chunk_size=514)
    np.testing.assert_allclose(lp, want, rtol=1e-6, atol=1e-6)
    assert not np.isin(np.asarray(tok), [512, 513]).any()


def test_small_projections_walk_the_vocabulary_in_one_step(monkeypatch) -> None:
    monkeypatch.setattr(vocab, "SMALL_LOGITS", 1 << 22)
    w = jnp.zeros((4, 514))
    assert vocab._spec(w, 100, 1.0, (), "float32", 8).lay.n_chunks == 1
    assert vocab._spec(w, 100, 1.0, (), "float32", 1 << 20).lay.n_chunks > 1
    assert vocab.fits_one_chunk(8, 514) and not vocab.fits_one_chunk(1 << 20, 514)
    assert vocab._spec(w, 100, 1.0, (), "float32", False).lay.n_chunks > 1  # explicit
    assert vocab._spec(w, 100, 1.0, (), "float32", True).lay.n_chunks == 1


def test_stacked_draws_give_each_steps_logp_and_gradient() -> None:
    """Draws of several steps, their log-probs taken in one stacked call, equal the
    per-step log-probs (value and gradient)."""
    hid, w, _ = _problem(514, seed=11)
    steps = jnp.stack([hid, hid * 0.5, -hid])
    kw = dict(logp_temperature=3.0, masked_ids=(512, 513), chunk_size=100)
    draws = [vocab.draw(steps[i], w, jax.random.key(i), **kw) for i in range(3)]
    stacked = vocab.Draw(*(jnp.stack(x) for x in zip(*draws, strict=True)))
    cot = jax.random.normal(jax.random.key(12), steps.shape[:-1])

    def one_call(steps, w):
        return jnp.sum(cot * vocab.logp_of_draws(steps, w, stacked, **kw))

    def per_step(steps, w):
        return sum(jnp.sum(cot[i] * vocab.logp_from_hidden(
            steps[i], w, draws[i].tok, temperature=3.0, masked_ids=(512, 513),
            chunk_size=514)) for i in range(3))

    (a, ga), (b, gb) = (jax.value_and_grad(f, argnums=(0, 1))(steps, w)
                        for f in (one_call, per_step))
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for x, y in zip(ga, gb, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_bad_chunk_size_is_rejected_naming_the_field() -> None:
    with pytest.raises(ValueError, match="ModelConfig.vocab_chunk"):
        ModelConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_layers=1,
                    num_heads=2, num_kv_heads=1, vocab_chunk=0)
    with pytest.raises(ValueError, match="chunk size"):
        vocab.layout(64, 0)


_MESH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, sys.argv[2])
    from quietstar_jax import sharding, vocab
    import memory_scaling as ms
    vocab.SMALL_LOGITS = 0  # walk the chunks even at this small size

    V, H, N = 512, 16, 32
    hid = jax.random.normal(jax.random.key(0), (N, H))
    w = jax.random.normal(jax.random.key(1), (H, V))
    ids = jax.random.randint(jax.random.key(2), (N,), 0, V)
    key = jax.random.key(3)

    def f(hid, w):
        nll = vocab.nll_from_hidden(hid, w, ids, chunk_size=96)
        kw = dict(logp_temperature=3.0, masked_ids=(5, 7), chunk_size=96)
        d = vocab.draw(hid, w, key, **kw)
        tok, lp = d.tok, vocab.logp_of_draws(hid, w, d, **kw)
        return jnp.sum(nll) + jnp.sum(lp), tok

    step = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
    (loss1, tok1), g1 = step(hid, w)
    mesh = sharding.make_mesh((2, 1, 4))
    with sharding.use_mesh(mesh):
        ws = jax.device_put(w, NamedSharding(mesh, P(None, "tensor")))
        hs = jax.device_put(hid, NamedSharding(mesh, P(("data", "fsdp"))))
        hlo = step.lower(hs, ws).compile().as_text()
        (loss2, tok2), g2 = step(hs, ws)
    gathered = [s for _, s in ms.all_gather_shapes(hlo) if any(d >= V // 4 for d in s)]
    print(json.dumps({
        "loss": [float(loss1), float(loss2)],
        "tok_equal": bool((np.asarray(tok1) == np.asarray(tok2)).all()),
        "gh": float(np.abs(np.asarray(g1[0]) - np.asarray(g2[0])).max()),
        "gw": float(np.abs(np.asarray(g1[1]) - np.asarray(g2[1])).max()),
        "w_sharding": str(g2[1].sharding.spec), "vocab_gathers": gathered,
    }))
    """
)


@pytest.mark.slow
def test_vocab_split_over_tensor_matches_one_device_without_gathering_logits() -> None:
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=f"{root}{os.pathsep}{root / 'benchmarks'}")
    res = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, "x", str(root)], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    a, b = out["loss"]
    assert abs(a - b) <= 1e-5 * abs(a), out
    assert out["tok_equal"], out
    assert out["gh"] < 1e-4 and out["gw"] < 1e-4, out
    assert "tensor" in out["w_sharding"], out
    assert out["vocab_gathers"] == [], out


def test_token_ids_outside_the_vocabulary_are_rejected_before_compiling() -> None:
    from quietstar_jax.model import init_params
    from quietstar_jax.thought import ThoughtConfig
    from quietstar_jax.thought.loss import quietstar_loss

    cfg = ModelConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_layers=1,
                      num_heads=2, num_kv_heads=1)
    tc = ThoughtConfig(n_ahead=3, n_ahead_talk=1, n_passes=1, start_token_id=62,
                       end_token_id=63, pad_token_id=0)
    params = init_params(cfg, jax.random.key(0))
    ids = np.full((1, 8), 5)
    ids[0, 3] = 64
    with pytest.raises(ValueError, match=r"input_ids has token id 64, outside the vocabulary"):
        quietstar_loss(params, cfg, tc, ids, None, jax.random.key(0))


@pytest.mark.parametrize(("v", "chunk"), [(514, 100), (97, 10)])
def test_a_vocab_major_table_draws_the_same_tokens(v: int, chunk: int) -> None:
    hid, w, _ = _problem(v, seed=4)
    kw = dict(logp_temperature=3.0, masked_ids=(1,), chunk_size=chunk)
    a = vocab.draw(hid, w, jax.random.key(5), **kw)
    b = vocab.draw(hid, vocab.VocabMajor(w.T), jax.random.key(5), **kw)
    np.testing.assert_array_equal(np.asarray(b.tok), np.asarray(a.tok))
    np.testing.assert_allclose(np.asarray(b.lse), np.asarray(a.lse), rtol=1e-5)


def test_a_vmapped_draw_keeps_the_chunking_of_all_its_tokens(monkeypatch: pytest.MonkeyPatch):
    """One token's draw mapped over N tokens with `one_chunk` decided for the N tokens
    (`fits_one_chunk`, as `map_thoughts` does for a position's thought under `jax.vmap`)
    walks the vocabulary in the chunks of the unmapped draw of N
    tokens, not in one step, and gives its greedy tokens and log-prob statistics."""
    monkeypatch.setattr(vocab, "SMALL_LOGITS", 1000)  # 12 tokens x 514 ids: chunked
    v, chunk, n = 514, 100, 12
    hid, w, _ = _problem(v, n=n)
    flat = hid.reshape(n, -1)
    want = vocab.draw(flat, w, None, greedy=True, logp_temperature=3.0, chunk_size=chunk)
    one = lambda hr: vocab.draw(hr[None], w, None, greedy=True, logp_temperature=3.0,  # noqa: E731
                                chunk_size=chunk, one_chunk=vocab.fits_one_chunk(n, v),
                                mapped=True)
    got = jax.vmap(one)(flat)
    np.testing.assert_array_equal(got.tok[:, 0], want.tok)
    np.testing.assert_allclose(got.lse[:, 0], want.lse, rtol=1e-6)
    np.testing.assert_allclose(got.picked[:, 0], want.picked, rtol=1e-6)
    def widths(f):  # the column counts of the projections inside the vocabulary scan
        return {d.outvars[0].aval.shape[-1] for e in jax.make_jaxpr(jax.vmap(f))(flat).eqns
                if e.primitive.name == "scan"
                for d in e.params["jaxpr"].jaxpr.eqns if d.primitive.name == "dot_general"}

    assert widths(one) and max(widths(one)) < v, widths(one)  # chunks, never all v at once
    # Without the hint the mapped draw sees one token and walks the vocabulary in one step.
    whole = lambda hr: vocab.draw(hr[None], w, None, greedy=True, chunk_size=chunk)  # noqa: E731
    assert widths(whole) == {v}
