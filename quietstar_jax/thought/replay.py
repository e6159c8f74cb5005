"""The replayed backward pass of a rollout: the base pass and its thought steps run
without gradient, tracing every layer's input; `replay_layers` returns their outputs with
a backward that replays each layer once over the base sequence and all steps together
(`joint_layer`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from quietstar_jax.model import (
    DecoderLayer,
    FusedCausal,
    LayerTrace,
    ModelConfig,
    Params,
    from_params,
    rope_tables,
)
from quietstar_jax.vocab import zeros_after


class JointGeometry(NamedTuple):
    """Where the queries of a base sequence and of its block of thought steps sit.

    base_positions `[batch, seq]`, base_mask: its self-attention mask (`self_attention_mask`);
    step_positions `[batch, steps * seq]` (step-major); ctx_mask `[batch, steps * seq, seq]`:
    which base keys each step query sees; own_mask `[batch, seq, steps, steps]`: which of
    its position's steps each step query sees (see `attend`'s grouped own block).
    """

    base_positions: jax.Array
    base_mask: jax.Array | FusedCausal
    step_positions: jax.Array
    ctx_mask: jax.Array
    own_mask: jax.Array


def joint_layer(
    lp: Params, cfg: ModelConfig, h_base: jax.Array, h_steps: jax.Array, geo: JointGeometry
) -> tuple[jax.Array, jax.Array]:
    """One layer over a base sequence and all its thought steps at once.

    h_base `[batch, seq, hidden]`; h_steps `[batch, steps * seq, hidden]` (step-major).
    The base queries attend causally among themselves; every step query attends to the
    base keys of this layer (`geo.ctx_mask`) and to its position's steps
    (`geo.own_mask`). Returns the two outputs, shaped like the inputs.

    `lp` is one layer's params (the backward scan's slice): the `DecoderLayer` is merged
    from it once, here, and called for both.
    """
    rope_b = rope_tables(geo.base_positions, cfg.dim_per_head, cfg.rope_theta)
    rope_s = rope_tables(geo.step_positions, cfg.dim_per_head, cfg.rope_theta)
    lyr = from_params(lp, cfg, DecoderLayer)
    out_b, k, v = lyr(h_base, rope_b, geo.base_mask, None, None)
    out_s, _, _ = lyr(h_steps, rope_s, None, (k, v, geo.ctx_mask), ((), (), geo.own_mask))
    return out_b, out_s


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def replay_layers(
    cfg: ModelConfig,
    layers: Params,
    h_base: jax.Array,
    h_steps: jax.Array,
    base_trace: LayerTrace,
    step_traces: Sequence[LayerTrace],
    geo: JointGeometry,
) -> tuple[jax.Array, jax.Array]:
    """The layer stack over a base sequence and its thought steps, differentiated by
    replaying each layer once over all steps together (`joint_layer`).

    A rollout computes the base pass and its thought steps one decoder call after
    another (a sampled token needs the step before it), without gradient, tracing every
    layer's input. This function returns those traced outputs (`[batch, seq, hidden]`,
    `[batch, steps * seq, hidden]`, before the final norm) with a backward pass that
    walks the layers in reverse and, per layer, recomputes and differentiates the base
    and all steps in one `joint_layer` call: full rematerialisation's memory (layer
    inputs) and FLOPs, but one weight-gradient pass instead of one per decoder call,
    whose `[layers, ...]` buffers a backward would otherwise hold all at once.

    h_base, h_steps: the embeddings fed to layer 0 (the gradient flows back to them).
    step_traces: the traces of the decoder calls that ran the steps, in step order
    (their `t` axes concatenated are the `steps * seq` of h_steps; a block of steps
    from `thought.map_thoughts` is position-major, `[layers, batch, seq, group, hidden]`);
    kept apart, and joined one layer at a time, so that no `[layers, ...]` copy of them
    is made.
    """
    del layers, h_base, h_steps, geo
    return base_trace.last, _join_steps([t.last for t in step_traces])


def _join_steps(pieces: Sequence[jax.Array]) -> jax.Array:
    """Step traces -> `[batch, steps * seq, hidden]` (step-major). A piece is one step
    `[batch, seq, hidden]` or a block of steps as `thought.map_thoughts` gives it,
    position-major `[batch, seq, group, hidden]` (reordered here, one layer at a time)."""
    pieces = [x if x.ndim == 3 else jnp.moveaxis(x, 2, 1).reshape(x.shape[0], -1, x.shape[-1])
              for x in pieces]
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)


def _replay_fwd(cfg, layers, h_base, h_steps, base_trace, step_traces, geo):
    del h_base, h_steps
    out = (base_trace.last, _join_steps([t.last for t in step_traces]))
    return out, (layers, base_trace.inputs, [t.inputs for t in step_traces], geo)


def _replay_bwd(cfg, res, cts):
    layers, in_base, in_steps, geo = res
    # The weight gradients are written layer by layer into accumulators that exist only
    # from here on (a scan's stacked outputs would be allocated with the forward pass).
    grads = jax.tree.map(lambda x: zeros_after(x.shape, cts[0]).astype(x.dtype), layers)

    def body(carry, i):
        ct, grads = carry
        at = lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False)
        _, vjp = jax.vjp(lambda p, b, s: joint_layer(p, cfg, b, s, geo), jax.tree.map(
            at, layers), at(in_base), _join_steps([at(x) for x in in_steps]))
        d_lp, d_b, d_s = vjp(ct)
        grads = jax.tree.map(
            lambda g, d: jax.lax.dynamic_update_index_in_dim(g, d.astype(g.dtype), i, 0),
            grads, d_lp)
        return ((d_b, d_s), grads), None

    ((d_base, d_steps), d_layers), _ = jax.lax.scan(
        body, (cts, grads), jnp.arange(cfg.num_layers), reverse=True)
    return d_layers, d_base, d_steps, None, None, None


replay_layers.defvjp(_replay_fwd, _replay_bwd)
