"""Fused, chunked vocabulary projections: hidden `[N, H]` x output matrix `[H, V]`.

At real vocabulary sizes (32k-152k) the float32 `[tokens, vocab]` logits of every
Quiet-STaR step dominate memory: sampling logits, the REINFORCE log-softmax at
temperature 3, the NLLs of the base and talk steps, and what autodiff keeps of them.
The ops here never build more than one `[N, chunk]` slab of logits. They scan over
the vocabulary a chunk at a time and keep per-token statistics only (log-sum-exp,
the logit of one chosen id, a sampled candidate). Their custom VJPs recompute each
chunk's logits in the backward pass: the softmax gradient `p - onehot` is formed a
chunk at a time and multiplied into the hidden and matrix gradients.

Layout. The vocabulary is viewed as `[blocks, block]` with `blocks = gcd(V, 16)`, a
function of V alone. The blocks follow the `vocab` mesh axis (tensor parallelism),
so every device projects its own columns and only per-token statistics cross
devices: no vocab-split logits are gathered. One scan step handles chunk `i` of
every block: `[H, blocks, chunk]` columns. A chunk size that does not divide the
block is fine: the last chunk starts earlier (`block - chunk`) and masks the
columns the chunk before it already covered. Since the layout does not depend on
the mesh, neither do the numbers (sampled tokens included).

`w` is the output matrix `[H, V]`, or `VocabMajor(table)` for a table stored `[V, H]`
(a tied embedding), which the ops then walk as it lies.

Ops:
- `nll_from_hidden(h, w, targets)`: cross-entropy `[N]` (the base and talk-step NLLs).
- `logp_from_hidden(h, w, ids, temperature, masked_ids)`: `log softmax(z / T)[id]` with
  `masked_ids` excluded (REINFORCE log-probs of given thought tokens).
- `draw(h, w, key, ...)`: an exact draw from `softmax(z / T_sample)` with `masked_ids`
  excluded (or the argmax), no gradient, with the statistics of its log-prob at
  `T_reinforce`, from one pass over the vocabulary; `logp_of_draws(h, w, draws)` gives
  that log-prob with gradient and no further forward pass (draws of several steps
  stacked: one backward pass).
- `sample_categorical(key, logits)`: the same draw from logits already in memory
  (generation's last token); with one chunk the chunked sampler gives its tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from quietstar_jax.axes import constrain

VOCAB_BLOCKS = 16  # blocks = gcd(V, 16): the most ways the vocab is split over devices
DEFAULT_CHUNK = 8192
# Below this many logits (tokens x vocab, 16 MB in float32) a projection walks the
# vocabulary in one step: slicing a chunk of the matrix copies it, which would double
# the memory traffic of a matrix-vector product (generation, batch 1).
SMALL_LOGITS = 1 << 22
_NEG = -1e30  # logit of a masked or already-covered column (finite: no inf - inf)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a vocabulary of `vocab` columns is walked: `blocks` x `block` columns, in
    `n_chunks` scan steps of `chunk` columns per block (the last one shifted back)."""

    vocab: int
    blocks: int
    block: int
    chunk: int
    n_chunks: int

    def start(self, i: jax.Array) -> jax.Array:
        """First column (inside a block) of chunk i."""
        return jnp.minimum(i * self.chunk, self.block - self.chunk)


def layout(vocab_size: int, chunk_size: int = DEFAULT_CHUNK) -> Layout:
    """The layout of a `vocab_size` vocabulary walked `chunk_size` columns per step."""
    if chunk_size < 1:
        raise ValueError(f"vocab chunk size must be >= 1, got {chunk_size}")
    blocks = math.gcd(vocab_size, VOCAB_BLOCKS)
    block = vocab_size // blocks
    n_chunks = -(-block // max(1, min(block, -(-chunk_size // blocks))))
    # The same number of steps, split evenly: the last chunk overlaps the one before
    # it by less than n_chunks columns (with `chunk` columns per step kept as asked,
    # up to a chunk less one of each block would be computed twice).
    chunk = -(-block // n_chunks)
    return Layout(vocab_size, blocks, block, chunk, n_chunks)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static settings of one projection: the layout, a logit scale (1 / temperature),
    the ids excluded from the softmax, and the compute dtype."""

    lay: Layout
    scale: float
    masked: tuple[int, ...]
    dtype: str
    vocab_major: bool = False  # the matrix is stored `[V, H]` (see VocabMajor)
    # Under a vmap (one token's op mapped over many): the logits' token axis is
    # not pinned (a size-1 "batch" axis would pin the mapped array replicated).
    mapped: bool = False


class VocabMajor(NamedTuple):
    """An output matrix stored vocabulary-major, `table` `[V, H]`: a tied embedding
    table. Passed in place of `w` `[H, V]`, the ops walk it as it lies; `embed.T` would
    make XLA copy the whole table into `[H, V]` order for each op (113 MB for SmolLM2)."""

    table: jax.Array


def _raw(w: jax.Array | VocabMajor) -> tuple[jax.Array, bool]:
    return (w.table, True) if isinstance(w, VocabMajor) else (w, False)


def _blocked(w: jax.Array, spec: _Spec) -> jax.Array:
    """The matrix in blocks, in the compute dtype, blocks on the vocab axis: `[H, V]` ->
    `[H, blocks, block]`, or vocabulary-major `[V, H]` -> `[blocks, block, H]`."""
    lay = spec.lay
    if spec.vocab_major:
        w = constrain(w.astype(spec.dtype), ("vocab", "embed"))
        return constrain(w.reshape(lay.blocks, lay.block, w.shape[1]), ("vocab", None, "embed"))
    w = constrain(w.astype(spec.dtype), ("embed", "vocab"))
    return constrain(w.reshape(w.shape[0], lay.blocks, lay.block), ("embed", "vocab", None))


def _vocab_axis(spec: _Spec) -> int:
    """The in-block column axis of `_blocked`'s output."""
    return 1 if spec.vocab_major else 2


def _as_matrix(wc: jax.Array, spec: _Spec) -> jax.Array:
    """A chunk of columns as an `[H, blocks * chunk]` matrix (a view of a vocab-major
    chunk `[blocks, chunk, H]` transposed: the dots take it as it lies)."""
    return wc.reshape(-1, wc.shape[-1]).T if spec.vocab_major else wc.reshape(wc.shape[0], -1)


def _chunk(h: jax.Array, w3: jax.Array, i: jax.Array, spec: _Spec, scale: float):
    """Chunk i: its columns (`_blocked`'s layout), their ids `[blocks, chunk]`, which of
    them count `[blocks, chunk]`, and the logits times `scale` `[N, blocks, chunk]`
    (float32, `_NEG` where they do not count)."""
    lay = spec.lay
    start = lay.start(i)
    wc = jax.lax.dynamic_slice_in_dim(w3, start, lay.chunk, axis=_vocab_axis(spec))
    z = jnp.dot(h, _as_matrix(wc, spec), preferred_element_type=jnp.float32)
    z = z.reshape(h.shape[0], lay.blocks, lay.chunk)
    if not spec.mapped:
        z = constrain(z, ("batch", "vocab", None))
    col = start + jnp.arange(lay.chunk)
    ids = jnp.arange(lay.blocks)[:, None] * lay.block + col[None, :]
    valid = jnp.broadcast_to(col >= i * lay.chunk, ids.shape)
    for m in spec.masked:
        valid = valid & (ids != m)
    if scale != 1.0:
        z = z * scale
    return wc, ids, valid, jnp.where(valid, z, _NEG)


def zeros_after(shape: tuple[int, ...], x: jax.Array) -> jax.Array:
    """float32 zeros of `shape` that depend on `x`: a backward pass's gradient
    accumulator, which XLA then allocates once the pass reaches it (`x` is one of its
    cotangents) instead of at the start of the program, where it would sit beside all
    of the forward pass's live arrays. NaN where `x` has a NaN (the gradient is then
    NaN anyway)."""
    return jnp.broadcast_to(0.0 * jnp.sum(x).astype(jnp.float32), shape)


def _over_chunks(xs: jax.Array) -> jax.Array:
    """Scan outputs `[n_chunks, N, blocks]` -> `[N, blocks * n_chunks]` in id order."""
    return jnp.moveaxis(xs, 0, -1).reshape(xs.shape[1], -1)


# --------------------------------------------------------------------------- lse and pick


def _lse_pick_fwd_pass(h, w, ids, spec):
    w3 = _blocked(w, spec)

    def body(picked, i):
        _, col_ids, valid, z = _chunk(h, w3, i, spec, spec.scale)
        hit = valid[None] & (col_ids[None] == ids[:, None, None])
        picked = picked + jnp.sum(jnp.where(hit, z, 0.0), axis=(1, 2))
        return picked, jax.nn.logsumexp(z, axis=-1)

    picked, lse = jax.lax.scan(
        body, jnp.zeros(h.shape[:1], jnp.float32), jnp.arange(spec.lay.n_chunks))
    return jax.nn.logsumexp(_over_chunks(lse), axis=-1), picked


def _grads(h, w, ids, lse, g_lse, g_pick, spec):
    """Cotangents of (h, w) for `g_lse * lse + g_pick * picked`, a chunk at a time."""
    w3 = _blocked(w, spec)
    lay = spec.lay

    def body(carry, i):
        dh, dw3 = carry
        wc, col_ids, valid, z = _chunk(h, w3, i, spec, spec.scale)
        hit = valid[None] & (col_ids[None] == ids[:, None, None])
        dz = g_lse[:, None, None] * jnp.exp(z - lse[:, None, None])
        dz = (dz + jnp.where(hit, g_pick[:, None, None], 0.0)) * spec.scale
        dz = dz.reshape(h.shape[0], -1).astype(h.dtype)
        dh = dh + jnp.dot(dz, _as_matrix(wc, spec).T, preferred_element_type=jnp.float32)
        if spec.vocab_major:
            dwc = jnp.dot(dz.T, h, preferred_element_type=jnp.float32).reshape(wc.shape)
        else:
            dwc = jnp.dot(h.T, dz, preferred_element_type=jnp.float32).reshape(wc.shape)
        start, axis = lay.start(i), _vocab_axis(spec)
        old = jax.lax.dynamic_slice_in_dim(dw3, start, lay.chunk, axis=axis)
        dw3 = jax.lax.dynamic_update_slice_in_dim(dw3, old + dwc, start, axis=axis)
        return (dh, dw3), None

    init = (jnp.zeros(h.shape, jnp.float32), zeros_after(w3.shape, g_lse))
    (dh, dw3), _ = jax.lax.scan(body, init, jnp.arange(lay.n_chunks))
    return dh.astype(h.dtype), dw3.reshape(w.shape).astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lse_pick(h, w, ids, spec):
    return _lse_pick_fwd_pass(h, w, ids, spec)


def _lse_pick_fwd(h, w, ids, spec):
    lse, picked = _lse_pick_fwd_pass(h, w, ids, spec)
    return (lse, picked), (h, w, ids, lse)


def _lse_pick_bwd(spec, res, g):
    h, w, ids, lse = res
    dh, dw = _grads(h, w, ids, lse, g[0], g[1], spec)
    return dh, dw, None


_lse_pick.defvjp(_lse_pick_fwd, _lse_pick_bwd)


def fits_one_chunk(n_tokens: int, vocab_size: int) -> bool:
    """Whether `n_tokens` tokens' logits `[n_tokens, vocab_size]` are small enough
    (`SMALL_LOGITS`) to walk the vocabulary in one step (e.g. generation: no chunk
    copies). A mapped op (one token's draw under `jax.vmap`) asks this for the tokens of
    the whole map and passes the answer as `one_chunk`."""
    return n_tokens * vocab_size <= SMALL_LOGITS


def _spec(w: jax.Array, chunk_size: int, scale: float, masked, dtype, one_chunk: bool | int,
          vocab_major: bool = False, mapped: bool = False) -> _Spec:
    """`one_chunk`: True/False, or an int, the rows of h (then `fits_one_chunk` decides)."""
    masked = tuple(dict.fromkeys(int(m) for m in masked))
    v = w.shape[0] if vocab_major else w.shape[1]
    if not isinstance(one_chunk, bool):
        one_chunk = fits_one_chunk(one_chunk, v)
    if one_chunk:
        chunk_size = max(chunk_size, v)
    return _Spec(layout(v, chunk_size), float(scale), masked, jnp.dtype(dtype).name,
                 vocab_major, mapped)


def _flat(h: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    return h.reshape(-1, h.shape[-1]), h.shape[:-1]


def lse_and_picked(
    h: jax.Array,
    w: jax.Array | VocabMajor,
    ids: jax.Array,
    *,
    scale: float = 1.0,
    masked_ids: tuple[int, ...] = (),
    chunk_size: int = DEFAULT_CHUNK,
    dtype: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per token: log-sum-exp of `z = scale * (h @ w)` over the vocabulary less
    `masked_ids`, and `z[ids]`, both float32 `[...]`, differentiable in h and w.

    h: `[..., H]` (compute dtype); w: `[H, V]`; ids: int `[...]` in `[0, V)`.
    """
    with jax.named_scope("vocab"):
        hf, lead = _flat(h)
        w, vocab_major = _raw(w)
        spec = _spec(w, chunk_size, scale, masked_ids, dtype or h.dtype, hf.shape[0],
                     vocab_major)
        lse, picked = _lse_pick(hf.astype(spec.dtype), w, ids.reshape(-1).astype(jnp.int32), spec)
        return lse.reshape(lead), picked.reshape(lead)


def nll_from_hidden(
    h: jax.Array, w: jax.Array | VocabMajor, targets: jax.Array, *, chunk_size: int = DEFAULT_CHUNK,
    dtype: str | None = None,
) -> jax.Array:
    """Cross-entropy of `h @ w` against `targets`: h `[..., H]`, targets `[...]` ->
    float32 `[...]`, never materialising the `[..., V]` logits."""
    lse, picked = lse_and_picked(h, w, targets, chunk_size=chunk_size, dtype=dtype)
    return lse - picked


def logp_from_hidden(
    h: jax.Array,
    w: jax.Array | VocabMajor,
    ids: jax.Array,
    *,
    temperature: float = 1.0,
    masked_ids: tuple[int, ...] = (),
    chunk_size: int = DEFAULT_CHUNK,
    dtype: str | None = None,
) -> jax.Array:
    """`log softmax((h @ w) / temperature)[ids]` over the vocabulary less `masked_ids`:
    h `[..., H]`, ids `[...]` -> float32 `[...]`."""
    lse, picked = lse_and_picked(h, w, ids, scale=1.0 / temperature, masked_ids=masked_ids,
                                 chunk_size=chunk_size, dtype=dtype)
    return picked - lse


# --------------------------------------------------------------------------- sampling


def _draw(z: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inverse-CDF draw inside the last axis: z `[..., C]` logits, u `[...]` uniform in
    [0, 1) -> (index `[...]`, log of the block's unnormalised mass `[...]`)."""
    top = jnp.max(z, axis=-1)
    cdf = jnp.cumsum(jnp.exp(z - top[..., None]), axis=-1)
    mass = cdf[..., -1]
    k = jnp.sum((cdf < (u * mass)[..., None]).astype(jnp.int32), axis=-1)
    return jnp.minimum(k, z.shape[-1] - 1), top + jnp.log(mass)


def _pick_block(key: jax.Array | None, score: jax.Array) -> jax.Array:
    """Which candidate `[N]` among `[N, candidates]`: the argmax of `score` (key None)
    or a draw from softmax(score)."""
    if key is None:
        return jnp.argmax(score, axis=-1)
    u = jax.random.uniform(key, score.shape[:1], jnp.float32)
    return _draw(score, u)[0]


def _uniforms(key: jax.Array, n_chunks: int, n: int, blocks: int):
    k_in, k_out = jax.random.split(key)
    return jax.random.uniform(k_in, (n_chunks, n, blocks), jnp.float32), k_out


def sample_categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """One exact sample from softmax(logits) per row: `[..., V]` -> int32 `[...]`.

    The vocab is split into `gcd(V, 16)` blocks: a block is drawn by its mass, then a
    token inside it by its inverse CDF (one uniform number per block instead of the V
    Gumbel numbers of `jax.random.categorical`; the PRNG dominated sampling on CPU).
    A token of probability 0 (a masked id) is never drawn. These are the tokens of
    `draw` on the same key when it walks the vocab in one chunk.
    """
    lead, v = logits.shape[:-1], logits.shape[-1]
    lay = layout(v, v)
    z = jnp.maximum(logits.reshape(-1, lay.blocks, lay.block).astype(jnp.float32), _NEG)
    u, k_out = _uniforms(key, 1, z.shape[0], lay.blocks)
    k, logmass = _draw(z, u[0])
    j = _pick_block(k_out, logmass)
    tok = j * lay.block + jnp.take_along_axis(k, j[:, None], axis=-1)[:, 0]
    return tok.astype(jnp.int32).reshape(lead)


def _sample_pass(h, w, key, spec: _Spec, sample_temperature: float, greedy: bool):
    """No-gradient pass: (token `[N]`, its logit times spec.scale `[N]`, the log-sum-exp
    of the scaled logits `[N]`)."""
    lay = spec.lay
    w3 = _blocked(w, spec)
    if greedy:
        u, k_out = jnp.zeros((lay.n_chunks, h.shape[0], lay.blocks), jnp.float32), None
    else:
        u, k_out = _uniforms(key, lay.n_chunks, h.shape[0], lay.blocks)

    def body(_, xs):
        i, u_i = xs
        _, col_ids, _, raw = _chunk(h, w3, i, spec, 1.0)  # masked columns at _NEG
        if greedy:
            k, score = jnp.argmax(raw, axis=-1), jnp.max(raw, axis=-1)
        else:
            k, score = _draw(raw / sample_temperature, u_i)
        cand_raw = jnp.take_along_axis(raw, k[..., None], axis=-1)[..., 0]
        cand_id = jnp.take_along_axis(col_ids[None], k[..., None], axis=-1)[..., 0]
        lse = jax.nn.logsumexp(raw * spec.scale, axis=-1)
        return None, (score, cand_id, cand_raw, lse)

    _, outs = jax.lax.scan(body, None, (jnp.arange(lay.n_chunks), u))
    score, cand_id, cand_raw, lse = (_over_chunks(x) for x in outs)
    j = _pick_block(k_out, score)[:, None]
    tok = jnp.take_along_axis(cand_id, j, axis=-1)[:, 0]
    picked = jnp.take_along_axis(cand_raw, j, axis=-1)[:, 0] * spec.scale
    return tok.astype(jnp.int32), picked, jax.nn.logsumexp(lse, axis=-1)


def sample(
    h: jax.Array,
    w: jax.Array | VocabMajor,
    key: jax.Array | None,
    *,
    temperature: float = 1.0,
    masked_ids: tuple[int, ...] = (),
    greedy: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    dtype: str | None = None,
) -> jax.Array:
    """The tokens of `draw` alone (no gradient): h `[..., H]` -> int32 `[...]`."""
    return draw(h, w, key, sample_temperature=temperature, masked_ids=masked_ids,
                greedy=greedy, chunk_size=chunk_size, dtype=dtype).tok


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _logp_of_drawn(h, w, tok, picked, lse, spec):
    """`picked - lse` for a token drawn by `_sample_pass` (which computed both), with
    the gradient of `log softmax(z)[tok]` in h and w: no second forward pass."""
    return picked - lse


def _logp_of_drawn_fwd(h, w, tok, picked, lse, spec):
    return picked - lse, (h, w, tok, lse)


def _logp_of_drawn_bwd(spec, res, g):
    h, w, tok, lse = res
    dh, dw = _grads(h, w, tok, lse, -g, g, spec)
    return dh, dw, None, None, None


_logp_of_drawn.defvjp(_logp_of_drawn_fwd, _logp_of_drawn_bwd)


class Draw(NamedTuple):
    """Tokens drawn by `draw`, with what their log-prob needs: token int32 `[...]`, its
    logit divided by the log-prob temperature and the log-sum-exp of those logits over
    the unmasked vocabulary, float32 `[...]` (no gradient)."""

    tok: jax.Array
    picked: jax.Array
    lse: jax.Array


def draw(
    h: jax.Array,
    w: jax.Array | VocabMajor,
    key: jax.Array | None,
    *,
    sample_temperature: float = 1.0,
    logp_temperature: float = 1.0,
    masked_ids: tuple[int, ...] = (),
    greedy: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    dtype: str | None = None,
    one_chunk: bool | None = None,
    mapped: bool = False,
) -> Draw:
    """One token per row of `h @ w` (h `[..., H]`, w `[H, V]`), no gradient: an exact
    sample from `softmax(z / sample_temperature)` (or its argmax when `greedy`),
    `masked_ids` never drawn; plus the statistics `logp_of_draws` needs for its
    log-prob at `logp_temperature`, all from one vocabulary pass.

    one_chunk: walk the vocabulary in one step (True) or in `chunk_size` chunks (False);
    None: `fits_one_chunk` of the rows of `h`. mapped: this draw is one token's, mapped
    over many by `jax.vmap` (the logits' token axis is then left to the map's sharding,
    not pinned as a batch of one); such a caller decides `one_chunk` for the whole map
    (`fits_one_chunk(tokens mapped, vocab)`), so no `[tokens, V]` logits are built."""
    if key is None and not greedy:
        raise ValueError("vocab.draw/sample needs a key unless greedy=True")
    with jax.named_scope("vocab"):
        hf, lead = _flat(h)
        w, vocab_major = _raw(w)
        spec = _spec(w, chunk_size, 1.0 / logp_temperature, masked_ids, dtype or h.dtype,
                     hf.shape[0] if one_chunk is None else one_chunk, vocab_major, mapped)
        tok, picked, lse = _sample_pass(
            jax.lax.stop_gradient(hf.astype(spec.dtype)), jax.lax.stop_gradient(w), key, spec,
            sample_temperature, greedy)
        return Draw(tok.reshape(lead), picked.reshape(lead), lse.reshape(lead))


def logp_of_draws(
    h: jax.Array,
    w: jax.Array | VocabMajor,
    d: Draw,
    *,
    logp_temperature: float = 1.0,
    masked_ids: tuple[int, ...] = (),
    chunk_size: int = DEFAULT_CHUNK,
    dtype: str | None = None,
) -> jax.Array:
    """`log softmax((h @ w) / logp_temperature)[d.tok]` over the vocabulary less
    `masked_ids`, float32 `[...]`, with gradient in h `[..., H]` and w, for tokens drawn
    by `draw` from the same h, w and settings: its value needs no vocabulary pass. A draw made
    with another chunk size or stack is fine (the statistics do not depend on them).
    Draws of several steps can be stacked into one call (one backward pass)."""
    with jax.named_scope("vocab"):
        hf, lead = _flat(h)
        w, vocab_major = _raw(w)
        spec = _spec(w, chunk_size, 1.0 / logp_temperature, masked_ids, dtype or h.dtype,
                     hf.shape[0], vocab_major)
        logp = _logp_of_drawn(hf.astype(spec.dtype), w, d.tok.reshape(-1), d.picked.reshape(-1),
                              d.lse.reshape(-1), spec)
        return logp.reshape(lead)
