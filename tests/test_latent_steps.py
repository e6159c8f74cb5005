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
from quietstar_jax.thought import ThoughtConfig, init_thought_params  # noqa: E402
from quietstar_jax.thought.loss import quietstar_details, quietstar_loss  # noqa: E402


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


@pytest.mark.slow
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
               "pretrain_seeds=0,1", "seeds=1", "eval_docs=3", "curve_docs=2",
               "curve_points=2", "log_every=1", "bootstrap=50"):
        args += ["--set", kv]
    assert latent_steps.main(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    # Two pretrained LMs, one fine-tune seed each (every run traces its dozen programs).
    assert res["runs"] == [{"lm": lm, "seed": 1} for lm in (0, 1)]
    for table in ("answer_nll", "answer_accuracy"):
        for key in ("plain_lm", "pause", "thinking", "reinforce_off", "random_thought",
                    "oracle_thought", "calibration_only", "worked_step", "pretrained"):
            e = res[table][key]
            assert len(e["per_seed"]) == 2
            assert e["mean"] == pytest.approx(np.mean(e["per_seed"]))
            lo, hi = e["ci95"]
            assert lo <= e["mean"] + 1e-9 and e["mean"] <= hi + 1e-9
        d = res[table]["differences"]["thinking_minus_plain_lm"]
        assert d["mean"] == pytest.approx(res[table]["thinking"]["mean"]
                                          - res[table]["plain_lm"]["mean"])
        assert set(d["per_lm"]) == {"0", "1"}
    for key in ("before_training", "thinking", "reinforce_off"):
        e = res["intermediate_in_thought"][key]
        assert 0.0 <= e["mean"] <= 1.0 and len(e["per_seed"]) == 2 and len(e["ci95"]) == 2
    assert set(res["n_ahead_sweep"]) == {"4"}
    assert res["seeds"] == [1] and res["pretrain_seeds"] == [0, 1]
    ex = res["per_seed"][0]["arms"]["pause"]["examples"][0]
    assert set(ex["thought"]) == {"_"}  # the pause control's thought is its fixed token
    # The per-answer values the intervals come from, saved beside the results.
    saved = np.load(tmp_path / "answers.npz")
    assert saved["thinking_hit"].shape == (2, res["answers_per_run"])
    np.testing.assert_allclose(saved["thinking_hit"].mean(axis=1),
                               res["answer_accuracy"]["thinking"]["per_seed"])


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


def test_default_task_holds_out_compositions_and_the_init_byte_is_not_in_it():
    """The default task: its splits hold out whole problems (compositions) while every
    step is trained, the worked step's delimiter is not the thought init's byte, and no
    document contains the init byte or the pause byte."""
    from experiments import latent_steps as ls

    task = corpus.get_task(None)
    assert ls.Protocol().task == task.name == corpus.DEFAULT_TASK
    init_byte = ls.Protocol().init_token[0]
    assert task.delim != init_byte
    parts = {name: set(corpus.problems_of(name)) for name in corpus.SPLITS}
    assert sum(map(len, parts.values())) == len(corpus.all_problems()) == len(
        task.functions) ** 2 * len(corpus.ENTITIES)
    assert not parts["train"] & (parts["tune"] | parts["eval"])
    assert len(parts["eval"]) > 100  # more held-out compositions than the first task's 63
    first = {(p.inner, p.x) for p in parts["train"]}
    second = {(p.outer, p.intermediate) for p in parts["train"]}
    for p in parts["eval"] | parts["tune"]:
        assert (p.inner, p.x) in first and (p.outer, p.intermediate) in second
    text = "".join(d.text for split in corpus.SPLITS
                   for d in corpus.documents(split, seed=0, count=200))
    assert init_byte not in text and chr(ls.PAUSE_ID) not in text and task.delim in text
    # The training stream uses training problems only.
    batch = next(ls.train_batches(ls.Protocol(), 5, 8))
    for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        for line in bytes(row[1:mask.sum()].tolist()).decode().splitlines():
            assert corpus.parse_line(line)[0] in parts["train"]
    # The first task is still reachable, unchanged.
    old = corpus.get_task("dash4")
    assert old.delim == "-" and len(corpus.problems_of("eval", "dash4")) == 63
    assert corpus.problems_of("train", "dash4")[0].text(True).count("-") == 2


def test_pause_arm_feeds_only_the_pause_token():
    """The experiment's pause arm: every sampled-thought slot is the pause byte (whose
    embedding row only the pause thoughts train), with the same length as the thinking
    arm's thoughts and no policy loss."""
    from experiments import latent_steps as ls
    from quietstar_jax.thought import rollout

    p = ls.Protocol(hidden=16, layers=1, heads=2, kv_heads=1, intermediate=24)
    tc = ls.arm_thought_config(p, "pause")
    think = ls.arm_thought_config(p, "thinking")
    off = ls.arm_thought_config(p, "reinforce_off")
    assert tc.sampling == "pause" and tc.pause_token_id == ls.PAUSE_ID
    assert tc.n_ahead == think.n_ahead and tc.num_sampled == think.num_sampled >= 1
    assert off.policy_loss_beta == 0.0 and think.policy_loss_beta > 0
    assert off.replace(policy_loss_beta=think.policy_loss_beta) == think
    cfg = ls.model_config(p)
    params = ls.add_thought_params(model.init_params(cfg, jax.random.key(0)), cfg, 0, 1.0)
    es = ls.eval_set(p, "eval", False, 4)
    ro = rollout(params, cfg, tc, jnp.asarray(es.batch["input_ids"]),
                 jnp.asarray(es.batch["attention_mask"]), jax.random.key(1))
    fed = np.asarray(ro.fed_tokens)
    assert np.all(np.asarray(ro.thought_tokens) == ls.PAUSE_ID)
    n = tc.n_ahead
    assert np.all(fed[0] == tc.start_token_id) and np.all(fed[n - 2] == tc.end_token_id)
    assert np.all(fed[1:n - 2] == ls.PAUSE_ID)


def test_bootstrap_interval_matches_a_direct_computation():
    """Per-problem bootstrap: resample problems with replacement (every answer of a
    drawn problem, in every run), mean, percentile interval; checked against a plain
    loop over the same draws."""
    from experiments.latent_steps import bootstrap_ci

    rng = np.random.default_rng(7)
    groups = rng.integers(0, 25, size=120) * 3 + 5  # 25 problems, unsorted, non-contiguous
    values = rng.random((3, 120)) < 0.3  # 3 runs x 120 answers of 0/1 hits
    got = bootstrap_ci(values, groups, samples=400, seed=11)
    uniq = np.unique(groups)
    draws = np.random.default_rng(11).integers(len(uniq), size=(400, len(uniq)))
    per_answer = values.astype(float).mean(axis=0)
    stats = []
    for row in draws:
        chosen = np.concatenate([per_answer[groups == uniq[k]] for k in row])
        stats.append(chosen.mean())
    np.testing.assert_allclose(got, np.percentile(stats, [2.5, 97.5]), rtol=1e-12)
    # The same thing over all runs' answers pooled (equal answers per run).
    pooled = []
    for row in draws:
        pooled.append(np.concatenate([values[:, groups == uniq[k]].ravel() for k in row]).mean())
    np.testing.assert_allclose(got, np.percentile(pooled, [2.5, 97.5]), rtol=1e-12)
    assert got[0] < values.mean() < got[1]
    # One problem, one value: no spread.
    assert bootstrap_ci(np.full(10, 0.25), np.zeros(10), samples=20) == [0.25, 0.25]


def test_worked_step_decodes_the_step_then_scores_the_answer(monkeypatch):
    """The worked_step arm: the document up to the question's "=", the delimiter, the
    model's greedy token, the delimiter, then the answer is scored. A stand-in LM that
    knows every step checks the sequences it is shown and gets every answer."""
    from experiments import latent_steps as ls

    p = ls.Protocol(hidden=16, layers=1, heads=2, kv_heads=1, intermediate=24)
    es = ls.eval_set(p, "eval", False, 5)
    d = ord(corpus.get_task(p.task).delim)
    seen = []

    def fake(cfg):
        def fn(params, ids, mask, pos):
            ids, pos = np.asarray(ids), np.asarray(pos)
            out = np.zeros((len(ids), 260), np.float32)
            for i, (row, q) in enumerate(zip(ids, pos, strict=True)):
                text = bytes(row[1:q + 1].tolist()).decode()
                seen.append(text)
                assert np.asarray(mask)[i, :q + 1].all()
                line = text.splitlines()[-1]
                if line.endswith("=" + chr(d)):  # write the intermediate
                    out[i, ord(corpus.apply(line[2], line[4]))] = 5.0
                else:  # "...=;m;": the answer is outer(m)
                    assert line[-3] == line[-1] == chr(d)
                    out[i, ord(corpus.apply(line[0], line[-2]))] = 5.0
            return out
        return fn

    monkeypatch.setattr(ls, "make_next_logits_fn", fake)
    got = ls.worked_step(None, ls.model_config(p), es, chr(d), chunk=7)
    n = int(es.ok.sum())
    assert len(seen) == 2 * n
    assert got["hit_think"] == got["step_correct"] == 1.0
    assert got["answers"]["hit_think"].shape == (n,)
    # The rest of each document (before the question) is the skipped text itself.
    rows, cols = np.nonzero(es.ok)
    for k, (r, c) in enumerate(zip(rows, cols, strict=True)):
        prefix = es.docs[r].text[:es.positions[r, c]]
        assert seen[k] == prefix + chr(d)
    np.testing.assert_allclose(got["answers"]["nll_think"],
                               -np.log(np.exp(5.0) / (np.exp(5.0) + 259)), rtol=1e-6)


def test_evaluate_pads_the_last_chunk_without_changing_any_answer():
    """`evaluate` feeds fixed-size chunks (one compile per configuration); the padding
    rows change no answer's values (fed thoughts: nothing is sampled)."""
    from experiments import latent_steps as ls

    p = ls.Protocol(hidden=16, layers=1, heads=2, kv_heads=1, intermediate=24)
    es = ls.eval_set(p, "eval", False, 6)
    cfg = ls.model_config(p)
    params = ls.add_thought_params(model.init_params(cfg, jax.random.key(0)), cfg, 0, 1.0)
    params["thought"]["mix"]["w2"] = 0.3 * jax.random.normal(jax.random.key(2), (16, 1))
    fn = ls.make_eval_fn(cfg, ls.thought_config(p, 4))
    fed = ls.fed_thoughts(es, "oracle", 1, seed=0)
    whole = ls.evaluate(fn, params, es, 0, chunk=6, given=fed)
    padded = ls.evaluate(fn, params, es, 0, chunk=4, given=fed)
    n = int(es.ok.sum())
    for k in ("nll_base", "nll_think", "hit_think", "weight"):
        assert padded["answers"][k].shape == (n,)
        np.testing.assert_allclose(padded["answers"][k], whole["answers"][k], rtol=1e-5,
                                   atol=1e-6)
    assert padded["raw"]["thought"].shape == whole["raw"]["thought"].shape


def test_use_warmup_feeds_the_true_intermediate_with_the_policy_loss_off():
    """`--set use_warmup=K`: the training stream's oracle thought is, at every answer
    position, the intermediate of the problem written just before it (found here from
    the text), and the warm-up step feeds it as the thought with no policy loss."""
    import re

    from experiments import latent_steps as ls
    from quietstar_jax.train.step import init_state, make_optimizer

    p = ls.Protocol(hidden=16, layers=1, heads=2, kv_heads=1, intermediate=24, batch=4,
                    explicit_frac=0.0)
    assert "oracle_thought" not in next(ls.train_batches(p, 5, p.batch))
    batch = next(ls.train_batches(p, 5, p.batch, with_oracle=True))
    checked = 0
    for r in range(p.batch):
        n = int(batch["attention_mask"][r].sum())
        text = bytes(batch["input_ids"][r, 1:n].tolist()).decode()
        for m in re.finditer(r"(\w)\((\w)\((\w)\)\)=", text):
            pos = m.end()  # the answer's char offset o: position o predicts token o + 1
            assert chr(batch["oracle_thought"][r, pos]) == corpus.apply(m.group(2), m.group(3))
            checked += 1
    assert checked >= p.batch

    cfg = ls.model_config(p)
    params = model.init_params(cfg, jax.random.key(0))
    params["thought"] = init_thought_params(params, cfg, jax.random.key(1), init_token_id=45)
    params["thought"]["mix"]["w2"] = 0.3 * jax.random.normal(jax.random.key(2), (16, 1))
    tc = ls.arm_thought_config(p, "thinking")
    opt, _ = make_optimizer(1e-3, 10, warmup_steps=1)
    state = init_state(params, opt)
    fed, fed_tokens = [], []
    real_loss = ls.quietstar_loss

    def spy(prm, cfg_, tc_, ids, mask, key, given=None):
        fed.append(tc_)
        jax.debug.callback(lambda g: fed_tokens.append(np.asarray(g)), given)
        return real_loss(prm, cfg_, tc_, ids, mask, key, given)

    ls.quietstar_loss = spy
    try:
        _, metrics = ls.make_oracle_use_step(cfg, tc, opt, seed=0)(state, batch)
    finally:
        ls.quietstar_loss = real_loss
    jax.effects_barrier()
    (tc_used,), (given,) = fed, fed_tokens
    assert tc_used.policy_loss_beta == 0.0 and tc.policy_loss_beta > 0
    assert given.shape == (tc.num_sampled, p.batch * tc.n_passes, p.seq_len)
    np.testing.assert_array_equal(given[0, ::tc.n_passes], batch["oracle_thought"])
    np.testing.assert_array_equal(given[0, 1::tc.n_passes], batch["oracle_thought"])
    assert np.isfinite(float(metrics["nll_thought"]))


def test_finetune_split_picks_the_second_phase_documents_and_tune_refuses_it():
    """`finetune_split` sets the split of the second phase's stream (every problem of
    its documents is in that split); the default stays "train"; `--tune`, which scores on
    the tune split, refuses to train on it."""
    import dataclasses

    from experiments import latent_steps as ls

    def splits(p, split: str) -> set[str]:
        batch = next(ls.train_batches(p, ls.FINETUNE_DATA_SEED, 8, split=split))
        out = set()
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            text = bytes(int(t) for t, m in zip(ids[1:], mask[1:], strict=True) if m).decode()
            out |= {corpus.split_of(corpus.parse_line(ln)[0])
                    for ln in text.split("\n") if "=" in ln}
        return out

    assert ls.FULL.finetune_split == ls.QUICK.finetune_split == "train"
    assert splits(ls.QUICK, "tune") == {"tune"} and splits(ls.QUICK, "train") == {"train"}
    p = dataclasses.replace(ls.QUICK, finetune_split="tune")
    with pytest.raises(ValueError, match="finetune_split=tune"):
        ls.tune(p, {}, "/nonexistent", print)
