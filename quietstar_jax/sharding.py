"""Device mesh and logical-axis sharding rules.

The mesh has three named axes: `data` (pure data parallelism), `fsdp` (data
parallelism with parameters and optimiser state sharded) and `tensor`
(Megatron-style tensor parallelism: attention heads and the MLP hidden split).
Every parameter carries logical axis names (`model.param_logical_axes`,
`thoughts.thought_logical_axes`); `DEFAULT_RULES` maps them onto mesh axes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from quietstar_jax.model import ModelConfig, param_logical_axes
from quietstar_jax.thoughts import thought_logical_axes

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or None: replicated)
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
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
}


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replace one -1 in a (data, fsdp, tensor) shape by what the devices leave."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: sizes must be positive or -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh shape {shape}: {num_devices} devices are not divisible by {known}"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, shape, strict=True))} has "
            f"{math.prod(shape)} devices but JAX sees {num_devices}"
        )
    return shape


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices JAX sees)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    try:
        dev_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 - e.g. CPU devices without a physical topology
        dev_array = np.asarray(devices).reshape(shape)
    return Mesh(dev_array, MESH_AXES)


def logical_to_spec(
    logical: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, Any] = DEFAULT_RULES,
) -> PartitionSpec:
    """PartitionSpec of an array with these logical axes.

    A dimension whose size the mesh axis does not divide stays replicated, and a
    mesh axis is used at most once per array.
    """
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical, shape, strict=True):
        target = rules.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n not in used and mesh.shape[n] > 1)
        size = math.prod(mesh.shape[n] for n in names)
        if not names or dim % size:
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)


def params_logical_axes(cfg: ModelConfig, with_thought: bool = True) -> dict[str, Any]:
    """Logical axes of the full params pytree (model, and `thought` when present)."""
    axes = param_logical_axes(cfg)
    if with_thought:
        axes["thought"] = thought_logical_axes()
    return axes


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str | None) for a in x)


def param_shardings(
    mesh: Mesh,
    params: Any,
    logical_axes: Any,
    rules: Mapping[str, Any] = DEFAULT_RULES,
) -> Any:
    """NamedShardings for `params` (arrays or ShapeDtypeStructs) from their logical axes."""
    return jax.tree.map(
        lambda axes, p: NamedSharding(mesh, logical_to_spec(axes, p.shape, mesh, rules)),
        logical_axes,
        params,
        is_leaf=_is_axes,
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of `[batch, seq]` arrays: batch split over data and fsdp."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_parallelism(mesh: Mesh, cfg: ModelConfig, global_batch: int) -> None:
    """Raise, naming the numbers, if the batch or the heads cannot be split on `mesh`."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % dp:
        raise ValueError(
            f"global batch {global_batch} is not divisible by the data-parallel size "
            f"{dp} (data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})"
        )
    tp = mesh.shape["tensor"]
    for name, n in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads),
                    ("intermediate_size", cfg.intermediate_size)):
        if n % tp:
            raise ValueError(f"model {name}={n} is not divisible by the tensor axis size {tp}")
