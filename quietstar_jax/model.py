"""The Llama-family causal decoder (Llama, Mistral, Qwen2) as pure functions.

Params are a plain pytree of arrays (see `init_params` and `param_logical_axes`).
Layers are stacked on a leading `layers` axis so they can be scanned.

Attention is written for Quiet-STaR's needs: besides ordinary causal
self-attention, a forward can attend to

* a *context* block of cached keys/values shared by all queries of a row
  (`[batch, ctx, kv_heads, head_dim]`, e.g. the base sequence's cache), with a
  mask `[batch, q, ctx]`, and
* an *own* block of keys/values private to each query position
  (`[batch, q, slots, kv_heads, head_dim]`, e.g. that position's earlier thought
  tokens), with a mask `[batch, q, slots]`; the query's own new key is always
  appended to it.

Both blocks enter one softmax. This module knows nothing of thoughts or losses.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from quietstar_jax.sharding import constrain
from quietstar_jax.vocab import zeros_after

Params = dict[str, Any]

MODEL_TYPES = ("llama", "mistral", "qwen2")
# Rematerialisation of each layer in the backward pass: nothing saved but the layer
# input ("full"), every matmul output ("dots"), the MLP's gate/up projections only
# ("mlp": the largest matmuls are not recomputed, attention is), or everything ("none").
REMAT_POLICIES = ("none", "full", "dots", "mlp")
_NEG_INF = -1e30
# Logical axes of activations (see sharding.constrain; no-ops without an active mesh).
HIDDEN_AXES = ("batch", "seq", "act_embed")
KV_AXES = ("batch", "seq", "kv_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a Llama-family decoder.

    `dtype` is the compute dtype; `param_dtype` the storage dtype of params.
    `sliding_window=None` means full causal attention.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    sliding_window: int | None = None  # Mistral
    model_type: str = "llama"
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"  # none | full | dots (save matmul outputs) | mlp (save gate/up)
    # Attention of the plain causal pass: "xla" (this module's `attend`) or "cudnn"
    # (jax.nn.dot_product_attention's cuDNN flash kernel, GPU only; right-padded or
    # unpadded batches only, see `forward`). Thought steps always use `attend`.
    attention: str = "xla"
    # Vocabulary columns per step of the fused, chunked output projections (vocab.py):
    # the largest `[tokens, chunk]` logits slab alive; any size works (the last chunk
    # is shifted back). Smaller saves memory, larger amortises the scan.
    vocab_chunk: int = 8192
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; expected one of {MODEL_TYPES}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"ModelConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}; set head_dim explicitly"
            )
        if self.attention not in ("xla", "cudnn"):
            raise ValueError(
                f"ModelConfig.attention must be 'xla' or 'cudnn', got {self.attention!r}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"ModelConfig.remat must be one of {'|'.join(REMAT_POLICIES)}, got {self.remat!r}"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(
                    f"ModelConfig.{name} must be float32|bfloat16|float16, "
                    f"got {getattr(self, name)!r}"
                )
        if self.vocab_chunk < 1:
            raise ValueError(f"ModelConfig.vocab_chunk must be >= 1, got {self.vocab_chunk}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"ModelConfig.sliding_window must be >= 1, got {self.sliding_window}")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)


class KV(NamedTuple):
    """Per-layer keys and values: each `[layers, batch, seq, kv_heads, head_dim]`."""

    k: jax.Array
    v: jax.Array


class LayerTrace(NamedTuple):
    """What a forward kept for `replay_layers`: every layer's input `[layers, batch, t,
    hidden]` and the last layer's output `[batch, t, hidden]` (before the final norm)."""

    inputs: jax.Array
    last: jax.Array


# --------------------------------------------------------------------------- params


# Logical axes of one layer's params (the stacked params add a leading "layers").
LAYER_AXES: dict[str, tuple[str, ...]] = {
    "attn_norm": ("norm",),
    "q": ("embed", "heads", "head_dim"),
    "k": ("embed", "kv_heads", "head_dim"),
    "v": ("embed", "kv_heads", "head_dim"),
    "o": ("heads", "head_dim", "embed"),
    "mlp_norm": ("norm",),
    "gate": ("embed", "mlp"),
    "up": ("embed", "mlp"),
    "down": ("mlp", "embed"),
}
LAYER_BIAS_AXES: dict[str, tuple[str, ...]] = {
    "q_bias": ("heads", "head_dim"),
    "k_bias": ("kv_heads", "head_dim"),
    "v_bias": ("kv_heads", "head_dim"),
}


def param_logical_axes(cfg: ModelConfig) -> Params:
    """Logical axis names of every parameter, a pytree shaped like `init_params`."""
    layer = {name: ("layers", *a) for name, a in LAYER_AXES.items()}
    if cfg.attention_bias:
        layer |= {name: ("layers", *a) for name, a in LAYER_BIAS_AXES.items()}
    axes: Params = {"embed": ("vocab", "embed"), "layers": layer, "final_norm": ("norm",)}
    if not cfg.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shapes(cfg: ModelConfig) -> Params:
    """Shape of every parameter, a pytree shaped like `init_params`."""
    n, h, d = cfg.num_layers, cfg.hidden_size, cfg.dim_per_head
    nh, nkv, m = cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    layer = {
        "attn_norm": (n, h),
        "q": (n, h, nh, d),
        "k": (n, h, nkv, d),
        "v": (n, h, nkv, d),
        "o": (n, nh, d, h),
        "mlp_norm": (n, h),
        "gate": (n, h, m),
        "up": (n, h, m),
        "down": (n, m, h),
    }
    if cfg.attention_bias:
        layer |= {"q_bias": (n, nh, d), "k_bias": (n, nkv, d), "v_bias": (n, nkv, d)}
    shapes: Params = {"embed": (cfg.vocab_size, h), "layers": layer, "final_norm": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (h, cfg.vocab_size)
    return shapes


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Random params: normal(0, initializer_range) matrices, ones for norms, zero biases."""
    shapes = param_shapes(cfg)
    is_shape = lambda x: isinstance(x, tuple)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=is_shape)
    with_path = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_shape)[0]
    paths = [jax.tree_util.keystr(p) for p, _ in with_path]
    keys = jax.random.split(rng, len(leaves))
    dtype = jnp.dtype(cfg.param_dtype)
    out = []
    for path, shape, key in zip(paths, leaves, keys, strict=True):
        if "norm" in path:
            out.append(jnp.ones(shape, dtype))
        elif "bias" in path:
            out.append(jnp.zeros(shape, dtype))
        else:
            out.append((cfg.initializer_range * jax.random.normal(key, shape)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


def output_matrix(params: Params, cfg: ModelConfig) -> jax.Array:
    """The `[hidden, vocab]` output projection (the embedding table when tied)."""
    return params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]


# --------------------------------------------------------------------------- pieces


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32, returned in x's dtype (HF Llama semantics)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * xf).astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Rotary tables for `positions` `[...]`: (cos, signed sin), each float32 `[..., 1, head_dim]`.

    The sin table carries rotate-half's sign (-sin on the first half), so that
    `apply_rope` is `x * cos + swap_halves(x) * sin`. Computed once per forward and
    shared by all layers: no sin/cos inside the layers nor in their backward pass.
    """
    d = head_dim
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., d/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    return (jnp.concatenate([cos, cos], axis=-1)[..., None, :],
            jnp.concatenate([-sin, sin], axis=-1)[..., None, :])


def apply_rope(x: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotary embedding (Hugging Face rotate-half layout) of `x` `[..., heads, head_dim]`
    with `rope_tables` of its leading dims."""
    cos, sin = tables
    d = x.shape[-1]
    xf = x.astype(jnp.float32)
    swapped = jnp.concatenate([xf[..., d // 2 :], xf[..., : d // 2]], axis=-1)
    return (xf * cos + swapped * sin).astype(x.dtype)


def causal_mask(
    positions: jax.Array, key_valid: jax.Array, sliding_window: int | None
) -> jax.Array:
    """Self-attention mask of a sequence: `[batch, seq, seq]` bool.

    Query t sees key j iff j <= t (by index), key j is valid, and, with a sliding
    window W, positions[t] - positions[j] < W.
    """
    n = positions.shape[-1]
    idx = jnp.arange(n)
    mask = (idx[None, :] <= idx[:, None])[None] & key_valid[:, None, :]
    if sliding_window is not None:
        dist = positions[:, :, None] - positions[:, None, :]
        mask = mask & (dist < sliding_window)
    return mask


def attend(
    q: jax.Array,
    ctx: tuple[jax.Array, jax.Array, jax.Array] | None,
    own: tuple[Sequence[jax.Array], Sequence[jax.Array], jax.Array] | None,
) -> jax.Array:
    """Softmax attention over a shared context block and a per-query own block.

    q: `[batch, q, heads, head_dim]` (already rotated, unscaled).
    ctx: (k, v `[batch, ctx, kv_heads, head_dim]`, mask `[batch, q, ctx]`) or None.
    own: (ks, vs: sequences of `slots` arrays `[batch, t, kv_heads, head_dim]`, one key
      per position per slot, and a mask) or None. With mask `[batch, t, slots]`, t = q:
      one query per position. With mask `[batch, t, group, slots]`, q = group * t
      (group-major): the `group` queries i, t + i, 2t + i, ... share position i's slots,
      each with its own mask row (a block of thought steps, causal among themselves).
    Returns `[batch, q, heads, head_dim]` in q's dtype. Scores and softmax in float32.

    The context block is two matmuls batched over (batch, kv_heads) with the query
    rows flattened to `q * group`: every contraction (forward and backward) is over a
    single dimension, which keeps XLA from transposing score-sized arrays. The own
    block is two small matmuls batched over (batch, position, kv_heads) on the stacked
    slots `[batch, t, kv_heads, slots, head_dim]`, with a position's `group * g` query
    rows side by side. Both share one softmax.
    """
    b, t, nh, d = q.shape
    nkv = ctx[0].shape[-2] if ctx is not None else own[0][0].shape[-2]
    g = nh // nkv
    qg = q.reshape(b, t, nkv, g, d) * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    # Own-block layout: the queries sharing a position's slots side by side,
    # [b, t // group, k, group * g]; `to_own` / `from_own` convert row statistics.
    group = 1 if own is None or own[2].ndim == 3 else own[2].shape[2]
    tp = t // group
    if group == 1:
        to_own = from_own = lambda x: x
    else:
        def to_own(x):  # [b, t, k, g, ...] -> [b, tp, k, group * g, ...]
            y = x.reshape(b, group, tp, *x.shape[2:])
            y = jnp.moveaxis(y, 1, 3)
            return y.reshape(b, tp, nkv, group * g, *x.shape[4:])

        def from_own(x):  # the inverse
            y = x.reshape(b, tp, nkv, group, g, *x.shape[4:])
            return jnp.moveaxis(y, 3, 1).reshape(b, t, nkv, g, *x.shape[4:])
    # Row statistics (max, normaliser) are kept as [b, t, k, g]; the context block's
    # rows are [b, k, t * g].
    to_btkg = lambda x: x.reshape(b, nkv, t, g).transpose(0, 2, 1, 3)
    to_bkr = lambda x: x.transpose(0, 2, 1, 3).reshape(b, nkv, t * g)
    tops = []
    if ctx is not None:
        k_c, v_c, m = ctx
        n = k_c.shape[1]
        m_c = jnp.broadcast_to(m[:, None, :, None, :], (b, 1, t, g, n)).reshape(b, 1, t * g, n)
        q_c = qg.transpose(0, 2, 1, 3, 4).reshape(b, nkv, t * g, d)
        sc_c = jnp.einsum("bkrd,bskd->bkrs", q_c, k_c, preferred_element_type=jnp.float32)
        sc_c = jnp.where(m_c, sc_c, _NEG_INF)
        tops.append(to_btkg(sc_c.max(axis=-1)))
    if own is not None:
        ks, vs, m = own
        if group == 1:
            m_o = m.reshape(b, t, 1, 1, m.shape[-1])  # [b, t, 1, 1, slots]
        else:
            m_o = jnp.broadcast_to(m[:, :, None, :, None, :], (b, tp, 1, group, g, m.shape[-1]))
            m_o = m_o.reshape(b, tp, 1, group * g, m.shape[-1])
        k_o = jnp.stack(ks, axis=3)  # [b, tp, k, slots, d]
        sc_o = jnp.einsum("btkgd,btksd->btkgs", to_own(qg), k_o,
                          preferred_element_type=jnp.float32)
        sc_o = jnp.where(m_o, sc_o, _NEG_INF)  # [b, tp, k, group * g, slots]
        tops.append(from_own(sc_o.max(axis=-1)))
    top = tops[0]
    for x in tops[1:]:
        top = jnp.maximum(top, x)
    top = jax.lax.stop_gradient(top)  # [b, t, k, g]
    # Masked keys get exactly 0; a query with no visible key (a fully padded row) gets
    # all-zero weights instead of NaN.
    denom = jnp.zeros_like(top)
    if ctx is not None:
        e_c = jnp.where(m_c, jnp.exp(sc_c - to_bkr(top)[..., None]), 0.0)
        denom = denom + to_btkg(e_c.sum(axis=-1))
    if own is not None:
        e_o = jnp.where(m_o, jnp.exp(sc_o - to_own(top)[..., None]), 0.0)
        denom = denom + from_own(e_o.sum(axis=-1))
    inv = 1.0 / jnp.maximum(denom, 1e-30)  # [b, t, k, g]
    out = jnp.zeros((b, t, nkv, g, d), jnp.float32)
    if ctx is not None:
        p_c = (e_c * to_bkr(inv)[..., None]).astype(q.dtype)
        o_c = jnp.einsum("bkrs,bskd->bkrd", p_c, v_c, preferred_element_type=jnp.float32)
        out = out + o_c.reshape(b, nkv, t, g, d).transpose(0, 2, 1, 3, 4)
    if own is not None:
        v_o = jnp.stack(own[1], axis=3)  # [b, tp, k, slots, d]
        p_o = (e_o * to_own(inv)[..., None]).astype(q.dtype)  # [b, tp, k, group * g, slots]
        out = out + from_own(jnp.einsum("btkgs,btksd->btkgd", p_o, v_o,
                                        preferred_element_type=jnp.float32))
    return out.reshape(b, t, nh, d).astype(q.dtype)


class FusedCausal(NamedTuple):
    """Causal self-attention by `jax.nn.dot_product_attention` instead of a mask:
    key_lengths `[batch]` int32, the number of real tokens at the start of each row."""

    key_lengths: jax.Array


# The kernel FusedCausal uses; tests swap in "xla" to check the call on CPU.
FUSED_IMPLEMENTATION = "cudnn"


def fused_causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, key_lengths: jax.Array,
    sliding_window: int | None,
) -> jax.Array:
    """Causal attention of right-padded rows with the platform's fused kernel.

    q `[batch, t, heads, head_dim]`, k/v `[batch, t, kv_heads, head_dim]`, key_lengths
    `[batch]`. Query i sees keys j <= i with j < key_lengths (and i - j < window).
    """
    window = None if sliding_window is None else (sliding_window - 1, 0)
    # At least one key per row: an all-padding row then attends to its first (padding)
    # key instead of to nothing (no NaN); its outputs are never used.
    lengths = jnp.maximum(key_lengths, 1).astype(jnp.int32)
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, key_value_seq_lengths=lengths, local_window_size=window,
        implementation=FUSED_IMPLEMENTATION,
    )


def dense(x: jax.Array, w: jax.Array, n_in: int = 1, **kw: Any) -> jax.Array:
    """Contract x's last `n_in` dims with w's first `n_in` dims, as one 2-D matmul.

    x: `[..., *in]`, w: `[*in, *out]` -> `[..., *out]`. Flattening the token dims first
    gives the backward pass single-dimension contractions: with `[batch, t, ...]` kept
    3-D, XLA's CPU backend transposed the activations for every weight gradient.
    """
    lead, ins = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in :]
    outs = w.shape[n_in:]
    y = jnp.dot(x.reshape(-1, math.prod(ins)), w.reshape(math.prod(ins), -1), **kw)
    return y.reshape(*lead, *outs)


# --------------------------------------------------------------------------- decoder


def _weight(lp: Params, name: str, cfg: ModelConfig) -> jax.Array:
    """Layer weight `name` in the compute dtype, pinned to the param's own sharding, so
    that under FSDP the all-gather for the matmul moves compute-dtype (e.g. bfloat16)
    bytes rather than float32 master weights."""
    return constrain(lp[name].astype(cfg.compute_dtype), LAYER_AXES[name])


def _layer(
    lp: Params,
    cfg: ModelConfig,
    h: jax.Array,
    rope_tabs: tuple[jax.Array, jax.Array],
    self_mask: jax.Array | FusedCausal | None,
    ctx: tuple[jax.Array, jax.Array, jax.Array] | None,
    own: tuple[Sequence[jax.Array], Sequence[jax.Array], jax.Array] | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decoder layer. h: `[batch, t, hidden]`.

    With `ctx is None` and `own is None`: causal self-attention under `self_mask`.
    Otherwise the queries attend to `ctx`, to the `own` slots and to their own new
    key, which is appended as the last own slot (its mask is own's last column). With
    a grouped own mask `[batch, t // group, group, slots + group]` (see `attend`), the
    `group` new keys of a position are appended as its last `group` slots.
    Returns (h_out, k_new, v_new), k/v `[batch, t, kv_heads, head_dim]`.
    """
    dt = cfg.compute_dtype
    x = rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps)
    q = dense(x, _weight(lp, "q", cfg))
    k = dense(x, _weight(lp, "k", cfg))
    v = dense(x, _weight(lp, "v", cfg))
    if cfg.attention_bias:
        q = q + lp["q_bias"].astype(dt)
        k = k + lp["k_bias"].astype(dt)
        v = v + lp["v_bias"].astype(dt)
    q = constrain(apply_rope(q, rope_tabs), ("batch", "seq", "heads", "head_dim"))
    k = constrain(apply_rope(k, rope_tabs), KV_AXES)
    v = constrain(v, KV_AXES)
    if isinstance(self_mask, FusedCausal):
        a = fused_causal_attention(q, k, v, self_mask.key_lengths, cfg.sliding_window)
    elif ctx is None and own is None:
        a = attend(q, (k, v, self_mask), None)
    else:
        if ctx is not None:
            ctx = (ctx[0].astype(dt), ctx[1].astype(dt), ctx[2])
        ks, vs, om = own
        if om.ndim == 3:
            new_k, new_v = [k], [v]
        else:  # a block of `group` queries per position, group-major
            grp = om.shape[2]
            kb = k.reshape(k.shape[0], grp, -1, *k.shape[2:])
            vb = v.reshape(v.shape[0], grp, -1, *v.shape[2:])
            new_k, new_v = [kb[:, i] for i in range(grp)], [vb[:, i] for i in range(grp)]
        own = ([*(x.astype(dt) for x in ks), *new_k], [*(x.astype(dt) for x in vs), *new_v], om)
        a = attend(q, ctx, own)
    h = h + dense(a, _weight(lp, "o", cfg), 2)
    x = rms_norm(h, lp["mlp_norm"], cfg.rms_norm_eps)
    g = checkpoint_name(dense(x, _weight(lp, "gate", cfg)), "mlp_gate")
    u = checkpoint_name(dense(x, _weight(lp, "up", cfg)), "mlp_up")
    g, u = constrain(g, ("batch", "seq", "mlp")), constrain(u, ("batch", "seq", "mlp"))
    h = h + dense(jax.nn.silu(g) * u, _weight(lp, "down", cfg))
    return h, k, v


def _remat(fn: Any, cfg: ModelConfig) -> Any:
    if cfg.remat == "full":
        return jax.checkpoint(fn)
    if cfg.remat == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    if cfg.remat == "mlp":
        return jax.checkpoint(
            fn, policy=jax.checkpoint_policies.save_only_these_names("mlp_gate", "mlp_up"))
    return fn


def decoder(
    params: Params,
    cfg: ModelConfig,
    h: jax.Array,
    positions: jax.Array,
    *,
    self_mask: jax.Array | FusedCausal | None = None,
    ctx: tuple[KV, jax.Array] | None = None,
    own: tuple[Sequence[KV], jax.Array] | None = None,
    trace: bool = False,
) -> tuple[jax.Array, KV] | tuple[jax.Array, KV, LayerTrace]:
    """Run all layers and the final norm.

    h: input embeddings `[batch, t, hidden]`; positions `[batch, t]` int.
    self_mask: `[batch, t, t]` for plain causal self-attention (ctx and own None), or
      a `FusedCausal` for the platform's fused causal kernel.
    ctx: (KV `[layers, batch, ctx, kv_heads, head_dim]`, mask `[batch, t, ctx]`): cached
      keys/values every query of a row may see (e.g. the base sequence).
    own: (a sequence of `slots` KVs `[layers, batch, t, kv_heads, head_dim]`, mask
      `[batch, t, slots + 1]`): keys private to each query position (its earlier thought
      tokens); the last mask column is the query's own new key. With ctx given and own
      None, each query sees the context and itself. A block of `group` steps per
      position runs as one call: h `[batch, group * p, hidden]` (group-major), the slots
      `[layers, batch, p, kv_heads, head_dim]`, mask `[batch, p, group, slots + group]`
      (the block's own new keys are the last `group` columns).
    Returns (final hidden `[batch, t, hidden]` after the final norm, the new tokens'
    KV `[layers, batch, t, kv_heads, head_dim]`), and with `trace` also a `LayerTrace`
    (every layer's input and the last layer's output: what `replay_layers` needs).
    """
    h = constrain(h.astype(cfg.compute_dtype), HIDDEN_AXES)
    ctx_mask = ctx[1] if ctx is not None else None
    if ctx is not None and own is None:
        own = ((), jnp.ones(h.shape[:2] + (1,), bool))
    own_mask = own[1] if own is not None else None
    rope_tabs = rope_tables(positions, cfg.dim_per_head, cfg.rope_theta)

    def body(h, xs):
        lp, ck, cv, oks, ovs = xs
        c = (ck, cv, ctx_mask) if ctx is not None else None
        o = (oks, ovs, own_mask) if own is not None else None
        h_in = h
        h, k, v = _layer(lp, cfg, h, rope_tabs, self_mask, c, o)
        return constrain(h, HIDDEN_AXES), (k, v, h_in if trace else None)

    body = _remat(body, cfg)
    xs = (
        params["layers"],
        ctx[0].k if ctx is not None else None,
        ctx[0].v if ctx is not None else None,
        [kv.k for kv in own[0]] if own is not None else None,
        [kv.v for kv in own[0]] if own is not None else None,
    )
    if cfg.scan_layers:
        h, (ks, vs, ins) = jax.lax.scan(body, h, xs)
    else:
        per_layer = []
        for i in range(cfg.num_layers):
            h, y = body(h, jax.tree.map(lambda a, i=i: a[i], xs))
            per_layer.append(y)
        ks, vs, ins = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
    last = h
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    if trace:
        return h, KV(ks, vs), LayerTrace(ins, last)
    return h, KV(ks, vs)


def embed_tokens(params: Params, cfg: ModelConfig, ids: jax.Array) -> jax.Array:
    """Token embeddings by table lookup: ids `[...]` -> `[..., hidden]` in compute dtype."""
    h = jnp.take(params["embed"], ids, axis=0).astype(cfg.compute_dtype)
    return constrain(h, HIDDEN_AXES) if ids.ndim == 2 else h


def logits_from_hidden(params: Params, cfg: ModelConfig, h: jax.Array) -> jax.Array:
    """`[..., hidden]` -> float32 logits `[..., vocab]`.

    Checkpointed: the backward pass keeps `h` and the (sharded) output matrix, not the
    gathered compute-dtype copy of the matrix, which Quiet-STaR would otherwise hold
    once per logits call (up to n_ahead + n_ahead_talk of them).
    """
    return _logits(output_matrix(params, cfg), h, cfg)


@functools.partial(jax.checkpoint, static_argnums=(2,))
def _logits(w: jax.Array, h: jax.Array, cfg: ModelConfig) -> jax.Array:
    w = constrain(w.astype(cfg.compute_dtype), ("embed", "vocab"))
    logits = dense(h.astype(cfg.compute_dtype), w, preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "seq", "vocab")) if logits.ndim == 3 else logits


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Position ids `[batch, seq]`: `arange(seq)` shifted so that the first real token
    is position 0 (plain arange for right padding; left padding is skipped)."""
    first = jnp.argmax(attention_mask.astype(bool), axis=-1)
    return jnp.maximum(jnp.arange(attention_mask.shape[-1])[None, :] - first[:, None], 0)


def forward(
    params: Params,
    cfg: ModelConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    trace: bool = False,
) -> tuple[jax.Array, KV] | tuple[jax.Array, KV, LayerTrace]:
    """Causal forward over `input_ids` `[batch, seq]`.

    Returns (final hidden `[batch, seq, hidden]`, KV `[layers, batch, seq, kv_heads, head_dim]`).
    Padded keys (attention_mask 0) are masked. With `cfg.attention == "cudnn"` the
    batch must be right-padded (real tokens first, as the trainer's data pipeline and
    the evaluation batches are); left-padded prompts need `attention="xla"`, which
    generation selects itself.
    """
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if positions is None:
        positions = default_positions(attention_mask)
    h = embed_tokens(params, cfg, input_ids)
    return decoder(params, cfg, h, positions, self_mask=self_attention_mask(
        cfg, positions, attention_mask), trace=trace)


def self_attention_mask(
    cfg: ModelConfig, positions: jax.Array, attention_mask: jax.Array
) -> jax.Array | FusedCausal:
    """The causal self-attention mask `forward` uses for `[batch, seq]` positions and
    attention mask: `causal_mask`, or a `FusedCausal` with `cfg.attention == "cudnn"`."""
    valid = attention_mask.astype(bool)
    if cfg.attention == "cudnn":
        return FusedCausal(jnp.sum(valid, axis=-1).astype(jnp.int32))
    return causal_mask(positions, valid, cfg.sliding_window)


def lm_logits(
    params: Params,
    cfg: ModelConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
) -> jax.Array:
    """Float32 logits `[batch, seq, vocab]` of the plain LM (no thoughts)."""
    h, _ = forward(params, cfg, input_ids, attention_mask)
    return logits_from_hidden(params, cfg, h)


# --------------------------------------------------------------------------- replayed backward


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
    """
    rope_b = rope_tables(geo.base_positions, cfg.dim_per_head, cfg.rope_theta)
    rope_s = rope_tables(geo.step_positions, cfg.dim_per_head, cfg.rope_theta)
    out_b, k, v = _layer(lp, cfg, h_base, rope_b, geo.base_mask, None, None)
    out_s, _, _ = _layer(lp, cfg, h_steps, rope_s, None, (k, v, geo.ctx_mask),
                         ((), (), geo.own_mask))
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
    (their `t` axes concatenated are the `steps * seq` of h_steps); kept apart, and
    joined one layer at a time, so that no `[layers, ...]` copy of them is made.
    """
    del layers, h_base, h_steps, geo
    return base_trace.last, _join_steps([t.last for t in step_traces])


def _join_steps(pieces: Sequence[jax.Array]) -> jax.Array:
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
