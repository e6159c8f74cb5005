"""Sparse thoughts in training and the think gate (`quietstar_jax.thought.sparse`, issue 25)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_grads_close

from quietstar_jax import model
from quietstar_jax.thought import (
    ThoughtConfig,
    init_gate_params,
    init_thought_params,
    merge_lm,
    mixing_weight,
    thought_embedding,
)
from quietstar_jax.thought.loss import quietstar_loss, quietstar_objective

VOCAB, START, END, PAD = 67, 65, 66, 0
TC = ThoughtConfig(n_ahead=5, n_ahead_talk=2, n_passes=2, start_token_id=START,
                   end_token_id=END, pad_token_id=PAD)
SEQ = 10


def tiny(gate: bool = False):
    cfg = model.ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                            num_layers=2, num_heads=4, num_kv_heads=2, initializer_range=0.2)
    params = model.init_params(cfg, jax.random.key(0))
    params["thought"] = init_thought_params(params, cfg, jax.random.key(1), init_token_id=7)
    # a live mixing head, so thoughts change the predictions and the rewards
    params["thought"]["mix"]["w2"] = 0.5 * jax.random.normal(jax.random.key(2), (32, 1))
    if gate:
        params["think_gate"] = init_gate_params(cfg, jax.random.key(4))
        params["think_gate"]["w1"] = 0.3 * jax.random.normal(jax.random.key(5), (64, 1))
    return cfg, params


def batch(seq=SEQ, pad_from=7):
    ids = np.random.RandomState(0).randint(1, 65, size=(2, seq))
    mask = np.ones_like(ids)
    ids[1, pad_from:] = PAD
    mask[1, pad_from:] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


objective = jax.jit(quietstar_objective, static_argnums=(1, 2))


def loss_and_grads(params, cfg, tc, ids, mask, key):
    f = jax.jit(jax.value_and_grad(quietstar_loss, has_aux=True), static_argnums=(1, 2))
    (loss, metrics), grads = f(params, cfg, tc, ids, mask, key)
    return loss, metrics, grads


@pytest.mark.parametrize("gate,variant", [
    (False, None),  # the default run; the variants in the slow tier
    *(pytest.param(g, v, marks=pytest.mark.slow)
      for g, v in [(True, None), (False, "pause"), (True, "remat_full"), (False, "offset")])])
def test_all_positions_gathered_equals_dense_loss_and_gradients(gate, variant):
    """think_k = seq: every position thinks (the gate cannot leave any out), so the
    sparse objective is the dense one: loss, metrics and every gradient (1e-5); also
    for pause thoughts, against the dense rollout's replayed backward (remat full), and
    with the mixing weight offset (both paths open the head alike)."""
    cfg, params = tiny(gate)
    base_tc = TC
    if variant == "pause":
        base_tc = TC.replace(sampling="pause", pause_token_id=9)
    if variant == "remat_full":
        cfg = cfg.replace(remat="full")
    if variant == "offset":
        base_tc = TC.replace(mixing_weight_offset=0.7)
    ids, mask = batch()
    key = jax.random.key(3)
    dense_params = {k: v for k, v in params.items() if k != "think_gate"}
    loss_d, met_d, g_d = loss_and_grads(dense_params, cfg, base_tc, ids, mask, key)
    # gate loss weight 0: the gate's own loss is not part of the dense objective
    tc = base_tc.replace(think_k=SEQ, think_explore=0.5, gate_loss_weight=0.0)
    loss_s, met_s, g_s = loss_and_grads(params, cfg, tc, ids, mask, key)
    if variant != "pause":
        assert float(met_d["policy_loss"]) != 0.0  # the comparison covers REINFORCE
    np.testing.assert_allclose(loss_s, loss_d, rtol=1e-5, atol=1e-5)
    for name in ("nll_base", "nll_thought", "nll_talk", "policy_loss", "reward_mean",
                 "reward_std", "reward_positive_frac", "mixing_weight_mean",
                 "thought_logp_mean"):
        np.testing.assert_allclose(met_s[name], met_d[name], rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    assert float(met_s["think_rate"]) == 1.0
    if gate:
        g_gate = g_s.pop("think_gate")
        assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_gate))
    # The dense step with remat "full" replays its backward layer by layer (another
    # summation order; gradients reach 1e3 with policy_loss_beta 1e6), and an open mixing
    # head (offset) sends the policy term's 1e4-sized gradients through every thought:
    # compared as tests/test_replay.py compares replay with plain autodiff, 1e-5 of the
    # leaf's max.
    assert_grads_close(g_s, g_d, leaf_scale=variant in ("remat_full", "offset"))


@pytest.mark.slow
@pytest.mark.parametrize("window,given", [(None, False), (4, False), (None, True)])
def test_replayed_backward_of_gathered_thoughts_equals_plain_autodiff(window, given):
    """remat "full": the sparse step runs its base pass and gathered thoughts without
    gradient and replays them layer by layer in the backward pass
    (`thought.replayed_hidden`); loss, metrics and every gradient equal plain autodiff
    through the same computation (remat "none"), 3 of 10 positions per row, with a gate,
    a sliding window, and with fed thought tokens."""
    cfg, params = tiny(gate=True)
    cfg = cfg.replace(sliding_window=window)
    ids, mask = batch()
    key = jax.random.key(13)
    tc = TC.replace(think_k=3, think_explore=0.5)
    toks = None
    if given:
        toks = jax.random.randint(jax.random.key(14), (tc.num_sampled, 4, SEQ), 1, 65)
    f = jax.jit(jax.value_and_grad(quietstar_loss, has_aux=True), static_argnums=(1, 2))
    (loss_p, met_p), g_p = f(params, cfg, tc, ids, mask, key, toks)
    (loss_r, met_r), g_r = f(params, cfg.replace(remat="full"), tc, ids, mask, key, toks)
    assert float(met_p["policy_loss"]) != 0.0 and float(met_p["think_rate"]) < 0.5
    np.testing.assert_allclose(loss_r, loss_p, rtol=1e-5, atol=1e-5)
    for name in ("nll_base", "nll_thought", "policy_loss", "reward_mean", "gate_loss"):
        np.testing.assert_allclose(met_r[name], met_p[name], rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    assert_grads_close(g_r, g_p)
    assert float(jnp.max(jnp.abs(g_p["layers"]["mlp"]["up"]))) > 0  # the check has teeth


def test_gathered_thoughts_equal_the_dense_rollouts_at_those_positions():
    """Same key: the thought tokens (and every step's hidden state) of the gathered
    positions are the dense rollout's at those positions."""
    cfg, params = tiny()
    ids, mask = batch()
    key = jax.random.key(11)
    _, _, dense = objective(params, cfg, TC, ids, mask, key)
    from quietstar_jax.thought.loss import sparse_objective

    pos = jnp.asarray([[1, 4, 8], [0, 2, 5]])
    tc = TC.replace(think_k=3)
    f = jax.jit(lambda p, c, t, *a: sparse_objective(merge_lm(p, c), t, *a),
                static_argnums=(1, 2))
    _, _, sp = f(params, cfg, tc, ids, mask, key, None, pos)
    idx = np.asarray(sp["positions"])
    np.testing.assert_array_equal(idx, np.repeat(np.asarray(pos), TC.n_passes, 0))
    ro, th = dense["rollout"], sp["thoughts"]
    rows = np.arange(idx.shape[0])[:, None]
    dense_toks = np.asarray(ro.thought_tokens)[:, rows, idx]
    assert dense_toks.shape == th.thought_tokens.shape and dense_toks.size > 0
    np.testing.assert_array_equal(np.asarray(th.thought_tokens), dense_toks)
    # the passes of a sequence think different thoughts (their own keys)
    assert not np.array_equal(dense_toks[:, 0], dense_toks[:, 1])
    for s, h in enumerate(th.step_hidden):
        np.testing.assert_allclose(h, np.asarray(ro.step_hidden[s])[rows, idx], atol=1e-5)
    np.testing.assert_allclose(th.thought_logp, np.asarray(ro.thought_logp)[:, rows, idx],
                               atol=1e-5)


def naive_gain(params, cfg, tc, ids_row, i, thought):
    """The gain of one thought, the slow way: one plain causal pass over the row's
    tokens up to i, then start, the thought tokens, end and the talk tokens, as one
    sequence; NLL of x[i + k + 1] from the base logits at i + k minus from the mixed
    hidden of talk step k, summed over the talk steps (float32, log-softmax)."""
    ids_row = np.asarray(ids_row)
    n = len(ids_row)
    talk = [ids_row[i + 1 + k] if i + 1 + k < n else PAD for k in range(tc.n_ahead_talk - 1)]
    emb_tok = lambda t: model.embed_tokens(params, cfg, jnp.asarray([t]))[0]  # noqa: E731
    embs = [emb_tok(t) for t in ids_row[: i + 1]]
    embs.append(thought_embedding(params, tc, "start_emb"))
    embs.extend(emb_tok(int(t)) for t in thought)
    embs.append(thought_embedding(params, tc, "end_emb"))
    embs.extend(emb_tok(int(t)) for t in talk)
    h = jnp.stack(embs)[None].astype(jnp.float32)
    pos = jnp.arange(h.shape[1])[None]
    mask = model.causal_mask(pos, jnp.ones(pos.shape, bool), None)
    hs, _ = model.decoder(params, cfg, h, pos, self_mask=mask)
    base_h, _ = model.decoder(params, cfg, jnp.stack([emb_tok(t) for t in ids_row])[None],
                              jnp.arange(n)[None],
                              self_mask=model.causal_mask(jnp.arange(n)[None],
                                                          jnp.ones((1, n), bool), None))
    lsm = lambda hh: jax.nn.log_softmax(model.logits_from_hidden(params, cfg, hh))  # noqa: E731
    base_lp = lsm(base_h[0])
    end_at = i + 1 + tc.num_sampled + 1  # index of the end step in the sequence
    gain = 0.0
    for k in range(tc.n_ahead_talk):
        tgt = ids_row[i + k + 1]
        b = base_h[0, i + k]
        ht = hs[0, end_at + k]
        w = mixing_weight(params["thought"]["mix"], b, ht)
        mixed = (1 - w) * b + w * ht
        gain += float(-base_lp[i + k, tgt] + lsm(mixed)[tgt])
    return gain


@pytest.mark.slow
def test_gate_labels_equal_independently_computed_gains():
    cfg, params = tiny(gate=True)
    ids, _ = batch()
    mask = jnp.ones_like(ids)
    ids = jnp.where(ids == PAD, 5, ids)  # no padding: every gathered position is labelled
    seq = ids.shape[1]
    n_reward = seq - 1 - TC.n_ahead_talk
    key = jax.random.key(7)
    _, _, sp0 = objective(params, cfg, TC.replace(think_k=4), ids, mask, key)
    gains = np.asarray(sp0["gain"])
    cost = float(np.median(gains[gains != 0]))
    tc = TC.replace(think_k=4, gate_cost=cost, use_baseline=False)
    _, met, sp = objective(params, cfg, tc, ids, mask, key)
    idx, toks = np.asarray(sp["positions"]), np.asarray(sp["thoughts"].thought_tokens)
    label, ok = np.asarray(sp["gate_label"]), np.asarray(sp["gate_ok"])
    n_checked = 0
    for r in range(idx.shape[0]):
        for j, i in enumerate(idx[r]):
            if i >= n_reward:
                assert not ok[r, j]
                continue
            g = naive_gain(params, cfg, tc, ids[r // tc.n_passes], int(i), toks[:, r, j])
            np.testing.assert_allclose(sp["gain"][r, j], g, rtol=1e-4, atol=1e-4)
            assert ok[r, j] and label[r, j] == (g > cost)
            n_checked += 1
    assert n_checked >= 4
    assert 0.0 < float(met["gate_positive_frac"]) < 1.0  # both labels occur
    assert float(met["gate_loss"]) > 0.0


@pytest.mark.slow
def test_default_config_takes_the_dense_path_unchanged(monkeypatch):
    """think_k None (the default): the authors' think-everywhere objective, the sparse
    code never runs, and the loss is the same bits with the option named explicitly."""
    from quietstar_jax.thought import loss as loss_module

    assert ThoughtConfig().think_k is None

    def boom(*a, **k):
        raise AssertionError("the sparse objective ran for the default config")

    monkeypatch.setattr(loss_module, "sparse_objective", boom)
    cfg, params = tiny()
    ids, mask = batch()
    key = jax.random.key(3)
    loss, metrics = quietstar_loss(params, cfg, TC, ids, mask, key)
    loss2, _ = quietstar_loss(params, cfg, TC.replace(think_k=None, think_explore=0.9,
                                                      gate_cost=3.0), ids, mask, key)
    assert np.asarray(loss).tobytes() == np.asarray(loss2).tobytes()
    assert "think_rate" not in metrics and "gate_loss" not in metrics


@pytest.mark.parametrize("field,value,message", [
    ("think_k", 0, "think_k=0"),
    ("think_k", -3, "think_k=-3"),
    ("think_k", 2.5, "think_k=2.5"),
    ("think_explore", 1.5, "think_explore=1.5"),
    ("think_explore", -0.1, "think_explore=-0.1"),
    ("gate_loss_weight", -1.0, "gate_loss_weight=-1.0"),
])
def test_bad_sparse_options_are_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        TC.replace(**{field: value})


def test_think_k_longer_than_the_sequence_is_rejected():
    cfg, params = tiny()
    ids, mask = batch()
    with pytest.raises(ValueError, match=r"think_k=11 exceeds the sequence length 10"):
        quietstar_loss(params, cfg, TC.replace(think_k=11), ids, mask, jax.random.key(0))


def test_selection_takes_the_gates_top_positions_and_a_random_share():
    from quietstar_jax.thought.sparse import select_positions

    score = jnp.asarray([[0.0, 5.0, 1.0, 4.0, -2.0, 3.0, 0.5, 2.0]] * 2)
    valid = jnp.ones((2, 8), bool).at[1, 6:].set(False)
    tc = TC.replace(think_k=4, think_explore=0.5)
    idx = np.asarray(select_positions(tc, valid, score, jax.random.key(0)))
    for r in range(2):
        assert len(set(idx[r])) == 4
        assert {1, 3} <= set(idx[r])  # the gate's top 2
        assert all(valid[r, i] for i in idx[r])
    # without a gate all are random: different keys give different positions
    tc = TC.replace(think_k=3)
    draws = {tuple(np.asarray(select_positions(tc, valid, None, jax.random.key(s)))[0])
             for s in range(8)}
    assert len(draws) > 1


def program_flops(params, cfg, tc, ids, mask):
    """XLA's FLOP count of the loss-and-gradient program as traced (`Lowered.cost_analysis`):
    every operation the code writes, before XLA could drop any; no compile (seconds, not a
    minute, per program)."""
    f = jax.jit(jax.value_and_grad(quietstar_loss, has_aux=True), static_argnums=(1, 2))
    cost = f.lower(params, cfg, tc, ids, mask, jax.random.key(0)).cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost["flops"])


@pytest.mark.slow
def test_sparse_cost_falls_with_k():
    """No thought work hidden behind masks: the traced program's FLOPs of the loss and its
    gradients with k = 2 of 32 positions are well below think-everywhere."""
    cfg, params = tiny(gate=True)
    rs = np.random.RandomState(1)
    ids = jnp.asarray(rs.randint(1, 65, size=(2, 32)))
    mask = jnp.ones_like(ids)
    dense = program_flops({k: v for k, v in params.items() if k != "think_gate"}, cfg, TC,
                           ids, mask)
    k2 = program_flops(params, cfg, TC.replace(think_k=2), ids, mask)
    k8 = program_flops(params, cfg, TC.replace(think_k=8), ids, mask)
    assert k2 < k8 < dense
    assert k2 < 0.35 * dense, (k2, k8, dense)


def test_trainer_config_maps_and_checks_the_sparse_options():
    from quietstar_jax.train.config import ConfigError, base_config, thought_config, validate_config
    from quietstar_jax.train.model_setup import wants_think_gate

    c = base_config()
    assert c.thought.think_k is None and not wants_think_gate(c.thought)
    c.thought.think_k = 8
    c.thought.gate_cost = 0.25
    validate_config(c)
    tc = thought_config(c, {"start_token_id": 1, "end_token_id": 2, "pad_token_id": 0})
    assert (tc.think_k, tc.gate_cost, tc.think_explore) == (8, 0.25, 0.25)
    assert wants_think_gate(c.thought)
    c.thought.think_k = c.data.seq_len + 1
    with pytest.raises(ConfigError, match="config.thought.think_k"):
        validate_config(c)
    c.thought.think_k = 4
    c.thought.think_explore = 2.0
    with pytest.raises(ConfigError, match="think_explore"):
        validate_config(c)


@pytest.mark.slow
def test_train_step_updates_the_gate_and_decays_its_weights_only():
    from quietstar_jax.train.step import decay_mask, init_state, make_optimizer, make_train_step

    cfg, params = tiny(gate=True)
    mask = decay_mask(params)["think_gate"]
    assert mask == {"w0": True, "ws": True, "b0": False, "w1": True, "b1": False}
    opt, _ = make_optimizer(1e-2, 10, weight_decay=0.1)
    tc = TC.replace(think_k=3, gate_cost=-1.0)  # every thought "pays": the gate must move
    step = make_train_step(cfg, tc, opt, donate=False)
    ids, am = batch()
    state, metrics = step(init_state(params, opt), {"input_ids": ids, "attention_mask": am})
    assert float(metrics["gate_loss"]) > 0.0
    assert 0.0 < float(metrics["think_rate"]) < 1.0
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params["think_gate"],
                         params["think_gate"])
    assert moved["w1"] > 0.0 and moved["b1"] > 0.0


@pytest.mark.slow
def test_sparse_run_with_a_gate_resumes_bit_identically(tmp_path):
    """Preempted after step 2 and resumed: the same metrics (gate loss, think rate,
    rewards: the same positions and thoughts) and the same final state, gate included."""
    import os
    import signal

    import _tiny_train

    from quietstar_jax.train import loop

    def config():
        return _tiny_train.tiny_config(str(tmp_path / "cache"), num_steps=4,
                                       **{"thought.think_k": 6})

    def records(summary):
        return [{k: v for k, v in r.items() if k not in ("step_time_s", "tokens_per_s")}
                for r in summary["history"]]

    full = loop.run(config(), str(tmp_path / "straight"))
    assert "think_gate" in full["final_state"].params

    def preempt_at_2(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    work = str(tmp_path / "resumed")
    first = loop.run(config(), work, on_step=preempt_at_2)
    assert first["preempted"] and first["final_step"] == 2
    second = loop.run(config(), work)
    assert second["start_step"] == 2 and second["final_step"] == 4
    resumed = records(first) + records(second)
    assert resumed == records(full)
    assert all(0 < r["think_rate"] < 1 for r in resumed)
    # (step 1: the mixing head starts at zero, every gain is 0 and so is the gate's loss)
    assert any(r["gate_loss"] > 0 for r in resumed)
    for a, b in zip(jax.tree.leaves(full["final_state"]), jax.tree.leaves(second["final_state"]),
                    strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_gated_generation_thinks_only_where_the_gate_fires():
    """A threshold below every gate logit is think-everywhere generation, one above
    every logit is the base LM's (same tokens, same keys); in between, thoughts only
    where the gate fires."""
    from quietstar_jax.generation import generate

    cfg, params = tiny(gate=True)
    tc = TC.replace(n_passes=1)
    prompts = [[5, 9, 13, 2], [7, 3]]
    kw = dict(max_new_tokens=6, rng=jax.random.key(5), eos_token_id=None,
              return_thoughts=True)
    always = generate(params, cfg, tc, prompts, **kw)
    never = generate(params, cfg, tc, prompts, think=False, **kw)
    g_open = generate(params, cfg, tc, prompts, gate_threshold=-1e30, **kw)
    g_shut = generate(params, cfg, tc, prompts, gate_threshold=1e30, **kw)
    assert np.asarray(g_open.thought_mask).all() and not np.asarray(g_shut.thought_mask).any()
    np.testing.assert_array_equal(g_open.tokens, always.tokens)
    np.testing.assert_array_equal(g_open.thoughts, always.thoughts)
    np.testing.assert_array_equal(g_shut.tokens, never.tokens)
    assert not np.asarray(g_shut.thoughts).any()
    assert not np.array_equal(always.tokens, never.tokens)  # thoughts change the output
    # the gate's logits on this model straddle 0 for some threshold: find a mixed one
    mixed = None
    for thr in np.linspace(-2, 2, 9):
        g = generate(params, cfg, tc, prompts, gate_threshold=float(thr), **kw)
        m = np.asarray(g.thought_mask)
        if m.any() and not m.all():
            mixed = g
            break
    assert mixed is not None
    m = np.asarray(mixed.thought_mask)
    assert not np.asarray(mixed.thoughts)[~m].any() and np.asarray(mixed.thoughts)[m].any()
    assert not np.asarray(mixed.mixing_weights)[~m].any()
    with pytest.raises(ValueError, match="think_gate"):
        generate({k: v for k, v in params.items() if k != "think_gate"}, cfg, tc, prompts,
                 gate_threshold=0.0, **kw)
