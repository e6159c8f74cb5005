"""The thought params as Flax NNX modules: the start/end-of-thought embeddings and the
mixing head (`ThoughtParams`, `params["thought"]`), the think gate (`ThinkGate`,
`params["think_gate"]`), `QuietStarLM`, the decoder with its thought params (the whole
params pytree the trainer takes), and `GatedQuietStarLM`, that with the think gate.

`merge_lm` merges the module a params pytree holds, once per public entry point; the
code below it calls the modules' methods (`lm.thought.embedding`, `lm.thought.blend`,
`lm.think_gate`). `mixing_weight`, `gate_logit` and `thought_embedding` are pure
functions of the params for notebooks and tests."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from quietstar_jax import model
from quietstar_jax.model import ModelConfig, Params
from quietstar_jax.thought.config import ThoughtConfig


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

    def embedding(self, which: str, scale: float) -> jax.Array:
        """The used start (`which="start_emb"`) or end (`"end_emb"`) embedding `[hidden]`,
        float32: the stored one times `scale` (`ThoughtConfig.embedding_scale`)."""
        return getattr(self, which)[...].astype(jnp.float32) * scale

    def blend(self, base: jax.Array, thought: jax.Array, offset: float = 0.0
              ) -> tuple[jax.Array, jax.Array]:
        """The mixing head's blend of a base hidden and a post-thought hidden that predict
        the same target: `[..., hidden]` x2 -> ((1 - w) base + w thought `[..., hidden]`,
        w `[...]` float32), w = mix([base, thought]) + `offset`
        (`ThoughtConfig.mixing_weight_offset`)."""
        w = self.mix(base, thought)
        if offset:
            w = w + jnp.float32(offset)
        wd = w[..., None].astype(thought.dtype)
        return (1 - wd) * base + wd * thought, w


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

    @property
    def outputs(self) -> int:
        """How many thought lengths the gate scores (its outputs)."""
        return int(self.b1[...].shape[-1])


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
    length), `[..., n_lengths]` for one with several. (Merged here: the package calls
    `lm.think_gate` of a merged `GatedQuietStarLM`.)"""
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


class GatedQuietStarLM(QuietStarLM):
    """A QuietStarLM with its think gate (`think_gate`, `ThinkGate`): the params of
    sparse thoughts trained with a gate loss. Merged from params of a gate of any
    number of outputs (`init_gate_params(cfg, rng, n_lengths)`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, init_token_id: int = 0,
                 embedding_scale: float = 100.0, n_lengths: int = 1):
        super().__init__(cfg, rngs=rngs, init_token_id=init_token_id,
                         embedding_scale=embedding_scale)
        self.think_gate = ThinkGate(cfg, rngs=rngs, n_lengths=n_lengths)


def merge_lm(params: Params, cfg: ModelConfig) -> model.CausalLM:
    """The module a params pytree holds, merged once (`model.from_params`): a
    `GatedQuietStarLM` when it has `thought` and `think_gate`, a `QuietStarLM` with
    `thought` only, else a `model.CausalLM`. The public entry points that take params
    call this once and pass the module down."""
    if "thought" not in params:
        return model.from_params(params, cfg)
    return model.from_params(params, cfg,
                             GatedQuietStarLM if "think_gate" in params else QuietStarLM)


# Any config gives the same logical axes and the same mixing-head graph.
_PROBE = ModelConfig(vocab_size=1, hidden_size=1, intermediate_size=1, num_layers=1,
                     num_heads=1, num_kv_heads=1)


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


def thought_module(params: Params) -> ThoughtParams:
    """The `ThoughtParams` of `params["thought"]`, merged alone (for the pure functions
    of the thought params that take no ModelConfig)."""
    return model.from_params(params["thought"], _PROBE, ThoughtParams)


def thought_embedding(params: Params, tc: ThoughtConfig, which: str) -> jax.Array:
    """The used (scaled) start or end embedding `[hidden]`, float32
    (`ThoughtParams.embedding`)."""
    return thought_module(params).embedding(which, tc.embedding_scale)
