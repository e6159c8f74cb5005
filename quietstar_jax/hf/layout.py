"""Hugging Face tensor names and layouts <-> paths and layouts of our params.

Layout of one layer (torch -> ours, `H` hidden, `n` heads, `k` kv heads, `d` head dim,
`I` intermediate): `q_proj.weight [n*d, H] -> q [H, n, d]`, `k_proj`/`v_proj
[k*d, H] -> [H, k, d]`, `o_proj.weight [H, n*d] -> o [n, d, H]`, `gate_proj`/`up_proj
[I, H] -> [H, I]`, `down_proj [H, I] -> [I, H]`, biases `[n*d] -> [n, d]`. The q/k rows
are in Hugging Face's rotate-half order, which is the order `model.apply_rope` uses: no
permutation is needed. Layers are stacked on a leading axis of each param (`layer` of
a `TensorSpec` is the index on it).
"""

from __future__ import annotations

from flax import traverse_util

from quietstar_jax.hf.authors import thought_specs
from quietstar_jax.hf.spec import TensorSpec, same, transpose
from quietstar_jax.model import ModelConfig, param_shapes
from quietstar_jax.thought import thought_param_shapes


def _layer_specs(cfg: ModelConfig, prefix: str, i: int) -> list[TensorSpec]:
    """The tensors of decoder layer `i`, in file order."""
    h, m, d = cfg.hidden_size, cfg.intermediate_size, cfg.dim_per_head
    nh, nkv = cfg.num_heads, cfg.num_kv_heads
    p = f"{prefix}layers.{i}."

    def proj(name: str, heads: int) -> TensorSpec:
        return TensorSpec(
            f"{p}self_attn.{name}_proj.weight", (heads * d, h), ("layers", "attn", name), i,
            lambda w: w.T.reshape(h, heads, d), lambda w: w.reshape(h, heads * d).T)

    def bias(name: str, heads: int) -> TensorSpec:
        return TensorSpec(
            f"{p}self_attn.{name}_proj.bias", (heads * d,), ("layers", "attn", f"{name}_bias"), i,
            lambda b: b.reshape(heads, d), lambda b: b.reshape(heads * d))

    specs = [
        TensorSpec(f"{p}input_layernorm.weight", (h,), ("layers", "attn_norm"), i, same, same),
        proj("q", nh),
        proj("k", nkv),
        proj("v", nkv),
        TensorSpec(f"{p}self_attn.o_proj.weight", (h, nh * d), ("layers", "attn", "o"), i,
                   lambda w: w.T.reshape(nh, d, h), lambda w: w.reshape(nh * d, h).T),
        TensorSpec(f"{p}post_attention_layernorm.weight", (h,), ("layers", "mlp_norm"), i,
                   same, same),
        TensorSpec(f"{p}mlp.gate_proj.weight", (m, h), ("layers", "mlp", "gate"), i,
                   transpose, transpose),
        TensorSpec(f"{p}mlp.up_proj.weight", (m, h), ("layers", "mlp", "up"), i,
                   transpose, transpose),
        TensorSpec(f"{p}mlp.down_proj.weight", (h, m), ("layers", "mlp", "down"), i,
                   transpose, transpose),
    ]
    if cfg.attention_bias:
        specs += [bias("q", nh), bias("k", nkv), bias("v", nkv)]
    return specs


def tensor_specs(cfg: ModelConfig, *, thought: bool = False, prefix: str = "model.") -> list[
        TensorSpec]:
    """Every tensor of a Hugging Face `*ForCausalLM` checkpoint of `cfg`, in file order
    (`lm_head.weight` only when untied; the authors' thought tensors when `thought`).
    `prefix` is "model." for `*ForCausalLM` checkpoints, "" for bare-model ones."""
    h, v = cfg.hidden_size, cfg.vocab_size
    specs = [TensorSpec(f"{prefix}embed_tokens.weight", (v, h), ("embed",), None, same, same)]
    for i in range(cfg.num_layers):
        specs += _layer_specs(cfg, prefix, i)
    specs.append(TensorSpec(f"{prefix}norm.weight", (h,), ("final_norm",), None, same, same))
    if not cfg.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (v, h), ("lm_head",), None,
                                transpose, transpose))
    if thought:
        specs += thought_specs(cfg)
    return specs


def dest_shapes(cfg: ModelConfig, thought: bool) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Our shape of every param, keyed by its path in params."""
    shapes = traverse_util.flatten_dict(param_shapes(cfg))
    if thought:
        shapes |= traverse_util.flatten_dict({"thought": thought_param_shapes(cfg)})
    return shapes


def zero_bias_keys(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the q/k/v biases Hugging Face's Qwen2 always has, which an
    export of a model without biases writes as zeros."""
    d = cfg.dim_per_head
    return [(f"model.layers.{i}.self_attn.{name}_proj.bias", (heads * d,))
            for i in range(cfg.num_layers)
            for name, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads),
                                ("v", cfg.num_kv_heads))]


def is_ignored(key: str) -> bool:
    """Tensors a checkpoint may hold that are not params (rotary inverse frequencies)."""
    return key.endswith("rotary_emb.inv_freq")


def checkpoint_prefix(keys: set[str]) -> str:
    """"model." for `*ForCausalLM` checkpoints, "" for bare-model ones."""
    if "model.embed_tokens.weight" in keys or "embed_tokens.weight" not in keys:
        return "model."
    return ""
