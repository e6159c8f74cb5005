"""Quiet-STaR thoughts: ThoughtConfig, the thought params (`ThoughtParams`: start/end
embeddings, `MixingHead`), the parallel rollout."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from quietstar_jax import model, vocab
from quietstar_jax.model import KV, ModelConfig, Params
from quietstar_jax.schedule import END, SAMPLED, START, ThoughtSchedule, window_visible
from quietstar_jax.vocab import sample_categorical  # noqa: F401  (re-export)

SAMPLING_MODES = ("sample", "greedy", "pause")
THOUGHT_LOGIT_MASK = -1e10


@dataclasses.dataclass(frozen=True)
class ThoughtConfig:
    """Every setting of Quiet-STaR; defaults are the authors' released code's.

    n_ahead: the base step plus the thought (start, `n_ahead - 3` sampled tokens, end).
    n_ahead_talk: how many true future tokens each thought is scored on.
    n_passes: independent thoughts per sequence (rows repeated consecutively).
    sampling: "sample" (softmax at `thought_temperature`), "greedy" (argmax), or "pause"
      (every thought token is `pause_token_id`: same compute, no content, no policy loss;
      the pause control of the thinking experiment).
    pause_token_id: the token fed as every thought token when `sampling == "pause"`.
    masked_token_ids: ids besides the two thought ids that thought sampling never draws
      (e.g. the tokenizer's special tokens; default none, as the authors).
    use_baseline: subtract the mean reward over passes (the authors' trice_mode).
    remove_negative_rewards: clamp rewards at 0 after the baseline.
    """

    n_ahead: int = 12
    n_ahead_talk: int = 4
    n_passes: int = 2
    thought_temperature: float = 1.0
    reinforce_temperature: float = 3.0
    embedding_scale: float = 100.0
    original_loss_weight: float = 0.5
    base_loss_beta: float = 1.0
    policy_loss_beta: float = 1e6
    remove_negative_rewards: bool = True
    use_baseline: bool = True
    sampling: str = "sample"
    start_token_id: int | None = None
    end_token_id: int | None = None
    pad_token_id: int | None = None
    pause_token_id: int | None = None
    masked_token_ids: tuple[int, ...] = ()
    init_token: str = "---"

    def __post_init__(self) -> None:
        if self.n_ahead < 3:
            raise ValueError(
                f"ThoughtConfig.n_ahead={self.n_ahead}: must be >= 3 (the base step, the "
                "start-of-thought and the end-of-thought tokens)"
            )
        if self.n_ahead_talk < 1:
            raise ValueError(f"ThoughtConfig.n_ahead_talk={self.n_ahead_talk}: must be >= 1")
        if self.n_passes < 1:
            raise ValueError(f"ThoughtConfig.n_passes={self.n_passes}: must be >= 1")
        for name in ("thought_temperature", "reinforce_temperature", "embedding_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ThoughtConfig.{name}={getattr(self, name)}: must be > 0")
        if not 0.0 <= self.original_loss_weight <= 1.0:
            raise ValueError(
                f"ThoughtConfig.original_loss_weight={self.original_loss_weight}: must be in [0, 1]"
            )
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(
                f"ThoughtConfig.sampling={self.sampling!r}: must be one of {SAMPLING_MODES}"
            )
        if self.sampling == "pause" and self.pause_token_id is None:
            raise ValueError("ThoughtConfig.sampling='pause' needs pause_token_id")
        object.__setattr__(self, "masked_token_ids", tuple(int(i) for i in self.masked_token_ids))

    @property
    def schedule(self) -> ThoughtSchedule:
        """The step schedule of a whole thought and its talk (`schedule.ThoughtSchedule`)."""
        return ThoughtSchedule.of(self)

    @property
    def num_steps(self) -> int:
        """Thought/talk steps after the base step: `n_ahead + n_ahead_talk - 2`."""
        return self.schedule.num_steps

    @property
    def num_sampled(self) -> int:
        """Sampled thought tokens per thought: `n_ahead - 3`."""
        return self.schedule.num_sampled

    def replace(self, **kw: Any) -> ThoughtConfig:
        return dataclasses.replace(self, **kw)

    def check_token_ids(self, vocab_size: int) -> None:
        """Raise unless start/end/pad ids are set and inside the vocabulary."""
        for name in ("start_token_id", "end_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is None:
                raise ValueError(
                    f"ThoughtConfig.{name} is not set: take it from a tokenizer with the thought "
                    "tokens added (hf.thought_token_ids) or set it for your checkpoint"
                )
            if not 0 <= v < vocab_size:
                raise ValueError(
                    f"ThoughtConfig.{name}={v} is outside the vocabulary [0, {vocab_size})"
                )
        if self.start_token_id == self.end_token_id:
            raise ValueError("ThoughtConfig.start_token_id and end_token_id must differ")
        extra = dict(masked_token_ids=self.masked_token_ids)
        if self.pause_token_id is not None:
            extra["pause_token_id"] = (self.pause_token_id,)
        for name, ids in extra.items():
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise ValueError(
                    f"ThoughtConfig.{name} has {bad[0]}, outside the vocabulary [0, {vocab_size})"
                )

    @property
    def sampled_masked_ids(self) -> tuple[int, ...]:
        """Ids that thought sampling never draws: the two thought ids and `masked_token_ids`."""
        ids = (self.start_token_id, self.end_token_id, *self.masked_token_ids)
        return tuple(dict.fromkeys(i for i in ids if i is not None))


class MixingHead(nnx.Module):
    """The mixing head: `[..., hidden]` x2 -> scalar weight `[...]` (float32, no sigmoid).

    relu(w0 [base, thought] + b0) -> relu(w1 . + b1) -> w2 .; torch-Linear default init
    (uniform +-1/sqrt(fan_in)) for the two hidden layers, zeros for the last, so the
    model starts as the base LM.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        h = cfg.hidden_size
        dt = jnp.dtype(cfg.param_dtype)
        hidden_in, hidden_out = uniform_init(2 * h), uniform_init(h)
        self.w0 = model.declare(rngs, hidden_in, (2 * h, h), ("mix_in", "embed"), dt)
        self.b0 = model.declare(rngs, hidden_in, (h,), ("embed",), dt)
        self.w1 = model.declare(rngs, hidden_out, (h, h), ("mix_in", "embed"), dt)
        self.b1 = model.declare(rngs, hidden_out, (h,), ("embed",), dt)
        self.w2 = model.declare(rngs, model.zeros_init, (h, 1), ("embed", "mix_out"), dt)

    def __call__(self, base_h: jax.Array, thought_h: jax.Array) -> jax.Array:
        f32 = lambda p: p[...].astype(jnp.float32)  # noqa: E731
        x = jnp.concatenate([base_h, thought_h], axis=-1).astype(jnp.float32)
        x = jax.nn.relu(x @ f32(self.w0) + f32(self.b0))
        x = jax.nn.relu(x @ f32(self.w1) + f32(self.b1))
        return (x @ f32(self.w2))[..., 0]


def uniform_init(fan_in: int) -> model.Init:
    """torch.nn.Linear's default: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn in float32."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


class ThoughtParams(nnx.Module):
    """The thought params (`params["thought"]`): the start/end-of-thought embeddings
    (stored divided by `embedding_scale`) and the mixing head.

    `init_embedding` `[hidden]`: both embeddings' initial value, already divided (the
    authors': the embedding row of the first token of "---"); zeros when None.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs,
                 init_embedding: jax.Array | None = None):
        dt = jnp.dtype(cfg.param_dtype)
        row = jnp.zeros((cfg.hidden_size,), dt) if init_embedding is None else init_embedding
        given = lambda key, shape, dtype: row.astype(dtype)  # noqa: E731
        # end_emb gets its own buffer (the train state is donated).
        copied = lambda key, shape, dtype: row.astype(dtype).copy()  # noqa: E731
        self.start_emb = model.declare(rngs, given, (cfg.hidden_size,), ("embed",), dt)
        self.end_emb = model.declare(rngs, copied, (cfg.hidden_size,), ("embed",), dt)
        self.mix = MixingHead(cfg, rngs=rngs)


class QuietStarLM(model.CausalLM):
    """A CausalLM with its thought params (`thought`): `to_params` of it is the whole
    params pytree the trainer, `quietstar_loss` and `generate` take. Its call is the
    plain LM's (`lm_logits`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, init_token_id: int = 0,
                 embedding_scale: float = 100.0):
        super().__init__(cfg, rngs=rngs)
        row = self.embed[...][init_token_id].astype(jnp.float32) / embedding_scale
        self.thought = ThoughtParams(cfg, rngs=rngs, init_embedding=row)


# Any config gives the same logical axes and the same mixing-head graph.
_PROBE = ModelConfig(vocab_size=1, hidden_size=1, intermediate_size=1, num_layers=1,
                     num_heads=1, num_kv_heads=1)


def thought_param_shapes(cfg: ModelConfig) -> Params:
    """Shapes of the thought params (`params["thought"]`)."""
    return model.param_shapes(cfg, ThoughtParams)


def thought_logical_axes() -> Params:
    """Logical axis names of the thought params (their `out_sharding` metadata)."""
    return model.param_logical_axes(_PROBE, ThoughtParams)


def init_thought_params(
    params: Params,
    cfg: ModelConfig,
    rng: jax.Array,
    init_token_id: int,
    embedding_scale: float = 100.0,
) -> Params:
    """Fresh thought params (`ThoughtParams`), as the authors initialise them.

    start/end embeddings: the embedding row of `init_token_id` (the first token of
    "---"), stored divided by `embedding_scale`. Mixing head: torch-Linear default
    init (uniform +-1/sqrt(fan_in)) for the two hidden layers, zeros for the last,
    so the model starts as the base LM.
    """
    row = params["embed"][init_token_id].astype(jnp.float32) / embedding_scale
    return model.to_params(ThoughtParams(cfg, rngs=nnx.Rngs(params=rng), init_embedding=row))


def mixing_weight(mix: Params, base_h: jax.Array, thought_h: jax.Array) -> jax.Array:
    """The mixing head (`MixingHead`) of params `mix`: `[..., hidden]` x2 -> scalar
    weight `[...]` (float32, no sigmoid)."""
    return model.from_params(mix, _PROBE, MixingHead)(base_h, thought_h)


def mask_thought_logits(logits: jax.Array, tc: ThoughtConfig) -> jax.Array:
    """Give the two thought ids (and `tc.masked_token_ids`) logit -1e10: never sampled.
    `[..., vocab]`."""
    for i in tc.sampled_masked_ids:
        logits = logits.at[..., i].set(THOUGHT_LOGIT_MASK)
    return logits


def thought_embedding(params: Params, tc: ThoughtConfig, which: str) -> jax.Array:
    """The used (scaled) start or end embedding `[hidden]`, float32."""
    return params["thought"][which].astype(jnp.float32) * tc.embedding_scale


def token_logp(
    params: Params, cfg: ModelConfig, tc: ThoughtConfig, h: jax.Array, tok: jax.Array
) -> jax.Array:
    """REINFORCE log-prob of thought token `tok` `[...]` drawn from the plain LM logits
    of hidden `h` `[..., hidden]`: `log softmax(r / reinforce_temperature)[tok]` with the
    thought ids masked, float32 `[...]` (fused: no `[..., vocab]` logits kept)."""
    return vocab.token_logp(
        h, model.vocab_table(params, cfg), tok, temperature=tc.reinforce_temperature,
        masked_ids=tc.sampled_masked_ids, chunk_size=cfg.vocab_chunk, dtype=cfg.dtype)


class Rollout(NamedTuple):
    """Everything the losses, generation and analysis read from one rollout.

    rows = batch * n_passes (or the batch given); S = tc.num_steps; T = tc.num_sampled.
    base_hidden: `[rows, seq, hidden]` final hidden of the base step (h0).
    base_kv: the base step's KV `[layers, rows, seq, kv_heads, head_dim]`.
    step_hidden: `[S, rows, seq, hidden]`, h_s for s = 1..S (index s - 1).
    thought_tokens: `[T, rows, seq]` int, the tokens fed on steps 2..n_ahead-2.
    thought_logp: `[T, rows, seq]` float32, log softmax(r / reinforce_temperature) of
      each fed thought token under the logits it was drawn from (with gradient);
      `[0, rows, seq]` for pause thoughts (nothing to reinforce).
    fed_tokens: `[S, rows, seq]` int, the token id fed on every step (start/end ids
      for the learned embeddings), for analysis.
    """

    base_hidden: jax.Array
    base_kv: KV
    step_hidden: jax.Array
    thought_tokens: jax.Array
    thought_logp: jax.Array
    fed_tokens: jax.Array


def teacher_forced_tokens(input_ids: jax.Array, shift: int, pad_id: int) -> jax.Array:
    """`x[i + shift]`, or `pad_id` past the end. `[rows, seq]` -> `[rows, seq]`."""
    if shift == 0:
        return input_ids
    pad = jnp.full(input_ids.shape[:-1] + (shift,), pad_id, input_ids.dtype)
    return jnp.concatenate([input_ids[..., shift:], pad], axis=-1)[..., : input_ids.shape[-1]]


def rollout(
    params: Params,
    cfg: ModelConfig,
    tc: ThoughtConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    rng: jax.Array | None,
    thought_tokens: jax.Array | None = None,
    *,
    num_steps: int | None = None,
) -> Rollout:
    """The parallel thought rollout: all positions think at once.

    input_ids, attention_mask: `[rows, seq]` (already repeated over passes).
    thought_tokens: optional int `[n_ahead - 3, rows, seq]` to feed instead of sampling.
    num_steps: how many thought/talk steps to run (default tc.num_steps).

    Step 0 is one causal forward over the sequence. On step s every position i is fed
    one token (start, a sampled token, end, or the true token `x[i + s - n_ahead + 1]`)
    at position id `pos[i] + s`; its query sees the base keys j <= i (causal mask,
    padding, sliding window) and position i's own keys from steps 1..s.

    The thought of one position is one function, `model.position_decoder` (its queries
    read the base keys/values of its row and its own earlier keys), mapped over the
    positions and rows with `jax.vmap` (`model.positions_decoder`); generation's
    `think_at` maps the same function over its chosen positions.

    A step whose token is sampled needs the previous step's output, so the steps up to
    the one before the last sampled token run one after another (one vmapped call each;
    the token is drawn outside the vmap, for all positions in one chunked vocabulary
    pass). The remaining steps (the last sampled token, end, talk; all steps when
    `thought_tokens` are given) have known inputs and run as one block: one vmapped call
    whose function takes a position's `block` queries at once, causal among themselves.
    """
    rows, seq = input_ids.shape
    if tc.sampling == "pause" and thought_tokens is None:
        thought_tokens = jnp.full((tc.num_sampled, rows, seq), tc.pause_token_id, jnp.int32)
    sch = ThoughtSchedule.of(tc, num_steps, given=thought_tokens is not None)
    window = cfg.sliding_window
    # With full rematerialisation the steps run without gradient and the backward pass
    # replays all of them together, layer by layer (`model.replay_layers`).
    replay = cfg.remat == "full" and sch.num_steps > 0
    run_params = jax.lax.stop_gradient(params) if replay else params
    valid = attention_mask.astype(bool)
    positions = model.default_positions(attention_mask)
    base = model.forward(run_params, cfg, input_ids, attention_mask, positions, trace=replay)
    h0, kv0 = base[:2]

    idx = jnp.arange(seq)
    base_ctx = (idx[None, :] <= idx[:, None])[None] & valid[:, None, :]  # [rows, q, k]
    dt = cfg.compute_dtype
    hidden_shape = (rows, seq, cfg.hidden_size)

    def ctx_mask_at(s: int) -> jax.Array:  # [rows, seq, seq]
        if window is None:
            return base_ctx
        q_pos = positions[:, :, None] + sch.position_offset(s)
        return base_ctx & window_visible(q_pos, positions[:, None, :], window)

    fed: list[jax.Array] = []  # the token fed on each step
    drawn: dict[int, vocab.Draw] = {}  # step -> its sampled token's draw
    w_out = model.vocab_table(run_params, cfg)
    vocab_kw = dict(logp_temperature=tc.reinforce_temperature,
                    masked_ids=tc.sampled_masked_ids, chunk_size=cfg.vocab_chunk,
                    dtype=cfg.dtype)

    def token_at(s: int, prev_h: jax.Array | None) -> jax.Array:
        """Step s's fed token `[rows, seq]` (drawing it from `prev_h` when sampled)."""
        kind = sch.kind(s)
        if kind == START:
            return jnp.full((rows, seq), tc.start_token_id, jnp.int32)
        if kind == SAMPLED:
            if thought_tokens is not None:
                return thought_tokens[sch.sampled_index(s)].astype(jnp.int32)
            greedy = tc.sampling == "greedy"
            drawn[s] = vocab.draw(prev_h, w_out,
                                  None if greedy else jax.random.fold_in(rng, s),
                                  sample_temperature=tc.thought_temperature, greedy=greedy,
                                  **vocab_kw)
            return drawn[s].tok
        if kind == END:
            return jnp.full((rows, seq), tc.end_token_id, jnp.int32)
        return teacher_forced_tokens(input_ids, sch.talk_shift(s), tc.pad_token_id)

    def embedding_at(p: Params, s: int) -> jax.Array:
        """Step s's input embedding `[rows, seq, hidden]` under params p."""
        kind = sch.kind(s)
        if kind in (START, END):
            which = "start_emb" if kind == START else "end_emb"
            emb = jnp.broadcast_to(thought_embedding(p, tc, which), hidden_shape)
        else:
            emb = model.embed_tokens(p, cfg, fed[s - 1])
        return emb.astype(dt)

    # Every step runs `model.positions_decoder`: the queries of one position (reading its
    # row's base keys and its own earlier keys) as one function, vmapped over positions
    # and rows. The loop below is over steps; the vocabulary ops (draws, log-probs) run
    # outside the vmap, on all positions at once, a vocabulary chunk at a time.
    own: list[KV] = []
    step_hidden, traces = [], []
    prev_h = None
    for s in sch.sequential_steps:
        fed.append(token_at(s, prev_h))
        # Own keys: steps 1..s-1, then the step's own new key; masked for padding queries.
        own_vis = sch.own_visible(s, jnp.arange(1, s + 1), window)
        own_mask = valid[:, :, None] & own_vis[None, None, :]
        out = model.positions_decoder(  # one query per position: t = 1
            run_params, cfg, embedding_at(run_params, s)[:, :, None],
            (positions + sch.position_offset(s))[:, :, None],
            (kv0, ctx_mask_at(s)[:, :, None]), own, own_mask[:, :, None], trace=replay,
        )
        own.append(KV(out[1].k[:, :, :, 0], out[1].v[:, :, :, 0]))
        step_hidden.append(out[0][:, :, 0])
        if replay:
            traces.append(model.LayerTrace(out[2].inputs[:, :, :, 0], out[2].last[:, :, 0]))
        prev_h = step_hidden[-1]

    block_steps = sch.block_steps
    if block_steps:
        # One call for the steps with known inputs: per position a group of queries,
        # causal among themselves, position-major `[rows, seq, group, ...]`.
        first = block_steps[0]
        for s in block_steps:
            fed.append(token_at(s, prev_h if s == first else None))
        emb = jnp.stack([embedding_at(run_params, s) for s in block_steps], axis=2)
        own_mask = sch.own_block_mask(block_steps, sch.steps, window)  # [g, slots]
        own_mask = valid[:, :, None, None] & own_mask[None, None]  # [rows, seq, g, slots]
        ctx_mask = jnp.stack([ctx_mask_at(s) for s in block_steps], axis=2)  # [rows, seq, g, L]
        offsets = jnp.asarray([sch.position_offset(s) for s in block_steps])
        blk_pos = positions[:, :, None] + offsets[None, None, :]
        out = model.positions_decoder(run_params, cfg, emb, blk_pos, (kv0, ctx_mask), own,
                                      own_mask, trace=replay)
        step_hidden.extend(jnp.moveaxis(out[0], 2, 0))
        if replay:
            traces.append(out[2])

    if replay:  # the differentiable outputs: the traced ones, with the replayed backward
        n = sch.num_steps
        offsets = jnp.asarray([sch.position_offset(s) for s in sch.steps])
        own_mask = sch.own_block_mask(sch.steps, sch.steps, window)
        geo = model.JointGeometry(
            base_positions=positions,
            base_mask=model.self_attention_mask(cfg, positions, attention_mask),
            step_positions=(positions[:, None, :] + offsets[None, :, None]).reshape(rows, -1),
            ctx_mask=jnp.concatenate([ctx_mask_at(s) for s in sch.steps], 1),
            own_mask=valid[:, :, None, None] & own_mask[None, None],
        )
        emb_steps = jnp.stack([embedding_at(params, s) for s in sch.steps], 1)
        out_b, out_s = model.replay_layers(
            cfg, params["layers"], model.embed_tokens(params, cfg, input_ids).astype(dt),
            emb_steps.reshape(rows, n * seq, -1), base[2], traces, geo)
        norm = lambda x: model.rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
        h0 = norm(out_b)
        step_hidden = list(jnp.moveaxis(norm(out_s).reshape(rows, n, seq, -1), 1, 0))

    # The REINFORCE log-probs (the token fed on step s was drawn from step s - 1's
    # hidden state), all drawn steps in one call and all given ones in another: one
    # backward vocabulary pass (and one output-matrix gradient) for each.
    w_grad = model.vocab_table(params, cfg)
    thought_logp = []
    if drawn:
        hs = jnp.stack([step_hidden[s - 2] for s in drawn])
        ds = vocab.Draw(*(jnp.stack(x) for x in zip(*drawn.values(), strict=True)))
        thought_logp.extend(vocab.logp_of_draws(hs, w_grad, ds, **vocab_kw))
    given = [s for s in sch.sampled_steps if s not in drawn]
    if given and tc.sampling != "pause":  # pause thoughts have no policy
        hs = jnp.stack([step_hidden[s - 2] for s in given])
        toks = jnp.stack([fed[s - 1] for s in given])
        thought_logp.extend(token_logp(params, cfg, tc, hs, toks))

    empty = jnp.zeros((0, rows, seq), jnp.int32)
    thought_toks = [fed[s - 1] for s in sch.sampled_steps]
    return Rollout(
        base_hidden=h0,
        base_kv=kv0,
        step_hidden=jnp.stack(step_hidden),
        thought_tokens=jnp.stack(thought_toks) if thought_toks else empty,
        thought_logp=jnp.stack(thought_logp) if thought_logp else empty.astype(jnp.float32),
        fed_tokens=jnp.stack(fed),
    )


def shift_left(x: jax.Array, k: int, axis: int = 1) -> jax.Array:
    """`x[i + k]` along `axis`, zeros past the end (same shape)."""
    if k == 0:
        return x
    x = jnp.moveaxis(x, axis, 0)
    out = jnp.concatenate([x[k:], jnp.zeros_like(x[:k])], axis=0)
    return jnp.moveaxis(out, 0, axis)


def mixed_hidden(
    params: Params, tc: ThoughtConfig, base_hidden: jax.Array, step_hidden: jax.Array, step: int
) -> tuple[jax.Array, jax.Array]:
    """Mix step `step`'s hidden with the base hidden that predicts the same target.

    base_hidden, step_hidden: `[rows, seq, hidden]`. With k = max(0, step - (n_ahead - 1)),
    b = h0[i + k]; w = mixing_head([b, h_s]); returns ((1 - w) b + w h_s `[rows, seq,
    hidden]`, w `[rows, seq]` float32). Positions with i + k past the end get b = 0.
    """
    b = shift_left(base_hidden, ThoughtSchedule.of(tc).base_shift(step))
    w = mixing_weight(params["thought"]["mix"], b, step_hidden)
    wd = w[..., None].astype(step_hidden.dtype)
    return (1 - wd) * b + wd * step_hidden, w
