"""The Llama-family causal decoder (Llama, Mistral, Qwen2) as Flax NNX modules, and
the pure functions of a params pytree that merge them.

The modules (`CausalLM` > `DecoderLayer` = `Attention` + `MLP`, `RMSNorm`) declare
every parameter once: shape, initialiser and logical axis names together. Their
attribute names are the keys of the params pytree, a plain dict of arrays
(`init_params`, `to_params`), with the layers stacked on a leading `layers` axis so
they can be scanned. A public entry point that takes that pytree merges the module
once (`from_params`: split at the jit boundary, merged inside it) and calls its
methods (`lm.forward`, `lm.decoder`, `lm.position_decoder`, `lm.embed_tokens`,
`lm.logits`, `lm.vocab_table`); the scan over the stacked layers merges one layer's
`DecoderLayer` from its slice in its body (`layer`). The functions `forward`,
`decoder`, `lm_logits`, `embed_tokens` and `logits_from_hidden` are those calls as
pure one-liners for notebooks and tests; no code of the package calls them.

Attention is written for Quiet-STaR's needs: besides ordinary causal
self-attention, a forward can attend to

* a *context* block of cached keys/values shared by all queries of a row
  (`[batch, ctx, kv_heads, head_dim]`, e.g. the base sequence's cache), with a
  mask `[batch, q, ctx]`, and
* an *own* block of keys/values private to each query position
  (`[batch, q, slots, kv_heads, head_dim]`, e.g. that position's earlier thought
  tokens), with a mask `[batch, q, slots]`; the query's own new key is always
  appended to it.

Both blocks enter one softmax. `CausalLM.position_decoder` is that forward for the
queries of one position (its row's context, its own slots); `thought.map_thoughts` maps a
position's thought over positions and rows with `jax.vmap`. This module knows nothing
of thoughts or losses.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, TypeVar, get_args

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from quietstar_jax.axes import constrain
from quietstar_jax.vocab import VocabMajor

Params = dict[str, Any]
M = TypeVar("M", bound=nnx.Module)

ModelType = Literal["llama", "mistral", "qwen2"]
MODEL_TYPES: tuple[ModelType, ...] = get_args(ModelType)
# Rematerialisation of each layer in the backward pass: nothing saved but the layer
# input ("full"), every matmul output ("dots"), the MLP's gate/up projections only
# ("mlp": the largest matmuls are not recomputed, attention is), or everything ("none").
RematPolicy = Literal["none", "full", "dots", "mlp"]
REMAT_POLICIES: tuple[RematPolicy, ...] = get_args(RematPolicy)
# The plain causal pass's attention: this module's `attend`, or cuDNN's flash kernel.
AttentionImpl = Literal["xla", "cudnn"]
_NEG_INF = -1e30
# Logical axes of activations (see axes.constrain; no-ops without an active mesh).
HIDDEN_AXES = ("batch", "seq", "act_embed")
KV_AXES = ("batch", "seq", "kv_heads", "head_dim")



# ModelConfig fields that say how to run a model, not what it is: a loaded checkpoint
# takes them from the caller (the trainer's config.model), its architecture from its
# config.json.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "attention", "vocab_chunk")

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
    model_type: ModelType = "llama"
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: RematPolicy = "none"  # see REMAT_POLICIES
    # Attention of the plain causal pass: "xla" (this module's `attend`) or "cudnn"
    # (jax.nn.dot_product_attention's cuDNN flash kernel, GPU only; right-padded or
    # unpadded batches only, see `forward`). Thought steps always use `attend`.
    attention: AttentionImpl = "xla"
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


def window_visible(q_pos: Any, k_pos: Any, window: int | None) -> jax.Array:
    """Sliding-window visibility of keys at position ids `k_pos` from queries at `q_pos`
    (broadcast together): `q_pos - k_pos < window`; all True without a window."""
    if window is None:
        return jnp.ones(jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(k_pos)), bool)
    return (jnp.asarray(q_pos) - jnp.asarray(k_pos)) < window


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
        mask = mask & window_visible(positions[:, :, None], positions[:, None, :],
                                     sliding_window)
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


# --------------------------------------------------------------------------- modules
#
# Every parameter is declared once, in the module that uses it: shape, initialiser and
# logical axis names (its nnx.Param's `out_sharding` metadata) together. Attribute names
# are the keys of the params pytree, so `to_params(CausalLM(cfg, rngs=...))` is the
# plain dict the functions below take (`embed`, `layers/{attn_norm, attn/{q, k, v, o[,
# q_bias, k_bias, v_bias]}, mlp_norm, mlp/{gate, up, down}}` stacked on a leading
# `layers` axis, `final_norm`, `lm_head` when untied), and `from_params` (`nnx.merge`) gives the
# module back. Shapes (`param_shapes`) and logical axes (`param_logical_axes`, hence
# every mesh sharding) are read off the abstract module (under `jax.eval_shape`).

Init = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


def normal_init(stddev: float) -> Init:
    """normal(0, stddev), drawn in float32 and cast (the same numbers for every dtype)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        return (stddev * jax.random.normal(key, shape)).astype(dtype)

    return init


def ones_init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    del key
    return jnp.ones(shape, dtype)


def zeros_init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    del key
    return jnp.zeros(shape, dtype)


def declare(
    rngs: nnx.Rngs,
    init: Init,
    shape: tuple[int, ...],
    axes: tuple[str, ...],
    dtype: Any,
    cls: type[nnx.Variable] = nnx.Param,
    *,
    decay: bool = True,
    **metadata: Any,
) -> nnx.Variable:
    """A parameter: `init(key, shape, dtype)` with its logical axis names and whether
    AdamW's weight decay applies to it (`weight_decay` metadata; False for norms and
    biases, read by `train.step.decay_mask` through `param_decay`).

    `eager_sharding=False`: Flax does not place the value at construction; the
    params are created or loaded straight into the shardings that
    `sharding.logical_to_spec` derives from these axes (which leaves a dimension its
    mesh axes do not divide replicated).
    """
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    return cls(init(rngs.params(), shape, dtype), out_sharding=tuple(axes),
               eager_sharding=False, weight_decay=decay, **metadata)


def _compute(w: nnx.Variable, cfg: ModelConfig) -> jax.Array:
    """Weight `w` in the compute dtype, pinned to the param's own sharding, so that under
    FSDP the all-gather for the matmul moves compute-dtype (e.g. bfloat16) bytes rather
    than float32 master weights."""
    return constrain(w[...].astype(cfg.compute_dtype), w.get_metadata("out_sharding"))


class RMSNorm(nnx.Param):
    """An RMSNorm weight `[hidden]` (ones at init) that applies itself: `norm(x)`.

    A Param rather than a Module holding one, so that each norm is one array of the
    params pytree (`layers/attn_norm`, `final_norm`), as in Hugging Face checkpoints.
    Float32 inside, returned in x's dtype (HF Llama semantics).
    """

    def __call__(self, x: jax.Array) -> jax.Array:  # type: ignore[override]
        return rms_norm(x, self[...], self.get_metadata("eps"))


def _norm(cfg: ModelConfig, rngs: nnx.Rngs) -> RMSNorm:
    return declare(rngs, ones_init, (cfg.hidden_size,), ("norm",), jnp.dtype(cfg.param_dtype),
                   cls=RMSNorm, decay=False, eps=cfg.rms_norm_eps)


class Attention(nnx.Module):
    """Grouped-query attention with rotary embeddings: projections q, k, v, o (and q/k/v
    biases with `cfg.attention_bias`), over the causal sequence, or over a shared
    context block plus a per-query own block (see `attend`). A `DecoderLayer`'s `attn`:
    its params are `layers/attn/{q, k, v, o, ...}`.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        h, d, nh, nkv = cfg.hidden_size, cfg.dim_per_head, cfg.num_heads, cfg.num_kv_heads
        dt, w = jnp.dtype(cfg.param_dtype), normal_init(cfg.initializer_range)
        self.q = declare(rngs, w, (h, nh, d), ("embed", "heads", "head_dim"), dt)
        self.k = declare(rngs, w, (h, nkv, d), ("embed", "kv_heads", "head_dim"), dt)
        self.v = declare(rngs, w, (h, nkv, d), ("embed", "kv_heads", "head_dim"), dt)
        self.o = declare(rngs, w, (nh, d, h), ("heads", "head_dim", "embed"), dt)
        if cfg.attention_bias:
            self.q_bias = declare(rngs, zeros_init, (nh, d), ("heads", "head_dim"), dt,
                                  decay=False)
            self.k_bias = declare(rngs, zeros_init, (nkv, d), ("kv_heads", "head_dim"), dt,
                                  decay=False)
            self.v_bias = declare(rngs, zeros_init, (nkv, d), ("kv_heads", "head_dim"), dt,
                                  decay=False)

    def __call__(
        self,
        x: jax.Array,
        rope_tabs: tuple[jax.Array, jax.Array],
        self_mask: jax.Array | FusedCausal | None = None,
        ctx: tuple[jax.Array, jax.Array, jax.Array] | None = None,
        own: tuple[Sequence[jax.Array], Sequence[jax.Array], jax.Array] | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x `[batch, t, hidden]` (normed) -> (output projection `[batch, t, hidden]`,
        the new keys and values `[batch, t, kv_heads, head_dim]`). See `DecoderLayer`."""
        with jax.named_scope("attention"):
            cfg = self.cfg
            dt = cfg.compute_dtype
            q = dense(x, _compute(self.q, cfg))
            k = dense(x, _compute(self.k, cfg))
            v = dense(x, _compute(self.v, cfg))
            if cfg.attention_bias:
                q = q + self.q_bias[...].astype(dt)
                k = k + self.k_bias[...].astype(dt)
                v = v + self.v_bias[...].astype(dt)
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
                own = ([*(x.astype(dt) for x in ks), *new_k], [*(x.astype(dt) for x in vs), *new_v],
                       om)
                a = attend(q, ctx, own)
            return dense(a, _compute(self.o, cfg), 2), k, v


class MLP(nnx.Module):
    """The SwiGLU MLP: `down(silu(gate(x)) * up(x))`; a `DecoderLayer`'s `mlp`, params
    `layers/mlp/{gate, up, down}`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        h, m = cfg.hidden_size, cfg.intermediate_size
        dt, w = jnp.dtype(cfg.param_dtype), normal_init(cfg.initializer_range)
        self.gate = declare(rngs, w, (h, m), ("embed", "mlp"), dt)
        self.up = declare(rngs, w, (h, m), ("embed", "mlp"), dt)
        self.down = declare(rngs, w, (m, h), ("mlp", "embed"), dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[batch, t, hidden]` (normed) -> `[batch, t, hidden]`. The gate and up
        projections are named for the "mlp" remat policy."""
        with jax.named_scope("mlp"):
            cfg = self.cfg
            g = checkpoint_name(dense(x, _compute(self.gate, cfg)), "mlp_gate")
            u = checkpoint_name(dense(x, _compute(self.up, cfg)), "mlp_up")
            g, u = constrain(g, ("batch", "seq", "mlp")), constrain(u, ("batch", "seq", "mlp"))
            return dense(jax.nn.silu(g) * u, _compute(self.down, cfg))


class DecoderLayer(nnx.Module):
    """One pre-norm decoder layer: `h + attn(attn_norm(h))`, then `h + mlp(mlp_norm(h))`.

    Its params (one layer's, `params["layers"]` sliced at a layer index) are
    attn_norm, attn (`Attention`: q, k, v, o[, q_bias, k_bias, v_bias]), mlp_norm and
    mlp (`MLP`: gate, up, down): Hugging Face's `input_layernorm`, `self_attn`,
    `post_attention_layernorm` and `mlp`.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = _norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = _norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(
        self,
        h: jax.Array,
        rope_tabs: tuple[jax.Array, jax.Array],
        self_mask: jax.Array | FusedCausal | None = None,
        ctx: tuple[jax.Array, jax.Array, jax.Array] | None = None,
        own: tuple[Sequence[jax.Array], Sequence[jax.Array], jax.Array] | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """h: `[batch, t, hidden]`; rope_tabs: `rope_tables` of the t positions.

        With `ctx is None` and `own is None`: causal self-attention under `self_mask`.
        Otherwise the queries attend to `ctx`, to the `own` slots and to their own new
        key, which is appended as the last own slot (its mask is own's last column).
        With a grouped own mask `[batch, t // group, group, slots + group]` (see
        `attend`), the `group` new keys of a position are appended as its last `group`
        slots. Returns (h_out, k_new, v_new), k/v `[batch, t, kv_heads, head_dim]`.
        """
        a, k, v = self.attn(self.attn_norm(h), rope_tabs, self_mask, ctx, own)
        h = h + a
        h = h + self.mlp(self.mlp_norm(h))
        return h, k, v


def _stacked_layers(cfg: ModelConfig, rngs: nnx.Rngs) -> DecoderLayer:
    """`cfg.num_layers` DecoderLayers as one, every param with a leading "layers" axis
    (`nnx.vmap` adds it to the shapes and to the logical axes), for `lax.scan`."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, axis_size=cfg.num_layers,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> DecoderLayer:
        return DecoderLayer(cfg, rngs=rngs)

    return make(rngs)


class CausalLM(nnx.Module):
    """The Llama-family causal LM: embedding, the stacked decoder layers, final norm and
    output head (the embedding, transposed, when tied).

    `model(input_ids, attention_mask)` gives the same float32 logits as `lm_logits`.
    Code that takes a params pytree merges this module once (`from_params`) and calls
    its methods; the functions of the same names below are those calls as one-liners.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        h, vocab = cfg.hidden_size, cfg.vocab_size
        dt, w = jnp.dtype(cfg.param_dtype), normal_init(cfg.initializer_range)
        self.embed = declare(rngs, w, (vocab, h), ("vocab", "embed"), dt)
        self.layers = _stacked_layers(cfg, rngs)
        self.final_norm = _norm(cfg, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = declare(rngs, w, (h, vocab), ("embed", "vocab"), dt)

    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        """Token embeddings by table lookup: ids `[...]` -> `[..., hidden]` in compute dtype."""
        h = jnp.take(self.embed[...], ids, axis=0).astype(self.cfg.compute_dtype)
        return constrain(h, HIDDEN_AXES) if ids.ndim == 2 else h

    def output_matrix(self) -> jax.Array:
        """The `[hidden, vocab]` output projection (the embedding table when tied)."""
        return self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

    def vocab_table(self) -> jax.Array | VocabMajor:
        """The output projection as `quietstar_jax.vocab`'s ops take it: `lm_head` `[hidden,
        vocab]`, or the tied embedding table `[vocab, hidden]` as it is stored."""
        return VocabMajor(self.embed[...]) if self.cfg.tie_word_embeddings else self.lm_head[...]

    def logits(self, h: jax.Array) -> jax.Array:
        """`[..., hidden]` -> float32 logits `[..., vocab]`.

        Checkpointed: the backward pass keeps `h` and the (sharded) output matrix, not the
        gathered compute-dtype copy of the matrix, which Quiet-STaR would otherwise hold
        once per logits call (up to n_ahead + n_ahead_talk of them).
        """
        return _logits(self.output_matrix(), h, self.cfg)

    def decoder(
        self,
        h: jax.Array,
        positions: jax.Array,
        *,
        self_mask: jax.Array | FusedCausal | None = None,
        ctx: tuple[KV, jax.Array] | None = None,
        own: tuple[Sequence[KV], jax.Array] | None = None,
        trace: bool = False,
    ) -> tuple[jax.Array, KV] | tuple[jax.Array, KV, LayerTrace]:
        """Run all layers (scanned over the stacked layer params) and the final norm.

        h: input embeddings `[batch, t, hidden]`; positions `[batch, t]` int.
        self_mask: `[batch, t, t]` for plain causal self-attention (ctx and own None), or
          a `FusedCausal` for the platform's fused causal kernel.
        ctx: (KV `[layers, batch, ctx, kv_heads, head_dim]`, mask `[batch, t, ctx]`):
          cached keys/values every query of a row may see (e.g. the base sequence).
        own: (a sequence of `slots` KVs `[layers, batch, t, kv_heads, head_dim]`, mask
          `[batch, t, slots + 1]`): keys private to each query position (its earlier
          thought tokens); the last mask column is the query's own new key. With ctx
          given and own None, each query sees the context and itself. A block of `group`
          steps per position runs as one call: h `[batch, group * p, hidden]`
          (group-major), the slots `[layers, batch, p, kv_heads, head_dim]`, mask
          `[batch, p, group, slots + group]` (the block's own new keys are the last
          `group` columns).
        Returns (final hidden `[batch, t, hidden]` after the final norm, the new tokens'
        KV `[layers, batch, t, kv_heads, head_dim]`), and with `trace` also a
        `LayerTrace` (every layer's input and the last layer's output: what
        `replay_layers` needs).

        The scan body merges one layer's `DecoderLayer` from its slice of the stacked
        params (`layer`): a `lax.scan` body takes arrays.
        """
        cfg = self.cfg
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
            h, k, v = layer(lp, cfg, h, rope_tabs, self_mask, c, o)
            return constrain(h, HIDDEN_AXES), (k, v, h_in if trace else None)

        body = _remat(body, cfg)
        xs = (
            to_params(self.layers),
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
        h = self.final_norm(h)
        if trace:
            return h, KV(ks, vs), LayerTrace(ins, last)
        return h, KV(ks, vs)

    def forward(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        trace: bool = False,
    ) -> tuple[jax.Array, KV] | tuple[jax.Array, KV, LayerTrace]:
        """Causal forward over `input_ids` `[batch, seq]`.

        Returns (final hidden `[batch, seq, hidden]`, KV `[layers, batch, seq, kv_heads,
        head_dim]`), and with `trace` a `LayerTrace`. Padded keys (attention_mask 0) are
        masked. With `cfg.attention == "cudnn"` the batch must be right-padded (real
        tokens first, as the trainer's data pipeline and the evaluation batches are);
        left-padded prompts need `attention="xla"`, which generation selects itself.
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if positions is None:
            positions = default_positions(attention_mask)
        mask = self_attention_mask(self.cfg, positions, attention_mask)
        h = self.embed_tokens(input_ids)
        return self.decoder(h, positions, self_mask=mask, trace=trace)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Float32 logits `[batch, seq, vocab]` of the plain LM (no thoughts)."""
        h, _ = self.forward(input_ids, attention_mask)
        return self.logits(h)

    def position_decoder(
        self,
        h: jax.Array,
        positions: jax.Array,
        ctx: tuple[KV, jax.Array],
        own: Sequence[KV],
        own_mask: jax.Array,
        trace: bool = False,
    ) -> tuple[jax.Array, KV] | tuple[jax.Array, KV, LayerTrace]:
        """All layers and the final norm for the queries of ONE position, held as a
        batch of one (a row of one position), so that it is `decoder` itself.

        A thought belongs to one position: its queries (one thought step, or a block of
        steps causal among themselves) read the base keys/values of that position's row
        and the position's own earlier keys. `thought.thought_of_position` runs this for
        each step of a position's thought, and `thought.map_thoughts` maps that over
        positions and rows with `jax.vmap` (the rollout, and generation's `think_at` at
        chosen positions).

        h: `[1, t, hidden]`, the position's t queries (one thought step, or a block of t
          steps that see each other causally through `own_mask`); positions `[1, t]` int.
        ctx: (KV `[layers, 1, ctx, kv_heads, head_dim]`, mask `[1, t, ctx]`): the base
          keys and values of the position's row, and which of them each query sees.
        own: a sequence of `slots` KVs `[layers, 1, 1, kv_heads, head_dim]`, the keys of
          the position's earlier steps; own_mask `[1, 1, slots + 1]` (t = 1) or
          `[1, 1, t, slots + t]`: which of them and of the t new keys each query sees.
        Returns (hidden `[1, t, hidden]`, the queries' KV `[layers, 1, t, kv_heads,
        head_dim]`), and with `trace` a `LayerTrace` (`[layers, 1, t, hidden]`,
        `[1, t, hidden]`).

        The unit axes are part of the function's shapes, and added and removed outside
        `thought.map_thoughts`'s vmap: a reshape inside would make the vmap move the
        mapped axes to the front (a transposed copy of every key/value array it touches).
        """
        return self.decoder(h, positions, ctx=ctx, own=(own, own_mask), trace=trace)


def _remat(fn: Any, cfg: ModelConfig) -> Any:
    if cfg.remat == "full":
        return jax.checkpoint(fn)
    if cfg.remat == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    if cfg.remat == "mlp":
        return jax.checkpoint(
            fn, policy=jax.checkpoint_policies.save_only_these_names("mlp_gate", "mlp_up"))
    return fn


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


# --------------------------------------------------------------------------- params <-> modules


def to_params(module: nnx.Module) -> Params:
    """The plain params pytree of `module`: its nnx.Params' arrays as nested dicts."""
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


class _Blueprint(NamedTuple):
    graphdef: Any  # nnx.GraphDef
    leaves: tuple[tuple[tuple[str, ...], jax.ShapeDtypeStruct, tuple[str, ...]], ...]
    decay: tuple[bool, ...]  # each leaf's `weight_decay` metadata


@functools.lru_cache(maxsize=64)
def _blueprint(cls: type[nnx.Module], cfg: ModelConfig) -> _Blueprint:
    """The graphdef of `cls(cfg, rngs=...)` and (path, abstract value, logical axes) of
    every param, from an abstract module (nothing is allocated).

    By `jax.eval_shape` rather than `nnx.eval_shape`, which under an active mesh would
    turn the logical axis names into mesh axes as they stand (without the rules).
    """
    static: dict[str, Any] = {}

    def build() -> list[jax.Array]:
        graphdef, state = nnx.split(cls(cfg, rngs=nnx.Rngs(0)))
        flat = list(nnx.to_flat_state(state))
        static["graphdef"] = graphdef
        static["meta"] = [(tuple(p), tuple(v.get_metadata("out_sharding"))) for p, v in flat]
        static["decay"] = tuple(bool(v.get_metadata().get("weight_decay", True))
                                for _, v in flat)
        return [v.get_value() for _, v in flat]

    values = jax.eval_shape(build)
    leaves = tuple((path, value, axes)
                   for (path, axes), value in zip(static["meta"], values, strict=True))
    return _Blueprint(static["graphdef"], leaves, static["decay"])


def _nest(pairs: Any) -> Params:
    out: Params = {}
    for path, leaf in pairs:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return out


def _paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(tree, Mapping):
        return [p for k, v in tree.items() for p in _paths(v, prefix + (k,))]
    return [prefix]


def from_params(params: Params, cfg: ModelConfig, cls: type[nnx.Module] | None = None) -> Any:
    """The module `cls` (default `CausalLM`) of `cfg` holding the arrays of `params`
    (`nnx.merge` of its graphdef with the pytree: no copies, works on tracers). Keys
    of `params` that the module does not have (e.g. `thought` for a CausalLM) are
    ignored; a missing or extra param inside raises."""
    bp = _blueprint(CausalLM if cls is None else cls, cfg)
    sub = {k: params[k] for k in dict.fromkeys(p[0] for p, _, _ in bp.leaves) if k in params}
    want = [path for path, _, _ in bp.leaves]
    got = sorted(_paths(sub))
    if got != want:  # (nnx.merge would pair the leaves up in sorted order regardless)
        lack, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise ValueError(
            f"params do not fit {(cls or CausalLM).__name__} of this config: missing "
            f"{['/'.join(p) for p in lack]}, unexpected {['/'.join(p) for p in extra]}")
    return nnx.merge(bp.graphdef, sub)


def stop_gradient(module: M) -> M:
    """`module` with `jax.lax.stop_gradient` of its arrays (`nnx.split`, then `nnx.merge`
    of the stopped state): no gradient flows into its params through what it computes."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.lax.stop_gradient(state))


def param_shapes(cfg: ModelConfig, cls: type[nnx.Module] | None = None) -> Params:
    """Shape of every param, a pytree shaped like `init_params` (tuples as leaves)."""
    bp = _blueprint(CausalLM if cls is None else cls, cfg)
    return _nest((p, tuple(v.shape)) for p, v, _ in bp.leaves)


def param_logical_axes(cfg: ModelConfig, cls: type[nnx.Module] | None = None) -> Params:
    """Logical axis names of every param (its `out_sharding` metadata), a pytree shaped
    like `init_params`; the stacked layers' start with "layers"."""
    bp = _blueprint(CausalLM if cls is None else cls, cfg)
    return _nest((p, axes) for p, _, axes in bp.leaves)


def param_decay(cfg: ModelConfig, cls: type[nnx.Module] | None = None) -> Params:
    """Whether weight decay applies to each param (its `weight_decay` metadata), a
    pytree of bools shaped like `init_params`."""
    bp = _blueprint(CausalLM if cls is None else cls, cfg)
    return _nest((p, d) for (p, _, _), d in zip(bp.leaves, bp.decay, strict=True))


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Random params: normal(0, initializer_range) matrices, ones for norms, zero biases."""
    return to_params(CausalLM(cfg, rngs=nnx.Rngs(params=rng)))


# --------------------------------------------------------------------------- functions
#
# The pure functions of a params pytree, for notebooks and tests: each merges the module
# (`from_params`) and calls one method. The package's entry points merge once and call
# the methods; of these only `layer` runs inside them (a `lax.scan` body's merge of one
# layer from its slice of the stacked params).

# Logical axes of the mapped thoughts' hidden states, pinned outside the vmapped
# function `thought.map_thoughts` (inside it the mapped dimensions are left unconstrained).
STEP_HIDDEN_AXES = ("batch", "seq", "steps", "act_embed")


def layer(
    lp: Params,
    cfg: ModelConfig,
    h: jax.Array,
    rope_tabs: tuple[jax.Array, jax.Array],
    self_mask: jax.Array | FusedCausal | None,
    ctx: tuple[jax.Array, jax.Array, jax.Array] | None,
    own: tuple[Sequence[jax.Array], Sequence[jax.Array], jax.Array] | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decoder layer (`DecoderLayer.__call__`) as a pure function of one layer's
    params `lp` (`params["layers"]` at a layer index, e.g. a `lax.scan` slice)."""
    return from_params(lp, cfg, DecoderLayer)(h, rope_tabs, self_mask, ctx, own)


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
    """`CausalLM.decoder` of `params`: all layers and the final norm, embeddings `[batch,
    t, hidden]` -> (hidden `[batch, t, hidden]`, KV `[layers, batch, t, kv_heads,
    head_dim]`[, LayerTrace])."""
    return from_params(params, cfg).decoder(h, positions, self_mask=self_mask, ctx=ctx, own=own,
                                            trace=trace)


def embed_tokens(params: Params, cfg: ModelConfig, ids: jax.Array) -> jax.Array:
    """`CausalLM.embed_tokens` of `params`: ids `[...]` -> `[..., hidden]` in compute dtype."""
    return from_params(params, cfg).embed_tokens(ids)


def logits_from_hidden(params: Params, cfg: ModelConfig, h: jax.Array) -> jax.Array:
    """`CausalLM.logits` of `params`: `[..., hidden]` -> float32 logits `[..., vocab]`."""
    return from_params(params, cfg).logits(h)


def forward(
    params: Params,
    cfg: ModelConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    trace: bool = False,
) -> tuple[jax.Array, KV] | tuple[jax.Array, KV, LayerTrace]:
    """`CausalLM.forward` of `params`: the causal forward over `input_ids` `[batch, seq]`
    -> (hidden `[batch, seq, hidden]`, KV `[layers, batch, seq, kv_heads, head_dim]`[,
    LayerTrace])."""
    return from_params(params, cfg).forward(input_ids, attention_mask, positions, trace=trace)


def self_attention_mask(
    cfg: ModelConfig, positions: jax.Array, attention_mask: jax.Array
) -> jax.Array | FusedCausal:
    """The causal self-attention mask `CausalLM.forward` uses for `[batch, seq]` positions
    and attention mask: `causal_mask`, or a `FusedCausal` with `cfg.attention == "cudnn"`."""
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
    """Float32 logits `[batch, seq, vocab]` of the plain LM (no thoughts): the call of
    `CausalLM` merged from `params`."""
    return from_params(params, cfg)(input_ids, attention_mask)
