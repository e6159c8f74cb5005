"""Params of a safetensors checkpoint, one tensor at a time, onto devices or a mesh.

Each param is built on the host in one preallocated array (layers stacked on axis 0,
grown vocab rows set to the mean row) and goes to the device(s) before the next is
built; with a sharding, `jax.make_array_from_callback` hands each device only its
slice, so a model larger than one device loads onto a mesh.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from quietstar_jax.hf.authors import has_thought_tensors
from quietstar_jax.hf.config import PathLike
from quietstar_jax.hf.layout import checkpoint_prefix, dest_shapes, is_ignored, tensor_specs
from quietstar_jax.hf.safetensors_io import SafetensorsCheckpoint
from quietstar_jax.hf.spec import TensorSpec, path_str
from quietstar_jax.model import ModelConfig, Params

Sharding = jax.sharding.Sharding
# One Sharding for all params, a pytree of them shaped like params, or
# Callable[[path: tuple[str, ...], shape: tuple[int, ...]], Sharding].
ShardingSpec = Sharding | Mapping[str, Any] | Callable[[tuple[str, ...], tuple[int, ...]],
                                                          Sharding] | None


def sharding_resolver(sharding: ShardingSpec) -> Callable[[tuple[str, ...], tuple[int, ...]],
                                                          Sharding | None]:
    """`(path, shape) -> Sharding | None` of a sharding argument: one Sharding for all,
    looked up in a pytree shaped like params (a missing entry is a KeyError naming
    the param), or the callable itself."""
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        return lambda path, shape: sharding
    if callable(sharding) and not isinstance(sharding, Mapping):
        return sharding
    flat = traverse_util.flatten_dict(dict(sharding))

    def lookup(path: tuple[str, ...], shape: tuple[int, ...]) -> Sharding:
        if path not in flat:
            raise KeyError(f"sharding has no entry for {path_str(path)}")
        return flat[path]

    return lookup


def place(arr: np.ndarray, sharding: Sharding | None) -> jax.Array:
    """A host array on device(s); with a sharding each device gets only its slice."""
    if sharding is None:
        return jax.device_put(arr)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def _check_keys(ckpt: SafetensorsCheckpoint, specs: list[TensorSpec], cfg: ModelConfig) -> None:
    """Errors for missing, unknown or mis-shaped tensors."""
    expected = {s.key for s in specs}
    present = set(ckpt.key_file)
    missing = [s.key for s in specs if s.key not in present]
    if missing:
        s = next(s for s in specs if s.key == missing[0])
        more = f" (and {len(missing) - 1} more: {missing[1:4]})" if len(missing) > 1 else ""
        raise KeyError(f"{ckpt.source}: missing tensor {s.key!r} of expected shape "
                       f"{list(s.hf_shape)}{more}")
    tied_head = cfg.tie_word_embeddings and "lm_head.weight" in present
    unknown = sorted(k for k in present - expected if not is_ignored(k)
                     and not (tied_head and k == "lm_head.weight"))
    if unknown:
        raise ValueError(f"{ckpt.source}: unexpected tensor(s) {unknown[:8]}"
                         f"{' ...' if len(unknown) > 8 else ''} for a {cfg.model_type} with "
                         f"{cfg.num_layers} layers (tie_word_embeddings={cfg.tie_word_embeddings},"
                         f" attention_bias={cfg.attention_bias})")
    for s in specs:
        got = ckpt.shape(s.key)
        if got != s.hf_shape:
            raise ValueError(f"{ckpt.where(s.key)}: tensor {s.key!r} has shape {list(got)}, "
                             f"expected {list(s.hf_shape)}")
    if tied_head and ckpt.shape("lm_head.weight") != (cfg.vocab_size, cfg.hidden_size):
        raise ValueError(f"{ckpt.where('lm_head.weight')}: tensor 'lm_head.weight' has shape "
                         f"{list(ckpt.shape('lm_head.weight'))}, expected "
                         f"{[cfg.vocab_size, cfg.hidden_size]}")


def _grow_rows(arr: np.ndarray, n_old: int, axis: int) -> None:
    """Fill entries `n_old:` of `arr` along `axis` with the mean of the first `n_old`."""
    if arr.shape[axis] == n_old:
        return
    old = [slice(None)] * arr.ndim
    old[axis] = slice(0, n_old)  # a view: no copy of the table
    mean = arr[tuple(old)].mean(axis=axis, keepdims=True, dtype=np.float32)
    new = [slice(None)] * arr.ndim
    new[axis] = slice(n_old, None)
    arr[tuple(new)] = mean.astype(arr.dtype)


def _slot(spec: TensorSpec, file_vocab: int) -> tuple[Any, ...]:
    """Where a converted tensor goes in its param's host array."""
    if spec.dest == ("embed",):
        return (slice(0, file_vocab),)
    if spec.dest == ("lm_head",):
        return (slice(None), slice(0, file_vocab))
    return (...,) if spec.layer is None else (spec.layer,)


def nonfinite_message(where: str, what: str, arr: np.ndarray) -> str | None:
    """One line saying that float array `arr` (`what`, in `where`) holds NaN or inf: how
    many and where the first is; None when all its values are finite (or it is not a
    float array). The fast path is one float64 sum, no temporary array."""
    if not jnp.issubdtype(arr.dtype, jnp.floating) or np.isfinite(arr.sum(dtype=np.float64)):
        return None
    bad = ~np.isfinite(arr)
    if not bad.any():  # a finite sum overflowed float64: impossible for stored weights
        return None
    n_nan = int(np.isnan(arr).sum())
    first = [int(i) for i in np.argwhere(bad)[0]]
    return (f"{where}: {what} holds non-finite values ({n_nan} NaN, {int(bad.sum()) - n_nan} "
            f"inf of {arr.size}; the first at {first}); the weights are damaged")


def check_finite_params(params: Params, where: str) -> None:
    """Raise ValueError (one line naming the first param, in flattened order, that holds
    NaN or inf) for params already on devices, e.g. restored from a training
    checkpoint. One jitted reduction over all params; only a bad param is fetched."""
    flat = traverse_util.flatten_dict(params)
    floats = {p: x for p, x in flat.items() if jnp.issubdtype(x.dtype, jnp.floating)}
    finite = jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])(list(floats.values()))
    for (p, x), ok in zip(floats.items(), finite, strict=True):
        if not bool(ok):
            raise ValueError(nonfinite_message(where, path_str(p), np.asarray(x))
                             or f"{where}: {path_str(p)} holds non-finite values")


def _build_param(ckpt: SafetensorsCheckpoint, group: list[TensorSpec], shape: tuple[int, ...],
                 dtype: np.dtype, file_vocab: int) -> np.ndarray:
    """One param on the host: its tensors read one at a time, converted to our layout
    and written into a preallocated array; grown vocab rows set to the mean row."""
    arr = np.empty(shape, dtype)
    for s in group:
        tensor = ckpt.get(s.key)
        bad = nonfinite_message(ckpt.where(s.key), f"tensor {s.key!r}", tensor)
        if bad is not None:
            raise ValueError(bad)
        arr[_slot(s, file_vocab)] = s.to_ours(tensor)
    if group[0].dest == ("embed",):
        _grow_rows(arr, file_vocab, axis=0)
    elif group[0].dest == ("lm_head",):
        _grow_rows(arr, file_vocab, axis=1)
    return arr


def has_authors_thought_params(path: PathLike) -> bool:
    """Whether the checkpoint at `path` holds the authors' thought tensors."""
    with contextlib.ExitStack() as stack:
        ckpt = SafetensorsCheckpoint(Path(path), stack)
        return has_thought_tensors(ckpt.key_file, ckpt.source)


def load_params(
    path: PathLike,
    cfg: ModelConfig,
    dtype: str | None = None,
    sharding: ShardingSpec = None,
    *,
    vocab_size: int | None = None,
) -> Params:
    """Params of the safetensors checkpoint in directory `path`, in our layout.

    Reads `model.safetensors` or the shards of `model.safetensors.index.json`, one
    tensor at a time, into one preallocated host array per param (layers stacked on
    axis 0), cast to `dtype` (default `cfg.param_dtype`). Each finished array goes to
    the device(s) before the next is built: with `sharding` (one
    `jax.sharding.Sharding` for all, a pytree of them shaped like the params, or a
    callable `(path: tuple[str, ...], shape) -> Sharding`, path e.g. `("layers", "attn", "q")`)
    by `jax.make_array_from_callback`, so each device receives only its slice.

    When the file holds the authors' thought tensors, they are loaded too, into
    `params["thought"]`. With `vocab_size` larger than `cfg.vocab_size`, `embed` and
    `lm_head` get extra rows (columns) equal to the mean of the file's ones.
    Raises on a missing, unknown or mis-shaped tensor, naming file, key and shapes,
    and on a tensor that holds NaN or inf, naming file, key and the first such value.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    np_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    new_vocab = cfg.vocab_size if vocab_size is None else int(vocab_size)
    if new_vocab < cfg.vocab_size:
        raise ValueError(f"vocab_size={new_vocab} is smaller than the checkpoint's "
                         f"{cfg.vocab_size}; shrinking is not supported")
    sharding_of = sharding_resolver(sharding)
    with contextlib.ExitStack() as stack:
        ckpt = SafetensorsCheckpoint(path, stack)
        thought = has_thought_tensors(ckpt.key_file, ckpt.source)
        specs = tensor_specs(cfg, thought=thought, prefix=checkpoint_prefix(set(ckpt.key_file)))
        _check_keys(ckpt, specs, cfg)
        shapes = dest_shapes(cfg.replace(vocab_size=new_vocab), thought)
        by_dest: dict[tuple[str, ...], list[TensorSpec]] = {}
        for s in specs:
            by_dest.setdefault(s.dest, []).append(s)
        flat: dict[tuple[str, ...], jax.Array] = {}
        for dest, group in by_dest.items():
            arr = _build_param(ckpt, group, shapes[dest], np_dtype, cfg.vocab_size)
            flat[dest] = place(arr, sharding_of(dest, arr.shape))
            del arr
    return traverse_util.unflatten_dict(flat)


def grow_vocab(params: Params, cfg: ModelConfig, new_vocab_size: int) -> tuple[Params,
                                                                               ModelConfig]:
    """Grow `embed` `[V, H]` (and an untied `lm_head` `[H, V]`) to `new_vocab_size`.

    New rows (columns of `lm_head`) are the mean of the existing ones, as
    transformers' `resize_token_embeddings` (with `mean_resizing`) starts them; a
    tied head grows with the embedding. Returns (new params, cfg with the new size);
    the input is not modified. Shrinking raises.
    """
    v = cfg.vocab_size
    if new_vocab_size < v:
        raise ValueError(f"new_vocab_size={new_vocab_size} < vocab_size={v}; shrinking is not "
                         "supported")
    if new_vocab_size == v:
        return params, cfg
    n = new_vocab_size - v

    def grow(x: jax.Array, axis: int) -> jax.Array:
        mean = jnp.mean(x.astype(jnp.float32), axis=axis, keepdims=True).astype(x.dtype)
        reps = [1] * x.ndim
        reps[axis] = n
        return jnp.concatenate([x, jnp.tile(mean, reps)], axis=axis)

    out = dict(params)
    out["embed"] = grow(params["embed"], 0)
    if not cfg.tie_word_embeddings:
        out["lm_head"] = grow(params["lm_head"], 1)
    return out, cfg.replace(vocab_size=new_vocab_size)
