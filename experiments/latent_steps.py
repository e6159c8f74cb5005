"""Does Quiet-STaR learn thoughts that help? A controlled run on two-step lookups.

    PYTHONPATH=. python experiments/latent_steps.py --out /tmp/latent   # full (<= 60 min)
    PYTHONPATH=. python experiments/latent_steps.py --out /tmp/q --quick  # <= 10 min
    PYTHONPATH=. python experiments/latent_steps.py --out /tmp/t --tune   # knobs, tune split

Protocol (see docs/EXPERIMENTS.md): pretrain small Llamas (one per pretraining seed)
as plain LMs on a mix of explicit and skipped documents (experiments/latent_corpus.py);
from each checkpoint train for the same number of steps, for every fine-tune seed:
(i) as a plain LM, (ii) with Quiet-STaR, (iii) with Quiet-STaR and REINFORCE off
(policy_loss_beta 0), (iv) with pause thoughts (every thought token the pause byte,
whose embedding only the pause thoughts train: no content, no policy loss), (v) with
Quiet-STaR at other thought lengths (`sweep`). Then measure, on held-out problems, the
NLL and exact-match accuracy of the answer token: plain LM, pause, thinking,
REINFORCE off, calibration only, the oracle's and random thoughts fed to the thinking
model, and the plain LM decoding the worked step itself (`worked_step`), with
per-problem bootstrap 95 % intervals; and what the thoughts at the answer positions
contain, before and after training. Writes `OUT/results.json`, `OUT/results.md`,
`OUT/answers.npz` (every per-answer value the intervals come from) and, when
matplotlib is installed, `OUT/latent_steps.png`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import traverse_util

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.latent_corpus import (  # noqa: E402
    DEFAULT_TASK,
    ENTITIES,
    Document,
    answer_offsets,
    get_task,
    make_document,
    problems_of,
)
from quietstar_jax import model  # noqa: E402
from quietstar_jax.command_line import CommandLine, UsageError  # noqa: E402
from quietstar_jax.model import ModelConfig, Params  # noqa: E402
from quietstar_jax.thought import ThoughtConfig, init_thought_params, mixed_hidden, rollout  # noqa: E402
from quietstar_jax.thought.loss import masked_mean, quietstar_loss, token_nll  # noqa: E402
from quietstar_jax.train.config import base_config  # noqa: E402
from quietstar_jax.train.model_setup import inline_model_config  # noqa: E402
from quietstar_jax.train.step import TrainState, init_state, make_optimizer, make_train_step  # noqa: E402
from quietstar_jax.train.tokenizer import ByteTokenizer  # noqa: E402

TOK = ByteTokenizer()
PAUSE_ID = ord("_")  # a byte no document contains
PRETRAIN_DATA_SEED = 101
FINETUNE_DATA_SEED = 202
EVAL_DOC_SEED = 303
ARMS = ("pretrained", "plain_lm", "pause", "thinking", "reinforce_off", "calibration_only",
        "oracle_thought", "random_thought", "worked_step")
DIFFERENCES = (("thinking", "plain_lm"), ("thinking", "pause"),
               ("thinking", "calibration_only"), ("thinking", "reinforce_off"),
               ("worked_step", "plain_lm"))


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Every number of a run (the presets below; `--set name=value` changes one)."""

    # The corpus (experiments/latent_corpus.py TASKS): "semi6" (worked step ";m;", which
    # the "-" init cannot write) or "dash4" (the first task, worked step "-m-").
    task: str = DEFAULT_TASK
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 172
    seq_len: int = 64
    # semi6 has 1.5x the facts of dash4: 0.75 explicit keeps each fact's exposure as in
    # dash4 at 0.5 (at 0.5 and 2000 steps the LM learnt no fact: loss flat at 1.10), and
    # fewer skipped documents leave fewer memorised composites.
    explicit_frac: float = 0.75
    pretrain_steps: int = 3000
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    steps: int = 200  # second phase, every arm
    batch: int = 16
    lr: float = 3e-4
    warmup: int = 20
    n_ahead: int = 4  # start, one sampled token, end
    n_ahead_talk: int = 2
    n_passes: int = 2
    thought_temperature: float = 1.0
    policy_loss_beta: float = 10.0
    # Chosen on the tune split (TUNE_GRID, docs/EXPERIMENTS.md); the authors' value is 100.
    embedding_scale: float = 1.0
    # The text the start/end-of-thought embeddings start from (the authors' "---"; no
    # "semi6" document contains "-", so its row is an untrained token's; in "dash4" the
    # dash opens the worked step); "" starts them at zero (`--set init_token=`).
    init_token: str = "---"
    # Added to the mixing head's output (ThoughtConfig.mixing_weight_offset; 0 is the
    # authors' head, which starts closed): 1 predicts from the post-thought hidden at first.
    mixing_weight_offset: float = 0.0
    # The first `use_warmup` second-phase steps of the thinking and REINFORCE-off arms
    # feed the true intermediate as the thought at the answer positions, NLL terms only:
    # they teach the model to use a thought's content, never which thought to write
    # (thought tokens are inputs, not targets). 0: off.
    use_warmup: int = 0
    # The second phase's documents: "train", the pretraining problems (their skipped
    # answers are memorised, so a thought cannot pay there), or "tune", compositions the
    # LM never saw (experiments/think_gate.py; docs/EXPERIMENTS.md, "Think gate").
    finetune_split: str = "train"
    sweep: tuple[int, ...] = ()  # other thought lengths to train (n_ahead always is)
    pretrain_seeds: tuple[int, ...] = (0, 1, 2)  # independently pretrained LMs
    seeds: tuple[int, ...] = (0, 1)  # fine-tune seeds, for every pretrained LM
    bootstrap: int = 2000  # resamples of the held-out problems for the 95 % intervals
    eval_docs: int = 160  # per form; skipped: 6 answers each, explicit: 4
    curve_docs: int = 48
    curve_points: int = 6
    log_every: int = 10


FULL = Protocol()
# One pretrained LM x one fine-tune seed, for the 10-minute budget from scratch (the
# quick runs of docs/EXPERIMENTS.md before 2026-12-07 had seeds 0, 1: `--set seeds=0,1`).
QUICK = Protocol(steps=100, pretrain_seeds=(0,), seeds=(0,), eval_docs=96,
                 curve_docs=24, curve_points=2)


# ------------------------------------------------------------------ data


def encode_batch(docs: list[Document], seq_len: int) -> dict[str, np.ndarray]:
    """BOS + bytes, right-padded with the pad id: int32 `[len(docs), seq_len]` x2."""
    ids = np.full((len(docs), seq_len), TOK.pad_token_id, np.int32)
    mask = np.zeros((len(docs), seq_len), np.int32)
    for r, d in enumerate(docs):
        t = TOK.encode(d.text, add_bos=True)[:seq_len]
        ids[r, :len(t)] = t
        mask[r, :len(t)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def train_batches(p: Protocol, data_seed: int, batch: int, with_oracle: bool = False,
                  split: str = "train") -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches of `split` (a fixed stream per `data_seed`):
    `input_ids`, `attention_mask` int32 `[batch, seq_len]`; with `with_oracle` also
    `oracle_thought` (the true intermediate at each answer position, the first entity
    elsewhere), for the use warm-up."""
    pool = problems_of(split, p.task)
    first_entity = ord(ENTITIES[0])
    i = 0
    while True:
        docs = [make_document(split, data_seed, i + j, explicit_frac=p.explicit_frac,
                              max_chars=p.seq_len - 4, pool=pool) for j in range(batch)]
        i += batch
        out = encode_batch(docs, p.seq_len)
        if not with_oracle:
            yield out
            continue
        oracle = np.full((batch, p.seq_len), first_entity, np.int32)
        for r, d in enumerate(docs):
            for off, prob in answer_offsets(d):
                oracle[r, off] = ord(prob.intermediate)  # position off predicts the answer
        yield out | {"oracle_thought": oracle}


@dataclasses.dataclass
class EvalSet:
    """Documents of one split and form, with the answer positions.

    positions: int32 `[docs, P]`, the token position whose prediction is the answer
    (-1: none); intermediates, answers: int `[docs, P]` (their byte ids); problem_ids:
    int `[docs, P]`, the problem's index in `problems_of(split, task)` (the unit the
    bootstrap resamples; -1: none).
    """

    docs: list[Document]
    batch: dict[str, np.ndarray]
    positions: np.ndarray
    intermediates: np.ndarray
    answers: np.ndarray
    problem_ids: np.ndarray

    @property
    def ok(self) -> np.ndarray:
        return self.positions >= 0


def eval_set(p: Protocol, split: str, explicit: bool, count: int) -> EvalSet:
    pool = problems_of(split, p.task)
    index = {q: i for i, q in enumerate(pool)}
    docs = [make_document(split, EVAL_DOC_SEED, i, explicit_frac=float(explicit),
                          max_chars=p.seq_len - 4, pool=pool) for i in range(count)]
    width = max(len(d.problems) for d in docs)
    pos = np.full((count, width), -1, np.int32)
    inter = np.zeros((count, width), np.int32)
    ans = np.zeros((count, width), np.int32)
    pid = np.full((count, width), -1, np.int32)
    for r, d in enumerate(docs):
        for j, (off, prob) in enumerate(answer_offsets(d)):
            pos[r, j] = off  # char offset o is token o + 1 (after BOS), predicted at o
            inter[r, j], ans[r, j] = ord(prob.intermediate), ord(prob.answer)
            pid[r, j] = index[prob]
    return EvalSet(docs, encode_batch(docs, p.seq_len), pos, inter, ans, pid)


# ------------------------------------------------------------------ model and steps


def model_config(p: Protocol) -> ModelConfig:
    m = base_config().model
    m.hidden_size, m.num_layers, m.num_heads = p.hidden, p.layers, p.heads
    m.num_kv_heads, m.intermediate_size = p.kv_heads, p.intermediate
    m.max_position_embeddings = 256
    return inline_model_config(m, TOK.vocab_size)


def thought_config(p: Protocol, n_ahead: int, sampling: str = "sample",
                   policy_loss_beta: float | None = None) -> ThoughtConfig:
    ids = TOK.thought_token_ids()
    beta = p.policy_loss_beta if policy_loss_beta is None else policy_loss_beta
    return ThoughtConfig(
        n_ahead=n_ahead, n_ahead_talk=p.n_ahead_talk, n_passes=p.n_passes,
        thought_temperature=p.thought_temperature, policy_loss_beta=beta,
        embedding_scale=p.embedding_scale, init_token=p.init_token or None,
        mixing_weight_offset=p.mixing_weight_offset, sampling=sampling,
        pause_token_id=PAUSE_ID if sampling == "pause" else None,
        masked_token_ids=(TOK.eos_token_id, TOK.bos_token_id), **ids)


def arm_thought_config(p: Protocol, arm: str, n_ahead: int | None = None) -> ThoughtConfig:
    """The ThoughtConfig an arm trains with: "thinking" (Quiet-STaR as configured),
    "reinforce_off" (the same with policy_loss_beta 0: only the NLL terms train the
    thoughts' use), "pause" (every thought token is PAUSE_ID, no policy loss)."""
    n = p.n_ahead if n_ahead is None else n_ahead
    if arm == "thinking":
        return thought_config(p, n)
    if arm == "reinforce_off":
        return thought_config(p, n, policy_loss_beta=0.0)
    if arm == "pause":
        return thought_config(p, n, "pause")
    raise ValueError(f"arm {arm!r} has no thoughts; expected thinking, reinforce_off or pause")


def make_plain_step(cfg: ModelConfig, optimizer: optax.GradientTransformation
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Jitted plain-LM update (next-token NLL of every non-padding target)."""

    def loss_fn(params: Params, ids: jax.Array, mask: jax.Array) -> jax.Array:
        lm = model.from_params(params, cfg)
        h, _ = lm.forward(ids, mask)
        logits = lm.logits(h[:, :-1]).astype(jnp.float32)
        tgt = ids[:, 1:]
        ok = mask[:, 1:].astype(bool) & (tgt != TOK.pad_token_id)
        return masked_mean(token_nll(logits, tgt), ok)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        loss, g = jax.value_and_grad(loss_fn)(state.params, batch["input_ids"],
                                              batch["attention_mask"])
        updates, opt = optimizer.update(g, state.opt_state, state.params)
        return (TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt),
                {"nll_base": loss})

    return jax.jit(step, donate_argnums=(0,))


def make_oracle_use_step(cfg: ModelConfig, tc: ThoughtConfig,
                         optimizer: optax.GradientTransformation, seed: int
                         ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Jitted update of the thinking model with the batch's `oracle_thought` fed as every
    sampled thought token (`quietstar_loss`'s thought_tokens) and the policy loss off:
    the NLL terms train the model to use the thought's content."""
    tc = tc.replace(policy_loss_beta=0.0)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        given = jnp.repeat(batch["oracle_thought"][None], tc.num_sampled, axis=0)
        given = jnp.repeat(given, tc.n_passes, axis=1)  # rows in the passes-repeated order
        (_, m), g = jax.value_and_grad(
            lambda prm: quietstar_loss(prm, cfg, tc, batch["input_ids"],
                                       batch["attention_mask"], key, given),
            has_aux=True)(state.params)
        updates, opt = optimizer.update(g, state.opt_state, state.params)
        return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt), m

    return jax.jit(step, donate_argnums=(0,))


@functools.cache
def make_eval_fn(cfg: ModelConfig, tc: ThoughtConfig) -> Callable[..., dict]:
    """Jitted, one per configuration (cached): answer-position NLL, argmax hit and
    thought of base and thinking.

    Inputs ids, mask `[rows, seq]`, positions `[rows, P]`; outputs `[rows, P]` arrays
    (`thought`: `[T, rows, P]`). Thinking = the mixed logits after the end-of-thought
    (one pass, n_ahead_talk = 1), as the authors evaluate; "thought side" = the
    end-of-thought hidden alone (what a mixing weight of 1 would give);
    "calibration" = the mixed prediction with the thought's logits replaced by zeros
    ((1 - w) x base logits: what the mixing head gains by shrinking the base logits
    alone, with no thought content). `given` `[n_ahead - 3, rows, seq]`: thought tokens
    to feed instead of sampling (the oracle and random-thought arms).
    """
    tc = tc.replace(n_ahead_talk=1, n_passes=1)
    s = tc.n_ahead - 1

    def fn(params: Params, ids: jax.Array, mask: jax.Array, pos: jax.Array,
           key: jax.Array, given: jax.Array | None = None) -> dict:
        ro = rollout(params, cfg, tc, ids, mask, key, given)
        mixed, w = mixed_hidden(params, tc, ro.base_hidden, ro.step_hidden[s - 1], s)
        p = jnp.maximum(pos, 0)
        tgt = jnp.take_along_axis(ids, p + 1, axis=1)

        def score(h: jax.Array) -> tuple[jax.Array, jax.Array]:
            hp = jnp.take_along_axis(h, p[..., None], axis=1)
            logits = model.logits_from_hidden(params, cfg, hp).astype(jnp.float32)
            return token_nll(logits, tgt), jnp.argmax(logits, -1) == tgt

        nb, hb = score(ro.base_hidden)
        nm, hm = score(mixed)
        ns, hs = score(ro.step_hidden[s - 1])  # the thought side alone (weight 1)
        # logits are linear in the hidden: (1 - w) h_base gives (1 - w) x base logits.
        nc, hc = score((1 - w)[..., None].astype(mixed.dtype) * ro.base_hidden)
        return {"nll_base": nb, "hit_base": hb, "nll_think": nm, "hit_think": hm,
                "nll_thought_side": ns, "hit_thought_side": hs,
                "nll_calibration": nc, "hit_calibration": hc,
                "weight": jnp.take_along_axis(w, p, axis=1),
                "thought": jnp.take_along_axis(ro.thought_tokens, p[None], axis=2)}

    return jax.jit(fn)


def fed_thoughts(es: EvalSet, kind: str, num_sampled: int, seed: int) -> np.ndarray:
    """Thought tokens `[num_sampled, docs, seq]` to feed instead of sampling.

    "oracle": the true intermediate entity at every answer position (every thought
    token is it); "random": a uniformly random entity at every answer position. Other
    positions get the first entity; they are not scored, and a position's thought never
    sees another position's."""
    if kind not in ("oracle", "random"):
        raise ValueError(f"thought kind {kind!r}: must be 'oracle' or 'random'")
    docs, seq = es.batch["input_ids"].shape
    entities = np.frombuffer(ENTITIES.encode(), np.uint8).astype(np.int32)
    out = np.full((num_sampled, docs, seq), entities[0], np.int32)
    ok = es.positions >= 0
    if kind == "oracle":
        values = es.intermediates
    else:
        values = np.random.default_rng([seed, 77]).choice(entities, es.positions.shape)
    rows, cols = np.nonzero(ok)
    out[:, rows, es.positions[rows, cols]] = values[rows, cols]
    return out


def evaluate(fn: Callable[..., dict], params: Params, es: EvalSet, seed: int,
             chunk: int = 32, given: np.ndarray | None = None) -> dict[str, Any]:
    """Means over every answer of `es`, plus the raw arrays (numpy) for analysis.
    `given` `[T, docs, seq]`: thought tokens to feed (`fed_thoughts`) instead of sampling.
    Every call sees `chunk` rows (the last chunk padded with BOS-only rows that have no
    answers), so each configuration compiles once."""
    outs = []
    for i in range(0, len(es.docs), chunk):
        sl = slice(i, i + chunk)
        n = len(es.docs[sl])

        def pad(x: np.ndarray, fill: int, axis: int = 0, n: int = n) -> np.ndarray:
            width = [(0, 0)] * x.ndim
            width[axis] = (0, chunk - n)
            return np.pad(x, width, constant_values=fill)

        ids = pad(es.batch["input_ids"][sl], TOK.pad_token_id)
        mask = pad(es.batch["attention_mask"][sl], 0)
        ids[n:, 0], mask[n:, 0] = TOK.bos_token_id, 1
        key = jax.random.fold_in(jax.random.key(seed), 1_000_000 + i)
        extra = () if given is None else (pad(given[:, sl], int(given.min()), axis=1),)
        o = jax.device_get(fn(params, ids, mask, pad(es.positions[sl], -1), key, *extra))
        outs.append({k: v[:, :n] if k == "thought" else v[:n] for k, v in o.items()})
    raw = {k: np.concatenate([o[k] for o in outs], axis=1 if k == "thought" else 0)
           for k in outs[0]}
    ok = es.ok
    keys = ("nll_base", "hit_base", "nll_think", "hit_think", "nll_thought_side",
            "hit_thought_side", "nll_calibration", "hit_calibration", "weight")
    out: dict[str, Any] = {k: float(raw[k][ok].mean()) for k in keys}
    # Per answer (in `es.ok` order), for the bootstrap intervals.
    answers = {k: raw[k][ok].astype(np.float64) for k in keys}
    th = raw["thought"]  # [T, docs, P]
    if th.shape[0]:
        has = (th == es.intermediates[None]).any(axis=0)
        answers["intermediate_in_thought"] = has[ok].astype(np.float64)
        first = _first_entity(th)
        out["intermediate_in_thought"] = float(has[ok].mean())
        out["first_entity_is_intermediate"] = float((first == es.intermediates)[ok].mean())
        out["answer_in_thought"] = float((th == es.answers[None]).any(axis=0)[ok].mean())
        # Chance level: the same thoughts against the intermediates of other problems.
        other = np.roll(es.intermediates[ok], 1)
        out["intermediate_in_thought_chance"] = float(
            (th[:, ok] == other[None]).any(axis=0).mean())
        out["thought_has_entity"] = float((first >= 0)[ok].mean())
    out["raw"] = raw
    out["answers"] = answers
    return out


@functools.cache
def make_next_logits_fn(cfg: ModelConfig) -> Callable[..., jax.Array]:
    """Jitted: the plain LM's logits `[rows, vocab]` at position `pos` `[rows]`."""

    def fn(params: Params, ids: jax.Array, mask: jax.Array, pos: jax.Array) -> jax.Array:
        lm = model.from_params(params, cfg)
        h, _ = lm.forward(ids, mask)
        hp = jnp.take_along_axis(h, pos[:, None, None], axis=1)[:, 0]
        return lm.logits(hp).astype(jnp.float32)

    return jax.jit(fn)


def worked_step(params: Params, cfg: ModelConfig, es: EvalSet, delim: str,
                chunk: int = 256) -> dict[str, Any]:
    """The model writes the step itself: for every answer of `es`, the document up to the
    question's "=", then the worked-step delimiter; the greedy next token is taken as
    the intermediate, the delimiter closes it, and the answer token is scored there.

    Returns means and per-answer arrays (`es.ok` order): nll, hit (the answer's argmax),
    step_hit (the decoded intermediate is right)."""
    fn = make_next_logits_fn(cfg)
    ids, (d,) = es.batch["input_ids"], TOK.encode(delim, add_bos=False)
    rows, cols = np.nonzero(es.ok)
    offs = es.positions[rows, cols]  # token index of "=" (the answer is at off + 1)
    n, seq = len(rows), ids.shape[1]
    if int(offs.max(initial=0)) + 4 > seq:
        raise ValueError("worked_step: no room for the worked step in seq_len")
    seqs = np.full((n, seq), TOK.pad_token_id, np.int32)
    for i, (r, o) in enumerate(zip(rows, offs, strict=True)):
        seqs[i, :o + 1] = ids[r, :o + 1]
        seqs[i, o + 1] = d
    mask = (np.arange(seq)[None] <= (offs + 3)[:, None]).astype(np.int32)

    def logits_at(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(jax.device_get(
            fn(params, x[i:i + chunk], mask[i:i + chunk], pos[i:i + chunk])))
            for i in range(0, n, chunk)]) if n else np.zeros((0, cfg.vocab_size))

    step = logits_at(seqs, offs + 1).argmax(-1)  # greedy intermediate
    seqs[np.arange(n), offs + 2] = step
    seqs[np.arange(n), offs + 3] = d
    logits = logits_at(seqs, offs + 3).astype(np.float64)
    target = es.answers[rows, cols]
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    nll = -logp[np.arange(n), target]
    hit = (logits.argmax(-1) == target).astype(np.float64)
    step_hit = (step == es.intermediates[rows, cols]).astype(np.float64)
    return {"nll_think": float(nll.mean()), "hit_think": float(hit.mean()),
            "step_correct": float(step_hit.mean()),
            "answers": {"nll_think": nll, "hit_think": hit, "step_correct": step_hit}}


def _first_entity(th: np.ndarray) -> np.ndarray:
    """Byte id of the first entity byte of each thought `[T, ...]` -> `[...]` (-1: none)."""
    isd = np.isin(th, np.frombuffer(ENTITIES.encode(), np.uint8).astype(th.dtype))
    idx = np.argmax(isd, axis=0)
    val = np.take_along_axis(th, idx[None], axis=0)[0]
    return np.where(isd.any(axis=0), val, -1)


# ------------------------------------------------------------------ runs


PRETRAIN_FIELDS = ("task", "hidden", "layers", "heads", "kv_heads", "intermediate", "seq_len",
                   "explicit_frac", "pretrain_steps", "pretrain_batch", "pretrain_lr")


def params_layout(cfg: ModelConfig) -> list[str]:
    """The params' paths, sorted ("layers/attn/q", ...): part of a pretrained-LM cache
    key, so that a cache written with another layout is not read."""
    return ["/".join(k) for k in sorted(traverse_util.flatten_dict(model.param_shapes(cfg)))]


def pretrained(p: Protocol, seed: int, log: Callable[[str], None],
               cache_dir: str | None = None) -> Params:
    """`pretrain(p, seed)`, read from `cache_dir` when an identical run was saved there
    (the run is deterministic: same fields, same params)."""
    if not cache_dir:
        return pretrain(p, seed, log)
    import hashlib
    import pickle

    fields = PRETRAIN_FIELDS[1:] if p.task == "dash4" else PRETRAIN_FIELDS
    key = json.dumps([seed] + [getattr(p, f) for f in fields] + params_layout(model_config(p)))
    path = os.path.join(cache_dir, f"pretrained_{hashlib.sha1(key.encode()).hexdigest()[:12]}.pkl")
    if os.path.exists(path):
        log(f"  pretrained params from {path}")
        with open(path, "rb") as f:
            return jax.tree.map(jnp.asarray, pickle.load(f))
    params = pretrain(p, seed, log)
    os.makedirs(cache_dir, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(jax.device_get(params), f)
    return params


def pretrain(p: Protocol, seed: int, log: Callable[[str], None]) -> Params:
    """A plain LM from random init on the mixed corpus; returns its params."""
    cfg = model_config(p)
    params = model.init_params(cfg, jax.random.key(seed))
    opt, _ = make_optimizer(p.pretrain_lr, p.pretrain_steps, warmup_steps=50,
                            end_lr_ratio=0.1, weight_decay=0.01)
    state = init_state(params, opt)
    step = make_plain_step(cfg, opt)
    data = train_batches(p, PRETRAIN_DATA_SEED + seed, p.pretrain_batch)
    t0 = time.time()
    for i in range(p.pretrain_steps):
        state, m = step(state, next(data))
        if (i + 1) % 100 == 0 or i + 1 == p.pretrain_steps:
            log(f"  pretrain seed {seed} step {i + 1}: nll {float(m['nll_base']):.3f} "
                f"({time.time() - t0:.0f}s)")
    return state.params


def add_thought_params(params: Params, cfg: ModelConfig, seed: int,
                       embedding_scale: float = 100.0, init_token: str = "---") -> Params:
    """The pretrained LM plus fresh thought params (embeddings from the first byte of
    `init_token`, zeros for "", zero mixing)."""
    out = dict(params)
    out["thought"] = init_thought_params(params, cfg, jax.random.key(10_000 + seed),
                                         TOK.init_token_id(init_token or None),
                                         embedding_scale)
    return jax.tree.map(jnp.copy, out)


def finetune(p: Protocol, arm: str, n_ahead: int, params: Params, seed: int,
             curve_fn: Callable[[Params, int], dict], log: Callable[[str], None]
             ) -> tuple[Params, list[dict], list[dict]]:
    """Second phase from the pretrained `params` (with thought params).

    arm: "plain" | "thinking" | "reinforce_off" | "pause". Returns (final params, training
    metrics every `log_every` steps, eval curve points).
    """
    cfg = model_config(p)
    opt, sched = make_optimizer(p.lr, p.steps, warmup_steps=p.warmup, end_lr_ratio=0.1,
                                weight_decay=0.01)
    state = init_state(params, opt)
    warm = p.use_warmup if arm in ("thinking", "reinforce_off") else 0
    if arm == "plain":
        step = make_plain_step(cfg, opt)
    else:
        tc = arm_thought_config(p, arm, n_ahead)
        step = make_train_step(cfg, tc, opt, schedule=sched, seed=seed)
        if warm:
            warm_step = make_oracle_use_step(cfg, tc, opt, seed)
    data = train_batches(p, FINETUNE_DATA_SEED + seed, p.batch, with_oracle=warm > 0,
                         split=p.finetune_split)
    marks = set(np.linspace(0, p.steps, p.curve_points).round().astype(int).tolist())
    history, curve, window = [], [], []
    t0 = time.time()
    for i in range(p.steps + 1):
        if i in marks:
            curve.append({"step": i, **curve_fn(state.params, i)})
        if i == p.steps:
            break
        batch = next(data)
        if i < warm:
            state, m = warm_step(state, batch)
        else:
            batch.pop("oracle_thought", None)
            state, m = step(state, batch)
        window.append(jax.device_get(m))
        if (i + 1) % p.log_every == 0:
            keys = ("nll_base", "nll_thought", "reward_mean", "reward_std",
                    "reward_positive_frac", "mixing_weight_mean", "policy_loss")
            rec = {"step": i + 1}
            rec |= {k: float(np.mean([w[k] for w in window])) for k in keys if k in window[0]}
            history.append(rec)
            window = []
    log(f"  {arm} n_ahead={n_ahead} seed {seed}: {p.steps} steps in {time.time() - t0:.0f}s; "
        f"last {json.dumps({k: round(v, 4) for k, v in history[-1].items()})}")
    return state.params, history, curve


def summary_of(ev: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in ev.items() if k not in ("raw", "answers")}


def examples(ev: dict[str, Any], es: EvalSet, n: int = 8) -> list[dict[str, Any]]:
    """The first `n` answers: question, thought text, digits, probabilities."""
    raw, out = ev["raw"], []
    for r, d in enumerate(es.docs):
        for j, (_, prob) in enumerate(answer_offsets(d)):
            thought = TOK.decode(raw["thought"][:, r, j].tolist()) if raw["thought"].size else ""
            out.append({"question": prob.question, "intermediate": prob.intermediate,
                        "answer": prob.answer, "thought": thought,
                        "p_answer_base": round(float(np.exp(-raw["nll_base"][r, j])), 4),
                        "p_answer_thinking": round(float(np.exp(-raw["nll_think"][r, j])), 4),
                        "mixing_weight": round(float(raw["weight"][r, j]), 4)})
            if len(out) == n:
                return out
    return out


def run_seed(p: Protocol, seed: int, lm: Params, log: Callable[[str], None],
             split: str = "eval", lm_seed: int = 0) -> dict[str, Any]:
    """Every arm from the pretrained `lm` (pretraining seed `lm_seed`) with fine-tune
    `seed` (thought params, thought sampling, data order); evaluated on `split`.

    Besides the summaries, "_answers" (arm -> {"nll", "hit"}: per-answer arrays of the
    held-out skipped answers), "_intermediate" (before_training / thinking /
    reinforce_off -> per answer, 1 if the answer-position thought holds the
    intermediate) and "_problem_ids" (per answer), which `collect` turns into intervals.
    """
    cfg = model_config(p)
    sets = {"skipped": eval_set(p, split, False, p.eval_docs),
            "explicit": eval_set(p, split, True, p.eval_docs)}
    curve_set = eval_set(p, split, False, p.curve_docs)
    arms = [("plain", p.n_ahead), ("thinking", p.n_ahead), ("reinforce_off", p.n_ahead),
            ("pause", p.n_ahead)]
    arms += [("thinking", n) for n in p.sweep if n != p.n_ahead]
    out: dict[str, Any] = {"lm": lm_seed, "seed": seed, "arms": {}}
    answers: dict[str, dict[str, np.ndarray]] = {}
    inter: dict[str, np.ndarray] = {}

    def keep(name: str, a: dict[str, np.ndarray], key: str) -> None:
        answers[name] = {"nll": a[f"nll_{key}"], "hit": a[f"hit_{key}"]}

    start = add_thought_params(lm, cfg, seed, p.embedding_scale, p.init_token)
    ev_fn = make_eval_fn(cfg, thought_config(p, p.n_ahead))
    evs = {f: evaluate(ev_fn, start, es, seed) for f, es in sets.items()}
    out["pretrained"] = {f: summary_of(ev) for f, ev in evs.items()}
    out["examples_before_training"] = examples(evs["skipped"], sets["skipped"])
    keep("pretrained", evs["skipped"]["answers"], "base")
    inter["before_training"] = evs["skipped"]["answers"]["intermediate_in_thought"]
    for arm, n in arms:
        fn = make_eval_fn(cfg, arm_thought_config(p, "thinking" if arm == "plain" else arm, n))

        def curve_fn(params: Params, step: int, fn: Callable = fn) -> dict:
            ev = evaluate(fn, params, curve_set, seed + step)
            return {k: ev[k] for k in ("nll_base", "nll_think", "hit_base", "hit_think",
                                       "weight", "intermediate_in_thought") if k in ev}

        t1 = time.time()
        params, hist, curve = finetune(p, arm, n, jax.tree.map(jnp.copy, start), seed,
                                       curve_fn, log)
        evs = {f: evaluate(fn, params, es, seed) for f, es in sets.items()}
        name = f"thinking_n{n}" if arm == "thinking" else arm
        out["arms"][name] = {"n_ahead": n, **{f: summary_of(ev) for f, ev in evs.items()},
                             "history": hist, "curve": curve,
                             "examples": examples(evs["skipped"], sets["skipped"])
                             if arm != "plain" else []}
        a = evs["skipped"]["answers"]
        if arm == "plain":
            keep("plain_lm", a, "base")
            ws = worked_step(params, cfg, sets["skipped"], get_task(p.task).delim)
            out["arms"]["worked_step"] = {"skipped": summary_of(ws)}
            keep("worked_step", ws["answers"], "think")
        elif arm == "pause":
            keep("pause", a, "think")
        elif arm == "reinforce_off":
            keep("reinforce_off", a, "think")
            inter["reinforce_off"] = a["intermediate_in_thought"]
        elif n == p.n_ahead:
            keep("thinking", a, "think")
            keep("thinking_no_thought", a, "base")
            keep("calibration_only", a, "calibration")
            inter["thinking"] = a["intermediate_in_thought"]
            for kind in ("oracle", "random"):
                fed = fed_thoughts(sets["skipped"], kind, thought_config(p, n).num_sampled,
                                   seed)
                ev = evaluate(fn, params, sets["skipped"], seed, given=fed)
                out["arms"][f"{kind}_thought"] = {"skipped": summary_of(ev)}
                keep(f"{kind}_thought", ev["answers"], "think")
        out["arms"][name]["time_s"] = time.time() - t1
        s = out["arms"][name]["skipped"]
        log(f"  {name} lm {lm_seed} seed {seed}: skipped answer nll base {s['nll_base']:.3f} "
            f"thinking {s['nll_think']:.3f}; acc base {s['hit_base']:.3f} thinking "
            f"{s['hit_think']:.3f}" + (f"; intermediate in thought "
                                       f"{s['intermediate_in_thought']:.3f}"
                                       if "intermediate_in_thought" in s else ""))
    ws = out["arms"]["worked_step"]["skipped"]
    log(f"  worked_step lm {lm_seed} seed {seed}: acc {ws['hit_think']:.3f} nll "
        f"{ws['nll_think']:.3f}; step correct {ws['step_correct']:.3f}")
    out["_answers"], out["_intermediate"] = answers, inter
    out["_problem_ids"] = sets["skipped"].problem_ids[sets["skipped"].ok]
    out["_worked_step_correct"] = out["arms"]["worked_step"]["skipped"]["step_correct"]
    return out


# ------------------------------------------------------------------ results


def bootstrap_ci(values: np.ndarray, groups: np.ndarray, samples: int, seed: int = 0,
                 level: float = 0.95) -> list[float]:
    """Per-problem bootstrap interval of a mean.

    values: `[answers]` or `[runs, answers]` (every run scored on the same answers);
    groups: `[answers]`, the problem of each answer. Each resample draws as many
    problems as there are, uniformly with replacement (`rng.integers`), and takes the
    mean over runs and over every answer of the drawn problems (a problem drawn twice
    counts twice); the interval is the percentile interval of those means."""
    v = np.asarray(values, np.float64)
    if v.ndim == 2:
        v = v.mean(axis=0)  # the same answers in every run: mean over runs first
    _, inv = np.unique(np.asarray(groups), return_inverse=True)
    k = int(inv.max()) + 1
    sums = np.bincount(inv, weights=v, minlength=k)
    counts = np.bincount(inv, minlength=k).astype(np.float64)
    idx = np.random.default_rng(seed).integers(k, size=(samples, k))
    w = np.zeros((samples, k))
    np.add.at(w, (np.arange(samples)[:, None], idx), 1.0)
    stats = (w @ sums) / (w @ counts)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return [float(lo), float(hi)]


def _entry(per_run: list[np.ndarray], groups: np.ndarray, samples: int) -> dict[str, Any]:
    """{"mean", "per_seed" (each run's mean, in `runs` order), "ci95"} of per-answer values."""
    stacked = np.stack(per_run)
    return {"mean": float(stacked.mean()), "per_seed": [float(r.mean()) for r in stacked],
            "ci95": bootstrap_ci(stacked, groups, samples)}


def _mean_seeds(values: list[float]) -> dict[str, Any]:
    return {"mean": float(np.mean(values)), "per_seed": [float(v) for v in values]}


def collect(p: Protocol, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """results.json: for each arm and measure the mean over runs (pretrained LM x
    fine-tune seed), every run's value and a per-problem bootstrap 95 % interval; the
    same for the differences, also per pretrained LM. Pops the per-answer arrays from
    `runs` and returns them as "_answers" (for answers.npz)."""
    groups = runs[0]["_problem_ids"]
    for r in runs:
        if not np.array_equal(r["_problem_ids"], groups):
            raise ValueError("every run must be scored on the same held-out answers")
    ans = [r.pop("_answers") for r in runs]
    inter = [r.pop("_intermediate") for r in runs]
    for r in runs:
        r.pop("_problem_ids")
    lms = sorted({r["lm"] for r in runs})
    b = p.bootstrap
    res: dict[str, Any] = {"runs": [{"lm": r["lm"], "seed": r["seed"]} for r in runs]}
    for table, metric in (("answer_accuracy", "hit"), ("answer_nll", "nll")):
        t: dict[str, Any] = {arm: _entry([a[arm][metric] for a in ans], groups, b)
                             for arm in ARMS + ("thinking_no_thought",)}
        diffs = {}
        for x, y in DIFFERENCES:
            d = [a[x][metric] - a[y][metric] for a in ans]
            e = _entry(d, groups, b)
            e["per_lm"] = {str(lm): _entry([v for v, r in zip(d, runs, strict=True)
                                            if r["lm"] == lm], groups, b) for lm in lms}
            diffs[f"{x}_minus_{y}"] = e
        t["differences"] = diffs
        res[table] = t
    res["intermediate_in_thought"] = {
        k: _entry([i[k] for i in inter], groups, b)
        for k in ("before_training", "thinking", "reinforce_off")}
    res["intermediate_in_thought"]["chance"] = _mean_seeds(
        [r["arms"][f"thinking_n{p.n_ahead}"]["skipped"]["intermediate_in_thought_chance"]
         for r in runs])
    res["worked_step_intermediate_correct"] = _mean_seeds(
        [r.pop("_worked_step_correct") for r in runs])
    res["mixing_weight"] = {
        arm: _mean_seeds([r["arms"][name]["skipped"]["weight"] for r in runs])
        for arm, name in (("thinking", f"thinking_n{p.n_ahead}"),
                          ("reinforce_off", "reinforce_off"), ("pause", "pause"))}
    res["explicit"] = {
        "answer_accuracy": {
            "pretrained": _mean_seeds([r["pretrained"]["explicit"]["hit_base"] for r in runs]),
            "plain_lm": _mean_seeds([r["arms"]["plain"]["explicit"]["hit_base"] for r in runs]),
            "thinking": _mean_seeds([r["arms"][f"thinking_n{p.n_ahead}"]["explicit"]
                                     ["hit_think"] for r in runs])},
        "answer_nll": {
            "pretrained": _mean_seeds([r["pretrained"]["explicit"]["nll_base"] for r in runs]),
            "plain_lm": _mean_seeds([r["arms"]["plain"]["explicit"]["nll_base"] for r in runs]),
            "thinking": _mean_seeds([r["arms"][f"thinking_n{p.n_ahead}"]["explicit"]
                                     ["nll_think"] for r in runs])}}
    sweep = {}
    for n in sorted(set(p.sweep) | {p.n_ahead}):
        rows = [r["arms"][f"thinking_n{n}"]["skipped"] for r in runs]
        sweep[str(n)] = {k: _mean_seeds([s[m] for s in rows])
                         for k, m in (("accuracy_base", "hit_base"),
                                      ("accuracy_thinking", "hit_think"),
                                      ("nll_base", "nll_base"), ("nll_thinking", "nll_think"),
                                      ("intermediate_in_thought", "intermediate_in_thought"))}
    res["n_ahead_sweep"] = sweep
    res["uniform_guess"] = {"accuracy": 1 / len(ENTITIES), "nll": float(np.log(len(ENTITIES)))}
    res["answers_per_run"] = int(len(groups))
    res["problems"] = int(len(np.unique(groups)))
    res["pretrain_seeds"] = list(p.pretrain_seeds)
    res["seeds"] = list(p.seeds)
    res["protocol"] = dataclasses.asdict(p)
    res["per_seed"] = runs
    res["_answers"] = {"problem_ids": groups, **{
        f"{arm}_{m}": np.stack([a[arm][m] for a in ans]) for arm in ans[0] for m in ("nll", "hit")},
        **{f"intermediate_{k}": np.stack([i[k] for i in inter]) for k in inter[0]}}
    return res


ARM_LABELS = (
    ("pretrained", "pretrained LM, no thought"),
    ("plain_lm", "plain LM control (same second phase, no thought)"),
    ("pause", "pause control (learned pause token as every thought token)"),
    ("thinking", "Quiet-STaR, thinking"),
    ("reinforce_off", "Quiet-STaR, REINFORCE off (policy_loss_beta 0)"),
    ("calibration_only", "calibration only (thinking model, thought logits zeroed)"),
    ("oracle_thought", "oracle: true intermediate fed to the thinking model"),
    ("random_thought", "random entity fed to the thinking model"),
    ("worked_step", "worked step: plain LM decodes the step greedily"),
    ("thinking_no_thought", "Quiet-STaR model, no thought"),
)


def plot(results: dict[str, Any], path: str) -> bool:
    """Answer accuracy over training (per arm and run) and every arm's accuracy with its
    interval; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    p = results["protocol"]
    main = f"thinking_n{p['n_ahead']}"
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    lines = [(main, "hit_think", "Quiet-STaR, thinking", "C0"),
             ("reinforce_off", "hit_think", "REINFORCE off", "C3"),
             ("pause", "hit_think", "pause control", "C1"),
             ("plain", "hit_base", "plain LM control", "C2")]
    for arm, key, label, color in lines:
        for i, s in enumerate(results["per_seed"]):
            c = s["arms"][arm]["curve"]
            ax.plot([q["step"] for q in c], [q[key] for q in c], color=color, alpha=0.7,
                    label=label if i == 0 else None)
    ax.axhline(results["uniform_guess"]["accuracy"], color="k", ls=":", label="chance")
    ax.set_xlabel("training step after pretraining")
    ax.set_ylabel("answer accuracy, held-out skipped")
    ax.legend(fontsize=8)
    acc = results["answer_accuracy"]
    names = [k for k, _ in ARM_LABELS if k in acc]
    means = [acc[k]["mean"] for k in names]
    err = np.array([[acc[k]["mean"] - acc[k]["ci95"][0] for k in names],
                    [acc[k]["ci95"][1] - acc[k]["mean"] for k in names]])
    bx.bar(range(len(names)), means, yerr=err, color="C0", alpha=0.7, capsize=3)
    for i, k in enumerate(names):
        bx.plot([i] * len(acc[k]["per_seed"]), acc[k]["per_seed"], "k.", ms=4)
    bx.set_xticks(range(len(names)))
    bx.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
    bx.set_ylabel("answer accuracy (mean, 95 % CI, runs as dots)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _ci(e: dict[str, Any], digits: int = 3) -> str:
    lo, hi = e["ci95"]
    per = ", ".join(f"{v:.{digits}f}" for v in e["per_seed"])
    return f"{e['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}] ({per})"


def markdown(results: dict[str, Any]) -> str:
    """The tables of docs/EXPERIMENTS.md: mean [bootstrap 95 % interval] (per run)."""
    acc, nll = results["answer_accuracy"], results["answer_nll"]
    runs = ", ".join(f"lm {r['lm']} seed {r['seed']}" for r in results["runs"])
    u = results["uniform_guess"]
    out = [f"Held-out skipped answers ({results['answers_per_run']} per run, "
           f"{results['problems']} problems); runs in brackets: {runs}. Chance: accuracy "
           f"{u['accuracy']:.3f}, NLL {u['nll']:.2f}.", "",
           "| arm | answer accuracy | answer NLL |", "| --- | --- | --- |"]
    for key, label in ARM_LABELS:
        out.append(f"| {label} | {_ci(acc[key])} | {_ci(nll[key])} |")
    out += ["", "| difference | accuracy | NLL | accuracy per pretrained LM |",
            "| --- | --- | --- | --- |"]
    for k, e in acc["differences"].items():
        per_lm = "; ".join(f"lm {lm}: {v['mean']:+.3f} [{v['ci95'][0]:+.3f}, "
                           f"{v['ci95'][1]:+.3f}]" for lm, v in e["per_lm"].items())
        out.append(f"| {k.replace('_minus_', ' - ')} | {_ci(e)} | "
                   f"{_ci(nll['differences'][k])} | {per_lm} |")
    it = results["intermediate_in_thought"]
    out += ["", "| intermediate in the answer-position thought | rate |", "| --- | --- |"]
    for k in ("before_training", "thinking", "reinforce_off"):
        out.append(f"| {k} | {_ci(it[k])} |")
    out.append(f"| chance (another problem's intermediate) | {it['chance']['mean']:.3f} |")
    ws = results["worked_step_intermediate_correct"]
    out.append(f"| worked step: decoded intermediate correct | {ws['mean']:.3f} |")
    ex = results["explicit"]["answer_accuracy"]
    out += ["", "Explicit documents (the steps written out), answer accuracy: " + ", ".join(
        f"{k} {v['mean']:.3f}" for k, v in ex.items())
        + ". Mixing weight at the answer positions: " + ", ".join(
        f"{k} {v['mean']:.3f}" for k, v in results["mixing_weight"].items()) + "."]
    return "\n".join(out) + "\n"


def parse_overrides(p: Protocol, items: list[str]) -> Protocol:
    """`name=value` strings -> a Protocol with those fields changed (tuples as 4,6,8);
    UsageError for an unknown field or a value of the wrong type."""
    kw: dict[str, Any] = {}
    types = {f.name: f.type for f in dataclasses.fields(Protocol)}
    for item in items:
        name, _, value = item.partition("=")
        if name not in types:
            raise UsageError(f"--set {item}: unknown field {name!r}")
        current = getattr(p, name)
        try:
            if isinstance(current, tuple):
                kw[name] = tuple(int(v) for v in value.split(",") if v)
            else:
                kw[name] = type(current)(value)
        except ValueError as e:
            raise UsageError(f"--set {item}: {e}") from None
    return dataclasses.replace(p, **kw)


# Changes from the defaults as they were tuned (embedding_scale 100, lr 3e-4, beta 10,
# 2 passes); the best, embedding_scale 1, is now the default.
TUNE_GRID = (
    {"embedding_scale": 100.0},
    {"embedding_scale": 100.0, "lr": 1e-4},
    {"embedding_scale": 100.0, "policy_loss_beta": 1000.0},
    {"embedding_scale": 1.0},
    {"embedding_scale": 100.0, "n_passes": 4},
)


def tune(p: Protocol, lm: Params, out_dir: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Quiet-STaR knobs on the tune split (one seed, main thought length only)."""
    if p.finetune_split == "tune":
        raise ValueError("--tune scores on the tune split, which finetune_split=tune trains "
                         "on: fine-tune on the train split to tune")
    p = dataclasses.replace(p, seeds=p.seeds[:1], sweep=(p.n_ahead,))
    cfg = model_config(p)
    sets = {"skipped": eval_set(p, "tune", False, p.eval_docs)}
    rows = []
    for change in TUNE_GRID:
        q = dataclasses.replace(p, **change)
        start = add_thought_params(lm, cfg, q.seeds[0], q.embedding_scale, q.init_token)
        fn = make_eval_fn(cfg, thought_config(q, q.n_ahead))
        params, hist, _ = finetune(q, "thinking", q.n_ahead, jax.tree.map(jnp.copy, start),
                                   q.seeds[0], lambda *_: {}, log)
        ev = summary_of(evaluate(fn, params, sets["skipped"], q.seeds[0]))
        rows.append({"change": change, "tune_skipped": ev, "last_train": hist[-1]})
        log(f"  tune {change}: thinking nll {ev['nll_think']:.3f} base {ev['nll_base']:.3f}")
    best = min(rows, key=lambda r: r["tune_skipped"]["nll_think"])
    result = {"protocol": dataclasses.asdict(p), "rows": rows, "best": best["change"]}
    with open(os.path.join(out_dir, "tune.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("out", None, "output directory (results.json, plot)", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)
    flags.DEFINE_boolean("quick", False, "reduced run (<= 10 min)", flag_values=fv)
    flags.DEFINE_boolean("tune", False, "tune knobs on the tune split", flag_values=fv)
    flags.DEFINE_string("cache", None, "keep/reuse the pretrained LM here", flag_values=fv)
    flags.DEFINE_multi_string("set", [], "NAME=VALUE: change one Protocol field (repeatable)",
                              flag_values=fv)


COMMAND = CommandLine.script("experiments/latent_steps.py",
                             " ".join(__doc__.split("\n\n")[0].split()), _define)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; bad flags end with one `PROG: error: ...` line (exit 2)."""
    return COMMAND.main(_run, argv)


def _run(args: SimpleNamespace) -> int:
    p = parse_overrides(QUICK if args.quick else FULL, args.set)
    os.makedirs(args.out, exist_ok=True)
    log_file = open(os.path.join(args.out, "log.txt"), "a")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    t0 = time.time()
    log(f"latent_steps: {'quick' if args.quick else 'full'} protocol {dataclasses.asdict(p)}")
    if args.tune:
        lm = pretrained(p, p.pretrain_seeds[0], log, args.cache)
        res = tune(p, lm, args.out, log)
        log(f"best on the tune split: {res['best']} ({time.time() - t0:.0f}s)")
        return 0
    runs, t_pre = [], 0.0
    for lm_seed in p.pretrain_seeds:
        t1 = time.time()
        lm = pretrained(p, lm_seed, log, args.cache)
        t_pre += time.time() - t1
        for seed in p.seeds:
            runs.append(run_seed(p, seed, lm, log, lm_seed=lm_seed))
    results = collect(p, runs)
    answers = results.pop("_answers")
    np.savez_compressed(os.path.join(args.out, "answers.npz"), **answers)
    results["pretrain_time_s"] = t_pre
    results["wall_time_s"] = time.time() - t0
    results["quick"] = bool(args.quick)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plotted = plot(results, os.path.join(args.out, "latent_steps.png"))
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(results))
    acc, it = results["answer_accuracy"], results["intermediate_in_thought"]
    d = acc["differences"]["thinking_minus_plain_lm"]
    log("answer accuracy (held-out skipped): " + ", ".join(
        f"{k} {acc[k]['mean']:.3f}" for k in ARMS)
        + f"; thinking - plain {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
        + "; intermediate in thought " + ", ".join(f"{k} {it[k]['mean']:.3f}" for k in
                                                   ("before_training", "thinking",
                                                    "reinforce_off"))
        + f"; {results['wall_time_s']:.0f}s"
        + ("" if plotted else " (no plot: matplotlib is not installed)"))
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
