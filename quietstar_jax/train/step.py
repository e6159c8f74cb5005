"""Train state, optimiser and the jitted update step.

One step: the global batch `[batch, seq]` is split into `grad_accum` micro-batches,
each one's loss and gradients of `quietstar_loss` are computed in a `lax.scan`, the
gradients are averaged, clipped by global norm, and AdamW (warm-up then linear
decay, decoupled weight decay) updates the float32 master weights. The thought
sampling key of micro-batch `m` on update `step` is
`fold_in(fold_in(key(seed), step), m)`: a resumed run samples the same thoughts.

The micro-batches are accumulated inside the one jitted step, by a `lax.scan` (as
MaxText does), not by `optax.MultiSteps`, which accumulates across calls of the
optimizer: one jitted call, one host round trip and one step of the step counter per
micro-batch, with the data order, logging and checkpoints counting micro-steps. The
scan carries the metrics' sums, whose zeros take one more trace of the loss
(`jax.eval_shape`, trace time only). Returning the micro-batches' metrics as the scan's
stacked outputs instead traces the loss once, but the TPU compiler's memory analysis of
that program reports no temporaries at all (the tiny step of tests/test_tpu_compile.py:
0 bytes against 10.2 MB), which would make `benchmarks/tpu_compile.py`'s per-chip
budget wrong; so the sums stay.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from quietstar_jax import model
from quietstar_jax.model import ModelConfig, Params
from quietstar_jax.sharding import BATCH_AXES, replicated
from quietstar_jax.thought import (
    ThoughtConfig,
    gate_param_decay,
    shift_left,
    thought_param_decay,
)
from quietstar_jax.thought.loss import hidden_nll, masked_mean, quietstar_loss

Batch = dict[str, jax.Array]  # input_ids, attention_mask: int32 [batch, seq]
# (params, micro-batch, thought-sampling key) -> (loss, metrics): what one step minimises.
LossFn = Callable[[Params, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


class TrainState(NamedTuple):
    """step: int32 scalar, updates done so far; params; optax state."""

    step: jax.Array
    params: Params
    opt_state: optax.OptState


def lr_schedule(lr: float, warmup_steps: int, total_steps: int,
                end_lr_ratio: float = 0.0) -> optax.Schedule:
    """Linear warm-up from 0 to `lr` over `warmup_steps`, then linear decay to
    `lr * end_lr_ratio` at `total_steps` and constant after (as transformers' linear
    schedule): optax's `linear_schedule`s joined at `warmup_steps`. When
    `total_steps <= warmup_steps` the decay takes one step. step: int scalar -> float32
    scalar."""
    if warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} and total_steps={total_steps} "
                         "must be >= 0")
    decay = optax.linear_schedule(lr, lr * end_lr_ratio,
                                  transition_steps=max(total_steps - warmup_steps, 1))
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, lr, transition_steps=warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


@functools.cache
def _decay_by_path() -> dict[tuple[str, ...], bool]:
    """Every param name any config can have (attention biases, an untied `lm_head`,
    `thought`) -> its declared `weight_decay` metadata (`model.declare`)."""
    probe = ModelConfig(vocab_size=1, hidden_size=1, intermediate_size=1, num_layers=1,
                        num_heads=1, num_kv_heads=1, attention_bias=True)
    table = {**model.param_decay(probe), "thought": thought_param_decay(),
             "think_gate": gate_param_decay()}
    return traverse_util.flatten_dict(table)


def decay_mask(params: Params) -> Params:
    """True for parameters that get weight decay, as each is declared: all but norms and
    biases (attention biases, the mixing head's `b0`, `b1`)."""
    table = _decay_by_path()

    def decays(path: tuple[Any, ...], _: Any) -> bool:
        key = tuple(str(getattr(k, "key", k)) for k in path)
        if key not in table:
            raise KeyError(f"param {'/'.join(key)} is not declared by the model's modules")
        return table[key]

    return jax.tree_util.tree_map_with_path(decays, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm`, with the clipping applied as one multiply by a
    scalar: XLA fuses a multiply into each consumer (Adam's two moment updates), where
    optax's divide is materialised, a second copy of every gradient beside the first
    (on SmolLM2-135M the plain update step's temporaries fell from 1.08 to 0.60 GB)."""

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(
    lr: float,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    end_lr_ratio: float = 0.0,
    weight_decay: float = 0.0,
    decay_norms_and_biases: bool = False,
    clip_norm: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping then AdamW; returns (optimizer, learning-rate schedule)."""
    schedule = lr_schedule(lr, warmup_steps, total_steps, end_lr_ratio)
    optimizer = optax.chain(
        clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                    mask=None if decay_norms_and_biases else decay_mask),
    )
    return optimizer, schedule


def optimizer_from_config(optim: Any, total_steps: int) -> tuple[
        optax.GradientTransformation, optax.Schedule]:
    """`make_optimizer` with the fields of `config.optim` (the trainer's schema)."""
    return make_optimizer(
        optim.lr, total_steps, warmup_steps=optim.warmup_steps,
        end_lr_ratio=optim.end_lr_ratio, weight_decay=optim.weight_decay,
        decay_norms_and_biases=optim.decay_norms_and_biases, clip_norm=optim.clip_norm,
        b1=optim.b1, b2=optim.b2, eps=optim.eps)


def unalias(tree: Any) -> Any:
    """Copy any leaf that is the same array object as an earlier leaf (e.g. start and
    end embeddings initialised from one row): a donated state must not hold one buffer
    twice."""
    seen: set[int] = set()

    def fresh(x: Any) -> Any:
        if id(x) in seen:
            return jnp.copy(x)
        seen.add(id(x))
        return x

    return jax.tree.map(fresh, tree)


def init_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0, `params` (aliased leaves copied) and the optimiser's initial state."""
    params = unalias(params)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def state_shardings(
    mesh: Mesh, optimizer: optax.GradientTransformation, params: Any, param_shardings: Any
) -> TrainState:
    """NamedShardings of a TrainState: optimiser moments like their params, other
    optimiser leaves (counts) and the step replicated. `params` may be abstract."""
    abstract_opt = jax.eval_shape(optimizer.init, params)
    rep = replicated(mesh)
    opt = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, param_shardings,
                                transform_non_params=lambda _: rep)
    return TrainState(rep, param_shardings, opt)


def abstract_state(optimizer: optax.GradientTransformation, params: Any,
                   state_sharding: TrainState) -> TrainState:
    """The TrainState of `init_state(params, optimizer)` as ShapeDtypeStructs carrying
    `state_sharding` (`params` may be abstract): to lower, compile or restore into."""
    shapes = jax.eval_shape(lambda p: init_state(p, optimizer), params)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, state_sharding)


def quietstar_loss_fn(model_cfg: ModelConfig, thought_cfg: ThoughtConfig) -> LossFn:
    """The trainer's objective: `quietstar_loss` of a micro-batch."""
    def loss_fn(params: Params, micro: Batch, key: jax.Array) -> tuple[jax.Array, dict]:
        return quietstar_loss(params, model_cfg, thought_cfg, micro["input_ids"],
                              micro["attention_mask"], key)

    return loss_fn


def next_token_loss_fn(model_cfg: ModelConfig, thought_cfg: ThoughtConfig) -> LossFn:
    """The plain baseline: mean next-token NLL of `CausalLM.forward` on the rows the
    Quiet-STaR loss sees (each sequence repeated `n_passes` times), with its rule for
    ignored labels (padding, the pad id); no thoughts. metrics: `loss`, `nll_base`."""
    def loss_fn(params: Params, micro: Batch, key: jax.Array) -> tuple[jax.Array, dict]:
        del key
        x = jnp.repeat(micro["input_ids"], thought_cfg.n_passes, axis=0)
        m = jnp.repeat(micro["attention_mask"], thought_cfg.n_passes, axis=0)
        lm = model.from_params(params, model_cfg)  # the plain LM, merged once
        h, _ = lm.forward(x, m)
        t = shift_left(x, 1)
        ok = shift_left(m.astype(bool), 1) & (t != thought_cfg.pad_token_id)
        nll = hidden_nll(lm, h, jnp.where(ok, t, 0))
        loss = masked_mean(jnp.where(ok, nll, 0.0), ok)
        return loss, {"loss": loss, "nll_base": loss}

    return loss_fn


def materialised_next_token_loss_fn(model_cfg: ModelConfig, thought_cfg: ThoughtConfig
                                    ) -> LossFn:
    """`next_token_loss_fn`'s loss with the logits materialised (`CausalLM`'s call,
    `[rows, seq, vocab]` float32, then log-softmax) instead of the chunked vocabulary
    walk: the plain step a user without thoughts would run, and on small batches the
    fastest (the benchmarks' "fast plain" baseline)."""
    def loss_fn(params: Params, micro: Batch, key: jax.Array) -> tuple[jax.Array, dict]:
        del key
        x = jnp.repeat(micro["input_ids"], thought_cfg.n_passes, axis=0)
        m = jnp.repeat(micro["attention_mask"], thought_cfg.n_passes, axis=0)
        logits = model.from_params(params, model_cfg)(x, m)
        t = shift_left(x, 1)
        ok = shift_left(m.astype(bool), 1) & (t != thought_cfg.pad_token_id)
        picked = jnp.take_along_axis(logits, jnp.where(ok, t, 0)[..., None], axis=-1)[..., 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - picked
        loss = masked_mean(jnp.where(ok, nll, 0.0), ok)
        return loss, {"loss": loss, "nll_base": loss}

    return loss_fn


def split_micro_batches(batch: Batch, n: int, mesh: Mesh | None = None) -> Batch:
    """`[batch, seq]` -> `[n, batch / n, seq]`, micro-batch m holding rows m, m + n, ...

    Rows are taken strided so that each device's contiguous block of the batch stays
    on that device: no data moves between devices.
    """
    def split(x: jax.Array) -> jax.Array:
        b = x.shape[0]
        y = x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
            spec = PartitionSpec(None, BATCH_AXES, *([None] * (x.ndim - 1)))
            y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))
        return y

    return jax.tree.map(split, batch)


def make_train_step(
    model_cfg: ModelConfig,
    thought_cfg: ThoughtConfig,
    optimizer: optax.GradientTransformation,
    *,
    schedule: optax.Schedule | None = None,
    grad_accum: int = 1,
    grad_accum_dtype: str = "float32",
    seed: int = 0,
    mesh: Mesh | None = None,
    state_sharding: TrainState | None = None,
    batch_sharding: NamedSharding | None = None,
    donate: bool = True,
    compiler_options: dict[str, Any] | None = None,
    loss_fn: LossFn | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted update `(state, batch) -> (state, metrics)`; the state is donated.

    batch: `{"input_ids", "attention_mask"}` int32 `[batch, seq]` (global), batch a
    multiple of `grad_accum`. metrics (float32, replicated): every component of
    `quietstar_loss` averaged over micro-batches (`reward_std` is the mean of the
    micro-batches' stds), `grad_norm` (before clipping), `lr` (of this update),
    `tokens` (non-padding tokens in the batch).
    grad_accum_dtype: the micro-batch gradient sum's dtype: "float32", or "params" (each
    param's own dtype: with bfloat16 params it halves the sum's memory, at bfloat16
    rounding of the sum). The sum is kept in the params' sharding.
    With `mesh`, `state_sharding` and `batch_sharding` (see `state_shardings`,
    `sharding.batch_sharding`) the step runs sharded and keeps those layouts.
    compiler_options: XLA options for this jit (e.g. a lower
    `xla_backend_optimization_level` to compile faster).
    loss_fn: what the step minimises (default `quietstar_loss_fn(model_cfg, thought_cfg)`;
    the benchmarks' plain baseline passes `next_token_loss_fn`); the metrics are its.
    """
    if grad_accum_dtype not in ("float32", "params"):
        raise ValueError(f"grad_accum_dtype={grad_accum_dtype!r} must be 'float32' or "
                         "'params'")
    base_key = jax.random.key(seed)
    if loss_fn is None:
        loss_fn = quietstar_loss_fn(model_cfg, thought_cfg)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        b = batch["input_ids"].shape[0]
        if b % grad_accum:
            raise ValueError(f"batch of {b} sequences is not divisible by grad_accum="
                             f"{grad_accum}")
        key = jax.random.fold_in(base_key, state.step)
        if grad_accum == 1:
            (_, metrics), grads = grad_fn(state.params, batch, jax.random.fold_in(key, 0))
        else:
            micro = split_micro_batches(batch, grad_accum, mesh)
            first = jax.tree.map(lambda x: x[0], micro)
            metric_shapes = jax.eval_shape(lambda p, mb: loss_fn(p, mb, key)[1],
                                           state.params, first)
            m_zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
            def acc_dtype(p: jax.Array) -> Any:
                return jnp.float32 if grad_accum_dtype == "float32" else p.dtype

            def in_param_layout(tree: Any) -> Any:
                if state_sharding is None:
                    return tree
                return jax.lax.with_sharding_constraint(tree, state_sharding.params)

            g_zero = in_param_layout(jax.tree.map(
                lambda p: jnp.zeros(p.shape, acc_dtype(p)), state.params))

            def body(carry, xs):
                g_sum, m_sum = carry
                i, mb = xs
                (_, m), g = grad_fn(state.params, mb, jax.random.fold_in(key, i))
                g_sum = in_param_layout(
                    jax.tree.map(lambda a, x: a + x.astype(a.dtype), g_sum, g))
                return (g_sum, jax.tree.map(jnp.add, m_sum, m)), None

            (g_sum, m_sum), _ = jax.lax.scan(
                body, (g_zero, m_zero), (jnp.arange(grad_accum), micro))
            grads = jax.tree.map(lambda g, p: (g / grad_accum).astype(p.dtype), g_sum,
                                 state.params)
            metrics = jax.tree.map(lambda m: m / grad_accum, m_sum)
        with jax.named_scope("optimizer"):
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics)
        metrics["grad_norm"] = grad_norm
        metrics["tokens"] = jnp.sum(batch["attention_mask"]).astype(jnp.float32)
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return TrainState(state.step + 1, params, opt_state), metrics

    kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else (),
                              "compiler_options": compiler_options}
    if state_sharding is not None or batch_sharding is not None:
        if mesh is None:
            raise ValueError("make_train_step: shardings need the mesh")
        kwargs["in_shardings"] = (state_sharding, batch_sharding)
        kwargs["out_shardings"] = (state_sharding, replicated(mesh))
    return jax.jit(step, **kwargs)
