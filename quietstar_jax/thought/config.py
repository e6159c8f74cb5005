"""ThoughtConfig: every setting of Quiet-STaR (the authors' defaults), and the pad id
rule shared by the rollout, generation and evaluation."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal, get_args

from quietstar_jax.thought.schedule import ThoughtSchedule

SamplingMode = Literal["sample", "greedy", "pause"]
SAMPLING_MODES: tuple[SamplingMode, ...] = get_args(SamplingMode)


@dataclasses.dataclass(frozen=True)
class ThoughtConfig:
    """Every setting of Quiet-STaR; defaults are the authors' released code's.

    n_ahead: the base step plus the thought (start, `n_ahead - 3` sampled tokens, end).
    n_ahead_talk: how many true future tokens each thought is scored on.
    n_passes: independent thoughts per sequence (rows repeated consecutively).
    sampling: "sample" (softmax at `thought_temperature`), "greedy" (argmax), or "pause"
      (every thought token is `pause_token_id`: same compute, no content, no policy loss;
      the pause control of the thinking experiment).
    pause_token_id: the token fed as every thought token when `sampling == "pause"`.
    masked_token_ids: ids besides the two thought ids that thought sampling never draws
      (e.g. the tokenizer's special tokens; default none, as the authors).
    use_baseline: subtract the mean reward over passes (the authors' trice_mode).
    remove_negative_rewards: clamp rewards at 0 after the baseline.
    init_token: the text whose first token's embedding row both thought embeddings
      start from when they are created (the authors': "---"); None starts them at zero,
      so no token's meaning is built into the thought (read by the trainer and
      `hf.load_pretrained`; params that already hold thought embeddings keep them).
    think_k: None (the default, the authors' method): every position thinks. An int:
      sparse thoughts in training, only `think_k` positions per sequence think (the
      think gate's top positions plus a random share); the rest use the base prediction
      (`quietstar_jax.thought.sparse`). Must be in [1, sequence length].
    think_explore: the share of the `think_k` positions drawn at random (exploration and
      unbiased gate labels), in [0, 1]; all are random without gate params.
    gate_cost: the cost of a thought in nats: a position's gate label is gain > gate_cost
      (gain: the talk steps' summed NLL without the thought minus with it).
    gate_loss_weight: weight of the think gate's margin-weighted logistic loss in the total.
    think_lengths: None (the default): one thought length, `num_sampled` sampled tokens.
      A tuple of distinct ascending ints >= 1 (only with `think_k`): the thought lengths
      (sampled tokens) the gate chooses among, one gate output per length; training runs
      one group of `think_k` positions per length (`loss.sparse_objective`), each with
      thoughts of its length (`n_ahead` is then not used by the sparse objective).
    gate_token_cost: the cost of each sampled thought token in nats: a thought of L
      sampled tokens costs `gate_cost + gate_token_cost * L` (`thought_cost`).
    mixing_weight_offset: added to the mixing head's output w (default 0, the authors':
      the head starts at w = 0, so the thought's content first reaches the prediction
      as the head learns to open it). An offset of, e.g., 1 starts every prediction
      from the post-thought hidden, so the NLL trains the thought embeddings and
      REINFORCE sees the thoughts' full effect from the first step; the head still
      learns a correction (it can close the channel again, w = offset + head).
    """

    n_ahead: int = 12
    n_ahead_talk: int = 4
    n_passes: int = 2
    thought_temperature: float = 1.0
    reinforce_temperature: float = 3.0
    embedding_scale: float = 100.0
    original_loss_weight: float = 0.5
    base_loss_beta: float = 1.0
    policy_loss_beta: float = 1e6
    remove_negative_rewards: bool = True
    use_baseline: bool = True
    sampling: SamplingMode = "sample"
    start_token_id: int | None = None
    end_token_id: int | None = None
    pad_token_id: int | None = None
    pause_token_id: int | None = None
    masked_token_ids: tuple[int, ...] = ()
    init_token: str | None = "---"
    think_k: int | None = None
    think_explore: float = 0.25
    gate_cost: float = 0.0
    gate_loss_weight: float = 1.0
    think_lengths: tuple[int, ...] | None = None
    gate_token_cost: float = 0.0
    mixing_weight_offset: float = 0.0

    def __post_init__(self) -> None:
        if self.n_ahead < 3:
            raise ValueError(
                f"ThoughtConfig.n_ahead={self.n_ahead}: must be >= 3 (the base step, the "
                "start-of-thought and the end-of-thought tokens)"
            )
        if self.n_ahead_talk < 1:
            raise ValueError(f"ThoughtConfig.n_ahead_talk={self.n_ahead_talk}: must be >= 1")
        if self.n_passes < 1:
            raise ValueError(f"ThoughtConfig.n_passes={self.n_passes}: must be >= 1")
        for name in ("thought_temperature", "reinforce_temperature", "embedding_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ThoughtConfig.{name}={getattr(self, name)}: must be > 0")
        if not 0.0 <= self.original_loss_weight <= 1.0:
            raise ValueError(
                f"ThoughtConfig.original_loss_weight={self.original_loss_weight}: must be in [0, 1]"
            )
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(
                f"ThoughtConfig.sampling={self.sampling!r}: must be one of {SAMPLING_MODES}"
            )
        if self.sampling == "pause" and self.pause_token_id is None:
            raise ValueError("ThoughtConfig.sampling='pause' needs pause_token_id")
        if self.init_token is not None and not self.init_token:
            raise ValueError("ThoughtConfig.init_token='': give a text with at least one "
                             "token, or None for zero-initialised thought embeddings")
        object.__setattr__(self, "masked_token_ids", tuple(int(i) for i in self.masked_token_ids))
        if self.think_k is not None and (isinstance(self.think_k, bool)
                                         or not isinstance(self.think_k, int)
                                         or self.think_k < 1):
            raise ValueError(f"ThoughtConfig.think_k={self.think_k!r}: must be None (think at "
                             "every position) or an int >= 1 (positions per sequence)")
        if not 0.0 <= self.think_explore <= 1.0:
            raise ValueError(
                f"ThoughtConfig.think_explore={self.think_explore}: must be in [0, 1]")
        if not self.gate_loss_weight >= 0:
            raise ValueError(
                f"ThoughtConfig.gate_loss_weight={self.gate_loss_weight}: must be >= 0")
        if not math.isfinite(self.gate_cost):
            raise ValueError(f"ThoughtConfig.gate_cost={self.gate_cost}: must be finite")
        if not math.isfinite(self.gate_token_cost):
            raise ValueError(
                f"ThoughtConfig.gate_token_cost={self.gate_token_cost}: must be finite")
        if not math.isfinite(self.mixing_weight_offset):
            raise ValueError(f"ThoughtConfig.mixing_weight_offset={self.mixing_weight_offset}: "
                             "must be finite")
        if self.think_lengths is not None:
            object.__setattr__(self, "think_lengths", check_think_lengths(self.think_lengths))
            if self.think_k is None:
                raise ValueError(
                    f"ThoughtConfig.think_lengths={self.think_lengths}: needs think_k (the "
                    "lengths are chosen among by the think gate of sparse thoughts)")

    def check_think_k(self, seq: int) -> None:
        """Raise unless `think_k` (when set) fits a sequence of `seq` positions."""
        if self.think_k is not None and self.think_k > seq:
            raise ValueError(f"ThoughtConfig.think_k={self.think_k} exceeds the sequence length "
                             f"{seq}: at most every position can think")

    @property
    def schedule(self) -> ThoughtSchedule:
        """The step schedule of a whole thought and its talk (`schedule.ThoughtSchedule`)."""
        return ThoughtSchedule.of(self)

    @property
    def num_steps(self) -> int:
        """Thought/talk steps after the base step: `n_ahead + n_ahead_talk - 2`."""
        return self.schedule.num_steps

    @property
    def num_sampled(self) -> int:
        """Sampled thought tokens per thought: `n_ahead - 3`."""
        return self.schedule.num_sampled

    @property
    def lengths(self) -> tuple[int, ...]:
        """The thought lengths (sampled tokens) trained: `think_lengths`, else
        `(num_sampled,)`."""
        return self.think_lengths if self.think_lengths is not None else (self.num_sampled,)

    def thought_cost(self, length: int) -> float:
        """The cost in nats of a thought of `length` sampled tokens: `gate_cost +
        gate_token_cost * length` (its gate label is gain > this)."""
        return self.gate_cost + self.gate_token_cost * length

    def of_length(self, length: int) -> ThoughtConfig:
        """The one-length config whose thoughts have `length` sampled tokens (`n_ahead =
        length + 3`, `think_lengths` None): what one length group of sparse thoughts
        runs. Itself when it already is."""
        if self.think_lengths is None and self.num_sampled == length:
            return self
        return dataclasses.replace(self, n_ahead=length + 3, think_lengths=None)

    def replace(self, **kw: Any) -> ThoughtConfig:
        return dataclasses.replace(self, **kw)

    def check_token_ids(self, vocab_size: int) -> None:
        """Raise unless start/end/pad ids are set and inside the vocabulary."""
        for name in ("start_token_id", "end_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is None:
                raise ValueError(
                    f"ThoughtConfig.{name} is not set: take it from a tokenizer with the thought "
                    "tokens added (hf.thought_token_ids) or set it for your checkpoint"
                )
            if not 0 <= v < vocab_size:
                raise ValueError(
                    f"ThoughtConfig.{name}={v} is outside the vocabulary [0, {vocab_size})"
                )
        if self.start_token_id == self.end_token_id:
            raise ValueError("ThoughtConfig.start_token_id and end_token_id must differ")
        extra = dict(masked_token_ids=self.masked_token_ids)
        if self.pause_token_id is not None:
            extra["pause_token_id"] = (self.pause_token_id,)
        for name, ids in extra.items():
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise ValueError(
                    f"ThoughtConfig.{name} has {bad[0]}, outside the vocabulary [0, {vocab_size})"
                )

    @property
    def sampled_masked_ids(self) -> tuple[int, ...]:
        """Ids that thought sampling never draws: the two thought ids and `masked_token_ids`."""
        ids = (self.start_token_id, self.end_token_id, *self.masked_token_ids)
        return tuple(dict.fromkeys(i for i in ids if i is not None))


def check_think_lengths(lengths: Any) -> tuple[int, ...]:
    """`ThoughtConfig.think_lengths` as a tuple of ints, or a ValueError naming the
    problem: a non-empty sequence of distinct ascending ints >= 1."""
    name = f"ThoughtConfig.think_lengths={lengths!r}"
    if isinstance(lengths, str | bytes) or not isinstance(lengths, Sequence):
        raise ValueError(f"{name}: must be None or a tuple of ints (sampled thought tokens "
                         "per length), e.g. (2, 8)")
    if not lengths:
        raise ValueError(f"{name}: give at least one length (or None for one length, "
                         "num_sampled)")
    for v in lengths:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: every length must be an int >= 1 (sampled thought "
                             f"tokens), got {v!r}")
    if any(b <= a for a, b in zip(lengths, lengths[1:], strict=False)):
        raise ValueError(f"{name}: the lengths must be distinct and ascending")
    return tuple(int(v) for v in lengths)


def pad_id(*candidates: int | None, default: int = 0) -> int:
    """The pad id: the first of `candidates` that is set (callers list them in order of
    preference, e.g. an explicit id, `ThoughtConfig.pad_token_id`, the tokenizer's pad
    id, its eos id), else `default`."""
    return next((int(c) for c in candidates if c is not None), default)
