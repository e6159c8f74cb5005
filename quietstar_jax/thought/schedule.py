"""The thought schedule: which step of a thought feeds what, where, and how it runs.

This is the one place that knows the step arithmetic of docs/ALGORITHM.md, sections 4-7
(the step schedule, what each query sees, the mixing head, talk steps); a leaf module:
it imports only jax and numpy. The rollout (`thought.rollout`),
generation's `think_at`, the recompute reference, the mixing head's base hidden
(`thought.mixed_hidden`), the losses and the FLOP count of the benchmarks read it.

Steps. Step 0 is the base pass; a thought and its talk are the steps
`s = 1 .. num_steps` (by default `n_ahead + n_ahead_talk - 2`; `talk=False` stops at
the end token, as generation and evaluation do). Position `i` is fed, on step `s`:

=============  =====================  ========================================
kind           steps                  fed token
=============  =====================  ========================================
``start``      1                      start-of-thought (the learned `start_emb`)
``sampled``    2 .. n_ahead - 2       a token drawn from step s - 1's logits
                                      (`thought_tokens[sampled_index(s)]`)
``end``        n_ahead - 1            end-of-thought (the learned `end_emb`)
``talk``       n_ahead .. num_steps   the true token `x[i + talk_shift(s)]`
=============  =====================  ========================================

at position id `pos[i] + position_offset(s)` (= `pos[i] + s`). Its query sees the base
keys `j <= i` (causal, padding, `window_visible`) and the keys that position `i` made on
its own steps `1 .. s` (`own_visible`). The mixing head of step `s` reads the base
hidden `h0[i + base_shift(s)]` (`base_shift(s) = max(0, s - (n_ahead - 1))`), the
base hidden that predicts the same target `x[i + target_shift(s)]`. The scored
(talk) steps are `scored_steps`: the end step and the teacher-forced ones.

How the steps run. A sampled token needs the step before it, so steps
`sequential_steps` (1 .. last sampled - 1) run one after another; `block_steps` (the
last sampled token, end, talk; every step when the thought tokens are given) have
known inputs and run as one call. With `given=True` (thought tokens fed, or pause
thoughts) `sequential_steps` is empty.

API (all static Python except the two mask functions, which take arrays):

- `ThoughtSchedule.of(tc, num_steps=None, *, talk=True, given=False)`; `tc` is any
  object with `n_ahead` and `n_ahead_talk` (a `ThoughtConfig`).
- `steps`, `kind(s)`, `sampled_steps`, `sampled_index(s)`, `num_sampled` (tokens of
  a whole thought), `start_step`, `end_step`, `talk_shift(s)`, `position_offset(s)`,
  `base_shift(s)`, `target_shift(s)`, `scored_steps`, `rewarded_positions(seq)`,
  `sequential_steps`, `block_steps`.
- `own_visible(s, key_steps, window, strict=False)`: which own keys a step's query sees.
- `window_visible(q_pos, k_pos, window)`: the sliding-window rule, the one copy of it
  (`model.causal_mask`, the rollout's context masks, generation's cache masks use it).
- `flop_counts(window=None)` -> `StepCounts`: what the FLOP count of one rollout needs
  (forwarded steps, queries per position, own keys seen per position, vocabulary
  passes of the sampling and talk logits, mixing-head calls, decoder calls). A
  benchmark's analytic count is, per layer and token, `forwarded_steps` times the
  linear work, `forwarded_steps` context attentions and `own_keys` own-key
  products, plus `(sampling_logits + talk_logits)` output projections and
  `mixing_heads` mixing-head MLPs, on top of the base pass.

Not to be confused with the trainer's thought-length curriculum
(`train.config.thought_schedule`, the n_ahead of each update): that picks `n_ahead`,
this says what a thought of that length does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from quietstar_jax.model import window_visible

StepKind = Literal["start", "sampled", "end", "talk"]
START: StepKind = "start"
SAMPLED: StepKind = "sampled"
END: StepKind = "end"
TALK: StepKind = "talk"


class StepCounts(NamedTuple):
    """Per-position counts of one rollout, for FLOP counts (see the module docstring).

    forwarded_steps: thought/talk steps run after the base pass (queries per position).
    own_keys: own keys seen by a position's queries, summed over the steps (step s sees
      its steps 1..s, fewer inside a sliding window).
    sampling_logits: vocabulary passes that draw a thought token (the logits r_{s-1}).
    talk_logits: scored steps, each a vocabulary pass of mixed logits.
    mixing_heads: mixing-head calls (one per scored step).
    decoder_calls: decoder calls of the thought steps (sequential steps + the block).
    block_size: steps in the block call.
    """

    forwarded_steps: int
    own_keys: int
    sampling_logits: int
    talk_logits: int
    mixing_heads: int
    decoder_calls: int
    block_size: int


@dataclasses.dataclass(frozen=True)
class ThoughtSchedule:
    """The steps of one position's thought (see the module docstring).

    n_ahead, n_ahead_talk: as `ThoughtConfig`. num_steps: steps run after the base
    pass. given: the thought tokens are known in advance (fed, or pause thoughts), so
    no step waits for a draw and all steps form the block.
    """

    n_ahead: int
    n_ahead_talk: int
    num_steps: int
    given: bool = False

    @classmethod
    def of(cls, tc: Any, num_steps: int | None = None, *, talk: bool = True,
           given: bool = False) -> ThoughtSchedule:
        """The schedule of `tc` (a `ThoughtConfig`): all `n_ahead + n_ahead_talk - 2`
        steps, or up to the end token with `talk=False`, or the first `num_steps`."""
        if num_steps is None:
            num_steps = full_steps(tc.n_ahead, tc.n_ahead_talk) if talk else tc.n_ahead - 1
        if num_steps < 0:
            raise ValueError(f"num_steps={num_steps}: must be >= 0")
        return cls(int(tc.n_ahead), int(tc.n_ahead_talk), int(num_steps), bool(given))

    # ----------------------------------------------------------------- what a step is

    @property
    def steps(self) -> tuple[int, ...]:
        """The steps run: `1 .. num_steps`."""
        return tuple(range(1, self.num_steps + 1))

    @property
    def start_step(self) -> int:
        return 1

    @property
    def end_step(self) -> int:
        """The end-of-thought step, `n_ahead - 1`: the first scored step."""
        return self.n_ahead - 1

    @property
    def last_sampled_step(self) -> int:
        """The last step of a whole thought fed a sampled token, `n_ahead - 2`."""
        return self.n_ahead - 2

    @property
    def num_sampled(self) -> int:
        """Sampled tokens of a whole thought, `n_ahead - 3` (the rows of
        `thought_tokens`), whatever `num_steps` is."""
        return self.n_ahead - 3

    def kind(self, s: int) -> StepKind:
        """What step `s` (1-based, static) is fed: start, sampled, end or talk."""
        if s < 1:
            raise ValueError(f"step {s}: thought steps start at 1 (0 is the base pass)")
        if s == self.start_step:
            return START
        if s <= self.last_sampled_step:
            return SAMPLED
        if s == self.end_step:
            return END
        return TALK

    @property
    def sampled_steps(self) -> tuple[int, ...]:
        """The steps run that are fed a sampled token: `2 .. min(n_ahead - 2, num_steps)`."""
        return tuple(s for s in self.steps if self.kind(s) == SAMPLED)

    def sampled_index(self, s: Any) -> Any:
        """Row of `thought_tokens` fed on sampled step `s`: `s - 2`."""
        return s - (self.start_step + 1)

    def talk_shift(self, s: int) -> int:
        """A talk step `s` is fed the true token `x[i + talk_shift(s)]`: `s - n_ahead + 1`."""
        return s - self.end_step

    def position_offset(self, s: Any) -> Any:
        """Step `s` of position `i` sits at position id `pos[i] + s`."""
        return s

    def base_shift(self, s: int) -> int:
        """The mixing head of step `s` reads the base hidden `h0[i + k]`,
        `k = max(0, s - (n_ahead - 1))`: the one that predicts the same target."""
        return max(0, s - self.end_step)

    def target_shift(self, s: int) -> int:
        """Step `s`'s mixed logits at position `i` predict `x[i + target_shift(s)]`."""
        return self.base_shift(s) + 1

    @property
    def scored_steps(self) -> tuple[int, ...]:
        """The talk steps the loss scores, `n_ahead - 1 + k` for `k < n_ahead_talk`
        (the end step predicts `x[i + 1]`), whether or not they are run."""
        return tuple(self.end_step + k for k in range(self.n_ahead_talk))

    def rewarded_positions(self, seq: int) -> int:
        """Positions `i < seq - 1 - n_ahead_talk` carry a reward (every scored target
        `x[i + n_ahead_talk]` lies before the last token)."""
        return seq - 1 - self.n_ahead_talk

    # ----------------------------------------------------------------- how steps run

    @property
    def sequential_steps(self) -> tuple[int, ...]:
        """Steps run one after another (the next token is drawn from their output):
        `1 .. last sampled step - 1`; none when the thought tokens are given."""
        if self.given:
            return ()
        last = min(self.last_sampled_step, self.num_steps)
        return tuple(range(1, max(0, last - 1) + 1))

    @property
    def block_steps(self) -> tuple[int, ...]:
        """Steps with known inputs, run as one call (causal among themselves)."""
        return self.steps[len(self.sequential_steps):]

    # ----------------------------------------------------------------- visibility

    def own_visible(self, s: Any, key_steps: Any, window: int | None,
                    strict: bool = False) -> jax.Array:
        """Which own keys the query of step `s` sees: keys of steps `key_steps` (array)
        of the same position, `<= s` (`< s` with `strict`, for a buffer whose slot `s`
        is not written yet) and inside the sliding window (by position id, `s - step`)."""
        key_steps = jnp.asarray(key_steps)
        vis = key_steps < s if strict else key_steps <= s
        if window is not None:
            vis = vis & window_visible(self.position_offset(s),
                                       self.position_offset(key_steps), window)
        return vis

    def own_block_mask(self, steps: tuple[int, ...], key_steps: tuple[int, ...],
                       window: int | None) -> jax.Array:
        """`own_visible` of each of `steps` over `key_steps`: bool `[len(steps),
        len(key_steps)]` (a block's own mask)."""
        ks = jnp.asarray(key_steps)
        return jnp.stack([self.own_visible(s, ks, window) for s in steps])

    # ----------------------------------------------------------------- counts

    def flop_counts(self, window: int | None = None) -> StepCounts:
        """Per-position counts of one rollout of this schedule (see `StepCounts`)."""
        steps = np.arange(1, self.num_steps + 1)
        own = sum(int(np.sum((steps <= s) & ((s - steps < window) if window else True)))
                  for s in steps)
        scored = sum(1 for s in self.scored_steps if s <= self.num_steps)
        seq = len(self.sequential_steps)
        return StepCounts(
            forwarded_steps=self.num_steps,
            own_keys=own,
            sampling_logits=len(self.sampled_steps),
            talk_logits=scored,
            mixing_heads=scored,
            decoder_calls=seq + (1 if self.block_steps else 0),
            block_size=len(self.block_steps),
        )


def full_steps(n_ahead: int, n_ahead_talk: int) -> int:
    """Steps of a whole thought and its talk after the base pass: `n_ahead +
    n_ahead_talk - 2` (start, `n_ahead - 3` sampled, end, `n_ahead_talk - 1` talk)."""
    return n_ahead + n_ahead_talk - 2
