"""Hugging Face `config.json` <-> `ModelConfig`.

Reads the Llama, Mistral and Qwen2 configs of transformers 4 and 5 (RoPE base in
`rope_theta`, `rope_scaling` or `rope_parameters`, maybe nested per attention type;
Qwen2's `use_sliding_window`/`max_window_layers`/`layer_types`), rejecting what the
decoder does not implement (scaled RoPE, partial rotary, per-layer attention types,
Llama biases) with one line naming the file and the field: the support check is
this module's job, so it reads the plain dict rather than a transformers config class.

Writes a dict that both transformers 4 and 5 read (`rope_theta` and
`rope_parameters`, `torch_dtype` and `dtype`). It is written out here, not by
`transformers.AutoConfig.for_model(...).to_dict()`: transformers 5's `to_dict` drops
`rope_theta` and `torch_dtype` (a transformers 4 reader would fall back to
`rope_theta=10000`), and its defaults and extra fields change between versions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quietstar_jax.model import MODEL_TYPES, ModelConfig

CONFIG_NAME = "config.json"
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
_DEFAULT_ROPE_THETA = 10000.0

PathLike = str | os.PathLike


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
    """Mistral with one attention type for all layers only."""
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
        config_dict, source = read_config(Path(config_dict))
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


def read_config(path: Path) -> tuple[dict[str, Any], str]:
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
