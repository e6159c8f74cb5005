"""The jitted update step: schedule, AdamW update, accumulation, thought keys, NaNs."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from quietstar_jax.model import ModelConfig, init_params
from quietstar_jax.thought import ThoughtConfig, init_thought_params
from quietstar_jax.thought.loss import quietstar_loss
from quietstar_jax.train.metrics import check_finite
from quietstar_jax.train.step import (
    decay_mask,
    init_state,
    lr_schedule,
    make_optimizer,
    make_train_step,
    split_micro_batches,
    unalias,
)

CFG = ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=1,
                  num_heads=2, num_kv_heads=1, tie_word_embeddings=False)
TC = ThoughtConfig(n_ahead=4, n_ahead_talk=2, n_passes=2, start_token_id=37, end_token_id=38,
                   pad_token_id=39, policy_loss_beta=10.0)


def tiny_params(seed=0):
    params = init_params(CFG, jax.random.key(seed))
    # Larger weights than the default init, so rewards and gradients are not tiny.
    params = jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, params)
    params["thought"] = init_thought_params(params, CFG, jax.random.key(seed + 1), 5)
    # A nonzero mixing head, so thoughts change predictions and rewards are not 0.
    w2 = jax.random.normal(jax.random.key(seed + 2), params["thought"]["mix"]["w2"].shape)
    params["thought"]["mix"]["w2"] = 0.5 * w2
    return unalias(params)


def tiny_batch(b=4, seq=10, seed=0, pad_tail=0):
    ids = np.array(jax.random.randint(jax.random.key(seed), (b, seq), 0, 37), np.int32)
    mask = np.ones_like(ids)
    if pad_tail:
        ids[0, -pad_tail:] = TC.pad_token_id
        mask[0, -pad_tail:] = 0
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}


def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _linear_warmup_decay(lr, warmup, total, end_ratio, step):
    """The schedule written out (transformers' get_linear_schedule_with_warmup with a
    floor at `lr * end_ratio`), in plain Python floats."""
    if step < warmup:
        return lr * step / warmup
    frac = min((step - warmup) / max(total - warmup, 1), 1.0)
    return lr + (lr * end_ratio - lr) * frac


@pytest.mark.parametrize("lr,warmup,total,end_ratio", [
    (1e-3, 4, 12, 0.0), (3e-4, 10, 110, 0.1), (1.0, 0, 10, 0.1), (2e-5, 0, 7, 0.0)])
def test_lr_schedule_is_warmup_then_linear_decay(lr, warmup, total, end_ratio):
    sched = lr_schedule(lr, warmup_steps=warmup, total_steps=total, end_lr_ratio=end_ratio)
    steps = sorted({0, warmup // 2, warmup, (warmup + total) // 2, total - 1, total,
                    total + 5})
    want = [_linear_warmup_decay(lr, warmup, total, end_ratio, s) for s in steps]
    np.testing.assert_allclose([float(sched(s)) for s in steps], want, rtol=1e-6,
                               atol=1e-12)
    # As the train step calls it: an int32 step under jit.
    jitted = jax.jit(jax.vmap(sched))(jnp.asarray(steps, jnp.int32))
    np.testing.assert_allclose(np.asarray(jitted), want, rtol=1e-6, atol=1e-12)
    assert float(sched(total + 100)) == pytest.approx(lr * end_ratio, rel=1e-6, abs=1e-12)
    assert float(sched(warmup)) == pytest.approx(lr, rel=1e-6)


def test_lr_schedule_rejects_negative_steps():
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        lr_schedule(1e-3, warmup_steps=-1, total_steps=10)


def test_decay_mask_skips_norms_and_biases():
    mask = decay_mask(tiny_params())
    assert mask["embed"] and mask["lm_head"] and mask["layers"]["attn"]["q"]
    assert not mask["final_norm"] and not mask["layers"]["attn_norm"]
    assert mask["thought"]["start_emb"] and mask["thought"]["mix"]["w0"]
    assert not mask["thought"]["mix"]["b0"] and not mask["thought"]["mix"]["b1"]


def test_decay_mask_reads_each_params_declaration():
    """The mask comes from the modules' `weight_decay` metadata (`model.declare`): a
    Qwen2-style config's attention biases are not decayed, its weights are; a param
    the modules do not declare is an error, not silently decayed."""
    from quietstar_jax import model

    cfg = model.ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                            num_layers=2, num_heads=2, num_kv_heads=1, attention_bias=True)
    params = model.init_params(cfg, jax.random.key(0))
    mask = decay_mask(params)
    assert not any(mask["layers"]["attn"][k] for k in ("q_bias", "k_bias", "v_bias"))
    assert not mask["layers"]["mlp_norm"]
    assert all(mask["layers"]["attn"][k] for k in ("q", "k", "v", "o"))
    assert all(mask["layers"]["mlp"][k] for k in ("gate", "up", "down"))
    with pytest.raises(KeyError, match="extra_bias"):
        decay_mask({**params, "extra_bias": jnp.zeros(3)})


def test_micro_batches_take_strided_rows():
    x = jnp.arange(12).reshape(6, 2)
    m = split_micro_batches({"a": x}, 3)["a"]
    assert m.shape == (3, 2, 2)
    assert m[0, :, 0].tolist() == [0, 6] and m[2, :, 0].tolist() == [4, 10]


# Compiling the Quiet-STaR gradient dominates these tests: compile with less LLVM
# optimisation (same semantics), and share one compiled step between tests.
FAST = {"xla_backend_optimization_level": 0}
LR, WD, CLIP, SEED = 1e-2, 0.1, 0.5, 3


@pytest.fixture(scope="module")
def adamw_step():
    opt, sched = make_optimizer(LR, 10, warmup_steps=0, weight_decay=WD, clip_norm=CLIP)
    step = make_train_step(CFG, TC, opt, schedule=sched, seed=SEED, donate=False,
                           compiler_options=FAST)
    return opt, step


def test_one_step_is_clipped_adamw_on_the_quietstar_gradient(adamw_step):
    """Independent check: the first AdamW step moves each weight by
    -lr * (g / (|g| + eps) + wd * w) (decay masked), with g the clipped gradient of
    quietstar_loss under key fold_in(fold_in(key(seed), 0), 0)."""
    opt, step = adamw_step
    params, batch = tiny_params(), tiny_batch()
    new_state, metrics = step(init_state(params, opt), batch)

    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(SEED), 0), 0)
    grad_fn = jax.jit(jax.value_and_grad(quietstar_loss, has_aux=True), static_argnums=(1, 2),
                      compiler_options=FAST)
    (loss, m), grads = grad_fn(params, CFG, TC, batch["input_ids"], batch["attention_mask"],
                               key)
    norm = optax.tree.norm(grads)
    scale = jnp.minimum(1.0, CLIP / norm)
    mask = decay_mask(params)
    want = jax.tree.map(
        lambda p, g, dm: p - LR * ((g * scale) / (jnp.abs(g * scale) + 1e-8) + WD * p * dm),
        params, grads, mask)
    assert float(m["policy_loss"]) > 0  # the REINFORCE term is really exercised
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(metrics["policy_loss"]) == pytest.approx(float(m["policy_loss"]), rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(float(norm), rel=1e-5)
    assert float(metrics["lr"]) == pytest.approx(LR)
    assert float(metrics["tokens"]) == batch["attention_mask"].size
    assert max_diff(new_state.params, want) < 1e-6
    assert int(new_state.step) == 1


def test_thought_key_comes_from_the_step_number(adamw_step):
    opt, step = adamw_step
    state = init_state(tiny_params(2), opt)
    batch = tiny_batch(seed=2)
    _, m_a = step(state, batch)
    _, m_b = step(state, batch)
    _, m_c = step(state._replace(step=jnp.asarray(1, jnp.int32)), batch)  # same params
    assert float(m_a["thought_logp_mean"]) == float(m_b["thought_logp_mean"])
    assert float(m_a["policy_loss"]) == float(m_b["policy_loss"])
    assert float(m_a["thought_logp_mean"]) != float(m_c["thought_logp_mean"])
    assert float(m_a["nll_base"]) == float(m_c["nll_base"])  # thoughts, not the LM, moved


def test_nan_params_are_reported_with_step_and_component(adamw_step):
    opt, step = adamw_step
    params = tiny_params()
    params["layers"]["attn"]["q"] = params["layers"]["attn"]["q"].at[0, 0, 0, 0].set(jnp.nan)
    _, metrics = step(init_state(params, opt), tiny_batch())
    with pytest.raises(FloatingPointError, match="step 7: component nll_base"):
        check_finite(jax.device_get(metrics), 7)


@pytest.mark.slow
def test_two_micro_batches_of_two_equal_one_batch_of_four():
    """Accumulating 2 micro-batches of 2 sequences gives the update of one batch of 4.

    With SGD at lr 1 the update is minus the (mean) gradient itself, so this compares
    gradients, leaf by leaf, to 1e-6 + 2e-5 x the leaf's largest entry. (Entries are
    up to ~3, and ~20 for the thought embeddings, whose gradients sum over every
    position and are scaled by embedding_scale=100; float32 summation-order noise is
    ~1e-6 of that, so an absolute 1e-6 would test rounding, not accumulation. The
    same gradients at a realistic lr of 1e-3 give updates equal to 1e-6.) Greedy thoughts
    with one pass make both runs think the same (sampling keys differ per
    micro-batch) and keep the REINFORCE term nonzero; full-length rows make the mean
    of micro-batch means the mean."""
    tc = TC.replace(sampling="greedy", n_passes=1)
    params, batch = tiny_params(1), tiny_batch(seed=1)
    opt = optax.sgd(1.0)
    one = make_train_step(CFG, tc, opt, grad_accum=1, donate=False, compiler_options=FAST)
    two = make_train_step(CFG, tc, opt, grad_accum=2, donate=False, compiler_options=FAST)
    s1, m1 = one(init_state(params, opt), batch)
    s2, m2 = two(init_state(params, opt), batch)
    update1 = jax.tree.map(jnp.subtract, s1.params, params)
    update2 = jax.tree.map(jnp.subtract, s2.params, params)
    flat1 = jax.tree_util.tree_flatten_with_path(update1)[0]
    for (path, u1), u2 in zip(flat1, jax.tree.leaves(update2), strict=True):
        diff, scale = float(jnp.max(jnp.abs(u1 - u2))), float(jnp.max(jnp.abs(u1)))
        assert diff <= 1e-6 + 2e-5 * scale, (jax.tree_util.keystr(path), diff, scale)
        assert 1e-3 * diff <= 1e-6  # the same gradients taken at lr 1e-3
    assert max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(update1)) > 1e-2
    for k in ("loss", "nll_base", "nll_thought", "policy_loss", "reward_mean", "grad_norm"):
        assert float(m1[k]) == pytest.approx(float(m2[k]), rel=1e-5, abs=1e-7), k
    assert float(m1["policy_loss"]) > 0
    # A different split really is different: one micro-batch alone is another update.
    half = {k: v[::2] for k, v in batch.items()}
    s3, _ = one(init_state(params, opt), half)
    assert max_diff(s3.params, s1.params) > 1e-3
    with pytest.raises(ValueError, match="not divisible by grad_accum"):
        make_train_step(CFG, tc, opt, grad_accum=3, donate=False)(init_state(params, opt),
                                                                  batch)


@pytest.mark.slow
def test_gradient_sum_in_the_params_dtype_rounds_as_the_float32_sum_for_two_micro_batches():
    """bfloat16 params, 2 micro-batches: summing the gradients in bfloat16
    (`grad_accum_dtype="params"`, half the memory) gives the float32 sum's new params
    within bfloat16 rounding at each leaf's scale (2^-6 of the leaf's largest |param| +
    |update|, two ulps; measured 0.005 at most; XLA may keep the float32 path's gradients
    unrounded), and the updates are not small. A bad value is refused by
    name."""
    cfg = CFG.replace(param_dtype="bfloat16", dtype="bfloat16")
    tc = TC.replace(sampling="greedy", n_passes=1)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tiny_params(1))
    batch = tiny_batch(seed=1)
    opt = optax.sgd(1.0)
    f32 = make_train_step(cfg, tc, opt, grad_accum=2, donate=False, compiler_options=FAST)
    own = make_train_step(cfg, tc, opt, grad_accum=2, grad_accum_dtype="params",
                          donate=False, compiler_options=FAST)
    s_f32, _ = f32(init_state(params, opt), batch)
    s_own, _ = own(init_state(params, opt), batch)
    for p0, a, b in zip(jax.tree.leaves(params), jax.tree.leaves(s_f32.params),
                        jax.tree.leaves(s_own.params), strict=True):
        assert a.dtype == b.dtype == jnp.bfloat16
        p0, a, b = (np.asarray(x, np.float32) for x in (p0, a, b))
        assert np.max(np.abs(a - b)) <= 2.0**-6 * np.max(np.abs(p0) + np.abs(a - p0))
    assert max_diff(s_own.params, params) > 1e-2
    # The sum really is bfloat16: the scan carries the gradients at the params' dtype.
    def carry_dtypes(step: Any) -> set[str]:
        jaxpr = step.trace(init_state(params, opt), batch).jaxpr
        scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
        return {str(v.aval.dtype) for e in scans
                for v in e.invars[e.params["num_consts"]:][:e.params["num_carry"]]
                if v.aval.ndim >= 2}
    assert carry_dtypes(f32) == {"float32"} and carry_dtypes(own) == {"bfloat16"}
    with pytest.raises(ValueError, match="grad_accum_dtype='float16' must be"):
        make_train_step(cfg, tc, opt, grad_accum=2, grad_accum_dtype="float16")


def test_bfloat16_compute_keeps_float32_master_weights():
    cfg = CFG.replace(dtype="bfloat16")
    params, batch = tiny_params(), tiny_batch(pad_tail=3)
    opt, sched = make_optimizer(1e-3, 10)
    step = make_train_step(cfg, TC, opt, schedule=sched, grad_accum=2, compiler_options=FAST)
    state, metrics = step(init_state(params, opt), batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert int(state.step) == 1
    check_finite(jax.device_get(metrics), 1)


@pytest.mark.slow
def test_plain_loss_hook_is_the_base_nll_of_the_same_rows():
    """`loss_fn=next_token_loss_fn` (the benchmarks' plain baseline) runs the same update
    machinery on the next-token NLL: its loss is the Quiet-STaR loss's `nll_base` of the
    same batch (same rows, same ignored labels), and the default loss_fn is
    `quietstar_loss_fn` (the same lowered program)."""
    from quietstar_jax.train.step import next_token_loss_fn, quietstar_loss_fn

    opt, _ = make_optimizer(1e-3, 10)
    params, batch = tiny_params(), tiny_batch(pad_tail=3)
    state = init_state(params, opt)
    plain = make_train_step(CFG, TC, opt, donate=False, compiler_options=FAST,
                            loss_fn=next_token_loss_fn(CFG, TC))
    new_state, metrics = plain(state, batch)
    _, qs_metrics = quietstar_loss(params, CFG, TC, batch["input_ids"],
                                   batch["attention_mask"], jax.random.key(0))
    np.testing.assert_allclose(float(metrics["loss"]), float(qs_metrics["nll_base"]),
                               rtol=1e-5)
    assert int(new_state.step) == 1 and np.isfinite(float(metrics["grad_norm"]))
    assert max_diff(new_state.params, params) > 0
    default = make_train_step(CFG, TC, opt, donate=False)
    explicit = make_train_step(CFG, TC, opt, donate=False, loss_fn=quietstar_loss_fn(CFG, TC))
    assert default.lower(state, batch).as_text() == explicit.lower(state, batch).as_text()
