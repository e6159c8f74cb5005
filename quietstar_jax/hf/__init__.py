"""Hugging Face checkpoints <-> this package: configs, safetensors params, tokenizers.

The only module that knows checkpoint file formats. It reads and writes

* `config.json` of Llama, Mistral and Qwen2 causal LMs (transformers 4 and 5 forms),
* `model.safetensors` or a sharded `model.safetensors.index.json` checkpoint, tensor
  by tensor, converting torch `[out, in]` matrices into this package's layout
  (see `quietstar_jax.model.param_shapes`) and stacking layers on a leading axis,
* the authors' Quiet-STaR layout: `start_embedding`, `end_embedding` (`[2, H]`, row
  0 is the stored value) and the mixing head `talk_head.0.{0,2,4}` (torch layout),
  which map to `params["thought"]` (see `quietstar_jax.thoughts`),
* tokenizers, with the two thought tokens `<|startthought|>` and `<|endthought|>`.

Layout of one layer (torch -> ours, `H` hidden, `n` heads, `k` kv heads, `d` head dim,
`I` intermediate): `q_proj.weight [n*d, H] -> q [H, n, d]`, `k_proj`/`v_proj
[k*d, H] -> [H, k, d]`, `o_proj.weight [H, n*d] -> o [n, d, H]`, `gate_proj`/`up_proj
[I, H] -> [H, I]`, `down_proj [H, I] -> [I, H]`, biases `[n*d] -> [n, d]`. The q/k rows
are in Hugging Face's rotate-half order, which is the order `model.apply_rope` uses: no
permutation is needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from quietstar_jax.model import MODEL_TYPES, ModelConfig, Params, param_shapes
from quietstar_jax.thoughts import init_thought_params, thought_param_shapes

START_THOUGHT_TOKEN = "<|startthought|>"
END_THOUGHT_TOKEN = "<|endthought|>"
# Named special tokens under which a tokenizer records its thought tokens.
_THOUGHT_TOKEN_NAMES = {
    "start_thought_token": START_THOUGHT_TOKEN,
    "end_thought_token": END_THOUGHT_TOKEN,
}
THOUGHT_INIT_STRING = "---"

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "spiece.model",
)
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# Thought params in the authors' layout (torch names).
AUTHORS_THOUGHT_KEYS = (
    "start_embedding",
    "end_embedding",
    "talk_head.0.0.weight",
    "talk_head.0.0.bias",
    "talk_head.0.2.weight",
    "talk_head.0.2.bias",
    "talk_head.0.4.weight",
)
_DEFAULT_ROPE_THETA = 10000.0

PathLike = str | os.PathLike
Sharding = jax.sharding.Sharding
# One Sharding for all params, a pytree of them shaped like params, or
# Callable[[path: tuple[str, ...], shape: tuple[int, ...]], Sharding].
ShardingSpec = Any


# --------------------------------------------------------------------------- config


def _first_int(value: Any) -> int | None:
    """An id field that may be an int, a list of ints (the first is used) or null."""
    if isinstance(value, list | tuple):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _rope_theta(c: Mapping[str, Any], source: str) -> float:
    """RoPE base from `rope_parameters` (transformers 5, maybe nested per attention
    type), `rope_scaling` or top-level `rope_theta`; rejects any scaled RoPE."""
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"{source}: rope_parameters must be a dict, got {params!r}")
    nested = [v for v in params.values() if isinstance(v, Mapping)]
    groups = nested or [params]
    thetas = set()
    for group in groups:
        kind = group.get("rope_type", group.get("type", "default"))
        if kind not in (None, "default"):
            raise ValueError(
                f"{source}: RoPE scaling type {kind!r} is not supported (only the default "
                f"unscaled RoPE is); rope parameters: {dict(group)!r}"
            )
        factor = group.get("partial_rotary_factor", c.get("partial_rotary_factor"))
        if factor not in (None, 1, 1.0):
            raise ValueError(f"{source}: partial_rotary_factor={factor} is not supported")
        if group.get("rope_theta") is not None:
            thetas.add(float(group["rope_theta"]))
    if len(thetas) > 1:
        raise ValueError(f"{source}: different rope_theta per attention type is not supported: "
                         f"{sorted(thetas)}")
    if thetas:
        return thetas.pop()
    if c.get("rope_theta") is not None:
        return float(c["rope_theta"])
    return _DEFAULT_ROPE_THETA


def _qwen2_sliding_window(c: Mapping[str, Any], n_layers: int, source: str) -> int | None:
    """Qwen2 slides only with `use_sliding_window`, and only on layers
    `>= max_window_layers` (or as `layer_types` says); we support all or none."""
    window = c.get("sliding_window")
    if not c.get("use_sliding_window", False) or window is None:
        return None
    layer_types = c.get("layer_types")
    if layer_types is None:
        first = int(c.get("max_window_layers", 28))
        layer_types = ["sliding_attention" if i >= first else "full_attention"
                       for i in range(n_layers)]
    sliding = sum(t == "sliding_attention" for t in layer_types)
    if sliding == 0:
        return None
    if sliding != len(layer_types):
        raise ValueError(
            f"{source}: Qwen2 with sliding window on only some layers ({sliding} of "
            f"{len(layer_types)}) is not supported; all layers must share one attention type"
        )
    return int(window)


def _check_mistral_layer_types(c: Mapping[str, Any], source: str) -> None:
    types = set(c.get("layer_types") or [])
    if len(types) > 1:
        raise ValueError(f"{source}: alternating attention layer_types {sorted(types)} are "
                         "not supported")


def model_config_from_hf(
    config_dict: Mapping[str, Any] | PathLike,
    dtype: str = "float32",
    param_dtype: str | None = None,
    *,
    source: str | None = None,
    **overrides: Any,
) -> ModelConfig:
    """A `ModelConfig` from a Hugging Face `config.json` (a dict, a file or a directory).

    Supports model_type llama, mistral, qwen2 with SiLU MLPs and unscaled RoPE.
    `dtype` is the compute dtype, `param_dtype` the storage dtype (default: `dtype`).
    `source` names the file in error messages. `overrides` replace any ModelConfig
    field (e.g. `scan_layers=False`, `remat="full"`).
    """
    if not isinstance(config_dict, Mapping):
        config_dict, source = _read_config(Path(config_dict))
    c = config_dict
    source = source or "config.json"
    mt = c.get("model_type")
    if mt not in MODEL_TYPES:
        raise ValueError(f"{source}: unsupported model_type {mt!r}; supported: {list(MODEL_TYPES)}")
    act = c.get("hidden_act", c.get("hidden_activation", "silu"))
    if act not in ("silu", "swish"):
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (only silu)")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                           "num_hidden_layers", "num_attention_heads") if c.get(k) is None]
    if missing:
        raise ValueError(f"{source}: missing required field(s) {missing}")
    n_layers = int(c["num_hidden_layers"])
    attention_bias = False
    window = None
    if mt == "llama":
        if c.get("attention_bias", False):
            raise ValueError(f"{source}: Llama with attention_bias=True (q/k/v/o biases) is not "
                             "supported")
        if c.get("mlp_bias", False):
            raise ValueError(f"{source}: mlp_bias=True is not supported")
    elif mt == "mistral":
        _check_mistral_layer_types(c, source)
        window = c.get("sliding_window")
    else:  # qwen2
        attention_bias = True
        window = _qwen2_sliding_window(c, n_layers, source)
    fields: dict[str, Any] = dict(
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]),
        num_layers=n_layers,
        num_heads=int(c["num_attention_heads"]),
        num_kv_heads=int(c.get("num_key_value_heads") or c["num_attention_heads"]),
        head_dim=None if c.get("head_dim") is None else int(c["head_dim"]),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(c, source),
        max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        sliding_window=None if window is None else int(window),
        model_type=mt,
        dtype=dtype,
        param_dtype=param_dtype or dtype,
        initializer_range=float(c.get("initializer_range", 0.02)),
        bos_token_id=_first_int(c.get("bos_token_id")),
        eos_token_id=_first_int(c.get("eos_token_id")),
    )
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: {e}") from e


def model_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The Hugging Face `config.json` dict of `cfg` (readable by transformers 4 and 5)."""
    if cfg.attention_bias and cfg.model_type != "qwen2":
        raise ValueError(f"cannot export model_type {cfg.model_type!r} with attention_bias=True "
                         "(Hugging Face Llama/Mistral would add an o_proj bias)")
    if cfg.sliding_window is not None and cfg.model_type == "llama":
        raise ValueError("cannot export a Llama with a sliding window; use model_type mistral")
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "torch_dtype": cfg.param_dtype,
        "dtype": cfg.param_dtype,
        "use_cache": True,
    }
    if cfg.head_dim is not None:
        d["head_dim"] = cfg.head_dim
    if cfg.model_type == "llama":
        d |= {"attention_bias": False, "mlp_bias": False}
    elif cfg.model_type == "mistral":
        d["sliding_window"] = cfg.sliding_window
    else:
        sliding = cfg.sliding_window is not None
        kind = "sliding_attention" if sliding else "full_attention"
        d |= {
            "use_sliding_window": sliding,
            "sliding_window": cfg.sliding_window,
            "max_window_layers": 0 if sliding else cfg.num_layers,
            "layer_types": [kind] * cfg.num_layers,
        }
    return d


def _read_config(path: Path) -> tuple[dict[str, Any], str]:
    """(config dict, file name) of a directory or a config.json path."""
    file = path / CONFIG_NAME if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    if not file.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no {CONFIG_NAME}")
    try:
        return json.loads(file.read_text()), str(file)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON: {e}") from e


# --------------------------------------------------------------------------- tensor specs


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: its torch name and shape, where it lives in params
    (`dest`, with `layer` the index on the stacked axis or None), and the two layout
    conversions (`to_ours(torch_array)`, `to_hf(our_slice)`)."""

    key: str
    hf_shape: tuple[int, ...]
    dest: tuple[str, ...]
    layer: int | None
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def _layer_specs(cfg: ModelConfig, prefix: str, i: int) -> list[TensorSpec]:
    h, m, d = cfg.hidden_size, cfg.intermediate_size, cfg.dim_per_head
    nh, nkv = cfg.num_heads, cfg.num_kv_heads
    p = f"{prefix}layers.{i}."

    def proj(name: str, heads: int) -> TensorSpec:
        return TensorSpec(
            f"{p}self_attn.{name}_proj.weight", (heads * d, h), ("layers", name), i,
            lambda w: w.T.reshape(h, heads, d), lambda w: w.reshape(h, heads * d).T)

    def bias(name: str, heads: int) -> TensorSpec:
        return TensorSpec(
            f"{p}self_attn.{name}_proj.bias", (heads * d,), ("layers", f"{name}_bias"), i,
            lambda b: b.reshape(heads, d), lambda b: b.reshape(heads * d))

    specs = [
        TensorSpec(f"{p}input_layernorm.weight", (h,), ("layers", "attn_norm"), i, _same, _same),
        proj("q", nh),
        proj("k", nkv),
        proj("v", nkv),
        TensorSpec(f"{p}self_attn.o_proj.weight", (h, nh * d), ("layers", "o"), i,
                   lambda w: w.T.reshape(nh, d, h), lambda w: w.reshape(nh * d, h).T),
        TensorSpec(f"{p}post_attention_layernorm.weight", (h,), ("layers", "mlp_norm"), i,
                   _same, _same),
        TensorSpec(f"{p}mlp.gate_proj.weight", (m, h), ("layers", "gate"), i,
                   _transpose, _transpose),
        TensorSpec(f"{p}mlp.up_proj.weight", (m, h), ("layers", "up"), i, _transpose, _transpose),
        TensorSpec(f"{p}mlp.down_proj.weight", (h, m), ("layers", "down"), i,
                   _transpose, _transpose),
    ]
    if cfg.attention_bias:
        specs += [bias("q", nh), bias("k", nkv), bias("v", nkv)]
    return specs


def _thought_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """The authors' layout: `[2, H]` embeddings (row 0 used) and the talk head."""
    h = cfg.hidden_size

    def emb_to_hf(v: np.ndarray) -> np.ndarray:
        return np.stack([v, np.zeros_like(v)])

    def first_row(w: np.ndarray) -> np.ndarray:
        return w[0]

    return [
        TensorSpec("start_embedding", (2, h), ("thought", "start_emb"), None, first_row, emb_to_hf),
        TensorSpec("end_embedding", (2, h), ("thought", "end_emb"), None, first_row, emb_to_hf),
        TensorSpec("talk_head.0.0.weight", (h, 2 * h), ("thought", "mix", "w0"), None,
                   _transpose, _transpose),
        TensorSpec("talk_head.0.0.bias", (h,), ("thought", "mix", "b0"), None, _same, _same),
        TensorSpec("talk_head.0.2.weight", (h, h), ("thought", "mix", "w1"), None,
                   _transpose, _transpose),
        TensorSpec("talk_head.0.2.bias", (h,), ("thought", "mix", "b1"), None, _same, _same),
        TensorSpec("talk_head.0.4.weight", (1, h), ("thought", "mix", "w2"), None,
                   _transpose, _transpose),
    ]


def tensor_specs(cfg: ModelConfig, *, thought: bool = False, prefix: str = "model.") -> list[
        TensorSpec]:
    """Every tensor of a Hugging Face `*ForCausalLM` checkpoint of `cfg`, in file order
    (`lm_head.weight` only when untied; the authors' thought tensors when `thought`)."""
    h, v = cfg.hidden_size, cfg.vocab_size
    specs = [TensorSpec(f"{prefix}embed_tokens.weight", (v, h), ("embed",), None, _same, _same)]
    for i in range(cfg.num_layers):
        specs += _layer_specs(cfg, prefix, i)
    specs.append(TensorSpec(f"{prefix}norm.weight", (h,), ("final_norm",), None, _same, _same))
    if not cfg.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (v, h), ("lm_head",), None,
                                _transpose, _transpose))
    if thought:
        specs += _thought_specs(cfg)
    return specs


def _dest_shapes(cfg: ModelConfig, thought: bool) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Our shape of every param, keyed by its path in params."""
    shapes = dict(_flatten(param_shapes(cfg)))
    if thought:
        shapes |= {("thought",) + k: s for k, s in _flatten(thought_param_shapes(cfg))}
    return shapes


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], Any]]:
    """(path, leaf) pairs of a nested dict."""
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _path_str(path: tuple[str, ...]) -> str:
    return "params" + "".join(f"[{k!r}]" for k in path)


# --------------------------------------------------------------------------- reading


class _Checkpoint:
    """Safetensors files of a checkpoint directory, opened lazily; `where(key)` names
    the file that holds a tensor."""

    def __init__(self, path: Path, stack: contextlib.ExitStack):
        from safetensors import safe_open

        self._open = safe_open
        self._stack = stack
        self._handles: dict[str, Any] = {}
        single, index = path / SAFE_WEIGHTS_NAME, path / SAFE_WEIGHTS_INDEX_NAME
        self.path = path
        if single.is_file():
            self.source = str(single)
            self.key_file = {k: SAFE_WEIGHTS_NAME for k in self._handle(SAFE_WEIGHTS_NAME).keys()}
        elif index.is_file():
            self.source = str(index)
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(
                    f"{index}: not a safetensors index (needs 'weight_map'): {e}") from e
            self.key_file = dict(weight_map)
            for name in sorted(set(self.key_file.values())):
                if not (path / name).is_file():
                    raise FileNotFoundError(f"{index}: shard file {name!r} is missing")
        else:
            others = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt*")]
            hint = f" (found {others}; only safetensors is supported)" if others else ""
            raise FileNotFoundError(
                f"{path}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}{hint}")

    def _handle(self, name: str) -> Any:
        if name not in self._handles:
            file = self.path / name
            try:
                handle = self._open(str(file), framework="numpy")
            except Exception as e:  # noqa: BLE001 - SafetensorError is not importable by name
                raise ValueError(_damaged_file(file, e)) from None
            self._handles[name] = self._stack.enter_context(handle)
        return self._handles[name]

    def where(self, key: str) -> str:
        return str(self.path / self.key_file[key])

    def shape(self, key: str) -> tuple[int, ...]:
        handle = self._handle(self.key_file[key])
        if key not in handle.keys():
            raise KeyError(f"{self.where(key)}: tensor {key!r} listed in the index is not in "
                           "the file")
        return tuple(handle.get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        handle = self._handle(self.key_file[key])
        try:
            return handle.get_tensor(key)
        except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways
            raise ValueError(_damaged_file(Path(self.where(key)), e)) from None


def _damaged_file(file: Path, error: BaseException) -> str:
    """One line: a safetensors file that cannot be read, and why."""
    reason = " ".join(str(error).split()) or type(error).__name__
    return (f"{file}: not a readable safetensors file ({reason}); the file is damaged or "
            "incomplete (an interrupted download or copy?)")


def _is_ignored(key: str) -> bool:
    return key.endswith("rotary_emb.inv_freq")


def _checkpoint_prefix(keys: set[str]) -> str:
    """"model." for `*ForCausalLM` checkpoints, "" for bare-model ones."""
    if "model.embed_tokens.weight" in keys or "embed_tokens.weight" not in keys:
        return "model."
    return ""


def _check_keys(ckpt: _Checkpoint, specs: list[TensorSpec], cfg: ModelConfig) -> None:
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
    unknown = sorted(k for k in present - expected if not _is_ignored(k)
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


def _resolve_sharding(sharding: ShardingSpec, path: tuple[str, ...],
                      shape: tuple[int, ...]) -> Sharding | None:
    """The Sharding of one param: one for all, looked up in a pytree, or asked of a
    callable `(path, shape) -> Sharding`."""
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        return sharding
    if callable(sharding) and not isinstance(sharding, Mapping):
        return sharding(path, shape)
    node: Any = sharding
    for k in path:
        if not isinstance(node, Mapping) or k not in node:
            raise KeyError(f"sharding has no entry for {_path_str(path)}")
        node = node[k]
    return node


def _place(arr: np.ndarray, sharding: Sharding | None) -> jax.Array:
    """A host array on device(s); with a sharding each device gets only its slice."""
    if sharding is None:
        return jax.device_put(arr)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def _has_thought_tensors(ckpt: _Checkpoint) -> bool:
    """Whether the checkpoint holds the authors' thought tensors (all or none)."""
    found = [k for k in AUTHORS_THOUGHT_KEYS if k in ckpt.key_file]
    if found and len(found) != len(AUTHORS_THOUGHT_KEYS):
        missing = [k for k in AUTHORS_THOUGHT_KEYS if k not in ckpt.key_file]
        raise KeyError(f"{ckpt.source}: incomplete Quiet-STaR thought tensors: has {found} but "
                       f"lacks {missing}")
    return bool(found)


def _slot(spec: TensorSpec, file_vocab: int) -> tuple[Any, ...]:
    """Where a converted tensor goes in its param's host array."""
    if spec.dest == ("embed",):
        return (slice(0, file_vocab),)
    if spec.dest == ("lm_head",):
        return (slice(None), slice(0, file_vocab))
    return (...,) if spec.layer is None else (spec.layer,)


def _build_param(ckpt: _Checkpoint, group: list[TensorSpec], shape: tuple[int, ...],
                 dtype: np.dtype, file_vocab: int) -> np.ndarray:
    """One param on the host: its tensors read one at a time, converted to our layout
    and written into a preallocated array; grown vocab rows set to the mean row."""
    arr = np.empty(shape, dtype)
    for s in group:
        arr[_slot(s, file_vocab)] = s.to_ours(ckpt.get(s.key))
    if group[0].dest == ("embed",):
        _grow_rows(arr, file_vocab, axis=0)
    elif group[0].dest == ("lm_head",):
        _grow_rows(arr, file_vocab, axis=1)
    return arr


def has_authors_thought_params(path: PathLike) -> bool:
    """Whether the checkpoint at `path` holds the authors' thought tensors."""
    with contextlib.ExitStack() as stack:
        return _has_thought_tensors(_Checkpoint(Path(path), stack))


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
    callable `(path: tuple[str, ...], shape) -> Sharding`, path e.g. `("layers", "q")`)
    by `jax.make_array_from_callback`, so each device receives only its slice.

    When the file holds the authors' thought tensors, they are loaded too, into
    `params["thought"]`. With `vocab_size` larger than `cfg.vocab_size`, `embed` and
    `lm_head` get extra rows (columns) equal to the mean of the file's ones.
    Raises on a missing, unknown or mis-shaped tensor, naming file, key and shapes.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    np_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    new_vocab = cfg.vocab_size if vocab_size is None else int(vocab_size)
    if new_vocab < cfg.vocab_size:
        raise ValueError(f"vocab_size={new_vocab} is smaller than the checkpoint's "
                         f"{cfg.vocab_size}; shrinking is not supported")
    with contextlib.ExitStack() as stack:
        ckpt = _Checkpoint(path, stack)
        thought = _has_thought_tensors(ckpt)
        specs = tensor_specs(cfg, thought=thought, prefix=_checkpoint_prefix(set(ckpt.key_file)))
        _check_keys(ckpt, specs, cfg)
        shapes = _dest_shapes(cfg.replace(vocab_size=new_vocab), thought)
        by_dest: dict[tuple[str, ...], list[TensorSpec]] = {}
        for s in specs:
            by_dest.setdefault(s.dest, []).append(s)
        params: Params = {}
        for dest, group in by_dest.items():
            arr = _build_param(ckpt, group, shapes[dest], np_dtype, cfg.vocab_size)
            _set(params, dest, _place(arr, _resolve_sharding(sharding, dest, arr.shape)))
            del arr
    return params


# --------------------------------------------------------------------------- vocab


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


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: PathLike) -> Any | None:
    """`transformers.AutoTokenizer` of directory `path`, or None when it holds no
    tokenizer files."""
    path = Path(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _configured_thought_tokens(tokenizer: Any) -> dict[str, str]:
    """Thought tokens a tokenizer names (`start_thought_token`, `end_thought_token`)."""
    found: dict[str, str] = {}
    init = getattr(tokenizer, "init_kwargs", None) or {}
    sources = [
        getattr(tokenizer, "_special_tokens_map", None),
        init,
        init.get("model_specific_special_tokens"),
        init.get("extra_special_tokens"),
    ]
    for name in _THOUGHT_TOKEN_NAMES:
        for src in sources:
            if isinstance(src, Mapping) and src.get(name) is not None:
                found[name] = str(src[name])
                break
    return found


def _token_id(tokenizer: Any, token: str) -> int | None:
    """Id of `token` in the vocabulary (None when it is not a single known token)."""
    vocab = tokenizer.get_vocab()
    return int(vocab[token]) if token in vocab else None


def add_thought_tokens(tokenizer: Any) -> dict[str, int]:
    """Add `<|startthought|>` and `<|endthought|>` as special tokens (in place).

    Tokens already in the vocabulary are reused. A tokenizer that names other
    strings as its thought tokens (`start_thought_token`/`end_thought_token`) is an
    error. Returns `thought_token_ids(tokenizer)`.
    """
    configured = _configured_thought_tokens(tokenizer)
    for name, token in configured.items():
        if token != _THOUGHT_TOKEN_NAMES[name]:
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} already has a different "
                f"thought token configured: {name}={token!r}, expected "
                f"{_THOUGHT_TOKEN_NAMES[name]!r}")
    from tokenizers import AddedToken

    new = [AddedToken(t, rstrip=False, lstrip=False, normalized=False, special=True)
           for t in _THOUGHT_TOKEN_NAMES.values()]
    try:
        tokenizer.add_special_tokens({"extra_special_tokens": new},
                                     replace_extra_special_tokens=False)
    except (TypeError, ValueError):  # transformers 4
        tokenizer.add_special_tokens({"additional_special_tokens": new},
                                     replace_additional_special_tokens=False)
    if hasattr(tokenizer, "_set_model_specific_special_tokens") and not configured:
        tokenizer._set_model_specific_special_tokens(dict(_THOUGHT_TOKEN_NAMES))
    return thought_token_ids(tokenizer)


_add_thought_tokens = add_thought_tokens  # load_pretrained's argument shadows the name


def thought_token_ids(tokenizer: Any) -> dict[str, int]:
    """`{"start_token_id", "end_token_id", "pad_token_id"}` of a tokenizer with thought
    tokens; pad is the tokenizer's pad id, else its eos id (as the authors use)."""
    ids = {}
    for key, token in (("start_token_id", START_THOUGHT_TOKEN),
                       ("end_token_id", END_THOUGHT_TOKEN)):
        tid = _token_id(tokenizer, token)
        if tid is None:
            raise ValueError(f"tokenizer has no {token!r} token; call add_thought_tokens first")
        ids[key] = tid
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an eos token")
    ids["pad_token_id"] = int(pad)
    return ids


def special_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The special tokens of a Hugging Face tokenizer (eos, bos, pad, unk, ...) other
    than the two thought tokens, which thought sampling masks anyway."""
    thought = {START_THOUGHT_TOKEN, END_THOUGHT_TOKEN}
    ids = {int(i) for i, t in zip(tokenizer.all_special_ids, tokenizer.all_special_tokens,
                                  strict=True) if t not in thought}
    ids |= {int(i) for i in (tokenizer.pad_token_id, tokenizer.eos_token_id,
                             tokenizer.bos_token_id) if i is not None}
    return tuple(sorted(ids))


def thought_init_token_id(tokenizer: Any) -> int:
    """The first token id of "---" (no special tokens): the thought embeddings' init row."""
    ids = tokenizer(THOUGHT_INIT_STRING, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"tokenizer encodes {THOUGHT_INIT_STRING!r} as no tokens")
    return int(ids[0])


# --------------------------------------------------------------------------- load_pretrained


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
    initialised by `init_thought_params` from the row of the first token of "---"
    (or of `init_token_id` when there is no tokenizer), divided by `embedding_scale`.
    With `add_thought_tokens=False` the tokenizer and vocab are left alone and no
    thought params are created.
    `sharding`: see `load_params` (it addresses the final, grown params).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"checkpoint path {str(path)!r} is not a directory")
    config_dict, source = _read_config(path)
    overrides.setdefault("remat", "full")
    cfg = model_config_from_hf(config_dict, dtype, param_dtype, source=source, **overrides)
    tokenizer = load_tokenizer(path)
    vocab = cfg.vocab_size
    if tokenizer is not None and add_thought_tokens:
        _add_thought_tokens(tokenizer)
        vocab = max(vocab, len(tokenizer))
    params = load_params(path, cfg, sharding=sharding, vocab_size=vocab)
    cfg = cfg.replace(vocab_size=vocab)
    if "thought" not in params and add_thought_tokens:
        if tokenizer is not None:
            init_token_id = thought_init_token_id(tokenizer)
        elif init_token_id is None:
            raise ValueError(
                f"{path}: no tokenizer files and no Quiet-STaR thought tensors; pass "
                f"init_token_id (the id of the first token of {THOUGHT_INIT_STRING!r}) to "
                "initialise the thought embeddings, or add_thought_tokens=False")
        if not 0 <= init_token_id < cfg.vocab_size:
            raise ValueError(f"init_token_id={init_token_id} is outside the vocab "
                             f"[0, {cfg.vocab_size})")
        rng = jax.random.PRNGKey(0) if rng is None else rng
        thought = init_thought_params(params, cfg, rng, init_token_id, embedding_scale)
        params["thought"] = {}
        for p, leaf in _flatten(thought):
            dest = ("thought",) + p
            _set(params, dest, _place(np.asarray(leaf),
                                      _resolve_sharding(sharding, dest, leaf.shape)))
    return cfg, params, tokenizer


def load_model(path: PathLike, **overrides: Any) -> tuple[Any, Any | None]:
    """(model, tokenizer) of a Hugging Face checkpoint directory, the object form of
    `load_pretrained` (which takes the same arguments): `model` is the `nnx.Module`
    holding the loaded params, a `thoughts.QuietStarLM` (a `model.CausalLM` with its
    thought params) unless `add_thought_tokens=False` left none, and `model(input_ids,
    attention_mask)` gives the logits of `lm_logits`. `model.cfg` is its ModelConfig;
    `quietstar_jax.model.to_params(model)` is the params pytree of `load_pretrained`.
    """
    from quietstar_jax.model import CausalLM, from_params
    from quietstar_jax.thoughts import QuietStarLM

    cfg, params, tokenizer = load_pretrained(path, **overrides)
    return from_params(params, cfg, QuietStarLM if "thought" in params else CausalLM), tokenizer


# --------------------------------------------------------------------------- saving


def _to_host(x: Any) -> np.ndarray:
    """A param as a host numpy array (gathered across processes when needed)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _hf_tensors(params: Params, cfg: ModelConfig, specs: list[TensorSpec]) -> Iterator[
        tuple[str, np.ndarray]]:
    """(torch name, torch-layout array) of every spec, one stacked param on the host at
    a time."""
    cache: tuple[tuple[str, ...], np.ndarray] | None = None
    for s in specs:
        if cache is None or cache[0] != s.dest:
            node: Any = params
            for k in s.dest:
                node = node[k]
            cache = (s.dest, _to_host(node))
        value = cache[1] if s.layer is None else cache[1][s.layer]
        yield s.key, np.ascontiguousarray(s.to_hf(value))


def _zero_bias_specs(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Qwen2 always has q/k/v biases: zeros when our config has none."""
    d = cfg.dim_per_head
    out = []
    for i in range(cfg.num_layers):
        for name, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads), ("v", cfg.num_kv_heads)):
            out.append((f"model.layers.{i}.self_attn.{name}_proj.bias", (heads * d,)))
    return out


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda u: -len(u[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def _check_params(params: Params, cfg: ModelConfig) -> bool:
    """Shape check of params against cfg; returns whether thought params are present."""
    thought = "thought" in params
    expected = _dest_shapes(cfg, thought)
    got = dict(_flatten(params))
    for dest, shape in expected.items():
        if dest not in got:
            raise KeyError(f"params lack {_path_str(dest)} (shape {list(shape)})")
        if tuple(got[dest].shape) != tuple(shape):
            raise ValueError(f"{_path_str(dest)} has shape {list(got[dest].shape)}, expected "
                             f"{list(shape)}")
    extra = sorted(_path_str(k) for k in got if k not in expected)
    if extra:
        raise ValueError(f"params hold entries with no checkpoint name: {extra}")
    return thought


def save_pretrained(
    path: PathLike,
    params: Params,
    cfg: ModelConfig,
    tokenizer: Any | None = None,
    *,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write a Hugging Face checkpoint directory that `transformers.AutoModelForCausalLM`
    loads: `config.json`, `model.safetensors` (or shards and an index when larger than
    `max_shard_size`), and the tokenizer when given. Thought params, when present,
    are written in the authors' layout (`start_embedding`/`end_embedding` `[2, H]`
    with row 1 zero, `talk_head.0.*`), which transformers ignores with a warning.

    Tensors keep their params' dtype. The directory is written under a temporary
    name and renamed into place (an existing one is replaced). With several
    processes every process must call this (params are gathered), process 0 writes.
    Returns the path.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    hf_config = model_config_to_hf(cfg)
    thought = _check_params(params, cfg)
    specs = tensor_specs(cfg, thought=thought)
    qwen2_no_bias = cfg.model_type == "qwen2" and not cfg.attention_bias
    zero_bias = _zero_bias_specs(cfg) if qwen2_no_bias else []
    writer = jax.process_index() == 0
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    if writer:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    try:
        shards = _plan_shards(params, specs, zero_bias, _parse_size(max_shard_size))
        n = len(shards)
        names = ([SAFE_WEIGHTS_NAME] if n == 1 else
                 [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        stream = _hf_tensors(params, cfg, specs)
        dt = np.dtype(params["embed"].dtype)
        zeros = {k: np.zeros(s, dt) for k, s in zero_bias}
        weight_map: dict[str, str] = {}
        for name, keys in zip(names, shards, strict=True):
            tensors = {}
            for key in keys:
                if key in zeros:
                    tensors[key] = zeros[key]
                else:
                    k, value = next(stream)
                    assert k == key, (k, key)
                    tensors[key] = value
                weight_map[key] = name
            if writer:
                save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            del tensors
        if writer:
            if len(shards) > 1:
                total = sum(_nbytes(params, s) for s in specs) + sum(
                    v.nbytes for v in zeros.values())
                (tmp / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(
                    {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
            (tmp / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            _replace_dir(tmp, path)
    finally:
        if writer and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


export_pretrained = save_pretrained


def _nbytes(params: Params, spec: TensorSpec) -> int:
    node: Any = params
    for k in spec.dest:
        node = node[k]
    item = np.dtype(node.dtype).itemsize
    return math.prod(spec.hf_shape) * item


def _plan_shards(params: Params, specs: list[TensorSpec],
                 zero_bias: list[tuple[str, tuple[int, ...]]], limit: int) -> list[list[str]]:
    """Tensor names per shard, in file order, each shard at most `limit` bytes (a
    larger single tensor gets a shard of its own)."""
    item = {s.key: _nbytes(params, s) for s in specs}
    item_size = np.dtype(params["embed"].dtype).itemsize
    item |= {k: math.prod(s) * item_size for k, s in zero_bias}
    order = [s.key for s in specs]
    if zero_bias:  # keep each layer's biases next to its other tensors
        bias_of = {}
        for k, _ in zero_bias:
            bias_of.setdefault(k.rsplit(".self_attn.", 1)[0], []).append(k)
        ordered = []
        for key in order:
            ordered.append(key)
            if key.endswith("mlp.down_proj.weight"):
                ordered += bias_of.get(key.rsplit(".mlp.", 1)[0], [])
        order = ordered
    shards: list[list[str]] = [[]]
    size = 0
    for key in order:
        if shards[-1] and size + item[key] > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += item[key]
    return shards


def _replace_dir(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`, replacing an existing directory `path`."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
