"""The thinking experiment's pieces: the two-step arithmetic corpus, pause thoughts,
and a tiny end-to-end run of experiments/latent_steps.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import latent_corpus as corpus  # noqa: E402
from quietstar_jax import model  # noqa: E402
from quietstar_jax.loss import quietstar_details, quietstar_loss  # noqa: E402
from quietstar_jax.thoughts import ThoughtConfig, init_thought_params  # noqa: E402


def test_functions_are_permutations():
    for f in corpus.FUNCTIONS:
        assert sorted(corpus.TABLES[f]) == sorted(corpus.TABLES[f].values()) == sorted(
            corpus.ENTITIES)


def test_skipped_and_explicit_forms_agree_on_every_answer():
    problems = corpus.all_problems()
    n_f, n_e = len(corpus.FUNCTIONS), len(corpus.ENTITIES)
    assert len(problems) == len(set(problems)) == n_f * n_f * n_e
    for p in problems:
        skipped, explicit = p.text(explicit=False), p.text(explicit=True)
        q1, none, t1 = corpus.parse_line(skipped)
        q2, m2, t2 = corpus.parse_line(explicit)
        assert q1 == q2 == p and none is None
        assert t1 == t2  # the same answer in both forms
        # ... and it is the composition the text states, looked up here step by step.
        m = corpus.TABLES[p.inner][p.x]
        assert m2 == m and t1 == corpus.TABLES[p.outer][m]
        assert skipped.startswith(p.question) and explicit.startswith(p.question)


def test_splits_are_disjoint_and_cover_every_problem():
    parts = {name: set(corpus.problems_of(name)) for name in corpus.SPLITS}
    assert sum(map(len, parts.values())) == len(corpus.all_problems())
    assert not (parts["train"] & parts["eval"]) and not (parts["train"] & parts["tune"])
    assert not (parts["tune"] & parts["eval"])
    assert len(parts["eval"]) > 40 and len(parts["tune"]) > 40
    # Every single step of a held-out problem occurs in some training problem.
    train = parts["train"]
    first = {(p.inner, p.x) for p in train}
    second = {(p.outer, p.intermediate) for p in train}
    for p in parts["eval"] | parts["tune"]:
        assert (p.inner, p.x) in first and (p.outer, p.intermediate) in second


def test_documents_are_deterministic_one_form_and_answers_are_located():
    docs = list(corpus.documents("eval", seed=3, count=40, max_chars=60))
    assert [d.text for d in docs] == [d.text for d in corpus.documents("eval", 3, 40)]
    assert {d.explicit for d in docs} == {True, False}
    pool = set(corpus.problems_of("eval"))
    for d in docs:
        assert len(d.text) <= 60
        lines = d.text.splitlines(keepends=True)
        assert len(lines) == len(d.problems)
        for line, (off, p) in zip(lines, corpus.answer_offsets(d), strict=True):
            prob, inter, ans = corpus.parse_line(line)
            assert prob == p and p in pool and (inter is not None) == d.explicit
            assert d.text[off] == ans and d.text[off + 1] == "\n"


def tiny_model():
    cfg = model.ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=1,
                            num_heads=2, num_kv_heads=1)
    params = model.init_params(cfg, jax.random.key(0))
    params["thought"] = init_thought_params(params, cfg, jax.random.key(1), init_token_id=3)
    # A mixing head that is not zero, so the thoughts do change the predictions.
    params["thought"]["mix"]["w2"] = 0.1 * jax.random.normal(jax.random.key(2), (16, 1))
    return cfg, params


def test_pause_thoughts_are_the_fixed_token_and_have_no_policy_loss():
    cfg, params = tiny_model()
    details = jax.jit(quietstar_details, static_argnums=(1, 2))
    pause = 7
    tc = ThoughtConfig(n_ahead=6, n_ahead_talk=2, n_passes=2, sampling="pause",
                       pause_token_id=pause, start_token_id=38, end_token_id=39,
                       pad_token_id=0, policy_loss_beta=1e6)
    ids = jax.random.randint(jax.random.key(3), (2, 12), 1, 38)
    mask = jnp.ones_like(ids)
    a = details(params, cfg, tc, ids, mask, jax.random.key(4))
    b = details(params, cfg, tc, ids, mask, jax.random.key(5))
    ro = a["rollout"]
    assert ro.thought_tokens.shape == (tc.n_ahead - 3, 4, 12)
    assert np.all(np.asarray(ro.thought_tokens) == pause)
    fed = np.asarray(ro.fed_tokens)
    assert np.all(fed[0] == 38) and np.all(fed[1:tc.n_ahead - 2] == pause)
    assert np.all(fed[tc.n_ahead - 2] == 39)
    assert float(a["metrics"]["policy_loss"]) == 0.0
    # No sampling: another key gives the same losses and rewards.
    assert float(a["metrics"]["loss"]) == float(b["metrics"]["loss"])
    assert np.array_equal(np.asarray(a["reward"]), np.asarray(b["reward"]))
    # The same as feeding the pause token as given thought tokens to the sampling mode.
    given = jnp.full((tc.n_ahead - 3, 4, 12), pause, jnp.int32)
    sample = tc.replace(sampling="sample", pause_token_id=None)
    c = details(params, cfg, sample, ids, mask, None, given)
    np.testing.assert_allclose(float(a["metrics"]["nll_thought"]),
                               float(c["metrics"]["nll_thought"]), rtol=1e-6)
    # There the same tokens would be reinforced (without the baseline, which cancels
    # identical passes), in pause mode never.
    no_base = dict(use_baseline=False)
    d = details(params, cfg, sample.replace(**no_base), ids, mask, None, given)
    e = details(params, cfg, tc.replace(**no_base), ids, mask, jax.random.key(4))
    assert float(d["metrics"]["policy_loss"]) != 0.0
    assert float(e["metrics"]["policy_loss"]) == 0.0
    # Gradients: the huge policy weight adds nothing (only the NLL trains the model).
    def loss(p, t):
        return quietstar_loss(p, cfg, t, ids, mask, jax.random.key(4))[0]

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_big = grad(params, tc)
    g_none = grad(params, tc.replace(policy_loss_beta=0.0))
    for x, y in zip(jax.tree.leaves(g_big), jax.tree.leaves(g_none), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_tiny_experiment_writes_the_results_file(tmp_path):
    from experiments import latent_steps

    args = ["--out", str(tmp_path), "--quick"]
    for kv in ("hidden=16", "intermediate=24", "layers=1", "heads=2", "kv_heads=1",
               "pretrain_steps=2", "pretrain_batch=4", "steps=2", "batch=2", "sweep=4",
               "seeds=0,1", "eval_docs=3", "curve_docs=2", "curve_points=2", "log_every=1"):
        args += ["--set", kv]
    assert latent_steps.main(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for table in ("answer_nll", "answer_accuracy"):
        for key in ("base", "thinking", "pause", "plain_lm", "calibration_only",
                    "oracle_thought", "random_thought"):
            assert len(res[table]["per_seed"][key]) == 2
            assert res[table][key] == pytest.approx(np.mean(res[table]["per_seed"][key]))
    assert set(res["n_ahead_sweep"]) == {"4"}
    for row in res["n_ahead_sweep"].values():
        assert {"base", "thinking"} <= set(row)
    assert 0.0 <= res["intermediate_in_thought"] <= 1.0
    assert res["seeds"] == [0, 1]
    ex = res["per_seed"][0]["arms"]["pause"]["examples"][0]
    assert set(ex["thought"]) == {"_"}  # the pause control's thought is its fixed token


def test_fed_thoughts_are_what_the_oracle_and_random_arms_claim_and_calibration_zeroes_them():
    import re

    from experiments import latent_steps as ls

    p = ls.Protocol(hidden=16, layers=1, heads=2, kv_heads=1, intermediate=24)
    es = ls.eval_set(p, "eval", False, 6)
    oracle = ls.fed_thoughts(es, "oracle", 1, seed=0)
    random = ls.fed_thoughts(es, "random", 1, seed=0)
    # Independently: the intermediate of the problem written just before each answer
    # position (the document text up to the answer), and the entity alphabet.
    hits, checked = 0, 0
    for r, doc in enumerate(es.docs):
        for pos in es.positions[r][es.positions[r] >= 0]:
            outer, inner, x = re.search(r"(\w)\((\w)\((\w)\)\)=$", doc.text[:pos]).groups()
            assert chr(oracle[0, r, pos]) == corpus.apply(inner, x)
            assert chr(random[0, r, pos]) in corpus.ENTITIES
            hits += chr(random[0, r, pos]) == corpus.apply(inner, x)
            checked += 1
    assert checked > 20 and hits < checked / 3

    cfg = ls.model_config(p)
    params = model.init_params(cfg, jax.random.key(0))
    params["thought"] = init_thought_params(params, cfg, jax.random.key(1), init_token_id=45)
    params["thought"]["mix"]["w2"] = 0.3 * jax.random.normal(jax.random.key(2), (16, 1))
    fn = ls.make_eval_fn(cfg, ls.thought_config(p, 4))
    ids, mask = es.batch["input_ids"], es.batch["attention_mask"]
    out = jax.device_get(fn(params, ids, mask, es.positions, jax.random.key(3),
                            jnp.asarray(oracle)))
    ok = es.positions >= 0
    # The rollout thought at each answer position is the fed token.
    np.testing.assert_array_equal(out["thought"][0][ok], es.intermediates[ok])
    # Calibration only: (1 - w) x the plain LM's logits, from lm_logits.
    logits = np.asarray(model.lm_logits(params, cfg, ids, mask), np.float64)
    w = out["weight"][ok]
    rows, cols = np.nonzero(ok)
    at = logits[rows, es.positions[rows, cols]] * (1 - w)[:, None]
    logp = at - np.log(np.exp(at - at.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - at.max(-1, keepdims=True)
    target = ids[rows, es.positions[rows, cols] + 1]
    assert np.abs(w).max() > 1e-3  # the mixing head is live, so this can differ from base
    np.testing.assert_allclose(out["nll_calibration"][ok], -logp[np.arange(len(rows)), target],
                               rtol=2e-4, atol=2e-5)
    assert not np.allclose(out["nll_calibration"][ok], out["nll_base"][ok])
