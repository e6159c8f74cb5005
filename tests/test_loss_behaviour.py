"""Behaviour of the Quiet-STaR loss that a sign or masking error would break."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quietstar_jax import model
from quietstar_jax.thought import ThoughtConfig, init_thought_params, mixed_hidden
from quietstar_jax.thought.loss import (
    quietstar_loss,
    quietstar_objective,
    reinforce_loss,
    training_reward,
)
from quietstar_jax.train.metrics import check_finite

VOCAB, START, END, PAD = 67, 65, 66, 0
TC = ThoughtConfig(n_ahead=5, n_ahead_talk=2, n_passes=2, start_token_id=START,
                   end_token_id=END, pad_token_id=PAD)


def tiny(zero_head: bool):
    cfg = model.ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                            num_layers=2, num_heads=4, num_kv_heads=2, initializer_range=0.2)
    params = model.init_params(cfg, jax.random.key(0))
    params["thought"] = init_thought_params(params, cfg, jax.random.key(1), init_token_id=7)
    if not zero_head:
        params["thought"]["mix"]["w2"] = 0.5 * jax.random.normal(jax.random.key(2), (32, 1))
    return cfg, params


def batch(seq=10, pad_from=7):
    ids = np.random.RandomState(0).randint(1, 65, size=(2, seq))
    mask = np.ones_like(ids)
    ids[1, pad_from:] = PAD
    mask[1, pad_from:] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


@pytest.fixture(scope="module")
def objective():
    return jax.jit(quietstar_objective, static_argnums=(1, 2))


def test_zero_mixing_head_gives_base_logits_at_every_talk_step():
    cfg, params = tiny(zero_head=True)
    ids, mask = batch()
    from quietstar_jax.thought import rollout

    ro = jax.jit(rollout, static_argnums=(1, 2))(params, cfg, TC, ids, mask, jax.random.key(3))
    z0 = model.logits_from_hidden(params, cfg, ro.base_hidden)
    seq = ids.shape[1]
    for k in range(TC.n_ahead_talk):
        s = TC.n_ahead - 1 + k
        mixed, w = mixed_hidden(params, TC, ro.base_hidden, ro.step_hidden[s - 1], s)
        assert float(jnp.max(jnp.abs(w))) == 0.0
        zk = model.logits_from_hidden(params, cfg, mixed)
        # Talk step k at position i predicts x[i+k+1], as the base logits at i+k do.
        np.testing.assert_allclose(zk[:, : seq - k], z0[:, k:], atol=1e-6)


@pytest.mark.slow
def test_zero_mixing_head_gives_zero_reward_and_no_policy_gradient(objective):
    cfg, params = tiny(zero_head=True)
    ids, mask = batch()
    loss, metrics, details = objective(params, cfg, TC, ids, mask, jax.random.key(4))
    # The thought cannot change the prediction, so no thought is better than the base.
    assert float(jnp.max(jnp.abs(details["reward"]))) < 1e-5
    policy_only = TC.replace(base_loss_beta=0.0, policy_loss_beta=1.0)
    grads = jax.grad(lambda p: quietstar_loss(p, cfg, policy_only, ids, mask,
                                              jax.random.key(4))[0])(params)
    # Rewards are ~1e-7 rounding noise here: clamped or tiny, the gradient is negligible.
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-6


def test_reinforce_gradient_signs():
    """d(policy)/d(logp) = -R / count: raises logp where R > 0, zero where R is clamped."""
    tc = TC.replace(n_passes=2)
    reward = jnp.array([[0.5, -0.2, 0.0], [0.1, 0.3, 0.0]])  # 1 sequence x 2 passes
    train_reward = training_reward(reward, tc)
    # baseline: mean over passes per position, then clamp at 0
    np.testing.assert_allclose(train_reward, [[0.2, 0.0, 0.0], [0.0, 0.25, 0.0]], atol=1e-7)
    logp = jnp.full((3, 2, 5), -2.0)  # [T, rows, seq]
    grad = jax.grad(lambda lp: reinforce_loss(train_reward, lp)[0])(logp)
    g = np.asarray(grad)
    assert (g[:, 0, 0] < 0).all() and (g[:, 1, 1] < 0).all()  # descent raises logp
    assert (g[:, 0, 1:] == 0).all() and (g[:, 1, [0, 2, 3, 4]] == 0).all()
    np.testing.assert_allclose(g[:, 0, 0], -0.2 / (2 * 3) / 3)
    no_clamp = training_reward(reward, tc.replace(remove_negative_rewards=False))
    assert float(no_clamp[0, 1]) < 0


def test_policy_step_raises_likelihood_of_rewarded_thoughts(objective):
    cfg, params = tiny(zero_head=False)
    ids, mask = batch()
    rng = jax.random.key(5)
    _, _, details = objective(params, cfg, TC, ids, mask, rng)
    thoughts = details["rollout"].thought_tokens
    r = details["train_reward"]
    assert float(jnp.sum(r > 0)) > 0, "the perturbed head should reward some thoughts"
    policy_only = TC.replace(base_loss_beta=0.0, policy_loss_beta=1.0)

    def rewarded_logp(p):
        _, _, d = quietstar_objective(p, cfg, policy_only, ids, mask, rng, thoughts)
        logp = d["rollout"].thought_logp[:, :, : r.shape[1]]
        return jnp.sum(r[None] * logp)

    def policy(p):
        return quietstar_loss(p, cfg, policy_only, ids, mask, rng, thoughts)[0]

    grads = jax.grad(policy)(params)
    descent = jax.tree.map(lambda g: -g, grads)
    # Directional derivative of sum(R * logp) along the descent direction: must be > 0.
    # (As <grad, direction>: the fused vocabulary ops define reverse-mode derivatives.)
    g_logp = jax.grad(rewarded_logp)(params)
    slope = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g_logp),
                                                 jax.tree.leaves(descent), strict=True))
    assert float(slope) > 0


def test_padding_content_changes_nothing(objective):
    cfg, params = tiny(zero_head=False)
    ids, mask = batch(pad_from=6)
    junk = jnp.asarray(np.random.RandomState(9).randint(1, 65, size=ids.shape))
    other = jnp.where(mask == 0, junk, ids)  # other tokens where the mask is 0
    assert (other != ids).any()
    thoughts = objective(params, cfg, TC, ids, mask, jax.random.key(6))[2]["rollout"].thought_tokens

    def run(x):
        fn = lambda p: quietstar_loss(p, cfg, TC, x, mask, None, thoughts)
        return jax.value_and_grad(fn, has_aux=True)(params)

    (la, ma), ga = run(ids)
    (lb, mb), gb = run(other)
    assert float(la) == pytest.approx(float(lb), rel=1e-6, abs=1e-7)
    for key in ("nll_base", "nll_thought", "policy_loss", "reward_mean"):
        assert float(ma[key]) == pytest.approx(float(mb[key]), rel=1e-5, abs=1e-7), key
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_padded_positions_carry_no_reward_and_ignored_targets(objective):
    cfg, params = tiny(zero_head=False)
    ids, mask = batch(pad_from=6)
    _, _, d = objective(params, cfg, TC, ids, mask, jax.random.key(7))
    rows = d["input_ids"].shape[0]
    for r in range(rows):
        if r // TC.n_passes == 1:  # the padded sequence's passes
            assert float(jnp.max(jnp.abs(d["reward"][r, 5:]))) == 0.0
            assert float(jnp.max(jnp.abs(d["nll_base_tok"][r, 5:]))) == 0.0


def test_thought_embeddings_get_gradient_only_through_a_live_mixing_head():
    ids, mask = batch()
    for zero_head, nonzero in ((False, True), (True, False)):
        cfg, params = tiny(zero_head=zero_head)
        grads = jax.grad(lambda p, cfg=cfg: quietstar_loss(
            p, cfg, TC, ids, mask, jax.random.key(8))[0])(params)
        for name in ("start_emb", "end_emb"):
            norm = float(jnp.linalg.norm(grads["thought"][name]))
            assert (norm > 1e-6) == nonzero, (zero_head, name, norm)


def test_mixing_weight_offset_one_predicts_from_the_thought_alone(objective):
    """With the zero-initialised head and offset 1, w = 1 everywhere: every talk step's
    NLL is the post-thought hidden's own (no base), computed here from the rollout."""
    cfg, params = tiny(zero_head=True)
    ids, mask = batch()
    tc = TC.replace(mixing_weight_offset=1.0)
    key = jax.random.key(4)
    _, metrics, details = objective(params, cfg, tc, ids, mask, key)
    assert float(metrics["mixing_weight_mean"]) == 1.0
    from quietstar_jax.thought import rollout

    ro = rollout(params, cfg, tc, jnp.repeat(ids, tc.n_passes, 0),
                 jnp.repeat(mask, tc.n_passes, 0), key)
    x = np.asarray(jnp.repeat(ids, tc.n_passes, 0))
    ok = np.asarray(jnp.repeat(mask, tc.n_passes, 0)).astype(bool)
    seq = x.shape[1]
    for k in range(tc.n_ahead_talk):
        s = tc.n_ahead - 1 + k
        logp = jax.nn.log_softmax(model.logits_from_hidden(params, cfg, ro.step_hidden[s - 1]))
        for r in range(x.shape[0]):
            for i in range(seq - k - 1):
                if ok[r, i + k + 1]:
                    want = -float(logp[r, i, x[r, i + k + 1]])
                    got = float(details["nll_talk_tok"][k, r, i])
                    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # ... and the thought now changes the prediction, so rewards are no longer zero
    assert float(jnp.max(jnp.abs(details["reward"]))) > 1e-3


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("n_ahead", 2, "n_ahead=2"),
        ("n_passes", 0, "n_passes=0"),
        ("n_ahead_talk", 0, "n_ahead_talk=0"),
        ("sampling", "beam", "sampling='beam'"),
        ("thought_temperature", 0.0, "thought_temperature"),
        ("mixing_weight_offset", float("nan"), "mixing_weight_offset=nan"),
    ],
)
def test_bad_thought_config_is_rejected(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ThoughtConfig(**{field: value})


def test_bad_inputs_are_rejected_before_compiling():
    cfg, params = tiny(zero_head=True)
    ids, mask = batch()
    with pytest.raises(ValueError, match="shorter than n_ahead_talk"):
        quietstar_loss(params, cfg, TC, ids[:, :3], mask[:, :3], jax.random.key(0))
    with pytest.raises(ValueError, match="start_token_id is not set"):
        quietstar_loss(params, cfg, TC.replace(start_token_id=None), ids, mask, None)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        quietstar_loss(params, cfg, TC.replace(end_token_id=VOCAB), ids, mask, None)
    with pytest.raises(ValueError, match="thought_tokens shape"):
        quietstar_loss(params, cfg, TC, ids, mask, None, jnp.zeros((3, 4, 10), jnp.int32))
    with pytest.raises(ValueError, match="needs an rng"):
        quietstar_loss(params, cfg, TC, ids, mask, None)


def test_non_finite_loss_names_step_and_component():
    metrics = {"loss": jnp.nan, "nll_base": 1.0, "nll_thought": 2.0, "policy_loss": jnp.inf,
               "nll_talk": jnp.array([1.0, 2.0])}
    with pytest.raises(FloatingPointError, match="step 17: component policy_loss"):
        check_finite(metrics, 17)
    metrics = {"loss": jnp.nan, "nll_base": 1.0, "nll_thought": 2.0, "policy_loss": 0.0,
               "nll_talk": jnp.array([1.0, jnp.nan])}
    with pytest.raises(FloatingPointError, match=r"nll_talk\[1\]"):
        check_finite(metrics, 3)
    check_finite({"loss": 1.0, "nll_base": 1.0}, 0)


@pytest.mark.slow
def test_reinforce_off_leaves_only_the_nll_gradient():
    """policy_loss_beta = 0 (the experiment's REINFORCE-off arm): the gradient is the
    NLL term's alone, though the policy loss itself has a non-zero gradient."""
    cfg, params = tiny(zero_head=False)
    ids, mask = batch()
    key = jax.random.key(5)

    def parts(p, tc):
        loss, metrics = quietstar_loss(p, cfg, tc, ids, mask, key)
        return jnp.stack([loss, metrics["nll_loss"], metrics["policy_loss"]])

    # The gradients of the three numbers as one program (a Jacobian of 3 rows).
    jac = jax.jit(jax.jacrev(parts), static_argnums=1)
    off = jac(params, TC.replace(policy_loss_beta=0.0))
    for a in jax.tree.leaves(off):
        np.testing.assert_allclose(np.asarray(a[0]), TC.base_loss_beta * np.asarray(a[1]),
                                   rtol=1e-6, atol=1e-9)
    # The policy loss does have a gradient (with the policy weight on, as it ships).
    on = jac(params, TC)
    assert max(float(jnp.abs(x[2]).max()) for x in jax.tree.leaves(on)) > 1e-6
