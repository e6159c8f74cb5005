"""Quiet-STaR thoughts: ThoughtConfig, the thought params (`ThoughtParams`: start/end
embeddings, `MixingHead`), the parallel rollout."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from flax import nnx

from quietstar_jax import model, vocab
from quietstar_jax.axes import constrain
from quietstar_jax.model import KV, ModelConfig, Params
from quietstar_jax.schedule import END, SAMPLED, START, ThoughtSchedule, window_visible
from quietstar_jax.vocab import sample_categorical  # noqa: F401  (re-export)

SamplingMode = Literal["sample", "greedy", "pause"]
SAMPLING_MODES: tuple[SamplingMode, ...] = get_args(SamplingMode)
THOUGHT_LOGIT_MASK = -1e10


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
      (`quietstar_jax.sparse`). Must be in [1, sequence length].
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


class MixingHead(nnx.Module):
    """The mixing head: `[..., hidden]` x2 -> scalar weight `[...]` (float32, no sigmoid).

    relu(w0 [base, thought] + b0) -> relu(w1 . + b1) -> w2 .; torch-Linear default init
    (uniform +-1/sqrt(fan_in)) for the two hidden layers, zeros for the last, so the
    model starts as the base LM.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        h = cfg.hidden_size
        dt = jnp.dtype(cfg.param_dtype)
        hidden_in, hidden_out = uniform_init(2 * h), uniform_init(h)
        self.w0 = model.declare(rngs, hidden_in, (2 * h, h), ("mix_in", "embed"), dt)
        self.b0 = model.declare(rngs, hidden_in, (h,), ("embed",), dt, decay=False)
        self.w1 = model.declare(rngs, hidden_out, (h, h), ("mix_in", "embed"), dt)
        self.b1 = model.declare(rngs, hidden_out, (h,), ("embed",), dt, decay=False)
        self.w2 = model.declare(rngs, model.zeros_init, (h, 1), ("embed", "mix_out"), dt)

    def __call__(self, base_h: jax.Array, thought_h: jax.Array) -> jax.Array:
        f32 = lambda p: p[...].astype(jnp.float32)  # noqa: E731
        x = jnp.concatenate([base_h, thought_h], axis=-1).astype(jnp.float32)
        x = jax.nn.relu(x @ f32(self.w0) + f32(self.b0))
        x = jax.nn.relu(x @ f32(self.w1) + f32(self.b1))
        return (x @ f32(self.w2))[..., 0]


def uniform_init(fan_in: int) -> model.Init:
    """torch.nn.Linear's default: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn in float32."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


class ThoughtParams(nnx.Module):
    """The thought params (`params["thought"]`): the start/end-of-thought embeddings
    (stored divided by `embedding_scale`) and the mixing head.

    `init_embedding` `[hidden]`: both embeddings' initial value, already divided (the
    authors': the embedding row of the first token of "---"); zeros when None.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs,
                 init_embedding: jax.Array | None = None):
        dt = jnp.dtype(cfg.param_dtype)
        row = jnp.zeros((cfg.hidden_size,), dt) if init_embedding is None else init_embedding
        given = lambda key, shape, dtype: row.astype(dtype)  # noqa: E731
        # end_emb gets its own buffer (the train state is donated).
        copied = lambda key, shape, dtype: row.astype(dtype).copy()  # noqa: E731
        self.start_emb = model.declare(rngs, given, (cfg.hidden_size,), ("embed",), dt)
        self.end_emb = model.declare(rngs, copied, (cfg.hidden_size,), ("embed",), dt)
        self.mix = MixingHead(cfg, rngs=rngs)


GATE_HIDDEN = 64  # width of the think gate's hidden layer
GATE_STATS = 2  # the base logits' statistics the gate reads: entropy, top-1 probability


class ThinkGate(nnx.Module):
    """The think gate (`params["think_gate"]`, present only for sparse thoughts with a gate):
    per position, from the base pass's final hidden `[..., hidden]` (gradient stopped by
    the caller) and its logits' statistics `[..., GATE_STATS]` (entropy, top-1
    probability), the logit `[...]` (float32) that a thought there pays; with
    `n_lengths` > 1 (`ThoughtConfig.think_lengths`) one logit per thought length, `[...,
    n_lengths]`, logit l saying that a thought of length l pays its cost
    (`ThoughtConfig.thought_cost`).

    relu(h w0 + stats ws + b0) -> . w1 + b1 (w1 `[GATE_HIDDEN, n_lengths]`); torch-Linear
    default init for the hidden layer, zeros for the output (the gate starts undecided:
    every position scores 0).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, n_lengths: int = 1):
        h, g = cfg.hidden_size, GATE_HIDDEN
        dt = jnp.dtype(cfg.param_dtype)
        hidden_in = uniform_init(h + GATE_STATS)
        self.w0 = model.declare(rngs, hidden_in, (h, g), ("embed", "mix_out"), dt)
        self.ws = model.declare(rngs, hidden_in, (GATE_STATS, g), ("mix_in", "mix_out"), dt)
        self.b0 = model.declare(rngs, hidden_in, (g,), ("mix_out",), dt, decay=False)
        self.w1 = model.declare(rngs, model.zeros_init, (g, n_lengths), ("mix_in", "mix_out"),
                                dt)
        self.b1 = model.declare(rngs, model.zeros_init, (n_lengths,), ("mix_out",), dt,
                                decay=False)

    def __call__(self, h: jax.Array, stats: jax.Array) -> jax.Array:
        f32 = lambda p: p[...].astype(jnp.float32)  # noqa: E731
        x = h.astype(jnp.float32) @ f32(self.w0) + stats.astype(jnp.float32) @ f32(self.ws)
        x = jax.nn.relu(x + f32(self.b0))
        out = x @ f32(self.w1) + f32(self.b1)
        return out[..., 0] if out.shape[-1] == 1 else out


def gate_param_shapes(cfg: ModelConfig, n_lengths: int = 1) -> Params:
    """Shapes of the think gate's params (`params["think_gate"]`) with `n_lengths` outputs."""
    shapes = dict(model.param_shapes(cfg, ThinkGate))
    shapes["w1"] = (shapes["w1"][0], n_lengths)
    shapes["b1"] = (n_lengths,)
    return shapes


def gate_logical_axes() -> Params:
    """Logical axis names of the think gate's params."""
    return model.param_logical_axes(_PROBE, ThinkGate)


def gate_param_decay() -> Params:
    """Whether weight decay applies to each think gate param."""
    return model.param_decay(_PROBE, ThinkGate)


def init_gate_params(cfg: ModelConfig, rng: jax.Array, n_lengths: int = 1) -> Params:
    """Fresh think gate params (`ThinkGate`) with one output per thought length
    (`len(ThoughtConfig.think_lengths)`; 1 without them): they go in
    `params["think_gate"]`. The hidden layer does not depend on `n_lengths`."""
    if isinstance(n_lengths, bool) or not isinstance(n_lengths, int) or n_lengths < 1:
        raise ValueError(f"init_gate_params: n_lengths={n_lengths!r} must be an int >= 1")
    return model.to_params(ThinkGate(cfg, rngs=nnx.Rngs(params=rng), n_lengths=n_lengths))


def gate_outputs(gate: Params) -> int:
    """How many thought lengths the think gate params `gate` score (its outputs)."""
    return int(gate["b1"].shape[-1])


def gate_logit(gate: Params, h: jax.Array, stats: jax.Array) -> jax.Array:
    """The think gate (`ThinkGate`) of params `gate`: hidden `[..., hidden]`, stats
    `[..., GATE_STATS]` -> logit `[...]` float32 for a gate with one output (one thought
    length), `[..., n_lengths]` for one with several."""
    return model.from_params(gate, _PROBE, ThinkGate)(h, stats)


class QuietStarLM(model.CausalLM):
    """A CausalLM with its thought params (`thought`): `to_params` of it is the whole
    params pytree the trainer, `quietstar_loss` and `generate` take. Its call is the
    plain LM's (`lm_logits`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, init_token_id: int = 0,
                 embedding_scale: float = 100.0):
        super().__init__(cfg, rngs=rngs)
        row = self.embed[...][init_token_id].astype(jnp.float32) / embedding_scale
        self.thought = ThoughtParams(cfg, rngs=rngs, init_embedding=row)


# Any config gives the same logical axes and the same mixing-head graph.
_PROBE = ModelConfig(vocab_size=1, hidden_size=1, intermediate_size=1, num_layers=1,
                     num_heads=1, num_kv_heads=1)


def pad_id(*candidates: int | None, default: int = 0) -> int:
    """The pad id: the first of `candidates` that is set (callers list them in order of
    preference, e.g. an explicit id, `ThoughtConfig.pad_token_id`, the tokenizer's pad
    id, its eos id), else `default`."""
    return next((int(c) for c in candidates if c is not None), default)


def thought_param_shapes(cfg: ModelConfig) -> Params:
    """Shapes of the thought params (`params["thought"]`)."""
    return model.param_shapes(cfg, ThoughtParams)


def thought_logical_axes() -> Params:
    """Logical axis names of the thought params (their `out_sharding` metadata)."""
    return model.param_logical_axes(_PROBE, ThoughtParams)


def thought_param_decay() -> Params:
    """Whether weight decay applies to each thought param (its `weight_decay` metadata)."""
    return model.param_decay(_PROBE, ThoughtParams)


def init_thought_params(
    params: Params,
    cfg: ModelConfig,
    rng: jax.Array,
    init_token_id: int | None,
    embedding_scale: float = 100.0,
) -> Params:
    """Fresh thought params (`ThoughtParams`), as the authors initialise them.

    start/end embeddings: the embedding row of `init_token_id` (the first token of
    `ThoughtConfig.init_token`, the authors' "---"), stored divided by
    `embedding_scale`; zeros when `init_token_id` is None (a neutral start). Mixing
    head: torch-Linear default init (uniform +-1/sqrt(fan_in)) for the two hidden
    layers, zeros for the last, so the model starts as the base LM.
    """
    if init_token_id is None:
        row = None
    else:
        row = params["embed"][init_token_id].astype(jnp.float32) / embedding_scale
    return model.to_params(ThoughtParams(cfg, rngs=nnx.Rngs(params=rng), init_embedding=row))


def mixing_weight(mix: Params, base_h: jax.Array, thought_h: jax.Array) -> jax.Array:
    """The mixing head (`MixingHead`) of params `mix`: `[..., hidden]` x2 -> scalar
    weight `[...]` (float32, no sigmoid)."""
    return model.from_params(mix, _PROBE, MixingHead)(base_h, thought_h)


def mask_thought_logits(logits: jax.Array, tc: ThoughtConfig) -> jax.Array:
    """Give the two thought ids (and `tc.masked_token_ids`) logit -1e10: never sampled.
    `[..., vocab]`."""
    for i in tc.sampled_masked_ids:
        logits = logits.at[..., i].set(THOUGHT_LOGIT_MASK)
    return logits


def thought_embedding(params: Params, tc: ThoughtConfig, which: str) -> jax.Array:
    """The used (scaled) start or end embedding `[hidden]`, float32."""
    return params["thought"][which].astype(jnp.float32) * tc.embedding_scale


def given_token_logp(
    params: Params, cfg: ModelConfig, tc: ThoughtConfig, h: jax.Array, tok: jax.Array
) -> jax.Array:
    """REINFORCE log-prob of thought token `tok` `[...]` drawn from the plain LM logits
    of hidden `h` `[..., hidden]`: `log softmax(r / reinforce_temperature)[tok]` with the
    thought ids masked, float32 `[...]` (fused: no `[..., vocab]` logits kept)."""
    return vocab.logp_from_hidden(
        h, model.vocab_table(params, cfg), tok, temperature=tc.reinforce_temperature,
        masked_ids=tc.sampled_masked_ids, chunk_size=cfg.vocab_chunk, dtype=cfg.dtype)


class Rollout(NamedTuple):
    """Everything the losses, generation and analysis read from one rollout.

    rows = batch * n_passes (or the batch given); S = tc.num_steps; T = tc.num_sampled.
    base_hidden: `[rows, seq, hidden]` final hidden of the base step (h0).
    base_kv: the base step's KV `[layers, rows, seq, kv_heads, head_dim]`.
    step_hidden: `[S, rows, seq, hidden]`, h_s for s = 1..S (index s - 1).
    thought_tokens: `[T, rows, seq]` int, the tokens fed on steps 2..n_ahead-2.
    thought_logp: `[T, rows, seq]` float32, log softmax(r / reinforce_temperature) of
      each fed thought token under the logits it was drawn from (with gradient);
      `[0, rows, seq]` for pause thoughts (nothing to reinforce).
    fed_tokens: `[S, rows, seq]` int, the token id fed on every step (start/end ids
      for the learned embeddings), for analysis.
    """

    base_hidden: jax.Array
    base_kv: KV
    step_hidden: jax.Array
    thought_tokens: jax.Array
    thought_logp: jax.Array
    fed_tokens: jax.Array


def position_key(rng: jax.Array | None, s: Any, index: Any) -> jax.Array | None:
    """The key of the thought token drawn on step `s` by the position with flat index
    `index` among those thinking together (`row * positions + position`):
    `fold_in(fold_in(rng, s), index)`; None (greedy) when rng is None."""
    if rng is None:
        return None
    return jax.random.fold_in(jax.random.fold_in(rng, s), index)


def draw_thought(
    params: Params,
    cfg: ModelConfig,
    tc: ThoughtConfig,
    h: jax.Array,
    key: jax.Array | None,
    n_tokens: int,
) -> vocab.Draw:
    """One position's next thought token from its previous step's hidden `h` `[...,
    hidden]` (e.g. `[1, 1, hidden]`, mapped over positions by `jax.vmap`): the plain LM
    logits with the thought ids masked, a sample at `tc.thought_temperature` (or the
    argmax, `tc.sampling == "greedy"`), with the statistics of its REINFORCE log-prob
    (`vocab.draw`: a chunked vocabulary pass, no logits kept). `n_tokens`: how many
    positions draw together (the size of the map), which sets the chunking."""
    greedy = tc.sampling == "greedy"
    return vocab.draw(h, model.vocab_table(params, cfg), None if greedy else key,
                      sample_temperature=tc.thought_temperature, greedy=greedy,
                      logp_temperature=tc.reinforce_temperature,
                      masked_ids=tc.sampled_masked_ids, chunk_size=cfg.vocab_chunk,
                      dtype=cfg.dtype, n_tokens=n_tokens)


def step_embedding(
    params: Params, cfg: ModelConfig, tc: ThoughtConfig, sch: ThoughtSchedule, s: int,
    tok: jax.Array,
) -> jax.Array:
    """The input embedding of step `s` fed token(s) `tok` `[...]` -> `[..., hidden]` in
    compute dtype: the learned start/end embedding, else the token's table row."""
    kind = sch.kind(s)
    if kind in (START, END):
        emb = thought_embedding(params, tc, "start_emb" if kind == START else "end_emb")
        emb = jnp.broadcast_to(emb, tok.shape + emb.shape)
    else:
        emb = model.embed_tokens(params, cfg, tok)
    return emb.astype(cfg.compute_dtype)


class RowContext(NamedTuple):
    """What the thoughts of one row read from it: its base keys/values `kv` (`[layers,
    C, kv_heads, head_dim]` per row), their position ids `pos` `[C]`, and its token ids
    `ids` `[C]` (the teacher-forced talk tokens; None without talk steps)."""

    kv: KV
    pos: jax.Array
    ids: jax.Array | None


class PositionInputs(NamedTuple):
    """One thinking position: position id `pos` `[]`, index `at` `[]` in its row (its
    talk tokens are `ids[at + talk_shift]`), flat index `index` `[]` (its keys), which
    context keys it sees `ctx_ok` `[C]` (causal, padding; the window is applied per
    step), whether it sees its own keys `own_ok` `[]` (False for padding), and the
    thought tokens to feed `given` `[n_ahead - 3]` (None: drawn)."""

    pos: jax.Array
    at: jax.Array | None
    index: jax.Array
    ctx_ok: jax.Array
    own_ok: jax.Array
    given: jax.Array | None


class PositionThought(NamedTuple):
    """One position's thought: the final hidden of each decoder call (`[1, t,
    hidden]`: t = 1 for a sequential step, the block's size for the block), the token fed
    on every step `fed` `[1, steps]`, the draws of its sampled tokens (`vocab.Draw` of
    `[1, drawn]`, None when none is drawn), and with `trace` each call's `LayerTrace`."""

    hidden: tuple[jax.Array, ...]
    fed: jax.Array
    draws: vocab.Draw | None
    traces: tuple[model.LayerTrace, ...]


def thought_of_position(
    params: Params,
    cfg: ModelConfig,
    tc: ThoughtConfig,
    sch: ThoughtSchedule,
    row: RowContext,
    x: PositionInputs,
    rng: jax.Array | None,
    *,
    n_tokens: int,
    trace: bool = False,
) -> PositionThought:
    """The thought of ONE position: every step of `sch`, its start token, sampled tokens
    (drawn here, `draw_thought` with `position_key`), end token and teacher-forced talk
    tokens; its queries read the base keys/values of its row (`row.kv` with a unit
    batch axis, `[layers, 1, C, kv_heads, head_dim]`; mask: `x.ctx_ok` and the sliding
    window at its step's position id) and its own earlier keys.

    The steps before the last sampled token run one `model.position_decoder` call each
    (a drawn token needs the step before it); the rest (`sch.block_steps`) have known
    inputs and run as one call of `t = len(block)` queries, causal among themselves.
    `thoughts.map_thoughts` maps it over positions and rows with `jax.vmap`; `n_tokens`
    is the number of positions mapped (the vocabulary chunking of the draws).
    """
    window = cfg.sliding_window
    fed: list[jax.Array] = []
    draws: list[vocab.Draw] = []
    hidden: list[jax.Array] = []
    traces: list[model.LayerTrace] = []

    def token(s: int, prev_h: jax.Array | None) -> jax.Array:  # [1, 1] int32
        kind = sch.kind(s)
        if kind == START:
            return jnp.full((1, 1), tc.start_token_id, jnp.int32)
        if kind == END:
            return jnp.full((1, 1), tc.end_token_id, jnp.int32)
        if kind == SAMPLED:
            if x.given is not None:
                return x.given[sch.sampled_index(s)].astype(jnp.int32).reshape(1, 1)
            with jax.named_scope("sampling"):
                d = draw_thought(params, cfg, tc, prev_h, position_key(rng, s, x.index),
                                 n_tokens)
            draws.append(d)
            return d.tok
        j = x.at + sch.talk_shift(s)  # teacher forcing: x[i + shift], pad past the end
        n = row.ids.shape[-1]
        tok = jnp.where(j < n, row.ids[jnp.minimum(j, n - 1)], tc.pad_token_id)
        return tok.astype(jnp.int32).reshape(1, 1)

    def ctx_mask(s: int) -> jax.Array:  # [C]
        if window is None:
            return x.ctx_ok
        return x.ctx_ok & window_visible(x.pos + sch.position_offset(s), row.pos, window)

    def run(steps: tuple[int, ...], toks: list[jax.Array], own: list[KV], own_mask: jax.Array):
        emb = jnp.concatenate([step_embedding(params, cfg, tc, sch, s, t)
                               for s, t in zip(steps, toks, strict=True)], axis=1)
        offsets = jnp.asarray([sch.position_offset(s) for s in steps])
        pos = (x.pos + offsets)[None]  # [1, t]
        cm = jnp.stack([ctx_mask(s) for s in steps])[None]  # [1, t, C]
        out = model.position_decoder(params, cfg, emb, pos, (row.kv, cm), own, own_mask,
                                     trace=trace)
        hidden.append(out[0])
        if trace:
            traces.append(out[2])
        return out

    own: list[KV] = []
    prev_h = None
    for s in sch.sequential_steps:
        tok = token(s, prev_h)
        fed.append(tok)
        # Own keys: steps 1..s-1, then the step's own new key; none for a padding query.
        own_mask = x.own_ok & sch.own_visible(s, jnp.arange(1, s + 1), window)
        with jax.named_scope("thought_steps"):
            out = run((s,), [tok], own, own_mask[None, None])  # [1, 1, s]
        own.append(out[1])
        prev_h = out[0]
    block = sch.block_steps
    if block:
        toks = [token(s, prev_h if s == block[0] else None) for s in block]
        fed.extend(toks)
        own_mask = x.own_ok & sch.own_block_mask(block, sch.steps, window)  # [t, slots + t]
        with jax.named_scope("thought_block"):
            run(block, toks, own, own_mask[None, None])
    d = (vocab.Draw(*(jnp.concatenate(f, axis=1) for f in zip(*draws, strict=True)))
         if draws else None)
    return PositionThought(tuple(hidden), jnp.concatenate(fed, axis=1), d, tuple(traces))


class MappedThoughts(NamedTuple):
    """`thought_of_position` mapped over P positions of R rows: `step_hidden` (per step
    `[R, P, hidden]`, kept apart: slicing a stack would cost a padded cotangent per
    step in the backward pass), `fed` `[steps, R, P]` int, `draws` (`vocab.Draw` of `[drawn, R, P]`,
    in the order of `sch.sampled_steps`; None when none is drawn), `traces` (per decoder
    call: a sequential step's `[layers, R, P, hidden]`, the block's position-major
    `[layers, R, P, block, hidden]`)."""

    step_hidden: list[jax.Array]
    fed: jax.Array
    draws: vocab.Draw | None
    traces: list[model.LayerTrace]


def map_thoughts(
    params: Params,
    cfg: ModelConfig,
    tc: ThoughtConfig,
    sch: ThoughtSchedule,
    row: RowContext,
    x: PositionInputs,
    rng: jax.Array | None,
    *,
    trace: bool = False,
) -> MappedThoughts:
    """`thought_of_position` vmapped over positions, then rows.

    row: per-row `RowContext` with a leading rows axis (kv `[layers, R, C, kv_heads,
    head_dim]`, pos/ids `[R, C]`); x: `PositionInputs` with leading `[R, P]` axes.
    The context is per row, shared by the row's positions (not copied per position);
    every projection is a 2-D matmul over all R x P positions' queries, and each draw a
    chunked vocabulary pass over all of them (`n_tokens = R * P`).

    The unit batch axis of one position is added (and removed) outside the vmap: a
    reshape of a mapped array inside would make the vmap move the mapped axes to the
    front (a transposed copy of every key/value array on every step).
    """
    rows, n_pos = x.pos.shape
    one = functools.partial(thought_of_position, params, cfg, tc, sch, n_tokens=rows * n_pos,
                            trace=trace)
    n_calls = len(sch.sequential_steps) + (1 if sch.block_steps else 0)
    tr_axes = tuple(model.LayerTrace(1, 0) for _ in range(n_calls)) if trace else ()
    out_axes = PositionThought(0, 0, 0, tr_axes)
    over_positions = jax.vmap(one, in_axes=(RowContext(None, None, None), 0, None),
                              out_axes=out_axes)
    over_rows = jax.vmap(over_positions, in_axes=(RowContext(1, 0, 0), 0, None),
                         out_axes=out_axes)
    kv1 = KV(row.kv.k[:, :, None], row.kv.v[:, :, None])  # [layers, R, 1, C, kv, d]
    out = over_rows(row._replace(kv=kv1), x, rng)
    step_hidden = []
    for h in out.hidden:  # [R, P, 1, t, hidden]
        h = constrain(h[:, :, 0], model.STEP_HIDDEN_AXES)
        step_hidden.extend(jnp.moveaxis(h, 2, 0))
    traces = []
    for i, tr in enumerate(out.traces):  # [layers, R, P, 1, t, hidden], [R, P, 1, t, hidden]
        ins, last = tr.inputs[:, :, :, 0], tr.last[:, :, 0]
        if i < len(sch.sequential_steps):  # t = 1: one step's trace
            ins, last = ins[:, :, :, 0], last[:, :, 0]
        traces.append(model.LayerTrace(ins, last))
    fed = jnp.moveaxis(out.fed[:, :, 0], -1, 0)
    draws = (None if out.draws is None else
             vocab.Draw(*(jnp.moveaxis(f[:, :, 0], -1, 0) for f in out.draws)))
    return MappedThoughts(step_hidden, fed, draws, traces)


def reinforce_logps(
    params: Params,
    cfg: ModelConfig,
    tc: ThoughtConfig,
    sch: ThoughtSchedule,
    step_hidden: Sequence[jax.Array],
    fed: Sequence[jax.Array],
    draws: Any,
) -> list[jax.Array]:
    """The REINFORCE log-probs of the sampled thought tokens, one `[...]` array per sampled
    step (the token fed on step s was drawn from step s - 1's hidden state): all drawn
    steps in one call and all given ones in another, so one backward vocabulary pass (and
    one output-matrix gradient) each. `draws`: the stacked `vocab.Draw` of the sampled
    steps, or None when the tokens were given. Pause thoughts have no policy."""
    drawn = () if draws is None else sch.sampled_steps
    w_grad = model.vocab_table(params, cfg)
    logp: list[jax.Array] = []
    if drawn:
        hs = jnp.stack([step_hidden[s - 2] for s in drawn])
        with jax.named_scope("reinforce_logp"):
            logp.extend(vocab.logp_of_draws(
                hs, w_grad, draws, logp_temperature=tc.reinforce_temperature,
                masked_ids=tc.sampled_masked_ids, chunk_size=cfg.vocab_chunk, dtype=cfg.dtype))
    given = [s for s in sch.sampled_steps if s not in drawn]
    if given and tc.sampling != "pause":
        hs = jnp.stack([step_hidden[s - 2] for s in given])
        toks = jnp.stack([fed[s - 1] for s in given])
        with jax.named_scope("reinforce_logp"):
            logp.extend(given_token_logp(params, cfg, tc, hs, toks))
    return logp


def replayed_hidden(
    params: Params,
    cfg: ModelConfig,
    tc: ThoughtConfig,
    sch: ThoughtSchedule,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    positions: jax.Array,
    base_trace: model.LayerTrace,
    mapped: MappedThoughts,
    x: PositionInputs,
) -> tuple[jax.Array, list[jax.Array]]:
    """The differentiable outputs of a base pass and its thoughts that ran without
    gradient, traced (`model.forward(..., trace=True)`, `map_thoughts(..., trace=True)`):
    the traced values, with the backward pass that replays every layer once over the
    base sequence and all steps of the P thinking positions together
    (`model.replay_layers`). The dense rollout passes every position (P = seq), the
    sparse objective its gathered ones.

    input_ids, attention_mask, positions: `[rows, seq]`; x: the thinking positions'
    `PositionInputs` (`[rows, P]`, ctx_ok `[rows, P, seq]`). Returns the base hidden
    `[rows, seq, hidden]` and per step `[rows, P, hidden]`, after the final norm.
    """
    rows, n_pos = x.pos.shape
    window, n = cfg.sliding_window, sch.num_steps

    def ctx_mask_at(s: int) -> jax.Array:  # [rows, P, seq]
        if window is None:
            return x.ctx_ok
        q_pos = x.pos[:, :, None] + sch.position_offset(s)
        return x.ctx_ok & window_visible(q_pos, positions[:, None, :], window)

    offsets = jnp.asarray([sch.position_offset(s) for s in sch.steps])
    geo = model.JointGeometry(
        base_positions=positions,
        base_mask=model.self_attention_mask(cfg, positions, attention_mask),
        step_positions=(x.pos[:, None, :] + offsets[None, :, None]).reshape(rows, -1),
        ctx_mask=jnp.concatenate([ctx_mask_at(s) for s in sch.steps], 1),
        own_mask=(x.own_ok[:, :, None, None]
                  & sch.own_block_mask(sch.steps, sch.steps, window)[None, None]),
    )
    emb_steps = jnp.stack([step_embedding(params, cfg, tc, sch, s, mapped.fed[s - 1])
                           for s in sch.steps], 1)
    with jax.named_scope("replayed_backward"):
        out_b, out_s = model.replay_layers(
            cfg, params["layers"],
            model.embed_tokens(params, cfg, input_ids).astype(cfg.compute_dtype),
            emb_steps.reshape(rows, n * n_pos, -1), base_trace, mapped.traces, geo)
    norm = lambda h: model.rms_norm(h, params["final_norm"], cfg.rms_norm_eps)  # noqa: E731
    return norm(out_b), list(jnp.moveaxis(norm(out_s).reshape(rows, n, n_pos, -1), 1, 0))


def rollout(
    params: Params,
    cfg: ModelConfig,
    tc: ThoughtConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    rng: jax.Array | None,
    thought_tokens: jax.Array | None = None,
    *,
    num_steps: int | None = None,
) -> Rollout:
    """The parallel thought rollout: all positions think at once.

    input_ids, attention_mask: `[rows, seq]` (already repeated over passes).
    thought_tokens: optional int `[n_ahead - 3, rows, seq]` to feed instead of sampling.
    num_steps: how many thought/talk steps to run (default tc.num_steps).

    Step 0 is one causal forward over the sequence. On step s every position i is fed
    one token (start, a sampled token, end, or the true token `x[i + s - n_ahead + 1]`)
    at position id `pos[i] + s`; its query sees the base keys j <= i (causal mask,
    padding, sliding window) and position i's own keys from steps 1..s.

    The thought of one position is one function, `thought_of_position`: its start
    token, its sampled tokens (drawn inside it, from its own previous step, with its
    own key `position_key(rng, s, row * seq + i)`), its end token and its teacher-forced
    talk tokens; its queries read the base keys/values of its row and its own earlier
    keys. `map_thoughts` maps it over the positions and rows with `jax.vmap`;
    generation's `think_at` maps the same function over its chosen positions. The step
    schedule (which step feeds what, which run one by one and which as one block) is
    `schedule.ThoughtSchedule`.

    Inside the function a step whose token is sampled needs the previous step's output,
    so the steps up to the one before the last sampled token run one after another (one
    `model.position_decoder` call each); the remaining steps (the last sampled token,
    end, talk; all steps when `thought_tokens` are given) have known inputs and run as
    one call of the position's `block` queries, causal among themselves. Under the vmap
    each draw is one chunked vocabulary pass over all positions.
    """
    rows, seq = input_ids.shape
    if tc.sampling == "pause" and thought_tokens is None:
        thought_tokens = jnp.full((tc.num_sampled, rows, seq), tc.pause_token_id, jnp.int32)
    sch = ThoughtSchedule.of(tc, num_steps, given=thought_tokens is not None)
    # With full rematerialisation the steps run without gradient and the backward pass
    # replays all of them together, layer by layer (`model.replay_layers`).
    replay = cfg.remat == "full" and sch.num_steps > 0
    run_params = jax.lax.stop_gradient(params) if replay else params
    valid = attention_mask.astype(bool)
    positions = model.default_positions(attention_mask)
    with jax.named_scope("base_pass"):
        base = model.forward(run_params, cfg, input_ids, attention_mask, positions, trace=replay)
    h0, kv0 = base[:2]

    idx = jnp.arange(seq)
    base_ctx = (idx[None, :] <= idx[:, None])[None] & valid[:, None, :]  # [rows, q, k]

    # Every position's thought is one function (`thought_of_position`: its steps, its
    # draws, its queries on its row's base keys and its own keys), vmapped over the
    # positions and rows (`map_thoughts`).
    if sch.num_steps > 0:
        at = jnp.broadcast_to(idx[None, :], (rows, seq))
        x = PositionInputs(
            pos=positions, at=at, index=at + seq * jnp.arange(rows)[:, None], ctx_ok=base_ctx,
            own_ok=valid,
            given=None if thought_tokens is None else jnp.moveaxis(thought_tokens, 0, -1))
        # (named scopes inside: thought_steps, sampling, thought_block)
        mapped = map_thoughts(run_params, cfg, tc, sch, RowContext(kv0, positions, input_ids),
                              x, rng, trace=replay)
        step_hidden, fed, draws = mapped.step_hidden, list(mapped.fed), mapped.draws
    else:
        step_hidden, fed, draws = [], [], None
    if replay:  # the differentiable outputs: the traced ones, with the replayed backward
        h0, step_hidden = replayed_hidden(params, cfg, tc, sch, input_ids, attention_mask,
                                          positions, base[2], mapped, x)

    thought_logp = reinforce_logps(params, cfg, tc, sch, step_hidden, fed, draws)

    empty = jnp.zeros((0, rows, seq), jnp.int32)
    thought_toks = [fed[s - 1] for s in sch.sampled_steps]
    return Rollout(
        base_hidden=h0,
        base_kv=kv0,
        step_hidden=jnp.stack(step_hidden),
        thought_tokens=jnp.stack(thought_toks) if thought_toks else empty,
        thought_logp=jnp.stack(thought_logp) if thought_logp else empty.astype(jnp.float32),
        fed_tokens=jnp.stack(fed),
    )


def shift_left(x: jax.Array, k: int, axis: int = 1) -> jax.Array:
    """`x[i + k]` along `axis`, zeros past the end (same shape)."""
    if k == 0:
        return x
    x = jnp.moveaxis(x, axis, 0)
    out = jnp.concatenate([x[k:], jnp.zeros_like(x[:k])], axis=0)
    return jnp.moveaxis(out, 0, axis)


def mixed_hidden(
    params: Params, tc: ThoughtConfig, base_hidden: jax.Array, step_hidden: jax.Array, step: int
) -> tuple[jax.Array, jax.Array]:
    """Mix step `step`'s hidden with the base hidden that predicts the same target.

    base_hidden, step_hidden: `[rows, seq, hidden]`. With k = max(0, step - (n_ahead - 1)),
    b = h0[i + k]; w = mixing_head([b, h_s]); returns ((1 - w) b + w h_s `[rows, seq,
    hidden]`, w `[rows, seq]` float32). Positions with i + k past the end get b = 0.
    """
    b = shift_left(base_hidden, ThoughtSchedule.of(tc).base_shift(step))
    w = mixing_weight(params["thought"]["mix"], b, step_hidden)
    wd = w[..., None].astype(step_hidden.dtype)
    return (1 - wd) * b + wd * step_hidden, w
