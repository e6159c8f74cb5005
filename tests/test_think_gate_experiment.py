"""experiments/think_gate.py on a tiny configuration: the results' keys, the curve's
end points against the base and dense paths computed here, the oracle's positions, and
the sparse evaluation against `sparse.sparse_thoughts` at the gathered positions."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import think_gate as tg
from quietstar_jax import model
from quietstar_jax.thought import merge_lm, mixed_hidden, mixing_weight, rollout
from quietstar_jax.thought.loss import token_nll
from quietstar_jax.thought.sparse import sparse_thoughts, take

TINY = dataclasses.replace(
    tg.QUICK, hidden=16, intermediate=32, pretrain_steps=3, pretrain_batch=4, steps=2,
    batch=4, eval_docs=6, bootstrap=50, cost_ks=(2,), cost_steps=1, log_every=1,
    dense_arm=False)


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def live():
    """The tiny LM with thought params, a live mixing head and a live gate (so thinking
    changes the predictions and the gate ranks positions), and its evaluation."""
    params = tg.with_thought_and_gate(tg.pretrained(TINY, quiet, None), TINY)
    params["thought"]["mix"]["w2"] = 2.0 * jax.random.normal(jax.random.key(2), (16, 1))
    params["think_gate"]["w1"] = jax.random.normal(jax.random.key(5), (64, 1))
    return params, tg.evaluate_model(TINY, params)


@pytest.mark.slow
def test_results_json(tmp_path):
    from experiments.think_gate_text import TextSetup

    # the SmolLM2 text half, with its model missing: recorded as skipped, with the reason
    res = tg.run(TINY, str(tmp_path), cost=True, log=quiet,
                 text=TextSetup(hf_dir=str(tmp_path / "no_model")))
    with open(tmp_path / "results.json") as f:
        out = json.load(f)
    assert "no SmolLM2-135M at" in out["smollm2_text"]["skipped"]
    assert {"curve", "always", "never", "step_cost_plain_steps", "must_show"} <= set(out)
    assert [r["rate"] for r in out["curve"]] == list(TINY.rates)
    for row in out["curve"]:
        for name in tg.SELECTORS:
            assert set(row[name]) >= {"accuracy", "nll"}
        assert len(row["gated_minus_random"]["accuracy_ci95"]) == 2
    assert set(out["step_cost_plain_steps"]) == {"2"}
    assert out["step_cost_plain_steps"]["2"] > 0
    for metric in ("accuracy", "nll"):
        assert {"rate", "gated_beats_random", "rate_le_25pct", "passed"} <= set(
            out["must_show"][metric])
    assert (tmp_path / "results.md").exists()
    assert res["curve"] == out["curve"]


def independent(params, s):
    """Per answer: the base path's NLL / hit (model.lm_logits) and the dense path's
    thinking NLL / hit (rollout + mixed_hidden), gathered here."""
    cfg = tg.model_config(s)
    batch, pos = tg.eval_docs(s)
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    rows, cols = np.nonzero(pos >= 0)
    p = pos[rows, cols]
    tgt = batch["input_ids"][rows, p + 1]
    base = np.asarray(model.lm_logits(params, cfg, ids, mask))[rows, p]
    tc = tg.thought_config(s, None).replace(n_ahead_talk=1, n_passes=1)
    key = jax.random.fold_in(jax.random.key(s.seed), 1_000_000)
    ro = rollout(params, cfg, tc, ids, mask, key)
    st = tc.n_ahead - 1
    mixed, _ = mixed_hidden(params, tc, ro.base_hidden, ro.step_hidden[st - 1], st)
    think = np.asarray(model.logits_from_hidden(params, cfg, mixed))[rows, p]
    out = {}
    for name, lg in (("base", base), ("think", think)):
        out[f"nll_{name}"] = np.asarray(token_nll(jnp.asarray(lg, jnp.float32),
                                                  jnp.asarray(tgt)))
        out[f"hit_{name}"] = lg.argmax(-1) == tgt
    return out


def test_rate_0_is_never_and_rate_1_is_always(live):
    params, ev = live
    ref = independent(params, TINY)
    assert np.abs(ref["nll_think"] - ref["nll_base"]).max() > 1e-3  # thinking matters
    pp, pos, mask = ev["_per_position"], ev["_pos"], ev["_mask"]
    for rate, which in ((0.0, "base"), (1.0, "think")):
        o = tg.outcomes(pp, mask, pos, rate)
        for name in tg.SELECTORS:
            np.testing.assert_allclose(o[name]["nll"], ref[f"nll_{which}"], atol=1e-4)
            np.testing.assert_array_equal(o[name]["hit"], ref[f"hit_{which}"].astype(float))
    first, last = ev["curve"][0], ev["curve"][-1]
    assert first["rate"] == 0.0 and last["rate"] == 1.0
    for name in tg.SELECTORS:
        assert first[name]["nll"] == pytest.approx(ev["never"]["nll"], abs=1e-5)
        assert first[name]["accuracy"] == pytest.approx(ev["never"]["accuracy"])
        assert last[name]["nll"] == pytest.approx(ev["always"]["nll"], abs=1e-5)
        assert last[name]["accuracy"] == pytest.approx(ev["always"]["accuracy"])
    assert ev["never"]["nll"] == pytest.approx(float(ref["nll_base"].mean()), abs=1e-4)
    assert ev["always"]["nll"] == pytest.approx(float(ref["nll_think"].mean()), abs=1e-4)


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5])
def test_oracle_takes_the_largest_gains(live, rate):
    params, ev = live
    pp, mask = ev["_per_position"], ev["_mask"]
    cand = tg.candidates(mask)
    k = tg.count_at(rate, cand)
    chosen = tg.select_top(tg.scores_of(pp)["oracle"], cand, k)
    gain = pp["nll_base"] - pp["nll_think"]
    np.testing.assert_array_equal(chosen.sum(1), k)
    assert not (chosen & ~cand).any()
    for r in range(len(mask)):
        if 0 < k[r] < cand[r].sum():
            assert gain[r][chosen[r]].min() >= gain[r][cand[r] & ~chosen[r]].max()
    # the gain the oracle ranks by is the base path's NLL minus the dense path's
    ref = independent(params, TINY)
    pos = ev["_pos"]
    np.testing.assert_allclose(tg.at_answers(gain, pos), ref["nll_base"] - ref["nll_think"],
                               atol=1e-4)


def test_gated_positions_match_sparse_thoughts(live):
    """The thinking prediction at the gate's positions equals the training path's
    (`sparse_thoughts` over the gathered positions, with the same keys, + the mixing
    head): the evaluation's sparse thinking is the trainer's."""
    params, ev = live
    s, cfg = TINY, tg.model_config(TINY)
    pp, mask = ev["_per_position"], ev["_mask"]
    batch, _ = tg.eval_docs(s)
    cand = tg.candidates(mask)
    k = np.full(len(mask), 4)
    chosen = tg.select_top(tg.scores_of(pp)["gated"], cand, k)
    idx = jnp.asarray(np.sort(np.argsort(~chosen, axis=1, kind="stable")[:, :4], axis=1))
    ids, m = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    tc = tg.thought_config(s, None).replace(n_ahead_talk=1, n_passes=1)
    positions = model.default_positions(m)
    h0, kv0 = model.forward(params, cfg, ids, m, positions)[:2]
    key = jax.random.fold_in(jax.random.key(s.seed), 1_000_000)
    th = sparse_thoughts(merge_lm(params, cfg), tc, ids, m, positions, kv0, idx, key)
    hs = th.step_hidden[tc.n_ahead - 2]
    b = take(h0, idx)
    # the head's weight plus the setup's offset (docs/ALGORITHM.md, section 13)
    w = (mixing_weight(params["thought"]["mix"], b, hs) + tc.mixing_weight_offset)[..., None]
    logits = model.logits_from_hidden(params, cfg, (1 - w) * b + w * hs).astype(jnp.float32)
    nll = np.asarray(token_nll(logits, take(jnp.roll(ids, -1, axis=1), idx)))
    np.testing.assert_allclose(nll, np.take_along_axis(pp["nll_think"], np.asarray(idx), 1),
                               atol=1e-4)


def test_must_show_logic():
    def row(rate, g_acc, r_acc, lo):
        return {"rate": rate, "gated": {"accuracy": g_acc, "nll": 1.0},
                "gated_minus_random": {"accuracy": g_acc - r_acc, "accuracy_ci95": [lo, 1.0],
                                       "nll": 0.0, "nll_ci95": [-1.0, 1.0]}}

    rows = [row(0.0, 0.1, 0.1, 0.0), row(0.1, 0.15, 0.11, -0.01), row(0.25, 0.2, 0.12, 0.02),
            row(1.0, 0.2, 0.2, 0.0)]
    m = tg.must_show(rows, {"accuracy": 0.2, "nll": 1.0}, {"accuracy": 0.1, "nll": 1.0})
    assert m["accuracy"]["rate"] == 0.25 and m["accuracy"]["gated_beats_random"]
    assert m["accuracy"]["passed"] and m["passed"]
    assert m["nll"]["degenerate"] and not m["nll"]["passed"]


def test_text_half_holds_out_the_last_documents(tmp_path):
    """think_gate_text: windows of the first documents train, of the last ones evaluate;
    each window is a run of one document's consecutive tokens."""
    from experiments.think_gate_text import text_windows

    docs = ["a" * 9, "b" * 5, "c" * 8, "d" * 12]
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(docs) + "\n")

    def tok(s):
        return {"input_ids": [ord(ch) for ch in s]}

    train, held = text_windows(tok, str(path), 4, held_out=1)
    assert {chr(r[0]) for r in train} == {"a", "b", "c"}
    assert len(train) == 2 + 1 + 2 and len(held) == 3
    assert all(len(set(r)) == 1 for r in np.concatenate([train, held]))
    assert {chr(r[0]) for r in held} == {"d"}
    with pytest.raises(ValueError, match="none would be left"):
        text_windows(tok, str(path), 4, held_out=4)
    with pytest.raises(FileNotFoundError, match="no text file"):
        text_windows(tok, str(tmp_path / "missing.txt"), 4, held_out=1)


def test_text_half_moves_the_lm_at_its_own_learning_rate():
    """The new parts (thought, think_gate) learn at head_lr; the LM's params at lm_lr
    (0 here: unchanged)."""
    import optax

    from experiments.think_gate_text import two_speed_optimizer

    params = {"embed": jnp.ones((3, 2)), "layers": {"q": jnp.ones((2, 2))},
              "thought": {"start_emb": jnp.ones((2,))}, "think_gate": {"w1": jnp.ones((2, 1))}}
    opt = two_speed_optimizer(params, 0.0, 0.1)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = opt.update(grads, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    def pairs(k):
        return zip(jax.tree.leaves(new[k]), jax.tree.leaves(params[k]), strict=True)

    for k in ("embed", "layers"):
        assert all(bool(jnp.all(a == b)) for a, b in pairs(k))
    for k in ("thought", "think_gate"):
        assert all(bool(jnp.all(a < b)) for a, b in pairs(k))


def test_finetune_documents_come_from_the_setup_split():
    """The fine-tuning stream of the default setup holds only "tune" problems (never an
    eval composition, and none the pretraining saw); `finetune_split="train"` gives
    train problems."""
    from experiments.latent_corpus import parse_line, split_of

    def splits(split: str) -> set[str]:
        batch = next(tg.train_batches(TINY, tg.FINETUNE_DATA_SEED, 8, split))
        out = set()
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            text = bytes(int(t) for t, m in zip(ids[1:], mask[1:], strict=True) if m).decode()
            lines = [ln for ln in text.split("\n") if "=" in ln]
            assert lines
            out |= {split_of(parse_line(ln)[0]) for ln in lines}
        return out

    assert tg.FULL.finetune_split == tg.QUICK.finetune_split == "tune"
    assert splits(TINY.finetune_split) == {"tune"}
    assert splits("train") == {"train"}
