"""The Quiet-STaR objective: NLL of the base and talk steps, rewards, REINFORCE.

See docs/ALGORITHM.md, sections 7-9 (talk steps and the NLL; rewards, the baseline and
REINFORCE; the total loss). Rows are the batch repeated `n_passes` times
consecutively; a label equal to `pad_id` (or masked out) is ignored everywhere.

`quietstar_loss`, `quietstar_details` and `quietstar_objective` are pure functions of
the params: `quietstar_objective` merges the module once (`thought.merge_lm`) and the
objectives below it (`dense_objective`, `sparse_objective`) take that module `lm`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from quietstar_jax import model, vocab
from quietstar_jax.model import CausalLM, ModelConfig, Params
from quietstar_jax.thought import (
    GatedQuietStarLM,
    QuietStarLM,
    Rollout,
    ThoughtConfig,
    merge_lm,
    mix_step,
    run_rollout,
    shift_left,
)
from quietstar_jax.thought.sparse import (
    gate_loss_of,
    length_keys,
    logit_stats,
    select_positions,
    sparse_thoughts,
    take,
)

LOSS_COMPONENTS = ("nll_base", "nll_thought", "policy_loss")


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross-entropy of materialised logits (optax): logits `[..., vocab]`
    float32, targets `[...]` int -> `[...]`. The training losses use `hidden_nll`."""
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, targets)


def hidden_nll(lm: CausalLM, h: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross-entropy of `lm`'s head on hidden `h` `[..., hidden]` against
    `targets` `[...]` -> float32 `[...]`, fused (vocab.nll_from_hidden: no logits kept)."""
    return vocab.nll_from_hidden(h, lm.vocab_table(), targets, chunk_size=lm.cfg.vocab_chunk,
                                 dtype=lm.cfg.dtype)


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
        want = (max(tc.lengths), input_ids.shape[0] * tc.n_passes, seq)
        what = ("n_ahead - 3" if tc.think_lengths is None
                else "the longest of ThoughtConfig.think_lengths")
        if tuple(thought_tokens.shape) != want:
            raise ValueError(
                f"thought_tokens shape {tuple(thought_tokens.shape)} != ({what}, "
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


def reinforce_loss(train_reward: jax.Array, thought_logp: jax.Array,
                   mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """REINFORCE: mean over token steps of mean over rows and rewarded positions of -R logp.

    train_reward: `[rows, positions]` (detached); thought_logp: `[T, rows, seq]`.
    mask: optional `[rows, positions]`, the entries that count (sparse thoughts: the
    gathered positions that carry a reward); the mean is then over them.
    Returns (policy loss scalar, per-token-step losses `[T]`); zeros when T == 0.
    """
    if thought_logp.shape[0] == 0:
        return jnp.zeros((), jnp.float32), jnp.zeros((0,), jnp.float32)
    logp = thought_logp[:, :, : train_reward.shape[-1]]
    if mask is None:
        per_token = jnp.mean(-jax.lax.stop_gradient(train_reward)[None] * logp, axis=(1, 2))
    else:
        m = mask.astype(jnp.float32)
        per = -jax.lax.stop_gradient(train_reward * m)[None] * logp
        per_token = jnp.sum(per, axis=(1, 2)) / jnp.maximum(jnp.sum(m), 1.0)
    return jnp.mean(per_token), per_token


def objective_metrics(
    tc: ThoughtConfig, *, nll_base: jax.Array, nll_talk: jax.Array, policy_loss: jax.Array,
    policy_per_token: jax.Array, reward_mean: jax.Array, reward_std: jax.Array,
    reward_positive_frac: jax.Array, w_means: list[jax.Array], thought_logp_mean: jax.Array,
) -> dict[str, jax.Array]:
    """The objective's total and its metrics from its parts (dense and sparse alike).

    nll_talk `[n_ahead_talk]`: each talk step's mean NLL; w_means: each talk step's mean
    mixing weight (scalars). The NLL loss is `original_loss_weight` x base + the rest x
    the talk steps' mean; the total `base_loss_beta` x that + `policy_loss_beta` x policy
    (docs/ALGORITHM.md, sections 7 and 9). All float32 scalars unless noted.
    """
    nll_thought = jnp.mean(nll_talk)
    nll_loss = tc.original_loss_weight * nll_base + (1 - tc.original_loss_weight) * nll_thought
    return {
        "loss": tc.base_loss_beta * nll_loss + tc.policy_loss_beta * policy_loss,
        "nll_loss": nll_loss,
        "nll_base": nll_base,
        "nll_thought": nll_thought,
        "nll_talk": nll_talk,
        "policy_loss": policy_loss,
        "policy_loss_per_token": policy_per_token,
        "reward_mean": reward_mean,
        "reward_std": reward_std,
        "reward_positive_frac": reward_positive_frac,
        "mixing_weight_mean": jnp.mean(jnp.stack(w_means)),
        "thought_logp_mean": thought_logp_mean,
    }


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
    its details and metrics add the gathered positions and the think gate's; with
    `tc.think_lengths`, one group of positions per thought length). Merges the module
    once (`merge_lm`); `dense_objective` / `sparse_objective` run on it."""
    validate_inputs(cfg, tc, input_ids, attention_mask, thought_tokens)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    if rng is None:
        if tc.sampling == "sample" and thought_tokens is None and max(tc.lengths) > 0:
            raise ValueError("quietstar_loss needs an rng to sample thoughts (sampling='sample')")
        rng = jax.random.key(0)
    lm = merge_lm(params, cfg)
    if tc.think_k is not None:  # sparse thoughts: only think_k positions per row think
        return sparse_objective(lm, tc, input_ids, attention_mask, rng, thought_tokens)
    return dense_objective(lm, tc, input_ids, attention_mask, rng, thought_tokens)


def dense_objective(
    lm: QuietStarLM,
    tc: ThoughtConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    rng: jax.Array,
    thought_tokens: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, Any]]:
    """(loss, metrics, details) of the think-everywhere objective (the authors') on the
    merged module `lm`; `quietstar_objective` calls it (inputs checked, `rng` set).
    input_ids, attention_mask: `[batch, seq]`; thought_tokens `[n_ahead - 3, rows, seq]`."""
    x = jnp.repeat(input_ids, tc.n_passes, axis=0)
    mask = jnp.repeat(attention_mask, tc.n_passes, axis=0)
    rows, seq = x.shape
    pad = tc.pad_token_id
    ro: Rollout = run_rollout(lm, tc, x, mask, rng, thought_tokens)

    def targets(k: int) -> tuple[jax.Array, jax.Array]:
        """Targets x[i + k] and whether each counts (not padding, not past the end)."""
        t = shift_left(x, k)
        ok = shift_left(mask.astype(bool), k) & (t != pad)
        return jnp.where(ok, t, 0), ok

    # Base step: z0[i] predicts x[i + 1]; talk step k (the scored step s = n_ahead - 1 + k):
    # the mixed hidden predicts x[i + k + 1]. All NLLs in one vocabulary pass.
    sch = tc.schedule
    with jax.named_scope("mixing_head"):
        mixes = [mix_step(lm.thought, tc, ro.base_hidden, ro.step_hidden[s - 1], s)
                 for s in sch.scored_steps]
    tgt = [targets(sch.target_shift(s)) for s in sch.scored_steps]
    with jax.named_scope("nll"):
        nll = hidden_nll(lm, jnp.stack([ro.base_hidden] + [m for m, _ in mixes]),
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
    train_reward = training_reward(reward, tc)
    with jax.named_scope("policy_loss"):
        if tc.sampling == "pause":  # fixed thoughts: nothing to reinforce
            policy_loss, policy_per_token = reinforce_loss(train_reward, ro.thought_logp[:0])
        else:
            policy_loss, policy_per_token = reinforce_loss(train_reward, ro.thought_logp)
    logp = ro.thought_logp[:, :, :n_reward]

    metrics = objective_metrics(
        tc, nll_base=nll_base, nll_talk=jnp.stack(nll_talk), policy_loss=policy_loss,
        policy_per_token=policy_per_token, reward_mean=jnp.mean(reward),
        reward_std=jnp.std(reward),
        reward_positive_frac=jnp.mean((train_reward > 0).astype(jnp.float32)),
        w_means=w_means,
        thought_logp_mean=jnp.mean(logp) if logp.shape[0] > 0 else jnp.zeros(()))
    loss = metrics["loss"]
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
    lm: QuietStarLM,
    tc: ThoughtConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    rng: jax.Array,
    thought_tokens: jax.Array | None = None,
    positions_override: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, Any]]:
    """(loss, metrics, details) of sparse thoughts (`quietstar_jax.thought.sparse`) on the
    merged module `lm` (a `GatedQuietStarLM` trains its think gate too);
    `quietstar_objective` calls it when `tc.think_k` is set (inputs already checked;
    `rng` set).

    input_ids, attention_mask: `[batch, seq]`. positions_override: `[batch, k]` int
    positions to think at instead of the gate's and random ones (tests, analysis); with
    several thought lengths also `[n_lengths, batch, k]` (one set per length).
    thought_tokens: `[max(tc.lengths), rows, seq]`; a length-L group is fed the first L.

    Thought lengths (`tc.lengths`: `think_lengths`, else one, `num_sampled`): one group
    per length. Group l gathers `think_k` positions per row by the gate's column l (plus
    the random share; keys `sparse.length_keys(rng, l)`), thinks there with thoughts of
    `lengths[l]` sampled tokens (`tc.of_length`) and is scored as one length is: talk
    NLL, gains, REINFORCE over its positions, gate column l's loss against the labels
    gain > `tc.thought_cost(lengths[l])`. The base pass runs once; the thought NLL, the
    policy loss and the gate loss are the means over the groups. With one length this is
    the one-length objective, bit for bit.

    metrics: `quietstar_objective`'s, plus `gate_loss`, `think_rate` (valid positions
    that think at some length / valid positions), `gate_positive_frac` (labels that say
    think), `gate_accuracy` (labels the gate's sign matches), pooled over the groups;
    with `think_lengths` set also per length `[n_lengths]`: `think_rate_per_length`,
    `gain_mean_per_length`, `nll_thought_per_length`, `gate_loss_per_length`,
    `gate_positive_frac_per_length`, `gate_accuracy_per_length`. details: `groups`, per
    length a dict of per-position `reward` `[rows, seq - 1 - n_ahead_talk]` (0 where no
    thought), `train_reward`, `nll_talk_tok` (the base prediction's NLL where no
    thought), `positions` `[rows, K]`, `gain` `[rows, K]` (the reward at the gathered
    positions), `gate_label`, `gate_ok` (which gathered positions carry a label),
    `thoughts` (`SparseThoughts`), `length`; `nll_base_tok`, `gate_logit` `[rows, seq]`
    (`[rows, seq, n_lengths]` with several lengths; zeros without a gate), `input_ids`,
    `lengths`; with one length also that group's keys at the top level.
    """
    n_passes = tc.n_passes
    x = jnp.repeat(input_ids, n_passes, axis=0)
    mask = jnp.repeat(attention_mask, n_passes, axis=0)
    rows, seq = x.shape
    pad = tc.pad_token_id
    lengths = tc.lengths
    n_len = len(lengths)
    tcs = [tc.of_length(length) for length in lengths]
    schs = [t.schedule for t in tcs]
    valid = mask.astype(bool)
    positions = model.default_positions(mask)
    # With full rematerialisation the base pass and the thoughts run without gradient
    # and the backward pass replays them together (`sparse_thoughts`' base_trace).
    replay = lm.cfg.remat == "full" and schs[0].num_steps > 0
    with jax.named_scope("base_pass"):
        base = (model.stop_gradient(lm) if replay else lm).forward(x, mask, positions,
                                                                   trace=replay)
    h0, kv0 = base[:2]

    has_gate = isinstance(lm, GatedQuietStarLM)
    gate_cols = jnp.zeros((rows, seq, n_len), jnp.float32)  # [rows, seq, n_lengths]
    if has_gate:
        n_out = lm.think_gate.outputs
        if n_out != n_len:
            raise ValueError(
                f"params['think_gate'] scores {n_out} thought length(s) but the config "
                f"trains {n_len} (ThoughtConfig.think_lengths={tc.think_lengths}): make the "
                f"gate with init_gate_params(cfg, rng, n_lengths={n_len})")
        with jax.named_scope("think_gate"):
            hb = jax.lax.stop_gradient(h0[::n_passes])  # the passes' base passes are equal
            stats = logit_stats(lm, hb)
            gate_b = lm.think_gate(hb, stats)  # [batch, seq(, n_lengths)]
            if n_len == 1:
                gate_b = gate_b[..., None]
            gate_cols = jnp.repeat(gate_b, n_passes, axis=0)
    override = None
    if positions_override is not None:
        override = jnp.asarray(positions_override).astype(jnp.int32)
        if override.ndim == 2:
            override = jnp.broadcast_to(override, (n_len,) + override.shape)
        if override.ndim != 3 or override.shape[0] != n_len:
            raise ValueError(f"positions_override shape {tuple(positions_override.shape)}: "
                             f"must be [batch, k] or [n_lengths={n_len}, batch, k]")
    # candidates: positions that can carry a reward (and a gate label) come first
    cand = attention_mask.astype(bool) & (jnp.arange(seq) < schs[0].rewarded_positions(seq))
    idxs, ths = [], []
    for li, tc_l in enumerate(tcs):
        k_select, k_thought = length_keys(rng, li)
        if override is not None:
            idx_b = jnp.sort(override[li], axis=1)
        else:
            idx_b = select_positions(tc, cand, gate_b[..., li] if has_gate else None, k_select)
        idx = jnp.repeat(idx_b, n_passes, axis=0)  # the same positions for every pass
        toks = None if thought_tokens is None else thought_tokens[: tc_l.num_sampled]
        idxs.append(idx)
        ths.append(sparse_thoughts(lm, tc_l, x, mask, positions, kv0, idx, k_thought, toks,
                                   base_trace=base[2] if replay else None))
    if ths[0].base_hidden is not None:
        # One group's replayed base feeds the base NLL and every mixing head; the other
        # groups' replays carry their thoughts' gradient into the base pass (through its
        # keys/values) and their base output is unused (a zero cotangent).
        h0 = ths[0].base_hidden

    def targets(k: int) -> tuple[jax.Array, jax.Array]:
        t = shift_left(x, k)
        ok = shift_left(valid, k) & (t != pad)
        return jnp.where(ok, t, 0), ok

    # the scored steps' targets x[i + 1 ..] are the same for every length
    tgt = [targets(schs[0].target_shift(s)) for s in schs[0].scored_steps]
    with jax.named_scope("mixing_head"):
        mixes_of = []
        for th, sch, idx in zip(ths, schs, idxs, strict=True):
            mixes = []
            for s in sch.scored_steps:
                b = take(shift_left(h0, sch.base_shift(s)), idx)
                hs = th.step_hidden[s - 1]
                mixes.append(lm.thought.blend(b, hs, tc.mixing_weight_offset))
            mixes_of.append(mixes)
    tgt_of = [[(take(t, idx), take(ok, idx)) for t, ok in tgt] for idx in idxs]
    with jax.named_scope("nll"):
        nll_b = hidden_nll(lm, h0, tgt[0][0])
        nll_t = hidden_nll(lm, jnp.stack([m for ms in mixes_of for m, _ in ms]),
                           jnp.stack([t for tg in tgt_of for t, _ in tg]))
    ok1 = tgt[0][1]
    base_tok = jnp.where(ok1, nll_b, 0.0)
    nll_base = masked_mean(base_tok, ok1)

    n_reward = schs[0].rewarded_positions(seq)
    n_talk = len(tgt)
    r_idx = jnp.arange(rows)[:, None]
    groups: list[dict[str, Any]] = []
    w_means: list[jax.Array] = []
    for li, (th, idx) in enumerate(zip(ths, idxs, strict=True)):
        rew_ok = idx < n_reward
        gain = jnp.zeros(idx.shape, jnp.float32)
        nll_talk, nll_talk_tok = [], []
        for k, ((_, w), (_, okk)) in enumerate(zip(mixes_of[li], tgt_of[li], strict=True)):
            nll_k = jnp.where(okk, nll_t[li * n_talk + k], 0.0)
            nll_talk.append(masked_mean(nll_k, okk))
            w_means.append(masked_mean(w, okk))
            base_k = shift_left(base_tok, k)  # the base prediction of the same target
            nll_talk_tok.append(base_k.at[r_idx, idx].set(nll_k))
            gain = gain + jax.lax.stop_gradient(take(base_k, idx) - nll_k)
        gain = jnp.where(rew_ok, gain, 0.0)
        train_gain = training_reward(gain, tc)  # baseline over passes: same positions per pass
        logp = th.thought_logp
        with jax.named_scope("policy_loss"):  # pause thoughts: nothing to reinforce
            policy_loss, policy_per_token = reinforce_loss(
                train_gain, logp[:0] if tc.sampling == "pause" else logp, rew_ok)
        gate_ok = rew_ok & take(ok1, idx)
        g_logit = take(gate_cols[..., li], idx)
        gate_loss, label = gate_loss_of(g_logit, gain, gate_ok, tc.thought_cost(lengths[li]))
        groups.append({
            "length": lengths[li], "positions": idx, "gain": gain, "rew_ok": rew_ok,
            "train_gain": train_gain, "nll_talk": jnp.stack(nll_talk),
            "nll_talk_tok": jnp.stack(nll_talk_tok), "logp": logp,
            "policy_loss": policy_loss, "policy_per_token": policy_per_token,
            "gate_ok": gate_ok, "g_logit": g_logit, "gate_loss": gate_loss,
            "gate_label": label, "thoughts": th,
            "reward": jnp.zeros((rows, seq), jnp.float32).at[r_idx, idx].set(gain)[:, :n_reward],
            "train_reward": (jnp.zeros((rows, seq), jnp.float32).at[r_idx, idx]
                             .set(train_gain)[:, :n_reward]),
        })

    def mean_of(key: str) -> jax.Array:  # over the groups (the value itself for one)
        vals = [g[key] for g in groups]
        return vals[0] if n_len == 1 else jnp.mean(jnp.stack(vals), axis=0)

    def pooled(key: str) -> jax.Array:  # the groups' gathered positions side by side
        vals = [g[key] for g in groups]
        return vals[0] if n_len == 1 else jnp.concatenate(vals, axis=1)

    policy_per_token = (groups[0]["policy_per_token"] if n_len == 1 else
                        jnp.concatenate([g["policy_per_token"] for g in groups]))
    gate_loss = mean_of("gate_loss")

    gain, rew_ok, train_gain = pooled("gain"), pooled("rew_ok"), pooled("train_gain")
    label, gate_ok, g_logit = pooled("gate_label"), pooled("gate_ok"), pooled("g_logit")
    n_valid = jnp.maximum(jnp.sum(valid), 1)
    if n_len == 1:
        think_rate = jnp.sum(take(valid, idxs[0])) / n_valid
    else:  # a position thinking at two lengths counts once
        thinks = jnp.zeros((rows, seq), bool)
        for idx in idxs:
            thinks = thinks.at[r_idx, idx].set(True)
        think_rate = jnp.sum(thinks & valid) / n_valid
    lp = [(g["logp"], jnp.broadcast_to(g["rew_ok"], g["logp"].shape)) for g in groups
          if g["logp"].shape[0] > 0]
    if not lp:
        logp_mean = jnp.zeros(())
    elif len(lp) == 1:
        logp_mean = masked_mean(*lp[0])
    else:
        logp_mean = (sum(jnp.sum(a * m.astype(a.dtype)) for a, m in lp)
                     / jnp.maximum(sum(jnp.sum(m.astype(a.dtype)) for a, m in lp), 1.0))
    metrics = objective_metrics(
        tc, nll_base=nll_base, nll_talk=mean_of("nll_talk"), policy_loss=mean_of("policy_loss"),
        policy_per_token=policy_per_token, reward_mean=masked_mean(gain, rew_ok),
        reward_std=masked_std(gain, rew_ok),
        reward_positive_frac=masked_mean((train_gain > 0).astype(jnp.float32), rew_ok),
        w_means=w_means, thought_logp_mean=logp_mean)
    if has_gate:
        metrics["loss"] = metrics["loss"] + tc.gate_loss_weight * gate_loss
    loss = metrics["loss"]
    metrics |= {
        "gate_loss": gate_loss,
        "think_rate": think_rate,
        "gate_positive_frac": masked_mean(label.astype(jnp.float32), gate_ok),
        "gate_accuracy": masked_mean(((g_logit > 0) == label).astype(jnp.float32), gate_ok),
    }
    if tc.think_lengths is not None:
        per = lambda f: jnp.stack([f(g) for g in groups])  # noqa: E731
        metrics |= {
            "think_rate_per_length": per(lambda g: jnp.sum(take(valid, g["positions"]))
                                         / n_valid),
            "gain_mean_per_length": per(lambda g: masked_mean(g["gain"], g["rew_ok"])),
            "nll_thought_per_length": per(lambda g: jnp.mean(g["nll_talk"])),
            "gate_loss_per_length": per(lambda g: g["gate_loss"]),
            "gate_positive_frac_per_length": per(
                lambda g: masked_mean(g["gate_label"].astype(jnp.float32), g["gate_ok"])),
            "gate_accuracy_per_length": per(lambda g: masked_mean(
                ((g["g_logit"] > 0) == g["gate_label"]).astype(jnp.float32), g["gate_ok"])),
        }
    keep = ("length", "reward", "train_reward", "nll_talk_tok", "positions", "gain",
            "gate_label", "gate_ok", "thoughts")
    details: dict[str, Any] = {
        "groups": [{k: g[k] for k in keep} for g in groups],
        "nll_base_tok": base_tok,
        "gate_logit": gate_cols[..., 0] if n_len == 1 else gate_cols,
        "input_ids": x,
        "lengths": lengths,
    }
    if n_len == 1:
        details |= {k: v for k, v in details["groups"][0].items() if k != "length"}
    return loss, metrics, details
