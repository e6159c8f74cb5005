"""The Quiet-STaR objective: NLL of the base and talk steps, rewards, REINFORCE.

See docs/ALGORITHM.md, sections 7-9 (talk steps and the NLL; rewards, the baseline and
REINFORCE; the total loss). Rows are the batch repeated `n_passes` times
consecutively; a label equal to `pad_id` (or masked out) is ignored everywhere.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from quietstar_jax import model, vocab
from quietstar_jax.model import ModelConfig, Params
from quietstar_jax.sparse import (
    SELECT_SALT,
    gate_loss_of,
    logit_stats,
    select_positions,
    sparse_thoughts,
    take,
)
from quietstar_jax.thoughts import (
    Rollout,
    ThoughtConfig,
    gate_logit,
    mixed_hidden,
    mixing_weight,
    rollout,
    shift_left,
)

LOSS_COMPONENTS = ("nll_base", "nll_thought", "policy_loss")


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross-entropy: logits `[..., vocab]` float32, targets `[...]` -> `[...]`."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return logz - picked


def hidden_nll(params: Params, cfg: ModelConfig, h: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross-entropy of the LM head on hidden `h` `[..., hidden]` against
    `targets` `[...]` -> float32 `[...]`, fused (vocab.token_nll: no logits kept)."""
    return vocab.token_nll(h, model.vocab_table(params, cfg), targets,
                           chunk_size=cfg.vocab_chunk, dtype=cfg.dtype)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x over `mask` (0 when the mask is empty)."""
    m = mask.astype(x.dtype)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def check_ids_in_vocab(ids: Any, vocab_size: int, name: str) -> None:
    """Reject token ids outside `[0, vocab_size)` when their values are known (concrete
    arrays, before anything is compiled); under jit the caller's data pipeline checks."""
    if isinstance(ids, jax.core.Tracer):
        return
    arr = np.asarray(ids)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = arr.min() if arr.min() < 0 else arr.max()
        raise ValueError(f"{name} has token id {int(bad)}, outside the vocabulary "
                         f"[0, {vocab_size})")


def validate_inputs(
    cfg: ModelConfig,
    tc: ThoughtConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    thought_tokens: jax.Array | None,
) -> None:
    """Reject shapes and settings that cannot work, naming the field (runs at trace time)."""
    tc.check_token_ids(cfg.vocab_size)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    seq = input_ids.shape[1]
    if seq < tc.n_ahead_talk + 2:
        raise ValueError(
            f"sequence length {seq} is shorter than n_ahead_talk + 2 = {tc.n_ahead_talk + 2}: "
            "no position would carry a reward"
        )
    tc.check_think_k(seq)
    check_ids_in_vocab(input_ids, cfg.vocab_size, "input_ids")
    if thought_tokens is not None:
        check_ids_in_vocab(thought_tokens, cfg.vocab_size, "thought_tokens")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
            f"{tuple(input_ids.shape)}"
        )
    if thought_tokens is not None:
        want = (tc.num_sampled, input_ids.shape[0] * tc.n_passes, seq)
        if tuple(thought_tokens.shape) != want:
            raise ValueError(
                f"thought_tokens shape {tuple(thought_tokens.shape)} != (n_ahead - 3, "
                f"batch * n_passes, seq) = {want}"
            )


def training_reward(reward: jax.Array, tc: ThoughtConfig) -> jax.Array:
    """Baseline (mean over the passes of a sequence) then clamp at 0, as configured.

    reward: `[rows, positions]`, rows in passes-repeated order -> same shape.
    """
    if tc.use_baseline and tc.n_passes > 1:
        r = reward.reshape(-1, tc.n_passes, reward.shape[-1])
        reward = (r - r.mean(axis=1, keepdims=True)).reshape(reward.shape)
    if tc.remove_negative_rewards:
        reward = jnp.maximum(reward, 0.0)
    return reward


def masked_std(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Standard deviation of x over `mask` (0 when the mask is empty)."""
    mu = masked_mean(x, mask)
    return jnp.sqrt(masked_mean(jnp.square(x - mu), mask))


def reinforce_loss(train_reward: jax.Array, thought_logp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """REINFORCE: mean over token steps of mean over rows and rewarded positions of -R logp.

    train_reward: `[rows, positions]` (detached); thought_logp: `[T, rows, seq]`.
    Returns (policy loss scalar, per-token-step losses `[T]`); zeros when T == 0.
    """
    if thought_logp.shape[0] == 0:
        return jnp.zeros((), jnp.float32), jnp.zeros((0,), jnp.float32)
    logp = thought_logp[:, :, : train_reward.shape[-1]]
    per_token = jnp.mean(-jax.lax.stop_gradient(train_reward)[None] * logp, axis=(1, 2))
    return jnp.mean(per_token), per_token


def quietstar_objective(
    params: Params,
    cfg: ModelConfig,
    tc: ThoughtConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    rng: jax.Array | None,
    thought_tokens: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, Any]]:
    """(loss, metrics, details): `quietstar_loss` plus the per-position details of
    `quietstar_details`, from one computation (differentiate with has_aux). With
    `tc.think_k` set, only that many positions per row think (`sparse.sparse_objective`:
    its details and metrics add the gathered positions and the think gate's)."""
    validate_inputs(cfg, tc, input_ids, attention_mask, thought_tokens)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    if rng is None:
        if tc.sampling == "sample" and thought_tokens is None and tc.num_sampled > 0:
            raise ValueError("quietstar_loss needs an rng to sample thoughts (sampling='sample')")
        rng = jax.random.key(0)
    if tc.think_k is not None:  # sparse thoughts: only think_k positions per row think
        return sparse_objective(params, cfg, tc, input_ids, attention_mask, rng, thought_tokens)
    x = jnp.repeat(input_ids, tc.n_passes, axis=0)
    mask = jnp.repeat(attention_mask, tc.n_passes, axis=0)
    rows, seq = x.shape
    pad = tc.pad_token_id
    ro: Rollout = rollout(params, cfg, tc, x, mask, rng, thought_tokens)

    def targets(k: int) -> tuple[jax.Array, jax.Array]:
        """Targets x[i + k] and whether each counts (not padding, not past the end)."""
        t = shift_left(x, k)
        ok = shift_left(mask.astype(bool), k) & (t != pad)
        return jnp.where(ok, t, 0), ok

    # Base step: z0[i] predicts x[i + 1]; talk step k (the scored step s = n_ahead - 1 + k):
    # the mixed hidden predicts x[i + k + 1]. All NLLs in one vocabulary pass.
    sch = tc.schedule
    with jax.named_scope("mixing_head"):
        mixes = [mixed_hidden(params, tc, ro.base_hidden, ro.step_hidden[s - 1], s)
                 for s in sch.scored_steps]
    tgt = [targets(sch.target_shift(s)) for s in sch.scored_steps]
    with jax.named_scope("nll"):
        nll = hidden_nll(params, cfg, jnp.stack([ro.base_hidden] + [m for m, _ in mixes]),
                         jnp.stack([tgt[0][0]] + [t for t, _ in tgt]))
    t1, ok1 = tgt[0]
    base_tok = jnp.where(ok1, nll[0], 0.0)
    nll_base = masked_mean(base_tok, ok1)

    n_reward = sch.rewarded_positions(seq)  # positions i < L - 1 - n_ahead_talk
    reward = jnp.zeros((rows, n_reward), jnp.float32)
    nll_talk, w_means, nll_talk_tok = [], [], []
    for k, ((_, w), (_, okk)) in enumerate(zip(mixes, tgt, strict=True)):
        nll_k = jnp.where(okk, nll[k + 1], 0.0)
        nll_talk.append(masked_mean(nll_k, okk))
        nll_talk_tok.append(nll_k)
        w_means.append(masked_mean(w, okk))
        gain = shift_left(base_tok, k) - nll_k  # both 0 where the target is ignored
        reward = reward + jax.lax.stop_gradient(gain[:, :n_reward])
    nll_talk = jnp.stack(nll_talk)
    nll_thought = jnp.mean(nll_talk)
    nll_loss = tc.original_loss_weight * nll_base + (1 - tc.original_loss_weight) * nll_thought

    train_reward = training_reward(reward, tc)
    with jax.named_scope("policy_loss"):
        if tc.sampling == "pause":  # fixed thoughts: nothing to reinforce
            policy_loss, policy_per_token = reinforce_loss(train_reward, ro.thought_logp[:0])
        else:
            policy_loss, policy_per_token = reinforce_loss(train_reward, ro.thought_logp)
    logp = ro.thought_logp[:, :, :n_reward]

    loss = tc.base_loss_beta * nll_loss + tc.policy_loss_beta * policy_loss
    metrics = {
        "loss": loss,
        "nll_loss": nll_loss,
        "nll_base": nll_base,
        "nll_thought": nll_thought,
        "nll_talk": nll_talk,
        "policy_loss": policy_loss,
        "policy_loss_per_token": policy_per_token,
        "reward_mean": jnp.mean(reward),
        "reward_std": jnp.std(reward),
        "reward_positive_frac": jnp.mean((train_reward > 0).astype(jnp.float32)),
        "mixing_weight_mean": jnp.mean(jnp.stack(w_means)),
        "thought_logp_mean": jnp.mean(logp) if logp.shape[0] > 0 else jnp.zeros(()),
    }
    details = {
        "reward": reward,
        "train_reward": train_reward,
        "nll_base_tok": base_tok,
        "nll_talk_tok": jnp.stack(nll_talk_tok),
        "rollout": ro,
        "input_ids": x,
    }
    return loss, metrics, details


def quietstar_loss(
    params: Params,
    config: ModelConfig,
    thought_config: ThoughtConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    rng: jax.Array | None,
    thought_tokens: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The Quiet-STaR training loss (docs/ALGORITHM.md, sections 3-9).

    input_ids, attention_mask: `[batch, seq]`, right-padded with `pad_token_id`.
    rng: key for thought sampling (the same key gives the same thoughts).
    thought_tokens: optional int `[n_ahead - 3, batch * n_passes, seq]` fed instead of
      sampled tokens (rows in the passes-repeated order).
    Returns (total loss, metrics) with metrics `nll_base`, `nll_thought` (mean over
    talk steps), `nll_talk` `[n_ahead_talk]`, `policy_loss`, `reward_mean` (before the
    baseline and clamp), `mixing_weight_mean`, ... (all float32 scalars unless noted).
    """
    loss, metrics, _ = quietstar_objective(
        params, config, thought_config, input_ids, attention_mask, rng, thought_tokens
    )
    return loss, metrics


def quietstar_details(
    params: Params,
    config: ModelConfig,
    thought_config: ThoughtConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    rng: jax.Array | None,
    thought_tokens: jax.Array | None = None,
) -> dict[str, Any]:
    """Per-position results for analysis and the reward page.

    Returns `reward` `[rows, seq - 1 - n_ahead_talk]` (before baseline/clamp),
    `train_reward` (after), per-token NLLs `nll_base_tok` `[rows, seq]` (position i
    predicts x[i + 1]) and `nll_talk_tok` `[n_ahead_talk, rows, seq]` (talk step k at
    position i predicts x[i + k + 1]), both 0 where ignored, `rollout` (a `Rollout`),
    `input_ids` `[rows, seq]` (passes-repeated), and `metrics`.
    """
    _, metrics, details = quietstar_objective(
        params, config, thought_config, input_ids, attention_mask, rng, thought_tokens
    )
    return details | {"metrics": metrics}


def sparse_objective(
    params: Params,
    cfg: ModelConfig,
    tc: ThoughtConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    rng: jax.Array,
    thought_tokens: jax.Array | None = None,
    positions_override: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, Any]]:
    """(loss, metrics, details) of sparse thoughts (`quietstar_jax.sparse`);
    `quietstar_objective` calls it when `tc.think_k` is set (inputs already checked;
    `rng` set).

    input_ids, attention_mask: `[batch, seq]`. positions_override: `[batch, k]` int
    positions to think at instead of the gate's and random ones (tests, analysis).
    metrics: `quietstar_objective`'s, plus `gate_loss`, `think_rate` (gathered valid
    positions / valid positions), `gate_positive_frac` (labels that say think),
    `gate_accuracy` (labels the gate's sign matches). details: per-position `reward`
    `[rows, seq - 1 - n_ahead_talk]` (0 where no thought), `train_reward`,
    `nll_base_tok`, `nll_talk_tok` (the base prediction's NLL where no thought),
    `positions` `[rows, K]`, `gain` `[rows, K]` (the reward at the gathered positions),
    `gate_label`, `gate_ok` (which gathered positions carry a label), `gate_logit`
    `[rows, seq]` (zeros without a gate), `thoughts` (`SparseThoughts`), `input_ids`.
    """
    n_passes = tc.n_passes
    x = jnp.repeat(input_ids, n_passes, axis=0)
    mask = jnp.repeat(attention_mask, n_passes, axis=0)
    rows, seq = x.shape
    pad = tc.pad_token_id
    sch = tc.schedule
    valid = mask.astype(bool)
    positions = model.default_positions(mask)
    # With full rematerialisation the base pass and the thoughts run without gradient
    # and the backward pass replays them together (`sparse_thoughts`' base_trace).
    replay = cfg.remat == "full" and sch.num_steps > 0
    with jax.named_scope("base_pass"):
        base = model.forward(jax.lax.stop_gradient(params) if replay else params, cfg, x, mask,
                             positions, trace=replay)
    h0, kv0 = base[:2]

    has_gate = "think_gate" in params
    gate_rows = jnp.zeros((rows, seq), jnp.float32)
    if has_gate:
        with jax.named_scope("think_gate"):
            hb = jax.lax.stop_gradient(h0[::n_passes])  # the passes' base passes are equal
            stats = logit_stats(params, cfg, hb)
            gate_b = gate_logit(params["think_gate"], hb, stats)  # [batch, seq]
            gate_rows = jnp.repeat(gate_b, n_passes, axis=0)
    if positions_override is not None:
        idx_b = jnp.sort(positions_override.astype(jnp.int32), axis=1)
    else:
        # candidates: positions that can carry a reward (and a gate label) come first
        cand = attention_mask.astype(bool) & (jnp.arange(seq) < sch.rewarded_positions(seq))
        idx_b = select_positions(tc, cand, gate_b if has_gate else None,
                                 jax.random.fold_in(rng, SELECT_SALT))
    idx = jnp.repeat(idx_b, n_passes, axis=0)  # the same positions for every pass
    th = sparse_thoughts(params, cfg, tc, x, mask, positions, kv0, idx, rng, thought_tokens,
                         base_trace=base[2] if replay else None)
    if th.base_hidden is not None:
        h0 = th.base_hidden

    def targets(k: int) -> tuple[jax.Array, jax.Array]:
        t = shift_left(x, k)
        ok = shift_left(valid, k) & (t != pad)
        return jnp.where(ok, t, 0), ok

    tgt = [targets(sch.target_shift(s)) for s in sch.scored_steps]
    with jax.named_scope("mixing_head"):
        mixes = []
        for s in sch.scored_steps:
            b = take(shift_left(h0, sch.base_shift(s)), idx)
            hs = th.step_hidden[s - 1]
            w = mixing_weight(params["thought"]["mix"], b, hs)
            wd = w[..., None].astype(hs.dtype)
            mixes.append(((1 - wd) * b + wd * hs, w))
    tgt_g = [(take(t, idx), take(ok, idx)) for t, ok in tgt]
    with jax.named_scope("nll"):
        nll_b = hidden_nll(params, cfg, h0, tgt[0][0])
        nll_t = hidden_nll(params, cfg, jnp.stack([m for m, _ in mixes]),
                           jnp.stack([t for t, _ in tgt_g]))
    ok1 = tgt[0][1]
    base_tok = jnp.where(ok1, nll_b, 0.0)
    nll_base = masked_mean(base_tok, ok1)

    n_reward = sch.rewarded_positions(seq)
    rew_ok = idx < n_reward
    gain = jnp.zeros(idx.shape, jnp.float32)
    nll_talk, w_means, nll_talk_tok = [], [], []
    r_idx = jnp.arange(rows)[:, None]
    for k, ((_, w), (_, okk)) in enumerate(zip(mixes, tgt_g, strict=True)):
        nll_k = jnp.where(okk, nll_t[k], 0.0)
        nll_talk.append(masked_mean(nll_k, okk))
        w_means.append(masked_mean(w, okk))
        base_k = shift_left(base_tok, k)  # the base prediction of the same target
        nll_talk_tok.append(base_k.at[r_idx, idx].set(nll_k))
        gain = gain + jax.lax.stop_gradient(take(base_k, idx) - nll_k)
    gain = jnp.where(rew_ok, gain, 0.0)
    nll_talk = jnp.stack(nll_talk)
    nll_thought = jnp.mean(nll_talk)
    nll_loss = tc.original_loss_weight * nll_base + (1 - tc.original_loss_weight) * nll_thought

    train_gain = training_reward(gain, tc)  # baseline over passes: same positions per pass
    logp = th.thought_logp
    with jax.named_scope("policy_loss"):
        if tc.sampling == "pause" or logp.shape[0] == 0:
            policy_loss = jnp.zeros((), jnp.float32)
            policy_per_token = jnp.zeros((0,), jnp.float32)
        else:
            m = rew_ok.astype(jnp.float32)
            per = -jax.lax.stop_gradient(train_gain * m)[None] * logp
            policy_per_token = jnp.sum(per, axis=(1, 2)) / jnp.maximum(jnp.sum(m), 1.0)
            policy_loss = jnp.mean(policy_per_token)

    loss = tc.base_loss_beta * nll_loss + tc.policy_loss_beta * policy_loss
    gate_ok = rew_ok & take(ok1, idx)
    g_logit = take(gate_rows, idx)
    gate_loss, label = gate_loss_of(g_logit, gain, gate_ok, tc.gate_cost)
    if has_gate:
        loss = loss + tc.gate_loss_weight * gate_loss

    reward = jnp.zeros((rows, seq), jnp.float32).at[r_idx, idx].set(gain)[:, :n_reward]
    train_reward = (jnp.zeros((rows, seq), jnp.float32).at[r_idx, idx]
                    .set(train_gain)[:, :n_reward])
    n_valid = jnp.maximum(jnp.sum(valid), 1)
    lp_ok = jnp.broadcast_to(rew_ok, logp.shape)
    metrics = {
        "loss": loss,
        "nll_loss": nll_loss,
        "nll_base": nll_base,
        "nll_thought": nll_thought,
        "nll_talk": nll_talk,
        "policy_loss": policy_loss,
        "policy_loss_per_token": policy_per_token,
        "reward_mean": masked_mean(gain, rew_ok),
        "reward_std": masked_std(gain, rew_ok),
        "reward_positive_frac": masked_mean((train_gain > 0).astype(jnp.float32), rew_ok),
        "mixing_weight_mean": jnp.mean(jnp.stack(w_means)),
        "thought_logp_mean": masked_mean(logp, lp_ok) if logp.shape[0] > 0 else jnp.zeros(()),
        "gate_loss": gate_loss,
        "think_rate": jnp.sum(take(valid, idx)) / n_valid,
        "gate_positive_frac": masked_mean(label.astype(jnp.float32), gate_ok),
        "gate_accuracy": masked_mean(((g_logit > 0) == label).astype(jnp.float32), gate_ok),
    }
    details = {
        "reward": reward,
        "train_reward": train_reward,
        "nll_base_tok": base_tok,
        "nll_talk_tok": jnp.stack(nll_talk_tok),
        "positions": idx,
        "gain": gain,
        "gate_label": label,
        "gate_ok": gate_ok,
        "gate_logit": gate_rows,
        "thoughts": th,
        "input_ids": x,
    }
    return loss, metrics, details
