"""Thought lengths of sparse thoughts (`ThoughtConfig.think_lengths`, issue 25): the gate
chooses among a few lengths, each with a cost per sampled token, and training scores the
lengths it samples (one group of `think_k` positions per length)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_grads_close
from test_sparse_training import PAD, SEQ, TC, batch, naive_gain, program_flops, tiny

from quietstar_jax import model
from quietstar_jax.thought import ThoughtConfig, gate_logit, init_gate_params, merge_lm
from quietstar_jax.thought.loss import quietstar_loss, quietstar_objective, sparse_objective
from quietstar_jax.thought.sparse import choose_length, length_keys, logit_stats

LENGTHS = (1, 3)


def two_length_params():
    """The tiny model with a live two-output gate (random output layer)."""
    cfg, params = tiny()
    params["think_gate"] = init_gate_params(cfg, jax.random.key(4), n_lengths=2)
    params["think_gate"]["w1"] = 0.3 * jax.random.normal(jax.random.key(5), (64, 2))
    return cfg, params


def grads_of(params, cfg, tc, ids, mask, key, toks=None):
    f = jax.jit(jax.value_and_grad(quietstar_loss, has_aux=True), static_argnums=(1, 2))
    (loss, metrics), grads = f(params, cfg, tc, ids, mask, key, toks)
    return loss, metrics, grads


@pytest.mark.slow
def test_one_length_is_todays_sparse_objective_bit_for_bit():
    """think_lengths = (L,) is the one-length objective with n_ahead = L + 3 (whatever
    n_ahead says): same loss, metrics and gradients, bit for bit, gate included."""
    cfg, params = tiny(gate=True)
    ids, mask = batch()
    key = jax.random.key(3)
    today = TC.replace(think_k=3, think_explore=0.5)  # n_ahead 5: 2 sampled tokens
    lengths = TC.replace(n_ahead=9, think_k=3, think_explore=0.5, think_lengths=(2,))
    assert lengths.lengths == (2,) and today.lengths == (2,)
    loss_a, met_a, g_a = grads_of(params, cfg, today, ids, mask, key)
    loss_b, met_b, g_b = grads_of(params, cfg, lengths, ids, mask, key)
    assert float(met_a["policy_loss"]) != 0.0 and float(met_a["gate_loss"]) > 0.0
    assert np.asarray(loss_a).tobytes() == np.asarray(loss_b).tobytes()
    for name, v in met_a.items():
        np.testing.assert_array_equal(met_b[name], v, err_msg=name)
    np.testing.assert_array_equal(met_b["think_rate_per_length"], [met_a["think_rate"]])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_a), jax.tree.leaves(g_b),
                            strict=True):
        np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))


@functools.cache
def two_length_run():
    """The two-length objective (lengths 1 and 3, a token cost), its details and the
    separate one-length runs of each group at the group's positions with its keys."""
    cfg, params = two_length_params()
    ids, _ = batch()
    mask = jnp.ones_like(ids)
    ids = jnp.where(ids == PAD, 5, ids)  # no padding: every gathered position is labelled
    key = jax.random.key(7)
    probe = TC.replace(think_k=3, think_explore=0.0, think_lengths=LENGTHS)
    f = jax.jit(quietstar_objective, static_argnums=(1, 2))
    _, _, d0 = f(params, cfg, probe, ids, mask, key)
    gains = np.concatenate([np.asarray(g["gain"]).ravel() for g in d0["groups"]])
    long_gains = np.asarray(d0["groups"][1]["gain"])
    # every thought would pay gate_cost alone; the long one's cost per token makes it pay
    # for about half of the long thoughts
    base_cost = float(gains.min()) - 0.01
    per_token = (float(np.median(long_gains)) - base_cost) / LENGTHS[1]
    tc = probe.replace(gate_cost=base_cost, gate_token_cost=per_token, use_baseline=False)
    loss, metrics, details = f(params, cfg, tc, ids, mask, key)
    plain = {k: v for k, v in params.items() if k != "think_gate"}
    sep = jax.jit(lambda p, c, t, *a: sparse_objective(merge_lm(p, c), t, *a),
                  static_argnums=(1, 2))
    separate = []
    for li, length in enumerate(LENGTHS):
        pos = details["groups"][li]["positions"][:: tc.n_passes]
        tc_l = TC.replace(n_ahead=length + 3, think_k=3, use_baseline=False)
        separate.append(sep(plain, cfg, tc_l, ids, mask, length_keys(key, li)[1], None, pos))
    return cfg, params, ids, tc, loss, metrics, details, separate


@pytest.mark.slow
def test_each_length_group_is_a_one_length_run_at_its_positions():
    """Group l's thoughts, step hidden states, gains, talk NLLs and policy loss are those
    of a separate one-length run of length l at the same positions with the group's key;
    the total combines them as documented (means over the groups)."""
    cfg, params, ids, tc, loss, metrics, details, separate = two_length_run()
    assert [g["length"] for g in details["groups"]] == list(LENGTHS)
    for li, (g, (_, met_s, d_s)) in enumerate(zip(details["groups"], separate, strict=True)):
        th, th_s = g["thoughts"], d_s["thoughts"]
        np.testing.assert_array_equal(d_s["positions"], g["positions"])
        assert th.thought_tokens.shape[0] == LENGTHS[li]
        np.testing.assert_array_equal(th.thought_tokens, th_s.thought_tokens)
        assert len(th.step_hidden) == len(th_s.step_hidden) == LENGTHS[li] + 1 + TC.n_ahead_talk
        for a, b in zip(th.step_hidden, th_s.step_hidden, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
        np.testing.assert_allclose(g["gain"], d_s["gain"], atol=1e-5)
        np.testing.assert_allclose(metrics["gain_mean_per_length"][li], met_s["reward_mean"],
                                   atol=1e-5)
        np.testing.assert_allclose(metrics["nll_thought_per_length"][li],
                                   met_s["nll_thought"], atol=1e-5)
    # the two groups think their own thoughts (own keys) at their own positions
    t0 = np.asarray(details["groups"][0]["thoughts"].thought_tokens)
    t1 = np.asarray(details["groups"][1]["thoughts"].thought_tokens)
    assert not np.array_equal(t0[0], t1[0])
    # total = beta (w nll_base + (1 - w) mean_l nll_thought_l) + pbeta mean_l policy_l
    #         + gate weight x mean_l gate_loss_l
    w = tc.original_loss_weight
    nll_base = float(separate[0][1]["nll_base"])
    nll_thought = np.mean([float(m["nll_thought"]) for _, m, _ in separate])
    policy = np.mean([float(m["policy_loss"]) for _, m, _ in separate])
    want = (tc.base_loss_beta * (w * nll_base + (1 - w) * nll_thought)
            + tc.policy_loss_beta * policy + tc.gate_loss_weight * float(metrics["gate_loss"]))
    assert policy != 0.0
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(metrics["gate_loss"], np.mean(metrics["gate_loss_per_length"]),
                               rtol=1e-6)


@pytest.mark.slow
def test_each_group_takes_the_top_positions_of_its_gate_column():
    """think_explore 0: group l thinks at the k positions (among those that can carry a
    reward) with the largest logits of the gate's column l, the gate computed here."""
    cfg, params, ids, tc, _, _, details, _ = two_length_run()
    h = model.forward(params, cfg, ids, jnp.ones_like(ids), model.default_positions(
        jnp.ones_like(ids)))[0]
    stats = logit_stats(model.from_params(params, cfg), h)
    logits = np.asarray(gate_logit(params["think_gate"], h, stats))
    assert logits.shape == ids.shape + (2,)
    n_reward = SEQ - 1 - TC.n_ahead_talk
    for li, g in enumerate(details["groups"]):
        pos = np.asarray(g["positions"])[:: tc.n_passes]
        for r in range(ids.shape[0]):
            top = np.argsort(-logits[r, :n_reward, li])[: tc.think_k]
            assert set(pos[r]) == set(top.tolist())
    assert not np.array_equal(details["groups"][0]["positions"], details["groups"][1]["positions"])


@pytest.mark.slow
def test_gate_labels_per_length_are_gain_above_that_lengths_cost():
    """Group l's labels are gain > gate_cost + gate_token_cost * L, the gain computed the
    slow way (one plain causal pass over the row, the thought and its talk)."""
    cfg, params, ids, tc, _, metrics, details, _ = two_length_run()
    labels_seen = set()
    for li, g in enumerate(details["groups"]):
        cost = tc.gate_cost + tc.gate_token_cost * LENGTHS[li]
        idx, toks = np.asarray(g["positions"]), np.asarray(g["thoughts"].thought_tokens)
        label, ok = np.asarray(g["gate_label"]), np.asarray(g["gate_ok"])
        for r in range(0, idx.shape[0], 2):  # pass 0 of each sequence
            for j, i in enumerate(idx[r]):
                gain = naive_gain(params, cfg, tc.of_length(LENGTHS[li]), ids[r // tc.n_passes],
                                  int(i), toks[:, r, j])
                np.testing.assert_allclose(g["gain"][r, j], gain, rtol=1e-4, atol=1e-4)
                assert ok[r, j] and label[r, j] == (gain > cost)
                labels_seen.add(bool(label[r, j]))
                assert gain > tc.gate_cost  # only the token cost says no
        frac = np.mean(label[ok])
        np.testing.assert_allclose(metrics["gate_positive_frac_per_length"][li], frac,
                                   rtol=1e-6)
    assert labels_seen == {True, False}


@pytest.mark.slow
def test_replayed_backward_with_two_lengths_equals_plain_autodiff():
    """remat "full": each length group replays the base pass with its thoughts; only
    group 0's replayed base feeds the base NLL. Loss, metrics and every gradient equal
    plain autodiff (1e-5 of each leaf's max), with padding and a gate."""
    cfg, params = two_length_params()
    ids, mask = batch()
    key = jax.random.key(13)
    tc = TC.replace(think_k=3, think_explore=0.5, think_lengths=LENGTHS, gate_token_cost=0.1)
    loss_p, met_p, g_p = grads_of(params, cfg, tc, ids, mask, key)
    loss_r, met_r, g_r = grads_of(params, cfg.replace(remat="full"), tc, ids, mask, key)
    assert float(met_p["policy_loss"]) != 0.0 and float(met_p["gate_loss"]) > 0.0
    np.testing.assert_allclose(loss_r, loss_p, rtol=1e-5, atol=1e-5)
    for name in ("nll_base", "nll_thought", "policy_loss", "reward_mean", "gate_loss",
                 "gain_mean_per_length"):
        np.testing.assert_allclose(met_r[name], met_p[name], rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    assert_grads_close(g_r, g_p)
    assert float(jnp.max(jnp.abs(g_p["think_gate"]["w1"][:, 1]))) > 0  # column 1 trains


@pytest.mark.slow
def test_program_cost_grows_with_the_lengths():
    """No length's work hidden: the loss and gradients of lengths (2, 6) cost more FLOPs
    than (2,) alone and than (6,) alone."""
    cfg, params = tiny()
    rs = np.random.RandomState(1)
    ids = jnp.asarray(rs.randint(1, 65, size=(2, 32)))
    mask = jnp.ones_like(ids)
    tc = TC.replace(think_k=4)
    short = program_flops(params, cfg, tc.replace(think_lengths=(2,)), ids, mask)
    long_ = program_flops(params, cfg, tc.replace(think_lengths=(6,)), ids, mask)
    both = program_flops(params, cfg, tc.replace(think_lengths=(2, 6)), ids, mask)
    assert short < long_ < both, (short, long_, both)


def test_choose_length_rule():
    logits = jnp.asarray([[-1.0, -0.5], [0.3, 2.0], [1.5, 0.2], [0.7, 0.7]])
    np.testing.assert_array_equal(choose_length(logits), [0, 2, 1, 1])
    np.testing.assert_array_equal(choose_length(logits, threshold=1.0), [0, 2, 1, 0])
    np.testing.assert_array_equal(choose_length(logits, threshold=-0.8), [2, 2, 1, 1])
    assert choose_length(logits).dtype == jnp.int32
    with pytest.raises(ValueError, match="n_lengths"):
        choose_length(jnp.zeros(()))


def test_gate_outputs_and_one_output_params_unchanged():
    """One output (existing params): the logit `[...]`, the same hidden layer as a gate
    with several outputs made from the same key; several: `[..., n_lengths]`."""
    cfg, _ = tiny()
    one = init_gate_params(cfg, jax.random.key(4))
    three = init_gate_params(cfg, jax.random.key(4), n_lengths=3)
    assert one["w1"].shape == (64, 1) and three["w1"].shape == (64, 3)
    for k in ("w0", "ws", "b0"):
        np.testing.assert_array_equal(one[k], three[k])
    h = jax.random.normal(jax.random.key(0), (2, 5, 32))
    stats = jax.random.uniform(jax.random.key(1), (2, 5, 2))
    three["w1"] = jax.random.normal(jax.random.key(2), (64, 3))
    out = gate_logit(three, h, stats)
    assert gate_logit(one, h, stats).shape == (2, 5) and out.shape == (2, 5, 3)
    col = {**one, "w1": three["w1"][:, 1:2], "b1": three["b1"][1:2]}
    np.testing.assert_allclose(out[..., 1], gate_logit(col, h, stats), rtol=1e-6)
    with pytest.raises(ValueError, match="n_lengths=0"):
        init_gate_params(cfg, jax.random.key(4), n_lengths=0)


@pytest.mark.parametrize("kw,message", [
    (dict(think_lengths=()), "at least one length"),
    (dict(think_lengths=(0, 2)), "int >= 1"),
    (dict(think_lengths=(2.5,)), "int >= 1"),
    (dict(think_lengths=(4, 2)), "distinct and ascending"),
    (dict(think_lengths=(2, 2)), "distinct and ascending"),
    (dict(think_lengths="24"), "tuple of ints"),
    (dict(think_lengths=3), "tuple of ints"),
    (dict(think_k=None, think_lengths=(1, 2)), "needs think_k"),
    (dict(gate_token_cost=float("nan")), "gate_token_cost=nan"),
])
def test_bad_length_options_are_rejected(kw, message):
    with pytest.raises(ValueError, match=message):
        TC.replace(**{"think_k": 3, **kw})


def test_lists_become_tuples_and_costs_add_up():
    tc = TC.replace(think_k=3, think_lengths=[1, 4], gate_cost=0.5, gate_token_cost=0.25)
    assert tc.think_lengths == (1, 4) and tc.lengths == (1, 4)
    assert tc.thought_cost(4) == 1.5
    assert tc.of_length(4).num_sampled == 4 and tc.of_length(4).think_lengths is None
    assert ThoughtConfig().think_lengths is None and TC.lengths == (TC.num_sampled,)


def test_gate_and_tokens_of_the_wrong_size_are_rejected():
    cfg, params = tiny(gate=True)  # a one-output gate
    ids, mask = batch()
    tc = TC.replace(think_k=3, think_lengths=LENGTHS)
    with pytest.raises(ValueError, match=r"scores 1 thought length\(s\) but the config trains 2"):
        quietstar_loss(params, cfg, tc, ids, mask, jax.random.key(0))
    toks = jnp.ones((2, 4, SEQ), jnp.int32)
    with pytest.raises(ValueError, match="the longest of ThoughtConfig.think_lengths"):
        quietstar_loss(params, cfg, tc, ids, mask, jax.random.key(0), toks)


def test_trainer_config_maps_the_lengths_and_makes_a_gate_per_length():
    from quietstar_jax import sharding
    from quietstar_jax.train.config import ConfigError, base_config, thought_config, validate_config
    from quietstar_jax.train.model_setup import add_think_gate

    c = base_config()
    assert c.thought.think_lengths is None
    c.thought.think_k = 4
    c.thought.think_lengths = (2, 6)
    c.thought.gate_token_cost = 0.1
    validate_config(c)
    tc = thought_config(c, {"start_token_id": 1, "end_token_id": 2, "pad_token_id": 0})
    assert (tc.think_lengths, tc.gate_token_cost) == ((2, 6), 0.1)
    cfg, params = tiny()
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    gate = add_think_gate(params, cfg, c.thought, mesh, 0)["think_gate"]
    assert gate["w1"].shape == (64, 2) and gate["b1"].shape == (2,)
    c.thought_schedule = "0:4,10:6"
    with pytest.raises(ConfigError, match="think_lengths"):
        validate_config(c)
    c.thought_schedule = ""
    c.thought.think_k = None
    with pytest.raises(ConfigError, match="needs think_k"):
        validate_config(c)


@pytest.mark.slow
def test_train_step_with_two_lengths_trains_both_gate_outputs():
    from quietstar_jax.train.step import init_state, make_optimizer, make_train_step

    cfg, params = two_length_params()
    opt, _ = make_optimizer(1e-2, 10, weight_decay=0.1)
    tc = TC.replace(think_k=3, think_lengths=LENGTHS, gate_cost=-1.0, gate_token_cost=0.1)
    step = make_train_step(cfg, tc, opt, donate=False)
    ids, am = batch()
    state, metrics = step(init_state(params, opt), {"input_ids": ids, "attention_mask": am})
    assert metrics["think_rate_per_length"].shape == (2,)
    assert all(0.0 < float(r) < 1.0 for r in metrics["think_rate_per_length"])
    assert float(metrics["gate_loss"]) > 0.0 and np.isfinite(float(metrics["loss"]))
    moved = np.abs(np.asarray(state.params["think_gate"]["b1"] - params["think_gate"]["b1"]))
    assert (moved > 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["given", "pause"])
def test_fed_and_pause_thoughts_of_each_length(mode):
    """Given thought tokens `[max length, rows, seq]`: a length-L group is fed their first
    L at its positions; pause thoughts: every group's tokens are the pause id and there is
    nothing to reinforce."""
    cfg, params = two_length_params()
    ids, mask = batch()
    tc = TC.replace(think_k=3, think_lengths=LENGTHS)
    toks = None
    if mode == "given":
        toks = jax.random.randint(jax.random.key(14), (LENGTHS[-1], 4, SEQ), 1, 65)
    else:
        tc = tc.replace(sampling="pause", pause_token_id=9)
    f = jax.jit(quietstar_objective, static_argnums=(1, 2))
    _, metrics, details = f(params, cfg, tc, ids, mask, jax.random.key(2), toks)
    for li, g in enumerate(details["groups"]):
        idx = np.asarray(g["positions"])
        got = np.asarray(g["thoughts"].thought_tokens)
        assert got.shape == (LENGTHS[li],) + idx.shape
        if mode == "given":
            rows = np.arange(idx.shape[0])[:, None]
            np.testing.assert_array_equal(got, np.asarray(toks)[: LENGTHS[li]][:, rows, idx])
        else:
            assert (got == 9).all()
    if mode == "pause":
        assert float(metrics["policy_loss"]) == 0.0
    assert np.isfinite(float(metrics["loss"]))
