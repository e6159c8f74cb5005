"""Gated generation (issue 25): the think rate it reports, the running threshold of
`generate(gate_rate=)` and its checks, against counts and recomputes made here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quietstar_jax import model
from quietstar_jax.generation import generate
from quietstar_jax.generation.cached import think_stats
from quietstar_jax.thought import (
    ThoughtConfig,
    gate_logit,
    init_gate_params,
    init_thought_params,
    merge_lm,
)

VOCAB, START, END, PAD = 67, 65, 66, 0
TC = ThoughtConfig(n_ahead=5, n_ahead_talk=1, n_passes=1, start_token_id=START,
                   end_token_id=END, pad_token_id=PAD)
PROMPTS = [[5, 9, 13, 2, 44, 17, 30], [7, 3, 21]]


def tiny(gate_scale: float = 0.3):
    """A tiny random LM with a live mixing head and a think gate whose logits spread
    (its output layer random, not the zero init)."""
    cfg = model.ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                            num_layers=2, num_heads=4, num_kv_heads=2, initializer_range=0.2)
    params = model.init_params(cfg, jax.random.key(0))
    params["thought"] = init_thought_params(params, cfg, jax.random.key(1), init_token_id=7)
    params["thought"]["mix"]["w2"] = 0.5 * jax.random.normal(jax.random.key(2), (32, 1))
    params["think_gate"] = init_gate_params(cfg, jax.random.key(4))
    params["think_gate"]["w1"] = gate_scale * jax.random.normal(jax.random.key(5), (64, 1))
    return cfg, params


def naive_rate(mask: np.ndarray, lengths: np.ndarray) -> float:
    """Thoughts over live tokens, counted one token at a time."""
    thought = live = 0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if t < lengths[b]:
                live += 1
                thought += bool(mask[b, t])
    return thought / max(live, 1)


def recomputed_gate_logits(params, cfg, prompts, tokens) -> tuple[np.ndarray, np.ndarray]:
    """The gate logit before every new token and at every prompt token, from one
    uncached forward pass per row over prompt + new tokens (no padding): returns
    (before new token `[B, N]`, prompt positions: a list of `[P_b]`). The gate's inputs
    (entropy, top-1 probability of the base logits) are computed here in numpy."""
    before, at_prompt = [], []
    for row, p in enumerate(prompts):
        seq = np.asarray(list(p) + list(np.asarray(tokens[row])), np.int32)[None]
        n = seq.shape[1]
        h, _ = model.forward(params, cfg.replace(attention="xla"), jnp.asarray(seq),
                             jnp.ones((1, n), jnp.int32), jnp.arange(n)[None])
        z = np.asarray(model.logits_from_hidden(params, cfg, h), np.float64)[0]
        z = z - z.max(-1, keepdims=True)
        prob = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        entropy = -(prob * np.log(prob)).sum(-1)
        stats = np.stack([entropy, prob.max(-1)], -1).astype(np.float32)
        g = np.asarray(gate_logit(params["think_gate"], h[0], jnp.asarray(stats)))
        before.append(g[len(p) - 1:n - 1])
        at_prompt.append(g[:len(p)])
    return np.stack(before), at_prompt


def test_think_stats_counts_only_live_tokens():
    rng = np.random.default_rng(0)
    mask = rng.random((4, 9)) < 0.3
    lengths = np.array([9, 3, 0, 6])
    rate, per_token = think_stats(jnp.asarray(mask), jnp.asarray(lengths), 4)
    np.testing.assert_allclose(rate, naive_rate(mask, lengths), rtol=1e-6)
    np.testing.assert_allclose(per_token, 6 * naive_rate(mask, lengths), rtol=1e-6)
    assert float(think_stats(jnp.asarray(mask), jnp.zeros(4, jnp.int32), 4)[0]) == 0.0
    # thoughts of several lengths: each feeds its sampled tokens + start and end
    sampled = rng.integers(1, 7, mask.shape)
    fed = sum(int(sampled[b, t]) + 2 for b in range(4) for t in range(lengths[b]) if mask[b, t])
    _, per_token = think_stats(jnp.asarray(mask), jnp.asarray(lengths), jnp.asarray(sampled))
    np.testing.assert_allclose(per_token, fed / lengths.sum(), rtol=1e-6)


@pytest.mark.slow
def test_reported_think_rate_equals_the_count_and_the_recomputed_gate():
    """Threshold gating with an eos that ends row 0 early: the reported think rate is
    the count of thoughts over live tokens; the thought mask is where an uncached
    recompute of the gate logit exceeds the threshold; thinking everywhere reports 1
    and n_ahead - 1 thought tokens per token, the base LM 0."""
    cfg, params = tiny()
    kw = dict(max_new_tokens=24, rng=jax.random.key(5), return_thoughts=True)
    probe = generate(params, cfg, TC, PROMPTS, gate_threshold=0.0, eos_token_id=None, **kw)
    logits, _ = recomputed_gate_logits(params, cfg, PROMPTS, probe.tokens)
    thr = float(np.median(logits))  # a threshold that fires on about half the tokens
    free = generate(params, cfg, TC, PROMPTS, gate_threshold=thr, eos_token_id=None, **kw)
    eos = int(np.asarray(free.tokens)[0, 4])  # row 0 stops at or before its 5th token
    g = generate(params, cfg, TC, PROMPTS, gate_threshold=thr, eos_token_id=eos, **kw)
    logits, _ = recomputed_gate_logits(params, cfg, PROMPTS, free.tokens)
    np.testing.assert_array_equal(free.thought_mask, logits > thr)
    mask, lengths = np.asarray(g.thought_mask), np.asarray(g.lengths)
    assert lengths[0] <= 5 and 0 < mask.mean() < 1
    assert naive_rate(mask, lengths) != mask.mean()  # the dead tokens do not count
    np.testing.assert_allclose(g.think_rate, naive_rate(mask, lengths), rtol=1e-6)
    np.testing.assert_allclose(g.thought_tokens_per_token,
                               (TC.n_ahead - 1) * naive_rate(mask, lengths), rtol=1e-6)
    np.testing.assert_allclose(g.gate_thresholds, np.full(24, thr, np.float32))
    always = generate(params, cfg, TC, PROMPTS, eos_token_id=eos, **kw)
    base = generate(params, cfg, TC, PROMPTS, think=False, eos_token_id=eos, **kw)
    assert float(always.think_rate) == 1.0
    assert float(always.thought_tokens_per_token) == TC.n_ahead - 1
    assert float(base.think_rate) == 0.0 and float(base.thought_tokens_per_token) == 0.0
    assert always.thought_mask is None and always.gate_thresholds is None


def test_running_threshold_follows_its_recomputed_update():
    """gate_rate: running mean and variance of the gate logits (from the prompts', then
    each token's with weight GATE_RATE_MEMORY) and an integral offset give the
    threshold mean + std * (z + offset); replayed here in numpy from recomputed gate
    logits, the thresholds and the thought mask agree."""
    from statistics import NormalDist

    from quietstar_jax.generation.cached import GATE_RATE_MEMORY as A

    cfg, params = tiny()
    r, step, n = 0.3, 0.25, 20
    g = generate(params, cfg, TC, PROMPTS, max_new_tokens=n, rng=jax.random.key(7),
                 eos_token_id=None, gate_rate=r, gate_rate_step=step)
    before, at_prompt = recomputed_gate_logits(params, cfg, PROMPTS, g.tokens)
    seen = np.concatenate(at_prompt).astype(np.float64)
    mean, var, offset = seen.mean(), seen.var(), 0.0
    z = NormalDist().inv_cdf(1 - r)
    thresholds, fired = [], []
    for t in range(n):
        thr = mean + np.sqrt(var) * (z + offset)
        thresholds.append(thr)
        x = before[:, t].astype(np.float64)
        fired.append(x > thr)
        offset += step * ((x > thr).mean() - r)
        var = (1 - A) * var + A * ((x - mean) ** 2).mean()
        mean += A * (x - mean).mean()
    np.testing.assert_allclose(g.gate_thresholds, thresholds, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(g.thought_mask, np.stack(fired, 1))
    assert 0 < np.asarray(g.thought_mask).mean() < 1


@pytest.mark.slow
@pytest.mark.parametrize("rate", [0.1, 0.4])
@pytest.mark.parametrize("gate_scale", [1.0, 30.0])
def test_gate_rate_holds_the_target_over_a_long_generation(rate, gate_scale):
    """Random gate logits (at two scales: the threshold's moves are relative to the
    logits' spread), 2 rows x 300 tokens: the realised share of thinking tokens
    (counted from the thought mask) is within 0.02 of the target; 32 tokens are
    already within 0.1."""
    cfg, params = tiny(gate_scale=gate_scale)
    kw = dict(rng=jax.random.key(11), eos_token_id=None, gate_rate=rate)
    g = generate(params, cfg, TC, PROMPTS, max_new_tokens=300, **kw)
    mask = np.asarray(g.thought_mask)
    assert abs(mask.mean() - rate) <= 0.02, (mask.mean(), rate)
    np.testing.assert_allclose(g.think_rate, mask.mean(), rtol=1e-6)
    assert mask.any(axis=1).all()  # both rows think somewhere
    short = np.asarray(generate(params, cfg, TC, PROMPTS, max_new_tokens=32, **kw).thought_mask)
    assert abs(short.mean() - rate) <= 0.1, (short.mean(), rate)


def test_gate_options_are_checked():
    cfg, params = tiny()
    kw = dict(max_new_tokens=3, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="not both"):
        generate(params, cfg, TC, PROMPTS, gate_threshold=0.0, gate_rate=0.1, **kw)
    with pytest.raises(ValueError, match=r"gate_rate=1.5.*\[0, 1\]"):
        generate(params, cfg, TC, PROMPTS, gate_rate=1.5, **kw)
    with pytest.raises(ValueError, match="gate_rate_step=0"):
        generate(params, cfg, TC, PROMPTS, gate_rate=0.1, gate_rate_step=0, **kw)
    with pytest.raises(ValueError, match="NaN"):
        generate(params, cfg, TC, PROMPTS, gate_threshold=float("nan"), **kw)
    no_gate = {k: v for k, v in params.items() if k != "think_gate"}
    with pytest.raises(ValueError, match="gate_rate needs a think gate"):
        generate(no_gate, cfg, TC, PROMPTS, gate_rate=0.1, **kw)
    two_lengths = dict(params, think_gate=init_gate_params(cfg, jax.random.key(6), n_lengths=2))
    with pytest.raises(ValueError, match=r"scores 2 thought length\(s\) but the ThoughtConfig"):
        generate(two_lengths, cfg, TC, PROMPTS, gate_threshold=0.0, **kw)


LENGTHS = (1, 4)


def with_two_length_gate(params, bias=(0.0, 0.0)):
    """`params` with a think gate of two outputs (lengths `LENGTHS`), random output
    weights and output biases `bias`."""
    gate = dict(params["think_gate"])
    gate["w1"] = 0.3 * jax.random.normal(jax.random.key(7), (64, 2))
    gate["b1"] = jnp.asarray(bias, jnp.float32)
    return dict(params, think_gate=gate)


@pytest.mark.slow
def test_a_gate_of_two_lengths_thinks_with_the_length_of_its_highest_logit():
    """A two-output gate: a token gets a thought where its highest recomputed gate logit
    exceeds the threshold, of the length of that logit, and the thought tokens fill
    just that length; thought tokens per token count each thought's own length. With
    the second output's bias far above the first's, the generation equals the
    one-length gated generation (that output alone, that length's config) token for
    token."""
    cfg, params = tiny()
    tc2 = TC.replace(think_k=2, think_lengths=LENGTHS)
    two = with_two_length_gate(params)
    kw = dict(max_new_tokens=10, rng=jax.random.key(3), return_thoughts=True,
              eos_token_id=None)
    g = generate(two, cfg, tc2, PROMPTS, gate_threshold=0.0, **kw)
    logits, _ = recomputed_gate_logits(two, cfg, PROMPTS, g.tokens)  # [B, N, 2]
    fire, choice = logits.max(-1) > 0.0, logits.argmax(-1)
    want = np.where(fire, np.asarray(LENGTHS)[choice], 0)
    np.testing.assert_array_equal(g.thought_mask, fire)
    np.testing.assert_array_equal(g.thought_lengths, want)
    assert {1, 4} <= set(want.ravel().tolist())  # both lengths were chosen somewhere
    th = np.asarray(g.thoughts)
    assert th.shape == (2, 10, 4)
    for b in range(2):
        for t in range(10):
            assert not th[b, t, want[b, t]:].any()  # nothing past the chosen length
    np.testing.assert_allclose(g.thought_tokens_per_token, (want + 2)[fire].sum() / 20)
    # a target rate: the running threshold is started and moved on the largest output
    r = generate(two, cfg, tc2, PROMPTS, gate_rate=0.5, **kw)
    mask = np.asarray(r.thought_mask)
    assert 0 < mask.mean() < 1
    logits, _ = recomputed_gate_logits(two, cfg, PROMPTS, r.tokens)
    np.testing.assert_array_equal(mask, logits.max(-1) > np.asarray(r.gate_thresholds)[None])
    np.testing.assert_array_equal(
        r.thought_lengths, np.where(mask, np.asarray(LENGTHS)[logits.argmax(-1)], 0))
    # the second length always wins and always fires (one compile pair, not two)
    forced_params = with_two_length_gate(params, (-20.0, 20.0))
    forced = generate(forced_params, cfg, tc2, PROMPTS, gate_threshold=0.0, **kw)
    one = dict(forced_params, think_gate=dict(forced_params["think_gate"],
                                              w1=forced_params["think_gate"]["w1"][:, 1:],
                                              b1=forced_params["think_gate"]["b1"][1:]))
    alone = generate(one, cfg, tc2.of_length(4), PROMPTS, gate_threshold=0.0, **kw)
    assert alone.thought_mask.all() and alone.thoughts.shape == (2, 10, 4)
    np.testing.assert_array_equal(forced.tokens, alone.tokens)
    np.testing.assert_array_equal(forced.thoughts, alone.thoughts)
    np.testing.assert_array_equal(forced.thought_lengths, 4)


def _gated_workdir(tmp_path, gate: bool):
    """A training workdir of stories260K with thought params (a live mixing head) and,
    with `gate`, a think gate with random output weights."""
    import json

    import orbax.checkpoint as ocp
    from conftest import shared_path

    from quietstar_jax import hf

    hf_dir = shared_path("data", "stories260K-hf")
    cfg, params, tok = hf.load_pretrained(hf_dir)
    params = dict(params)
    mix = dict(params["thought"]["mix"])
    mix["w2"] = 0.5 * jax.random.normal(jax.random.key(3), mix["w2"].shape)
    params["thought"] = dict(params["thought"], mix=mix)
    if gate:
        params["think_gate"] = init_gate_params(cfg, jax.random.key(4))
        params["think_gate"]["w1"] = jax.random.normal(jax.random.key(5), (64, 1))
    wd = tmp_path / ("gated" if gate else "plain")
    (wd / "checkpoints").mkdir(parents=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save((wd / "checkpoints" / "5" / "state").resolve(), {"params": params, "step": 5})
    ckpt.wait_until_finished()
    (wd / "config.json").write_text(json.dumps({
        "model": {"hf_path": str(hf_dir), "param_dtype": "float32"},
        "thought": {"n_ahead": 4, "n_ahead_talk": 1, "n_passes": 1, "sampling": "sample",
                    "start_token_id": None, "end_token_id": None, "pad_token_id": None}}))
    return wd


@pytest.mark.slow
def test_generate_cli_prints_the_think_rate(tmp_path, capsys):
    """`python -m quietstar_jax.generation` with --gate-rate: the printed and written
    think rate is the share of new tokens marked as thought-preceded, and thought tokens
    per token are n_ahead - 1 times it; thinking everywhere prints rate 1; the gate
    flags are checked."""
    import json

    from quietstar_jax.generation.cli import main

    wd = _gated_workdir(tmp_path, gate=True)
    out = tmp_path / "gen.json"
    args = [str(wd), "--prompt", "Once upon a time", "--prompt", "The dog", "--ignore-eos",
            "--max-new-tokens", "24", "--out", str(out)]
    assert main(args + ["--gate-rate", "0.5"]) == 0
    res = json.loads(out.read_text())
    flags = [f for item in res["thinking"] for f in item["thought_before"]]
    assert len(flags) == 48 and 0 < sum(flags) < 48
    assert res["think_rate"] == pytest.approx(sum(flags) / 48)
    assert res["thought_tokens_per_token"] == pytest.approx(3 * sum(flags) / 48)
    err = capsys.readouterr().err
    assert f"think rate {sum(flags) / 48:.3f} (gate rate target 0.5)" in err
    assert main(args) == 0
    assert json.loads(out.read_text())["think_rate"] == 1.0
    assert "think rate 1.000 (every token), 3.00 thought tokens" in capsys.readouterr().err
    assert main(args + ["--gate-rate", "2"]) == 2
    assert "--gate-rate=2.0 must be a share in [0, 1]" in capsys.readouterr().err
    assert main(args + ["--gate-threshold", "0", "--mode", "base"]) == 2
    plain = _gated_workdir(tmp_path, gate=False)
    assert main([str(plain)] + args[1:] + ["--gate-threshold", "0"]) == 2
    assert "no 'think_gate'" in capsys.readouterr().err
    assert main(args + ["--gate-threshold", "0", "--gate-rate", "0.5"]) == 2  # exclusive
    assert "At most one of (gate-threshold, gate-rate)" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluation_cli_prints_the_cot_think_rate(tmp_path, capsys):
    """`python -m quietstar_jax.evaluation --tasks cot` with a gate: the thinking run's
    think rate and thought tokens per token are written and printed; a gate that never
    fires gives rate 0 (the thinking run is the base LM), one that always fires rate 1;
    the gate flags need the cot task."""
    import json

    from conftest import shared_path

    from quietstar_jax.evaluation import cli as evaluate_cli

    wd = _gated_workdir(tmp_path, gate=True)
    out = tmp_path / "r.json"
    args = [str(wd), "--tasks", "cot", "--gsm8k", str(shared_path("data", "gsm8k")),
            "--cot-limit", "2", "--cot-votes", "2", "--cot-solution-tokens", "8",
            "--cot-batch-size", "4", "--out", str(out)]
    rates = {}
    for flag, value in (("--gate-threshold", "1e30"), ("--gate-threshold", "-1e30"),
                        ("--gate-rate", "0.5")):
        assert evaluate_cli.main(args + [f"{flag}={value}"]) == 0
        thinking = json.loads(out.read_text())["results"]["cot"]["thinking"]
        rates[value] = thinking["think_rate"]
        assert thinking["thought_tokens_per_token"] == pytest.approx(3 * rates[value])
        assert f"[cot] thinking: think rate {rates[value]:.3f} (gate " in capsys.readouterr().err
    assert rates["1e30"] == 0.0 and rates["-1e30"] == 1.0 and 0 < rates["0.5"] < 1
    assert evaluate_cli.main([str(wd), "--tasks", "gsm8k", "--gate-rate", "0.5"]) == 2
    assert "apply to the generated task (cot) only" in capsys.readouterr().err


def test_thinking_row_buckets():
    from quietstar_jax.generation.cached import thinking_row_buckets

    assert thinking_row_buckets(1) == (0, 1)
    assert thinking_row_buckets(2) == (0, 1, 2)
    assert thinking_row_buckets(5) == (0, 1, 2, 4, 5)
    assert thinking_row_buckets(8) == (0, 1, 2, 4, 8)


@pytest.mark.slow
def test_only_the_firing_rows_think_and_draw_their_whole_batch_thoughts():
    """A gated step at batch 4 with 0, 1, 3 and 4 rows firing (3: a bucket of 4 with one
    row that did not fire gathered beside them): the firing rows'
    logits, thoughts and mixing weights equal the whole batch's `think_at` (every row
    thinking, with the same key) at those rows; the other rows keep the base logits
    and no thought."""
    from quietstar_jax.generation import cached

    cfg, params = tiny()
    prompts = [[5, 9, 13, 2, 44, 17, 30], [7, 3, 21], [11, 12], [40, 41, 42, 43]]
    ids, mask = (jnp.asarray(a) for a in cached.left_pad(prompts, PAD))
    pos = model.default_positions(mask)
    h, kv = model.forward(params, cfg, ids, mask, pos)
    valid, h_last, pos_last = mask.astype(bool), h[:, -1], pos[:, -1]
    key = jax.random.key(9)
    base = model.logits_from_hidden(params, cfg, h_last)
    lm = merge_lm(params, cfg)
    gate = np.asarray(cached.gate_logits_of(lm, h_last))
    mixed, thought, w = cached.think_at(lm, TC, kv, valid[:, None, :], pos,
                                        h_last[:, None, :], pos_last[:, None], key)
    want_logits = np.asarray(model.logits_from_hidden(params, cfg, mixed[:, 0]))
    step = jax.jit(lambda *a: cached._gated_thought(merge_lm(params, cfg), TC, *a))
    ranked = np.sort(gate)[::-1]
    for n_fire in (0, 1, 3, 4):
        thr = ranked[n_fire - 1] - 1e-4 if n_fire else ranked[0] + 1.0
        logits, th, n_sampled, ww, fire, g = step(kv, valid, pos, h_last, pos_last, key, thr)
        np.testing.assert_array_equal(n_sampled, np.where(fire, TC.num_sampled, 0))
        fire = np.asarray(fire)
        assert fire.sum() == n_fire and np.array_equal(fire, gate > thr)
        np.testing.assert_allclose(g, gate, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(logits)[fire], want_logits[fire],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(logits)[~fire], np.asarray(base)[~fire])
        np.testing.assert_array_equal(np.asarray(th)[fire], np.asarray(thought)[fire, 0])
        assert not np.asarray(th)[~fire].any() and not np.asarray(ww)[~fire].any()
        np.testing.assert_allclose(np.asarray(ww)[fire], np.asarray(w)[fire, 0], rtol=1e-5)
