"""Logical axis names and the rules that map them onto the mesh; activation constraints.

A leaf every module may import (it imports nothing of the package): the model pins its
activations with `constrain(x, logical_axes)`, a no-op unless a mesh is active
(`use_mesh(mesh)` around tracing/calling the jitted step), so single-device code is
unaffected. The mesh axes are `data`, `fsdp` and `tensor` (see `sharding`, which
builds the mesh and the shardings of params, state and batches on these rules).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = Mapping[str, str | tuple[str, ...] | None]

# logical axis -> mesh axis, tuple of mesh axes, or None (replicated)
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "mix_in": None,
    "mix_out": None,
    # activations
    "batch": BATCH_AXES,
    "seq": None,
    "act_embed": None,  # the residual stream: replicated over `tensor` (Megatron)
    "steps": None,  # the thought-step axis of stacked rollout outputs
    "slots": None,
}

_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar(
    "quietstar_sharding_rules", default=DEFAULT_RULES
)


# --------------------------------------------------------------------------- rules


def logical_to_spec(
    logical: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh | jax.sharding.AbstractMesh,
    rules: Rules | None = None,
) -> PartitionSpec:
    """PartitionSpec of an array of `shape` with these logical axes.

    A dimension whose size its mesh axes do not divide stays replicated (e.g. a
    vocabulary of 32002 on tensor=4), mesh axes of size 1 are dropped, and a mesh
    axis is used at most once per array (first come, first served).
    """
    rules = current_rules() if rules is None else rules
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(logical, shape, strict=True):
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        target = rules.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n not in used and mesh.shape[n] > 1)
        size = math.prod(mesh.shape[n] for n in names)
        if not names or dim % size:
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def current_rules() -> Rules:
    """The rules `constrain` and `logical_to_spec` use (set by `use_mesh`)."""
    return _RULES.get()


# --------------------------------------------------------------------------- activations


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules | None = None) -> Iterator[Mesh]:
    """Make `mesh` (and `rules`) current, so `constrain` pins activations.

    Trace, lower and call the jitted step inside this context; jit caches per mesh.
    """
    token = _RULES.set(DEFAULT_RULES if rules is None else rules)
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _RULES.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Pin `x`'s sharding by logical axis names; a no-op when no mesh is active.

    E.g. hidden states `[batch, seq, hidden]` -> `("batch", "seq", "act_embed")`,
    logits `[batch, seq, vocab]` -> `("batch", "seq", "vocab")`, keys
    `[layers, batch, seq, kv_heads, head_dim]` -> `("layers", "batch", "seq",
    "kv_heads", "head_dim")`. Safe inside jit, scan and grad.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    if len(logical_axes) != x.ndim:
        raise ValueError(f"constrain: logical axes {tuple(logical_axes)} do not match the "
                         f"shape {tuple(x.shape)} of the array")
    spec = logical_to_spec(logical_axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)
