"""Device mesh, and the shardings of params, optimiser state and batches.

The mesh has three named axes: `data` (pure data parallelism), `fsdp` (data
parallelism with parameters and optimiser state sharded) and `tensor`
(Megatron-style tensor parallelism: attention heads and the MLP hidden split).
Every parameter carries logical axis names, declared with it in the model's NNX
modules (its Param's `out_sharding` metadata, read back by `model.param_logical_axes`,
`thought.thought_logical_axes`); a rules table (`axes.DEFAULT_RULES`) maps them onto
mesh axes. The batch is split over `data` and `fsdp`.

The rules, `use_mesh` and the activation constraint `constrain` live in the leaf
module `axes` (the model imports it; this module imports the model) and are
re-exported here.

Typical use::

    mesh = make_mesh(config.mesh)                       # e.g. (1, -1, 1): all FSDP
    check_parallelism(mesh, cfg, global_batch)          # clear errors before compiling
    axes = params_logical_axes(cfg)
    params = sharded_init(lambda k: init(k), mesh, axes, rng)   # never whole on one device
    p_sh = param_shardings(mesh, params, axes)
    st_sh = train.step.state_shardings(mesh, optimizer, params, p_sh)  # + optimiser state
    with use_mesh(mesh):
        step = train.step.make_train_step(cfg, tc, optimizer, mesh=mesh, state_sharding=st_sh,
                                          batch_sharding=batch_sharding(mesh))
        state, metrics = step(state, batch)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from quietstar_jax.axes import (  # noqa: F401  (re-exported: the mesh's rules live in axes)
    BATCH_AXES,
    DEFAULT_RULES,
    MESH_AXES,
    Rules,
    constrain,
    current_rules,
    logical_to_spec,
    use_mesh,
)
from quietstar_jax.model import ModelConfig, param_logical_axes
from quietstar_jax.thought import gate_logical_axes, thought_logical_axes

# --------------------------------------------------------------------------- the mesh


def resolve_mesh_shape(shape: Sequence[int] | Mapping[str, int], num_devices: int) -> tuple[
        int, int, int]:
    """Replace one -1 in a (data, fsdp, tensor) shape by what the devices leave.

    `shape` is a sequence in `MESH_AXES` order or a mapping axis -> size (missing
    axes are 1). Raises ValueError, naming the numbers, when the product is not
    `num_devices`.
    """
    if isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh shape {dict(shape)}: unknown axes {sorted(unknown)}; "
                             f"the axes are {MESH_AXES}")
        shape = tuple(shape.get(a, 1) for a in MESH_AXES)
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
    return shape  # type: ignore[return-value]


def _device_array(shape: tuple[int, ...], devices: list[Any]) -> np.ndarray:
    """Devices arranged as `shape`, topology-aware where JAX knows the topology.

    Several TPU slices (devices with distinct `slice_index`) put the slow
    inter-slice network on `data`. Otherwise `mesh_utils.create_device_mesh`
    orders a TPU/GPU host's devices for fast collectives; on CPUs (no physical
    topology) devices stay in `jax.devices()` order, process-major, so each
    process owns a contiguous block of the batch.
    """
    from jax.experimental import mesh_utils

    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) > 1:
        n = len(slices)
        if shape[0] % n:
            raise ValueError(
                f"mesh shape {shape}: the data axis {shape[0]} must be a multiple of the "
                f"number of TPU slices {n} (the slices are joined over data)"
            )
        return mesh_utils.create_hybrid_device_mesh(
            (shape[0] // n, *shape[1:]), (n, 1, 1), devices
        )
    if devices[0].platform == "cpu":
        return np.asarray(devices, dtype=object).reshape(shape)
    try:
        return mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        return np.asarray(devices, dtype=object).reshape(shape)


def make_mesh(
    shape: Sequence[int] | Mapping[str, int] = (1, -1, 1),
    devices: Sequence[Any] | None = None,
) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: every device of every process).

    `shape` may hold one -1 ("the rest"). Axis types are Auto: shardings are given
    by `in_shardings`/`out_shardings` and `constrain`, and XLA propagates the rest.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    return Mesh(_device_array(shape, devices), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


# --------------------------------------------------------------------------- param shardings


def params_logical_axes(cfg: ModelConfig, with_thought: bool = True,
                        with_gate: bool = False) -> dict[str, Any]:
    """Logical axes of the full params pytree (model, `thought` when present, and the
    think gate `think_gate` of sparse thoughts when present)."""
    axes = param_logical_axes(cfg)
    if with_thought:
        axes["thought"] = thought_logical_axes()
    if with_gate:
        axes["think_gate"] = gate_logical_axes()
    return axes


def sharding_by_path(
    mesh: Mesh, rules: Rules | None = None
) -> Callable[[tuple[str, ...], tuple[int, ...]], NamedSharding]:
    """`(path, shape) -> NamedSharding` of any param, e.g. `(("layers", "attn", "q"), shape)`.

    For loaders that learn the config as they read (`hf.load_pretrained(...,
    sharding=sharding_by_path(mesh))`): the lookup covers every param name any
    config can have (attention biases, an untied `lm_head`, `thought`).
    """
    probe = ModelConfig(vocab_size=1, hidden_size=1, intermediate_size=1, num_layers=1,
                        num_heads=1, num_kv_heads=1, attention_bias=True)
    axes = params_logical_axes(probe, with_gate=True)

    def lookup(path: tuple[str, ...], shape: tuple[int, ...]) -> NamedSharding:
        node: Any = axes
        for key in path:
            if not isinstance(node, Mapping) or key not in node:
                raise KeyError(f"no logical axes for param {'/'.join(path)}")
            node = node[key]
        return NamedSharding(mesh, logical_to_spec(node, shape, mesh, rules))

    return lookup


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str | None) for a in x)


def param_shardings(
    mesh: Mesh,
    params: Any,
    logical_axes: Any,
    rules: Rules | None = None,
) -> Any:
    """NamedShardings for `params` (arrays or ShapeDtypeStructs) from their logical axes."""
    return jax.tree.map(
        lambda axes, p: NamedSharding(mesh, logical_to_spec(axes, p.shape, mesh, rules)),
        logical_axes,
        params,
        is_leaf=_is_axes,
    )


def module_shardings(module: nnx.Module, mesh: Mesh | AbstractMesh,
                     rules: Rules | None = None) -> dict[str, Any]:
    """NamedShardings of a module's params (concrete or from `nnx.eval_shape`), a pytree
    shaped like `model.to_params(module)`.

    Flax reads the logical axes off each Param's metadata (`nnx.get_partition_spec`);
    `logical_to_spec` maps them onto the mesh. Flax's own mapping (`nnx.get_named_sharding`
    under `logical_axis_rules`) is not used because it shards a dimension its mesh axes
    do not divide (SmolLM2's 49,154-row vocabulary on tensor=4), which then fails to
    place; here such a dimension stays replicated, as everywhere else in the package.
    """
    state = nnx.state(module, nnx.Param)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    values = nnx.to_pure_dict(state)
    return jax.tree.map(
        lambda spec, v: NamedSharding(mesh, logical_to_spec(tuple(spec), v.shape, mesh, rules)),
        specs, values, is_leaf=lambda x: isinstance(x, PartitionSpec))


def sharded_init(
    init_fn: Callable[..., Any],
    mesh: Mesh,
    logical_axes: Any,
    *args: Any,
    rules: Rules | None = None,
) -> Any:
    """Run `init_fn(*args)` under jit with its outputs sharded by `logical_axes`.

    Each device computes and holds only its shard: the full pytree never exists on
    one device or host. (Random init is sharding-independent with JAX's default
    partitionable threefry, so any mesh gives the same values.)
    """
    abstract = jax.eval_shape(init_fn, *args)
    out = param_shardings(mesh, abstract, logical_axes, rules)
    with use_mesh(mesh, rules):
        return jax.jit(init_fn, out_shardings=out)(*args)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of `[batch, ...]` arrays (token ids, masks): batch split over data and fsdp."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh` (scalars, rng keys, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split: data x fsdp."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def check_parallelism(mesh: Mesh, cfg: ModelConfig, global_batch: int) -> None:
    """Raise, naming the numbers, if the batch or the heads cannot be split on `mesh`.

    Call before compiling: a global batch not divisible by data x fsdp, or head
    counts / MLP width not divisible by the tensor axis, would otherwise fail deep
    inside XLA or silently replicate.
    """
    dp = data_parallel_size(mesh)
    if global_batch < 1 or global_batch % dp:
        raise ValueError(
            f"global batch {global_batch} is not divisible by the data-parallel size "
            f"{dp} (data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})"
        )
    tp = mesh.shape["tensor"]
    for name, n in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads),
                    ("intermediate_size", cfg.intermediate_size)):
        if n % tp:
            raise ValueError(f"model {name}={n} is not divisible by the tensor axis size {tp}")


def process_rows(sharding: jax.sharding.Sharding, global_batch: int) -> slice:
    """The contiguous rows of a `[global_batch, ...]` array this process must supply.

    Each process reads only these rows of every global batch and passes them to
    `jax.make_array_from_process_local_data` (see `distributed.global_batch`).
    """
    idx = sharding.addressable_devices_indices_map((global_batch,))
    rows = sorted({r for s in idx.values() for r in range(*s[0].indices(global_batch))})
    if rows != list(range(rows[0], rows[-1] + 1)):
        raise ValueError(
            f"this process's batch rows {rows[0]}..{rows[-1]} are not contiguous on the mesh; "
            "order the devices process-major (make_mesh does)"
        )
    return slice(rows[0], rows[-1] + 1)
