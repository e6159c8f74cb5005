"""Hugging Face checkpoint directories: `load_pretrained`, `load_model`, `save_pretrained`.

A directory is `config.json` (`hf.config`), safetensors params (`hf.loading`,
`hf.safetensors_io`, in the layout of `hf.layout` and, for the thought params,
`hf.authors`) and tokenizer files (`hf.tokenizer`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from quietstar_jax.hf.config import (
    CONFIG_NAME,
    PathLike,
    model_config_from_hf,
    model_config_to_hf,
    read_config,
)
from quietstar_jax.hf.layout import dest_shapes, tensor_specs, zero_bias_keys
from quietstar_jax.hf.loading import ShardingSpec, load_params, place, sharding_resolver
from quietstar_jax.hf.safetensors_io import write_safetensors
from quietstar_jax.hf.spec import TensorSpec, path_str
from quietstar_jax.hf.tokenizer import (
    THOUGHT_INIT_STRING,
    check_tokenizer_fits,
    load_tokenizer,
    thought_init_token_id,
)
from quietstar_jax.hf.tokenizer import add_thought_tokens as _add_thought_tokens
from quietstar_jax.model import ModelConfig, Params
from quietstar_jax.thought import init_thought_params


def load_pretrained(
    path: PathLike,
    dtype: str = "float32",
    *,
    param_dtype: str | None = None,
    sharding: ShardingSpec = None,
    add_thought_tokens: bool = True,
    rng: jax.Array | None = None,
    init_token_id: int | None = None,
    embedding_scale: float = 100.0,
    init_token: str | None = THOUGHT_INIT_STRING,
    **overrides: Any,
) -> tuple[ModelConfig, Params, Any | None]:
    """(config, params, tokenizer) of a Hugging Face checkpoint directory.

    `dtype` is the compute dtype, `param_dtype` the storage dtype (default `dtype`);
    `overrides` replace ModelConfig fields (e.g. `remat="none"`, `vocab_chunk=4096`).
    The default is `remat="full"`: Quiet-STaR runs ~15 forwards per step, and on a real
    model (SmolLM2-135M, BENCHMARKS.md) full rematerialisation is both the leanest and
    the fastest policy measured; the vocabulary projections are fused and chunked
    (`vocab_chunk` columns at a time) whatever the policy. The tokenizer
    (None when the directory has none) gets the two thought tokens and the vocab
    grows to fit them (new rows = mean row). `params["thought"]` is loaded from the
    authors' layout when the file has it, else (with `add_thought_tokens`)
    initialised by `init_thought_params` from the row of the first token of
    `init_token` (the authors' "---"; `ThoughtConfig.init_token`), or of `init_token_id`
    when there is no tokenizer, divided by `embedding_scale`; `init_token=None` starts
    both embeddings at zero.
    With `add_thought_tokens=False` the tokenizer and vocab are left alone and no
    thought params are created.
    `sharding`: see `load_params` (it addresses the final, grown params).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"checkpoint path {str(path)!r} is not a directory")
    config_dict, source = read_config(path)
    overrides.setdefault("remat", "full")
    cfg = model_config_from_hf(config_dict, dtype, param_dtype, source=source, **overrides)
    tokenizer = load_tokenizer(path)
    vocab = cfg.vocab_size
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, vocab, str(path))
    if tokenizer is not None and add_thought_tokens:
        _add_thought_tokens(tokenizer)
        vocab = max(vocab, len(tokenizer))
    params = load_params(path, cfg, sharding=sharding, vocab_size=vocab)
    cfg = cfg.replace(vocab_size=vocab)
    if "thought" not in params and add_thought_tokens:
        if init_token is None:
            init_token_id = None
        elif tokenizer is not None:
            init_token_id = thought_init_token_id(tokenizer, init_token)
        elif init_token_id is None:
            raise ValueError(
                f"{path}: no tokenizer files and no Quiet-STaR thought tensors; pass "
                f"init_token_id (the id of the first token of {THOUGHT_INIT_STRING!r}) to "
                "initialise the thought embeddings, or add_thought_tokens=False")
        if init_token_id is not None and not 0 <= init_token_id < cfg.vocab_size:
            raise ValueError(f"init_token_id={init_token_id} is outside the vocab "
                             f"[0, {cfg.vocab_size})")
        rng = jax.random.PRNGKey(0) if rng is None else rng
        thought = init_thought_params(params, cfg, rng, init_token_id, embedding_scale)
        sharding_of = sharding_resolver(sharding)
        params["thought"] = traverse_util.unflatten_dict({
            p: place(np.asarray(leaf), sharding_of(("thought",) + p, leaf.shape))
            for p, leaf in traverse_util.flatten_dict(thought).items()})
    return cfg, params, tokenizer


def load_model(path: PathLike, **overrides: Any) -> tuple[Any, Any | None]:
    """(model, tokenizer) of a Hugging Face checkpoint directory, the object form of
    `load_pretrained` (which takes the same arguments): `model` is the `nnx.Module`
    holding the loaded params, a `thought.QuietStarLM` (a `model.CausalLM` with its
    thought params) unless `add_thought_tokens=False` left none, and `model(input_ids,
    attention_mask)` gives the logits of `lm_logits`. `model.cfg` is its ModelConfig;
    `quietstar_jax.model.to_params(model)` is the params pytree of `load_pretrained`.
    """
    from quietstar_jax.thought import merge_lm

    cfg, params, tokenizer = load_pretrained(path, **overrides)
    return merge_lm(params, cfg), tokenizer


# --------------------------------------------------------------------------- saving


def _to_host(x: Any) -> np.ndarray:
    """A param as a host numpy array (gathered across processes when needed)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _check_params(flat: dict[tuple[str, ...], Any], cfg: ModelConfig) -> bool:
    """Shape check of the flattened params against cfg; returns whether thought params
    are present."""
    thought = any(p[0] == "thought" for p in flat)
    expected = dest_shapes(cfg, thought)
    for dest, shape in expected.items():
        if dest not in flat:
            raise KeyError(f"params lack {path_str(dest)} (shape {list(shape)})")
        if tuple(flat[dest].shape) != tuple(shape):
            raise ValueError(f"{path_str(dest)} has shape {list(flat[dest].shape)}, expected "
                             f"{list(shape)}")
    extra = sorted(path_str(k) for k in flat if k not in expected)
    if extra:
        raise ValueError(f"params hold entries with no checkpoint name: {extra}")
    return thought


def _file_order(specs: list[TensorSpec], zero_bias: list[tuple[str, tuple[int, ...]]]) -> list[
        str]:
    """Tensor names in file order: the specs', each layer's zero biases after its
    other tensors."""
    order = [s.key for s in specs]
    if not zero_bias:
        return order
    bias_of: dict[str, list[str]] = {}
    for k, _ in zero_bias:
        bias_of.setdefault(k.rsplit(".self_attn.", 1)[0], []).append(k)
    ordered = []
    for key in order:
        ordered.append(key)
        if key.endswith("mlp.down_proj.weight"):
            ordered += bias_of.get(key.rsplit(".mlp.", 1)[0], [])
    return ordered


EXPORT_MANIFEST = ".quietstar-export.json"  # the files an export wrote, for the next one


def check_export_target(path: PathLike, overwrite: bool = False,
                        flag: str = "overwrite=True") -> None:
    """Raise FileExistsError (one line) when `save_pretrained` must not write to `path`:
    a file, or a directory that is not empty unless `overwrite` (`flag` names how the
    caller says so). An existing export is not empty either: replacing it needs
    `overwrite` too."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"export directory {str(path)!r} exists and is not a directory")
    if overwrite or not path.is_dir():
        return
    entries = sorted(p.name for p in path.iterdir())
    if entries:
        shown = ", ".join(repr(e) for e in entries[:3]) + (" ..." if len(entries) > 3 else "")
        count = f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"
        raise FileExistsError(
            f"export directory {str(path)!r} is not empty ({count}: {shown}); "
            f"choose a new or empty directory, or set {flag} to replace the checkpoint files "
            "in it (other files are kept)")


def _written_before(path: Path) -> set[str]:
    """The file names an earlier export recorded in `path` (none when no manifest)."""
    try:
        names = json.loads((path / EXPORT_MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {n for n in names if isinstance(n, str) and n == Path(n).name}


def _move_into(tmp: Path, path: Path) -> None:
    """Move the finished export `tmp` to `path`. A missing or empty `path` becomes `tmp`
    (one rename); into an existing directory each file is renamed over its namesake,
    then the files the previous export wrote (its manifest) and this one did not (e.g.
    shards of another size) are removed. Nothing else in `path` is touched."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
        return
    written = {p.name for p in tmp.iterdir()}
    stale = _written_before(path) - written
    for name in sorted(written):  # before anything moves
        target = path / name
        if target.is_dir() and not target.is_symlink():
            raise FileExistsError(f"{target} is a directory; the export would write a file "
                                  "of that name")
    for name in sorted(written - {EXPORT_MANIFEST}) + [EXPORT_MANIFEST]:
        os.replace(tmp / name, path / name)
    for name in stale:
        target = path / name
        if target.is_file() or target.is_symlink():
            target.unlink()


def save_pretrained(
    path: PathLike,
    params: Params,
    cfg: ModelConfig,
    tokenizer: Any | None = None,
    *,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write a Hugging Face checkpoint directory that `transformers.AutoModelForCausalLM`
    loads: `config.json`, `model.safetensors` (or shards and an index when larger than
    `max_shard_size`, bytes or a string such as "5GB"/"200KB"), and the tokenizer when
    given. Thought params, when present, are written in the authors' layout
    (`start_embedding`/`end_embedding` `[2, H]` with row 1 zero, `talk_head.0.*`),
    which transformers ignores with a warning.

    Tensors keep their params' dtype. `path` must not exist or be an empty directory;
    a non-empty one (an earlier export included) is refused with FileExistsError
    before anything is written, unless `overwrite`: then the files of this export
    replace their namesakes, the files the previous export wrote and this one does not
    are removed (`EXPORT_MANIFEST` lists them), and every other file is kept. The
    export is written under a temporary name beside `path` and moved into place when
    complete, so an interrupted export leaves `path` as it was. With several processes
    every process must call this (params are gathered), process 0 writes. Returns the
    path.
    """
    path = Path(path)
    check_export_target(path, overwrite)
    hf_config = model_config_to_hf(cfg)
    flat = traverse_util.flatten_dict(params)
    thought = _check_params(flat, cfg)
    specs = {s.key: s for s in tensor_specs(cfg, thought=thought)}
    dt = np.dtype(params["embed"].dtype)
    qwen2_no_bias = cfg.model_type == "qwen2" and not cfg.attention_bias
    zero_bias = zero_bias_keys(cfg) if qwen2_no_bias else []
    zeros = dict(zero_bias)

    def nbytes(key: str) -> int:
        if key in zeros:
            return math.prod(zeros[key]) * dt.itemsize
        s = specs[key]
        return math.prod(s.hf_shape) * np.dtype(flat[s.dest].dtype).itemsize

    sizes = {k: nbytes(k) for k in _file_order(list(specs.values()), zero_bias)}
    cache: dict[tuple[str, ...], np.ndarray] = {}

    def tensor(key: str) -> np.ndarray:
        """The torch-layout array of `key`, one stacked param on the host at a time."""
        if key in zeros:
            return np.zeros(zeros[key], dt)
        s = specs[key]
        if s.dest not in cache:
            cache.clear()
            cache[s.dest] = _to_host(flat[s.dest])
        value = cache[s.dest] if s.layer is None else cache[s.dest][s.layer]
        return np.ascontiguousarray(s.to_hf(value))

    writer = jax.process_index() == 0
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    if writer:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    try:
        write_safetensors(tmp, sizes, tensor, max_shard_size=max_shard_size, write=writer)
        cache.clear()
        if writer:
            (tmp / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            files = sorted(p.name for p in tmp.iterdir()) + [EXPORT_MANIFEST]
            (tmp / EXPORT_MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n",
                                               encoding="utf-8")
            _move_into(tmp, path)
    finally:
        if writer and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
