"""The thought schedule (`quietstar_jax.thought.schedule`): every step's kind, shift and position
agree with docs/ALGORITHM.md, section 4 (One thought: the step schedule), and the split
into sequential and block steps."""

from __future__ import annotations

import numpy as np
import pytest

from quietstar_jax.thought import ThoughtConfig
from quietstar_jax.thought.schedule import StepCounts, ThoughtSchedule, window_visible


@pytest.mark.parametrize("n_ahead, n_ahead_talk", [(3, 1), (4, 2), (5, 3), (12, 4)])
def test_steps_follow_the_algorithm(n_ahead, n_ahead_talk):
    tc = ThoughtConfig(n_ahead=n_ahead, n_ahead_talk=n_ahead_talk)
    sch = ThoughtSchedule.of(tc)
    assert sch.num_steps == tc.num_steps == n_ahead + n_ahead_talk - 2
    assert sch.steps == tuple(range(1, sch.num_steps + 1))
    for s in sch.steps:
        want = ("start" if s == 1 else "sampled" if s <= n_ahead - 2 else
                "end" if s == n_ahead - 1 else "talk")
        assert sch.kind(s) == want
        assert sch.position_offset(s) == s
        assert sch.base_shift(s) == max(0, s - (n_ahead - 1))
        assert sch.target_shift(s) == sch.base_shift(s) + 1
        if want == "talk":
            assert sch.talk_shift(s) == s - n_ahead + 1
    assert sch.sampled_steps == tuple(range(2, n_ahead - 1))
    assert [sch.sampled_index(s) for s in sch.sampled_steps] == list(range(n_ahead - 3))
    assert sch.num_sampled == tc.num_sampled == n_ahead - 3
    assert sch.scored_steps == tuple(n_ahead - 1 + k for k in range(n_ahead_talk))
    assert sch.scored_steps[-1] == sch.num_steps
    assert sch.rewarded_positions(20) == 20 - 1 - n_ahead_talk
    # A sampled token waits for the step before it: steps 1 .. n_ahead - 3 run one by
    # one, the rest (last sampled, end, talk) form the block.
    assert sch.sequential_steps == tuple(range(1, max(0, n_ahead - 3) + 1))
    assert sch.sequential_steps + sch.block_steps == sch.steps
    given = ThoughtSchedule.of(tc, given=True)
    assert given.sequential_steps == () and given.block_steps == sch.steps
    thought = ThoughtSchedule.of(tc, talk=False)
    assert thought.num_steps == n_ahead - 1 and thought.steps[-1] == thought.end_step


def test_truncated_schedules():
    tc = ThoughtConfig(n_ahead=6, n_ahead_talk=3)
    for n in range(0, tc.num_steps + 1):
        sch = ThoughtSchedule.of(tc, n)
        assert sch.steps == tuple(range(1, n + 1))
        last = min(tc.n_ahead - 2, n)
        assert sch.sampled_steps == tuple(range(2, last + 1))
        assert sch.sequential_steps == tuple(range(1, max(0, last - 1) + 1))
        assert sch.sequential_steps + sch.block_steps == sch.steps


def test_visibility_and_window():
    sch = ThoughtSchedule.of(ThoughtConfig(n_ahead=6, n_ahead_talk=3))
    keys = np.arange(1, sch.num_steps + 1)
    for s in sch.steps:
        np.testing.assert_array_equal(sch.own_visible(s, keys, None), keys <= s)
        np.testing.assert_array_equal(sch.own_visible(s, keys, 3), (keys <= s) & (s - keys < 3))
        np.testing.assert_array_equal(sch.own_visible(s, keys, None, strict=True), keys < s)
    np.testing.assert_array_equal(sch.own_block_mask(sch.steps, sch.steps, None),
                                  keys[None, :] <= keys[:, None])
    q, k = np.arange(8)[:, None], np.arange(8)[None, :]
    np.testing.assert_array_equal(window_visible(q, k, 3), q - k < 3)
    assert bool(window_visible(q, k, None).all()) and window_visible(q, k, None).shape == (8, 8)


def test_flop_counts():
    tc = ThoughtConfig(n_ahead=12, n_ahead_talk=4)
    c = tc.schedule.flop_counts()
    steps = 14
    assert c == StepCounts(forwarded_steps=steps, own_keys=sum(range(1, steps + 1)),
                           sampling_logits=9, talk_logits=4, mixing_heads=4,
                           decoder_calls=9 + 1, block_size=5)
    w = tc.schedule.flop_counts(window=2)
    assert w.own_keys == 1 + 2 * (steps - 1)
    g = ThoughtSchedule.of(tc, given=True).flop_counts()
    assert g.decoder_calls == 1 and g.block_size == steps
