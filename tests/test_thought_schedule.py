"""The thought-length curriculum (`config.thought_schedule`): parsing, the n_ahead of
every update, and exact resume from a checkpoint taken between two schedule points."""

from __future__ import annotations

import os
import signal

import _tiny_train
import jax
import numpy as np
import pytest

from quietstar_jax.train import loop
from quietstar_jax.train.config import (
    ConfigError,
    n_ahead_at,
    parse_thought_schedule,
    validate_config,
)

UNTIMED = ("step_time_s", "tokens_per_s")
SCHEDULE = "0:4,2:5,4:6"


def tiny_config(cache_dir, **overrides):
    """The shared tiny config with the curriculum SCHEDULE."""
    return _tiny_train.tiny_config(cache_dir, **{"thought_schedule": SCHEDULE, **overrides})


def test_parse_and_lookup():
    assert parse_thought_schedule("") == ()
    assert parse_thought_schedule(" 0:4, 200:8 ,400:12") == ((0, 4), (200, 8), (400, 12))
    sched = ((10, 6), (20, 9))
    got = [n_ahead_at(sched, s, default=4) for s in range(30)]
    want = [4 if s < 10 else 6 if s < 20 else 9 for s in range(30)]
    assert got == want


@pytest.mark.parametrize("text, message", [
    ("0:4,abc", "entry 'abc' is not step:n_ahead"),
    ("0-4", "is not step:n_ahead"),
    ("5:4,5:6", "strictly increasing"),
    ("9:4,3:6", "strictly increasing"),
    ("-1:4", "must be >= 0"),
    ("0:2", "n_ahead=2: must be >= 3"),
])
def test_bad_schedules_are_one_line_config_errors(text, message):
    c = tiny_config(None, thought_schedule=text)
    with pytest.raises(ConfigError, match="config.thought_schedule") as e:
        validate_config(c)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def straight(cache_dir, tmp_path_factory):
    return loop.run(tiny_config(cache_dir), str(tmp_path_factory.mktemp("straight")))


def records(summary):
    return [{k: v for k, v in r.items() if k not in UNTIMED} for r in summary["history"]]


@pytest.mark.slow
def test_curriculum_changes_n_ahead_at_the_scheduled_steps(straight):
    points = parse_thought_schedule(SCHEDULE)
    want = [max(n for first, n in points if first <= s) for s in range(6)]
    hist = straight["history"]
    assert [r["n_ahead"] for r in hist] == want
    # What the compiled steps did: one policy loss per sampled token (n_ahead - 3).
    assert [len(r["policy_loss_per_token"]) for r in hist] == [n - 3 for n in want]


@pytest.mark.slow
def test_resume_mid_schedule_is_bit_identical(straight, cache_dir, tmp_path):
    def preempt_at_3(step):
        if step == 3:  # between the schedule points 2 and 4
            os.kill(os.getpid(), signal.SIGTERM)

    work = str(tmp_path / "run")
    first = loop.run(tiny_config(cache_dir), work, on_step=preempt_at_3)
    assert first["preempted"] and first["final_step"] == 3
    second = loop.run(tiny_config(cache_dir), work)
    assert second["start_step"] == 3 and second["final_step"] == 6
    assert records(first) + records(second) == records(straight)
    for a, b in zip(jax.tree.leaves(straight["final_state"]),
                    jax.tree.leaves(second["final_state"]), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
