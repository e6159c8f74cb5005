"""Does Quiet-STaR learn thoughts that help? A controlled run on two-step arithmetic.

    PYTHONPATH=. python experiments/latent_steps.py --out /tmp/latent   # full (<= 60 min)
    PYTHONPATH=. python experiments/latent_steps.py --out /tmp/q --quick  # <= 10 min
    PYTHONPATH=. python experiments/latent_steps.py --out /tmp/t --tune   # knobs, tune split

Protocol (see docs/EXPERIMENTS.md): pretrain a small Llama as a plain LM on a mix of
explicit and skipped documents (experiments/latent_corpus.py); from that checkpoint
train for the same number of steps (i) as a plain LM, (ii) with Quiet-STaR, (iii) with
pause thoughts (fixed tokens, no policy loss), (iv) with Quiet-STaR at other thought
lengths; for every seed. Then measure, on held-out problems, the NLL and exact-match
accuracy of the answer token without (base) and with (thinking) a thought, and what
the thoughts at the answer positions contain. Writes `OUT/results.json` and, when
matplotlib is installed, `OUT/latent_steps.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.latent_corpus import (  # noqa: E402
    ENTITIES,
    Document,
    answer_offsets,
    make_document,
    problems_of,
)
from quietstar_jax import model  # noqa: E402
from quietstar_jax.loss import masked_mean, token_nll  # noqa: E402
from quietstar_jax.model import ModelConfig, Params  # noqa: E402
from quietstar_jax.thoughts import ThoughtConfig, init_thought_params, mixed_hidden, rollout  # noqa: E402
from quietstar_jax.train.config import base_config  # noqa: E402
from quietstar_jax.train.model_setup import inline_model_config  # noqa: E402
from quietstar_jax.train.step import TrainState, init_state, make_optimizer, make_train_step  # noqa: E402
from quietstar_jax.train.tokenizer import ByteTokenizer  # noqa: E402

TOK = ByteTokenizer()
PAUSE_ID = ord("_")  # a byte no document contains
PRETRAIN_DATA_SEED = 101
FINETUNE_DATA_SEED = 202
EVAL_DOC_SEED = 303
PRETRAIN_SEED = 0  # one pretrained LM; the seeds vary everything after it


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Every number of a run (the presets below; `--set name=value` changes one)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 172
    seq_len: int = 64
    explicit_frac: float = 0.5
    pretrain_steps: int = 2000
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
    # The text the start/end-of-thought embeddings start from (the authors' "---", whose
    # dash opens this corpus's worked step); "" starts them at zero (`--set init_token=`).
    init_token: str = "---"
    sweep: tuple[int, ...] = (4, 6, 8)
    seeds: tuple[int, ...] = (0, 1)
    eval_docs: int = 160  # per form; skipped: 6 answers each, explicit: 4
    curve_docs: int = 48
    curve_points: int = 6
    log_every: int = 10


FULL = Protocol()
QUICK = Protocol(pretrain_steps=2000, steps=100, sweep=(4,), seeds=(0, 1), eval_docs=48,
                 curve_docs=24, curve_points=3)


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


def train_batches(p: Protocol, data_seed: int, batch: int) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches of the train split (a fixed stream per `data_seed`)."""
    pool = problems_of("train")
    i = 0
    while True:
        docs = [make_document("train", data_seed, i + j, explicit_frac=p.explicit_frac,
                              max_chars=p.seq_len - 4, pool=pool) for j in range(batch)]
        i += batch
        yield encode_batch(docs, p.seq_len)


@dataclasses.dataclass
class EvalSet:
    """Documents of one split and form, with the answer positions.

    positions: int32 `[docs, P]`, the token position whose prediction is the answer
    (-1: none); intermediates, answers: int `[docs, P]` (their byte ids).
    """

    docs: list[Document]
    batch: dict[str, np.ndarray]
    positions: np.ndarray
    intermediates: np.ndarray
    answers: np.ndarray


def eval_set(p: Protocol, split: str, explicit: bool, count: int) -> EvalSet:
    pool = problems_of(split)
    docs = [make_document(split, EVAL_DOC_SEED, i, explicit_frac=float(explicit),
                          max_chars=p.seq_len - 4, pool=pool) for i in range(count)]
    width = max(len(d.problems) for d in docs)
    pos = np.full((count, width), -1, np.int32)
    inter = np.zeros((count, width), np.int32)
    ans = np.zeros((count, width), np.int32)
    for r, d in enumerate(docs):
        for j, (off, prob) in enumerate(answer_offsets(d)):
            pos[r, j] = off  # char offset o is token o + 1 (after BOS), predicted at o
            inter[r, j], ans[r, j] = ord(prob.intermediate), ord(prob.answer)
    return EvalSet(docs, encode_batch(docs, p.seq_len), pos, inter, ans)


# ------------------------------------------------------------------ model and steps


def model_config(p: Protocol) -> ModelConfig:
    m = base_config().model
    m.hidden_size, m.num_layers, m.num_heads = p.hidden, p.layers, p.heads
    m.num_kv_heads, m.intermediate_size = p.kv_heads, p.intermediate
    m.max_position_embeddings = 256
    return inline_model_config(m, TOK.vocab_size)


def thought_config(p: Protocol, n_ahead: int, sampling: str = "sample") -> ThoughtConfig:
    ids = TOK.thought_token_ids()
    return ThoughtConfig(
        n_ahead=n_ahead, n_ahead_talk=p.n_ahead_talk, n_passes=p.n_passes,
        thought_temperature=p.thought_temperature, policy_loss_beta=p.policy_loss_beta,
        embedding_scale=p.embedding_scale, init_token=p.init_token or None,
        sampling=sampling, pause_token_id=PAUSE_ID if sampling == "pause" else None,
        masked_token_ids=(TOK.eos_token_id, TOK.bos_token_id), **ids)


def make_plain_step(cfg: ModelConfig, optimizer: optax.GradientTransformation
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Jitted plain-LM update (next-token NLL of every non-padding target)."""

    def loss_fn(params: Params, ids: jax.Array, mask: jax.Array) -> jax.Array:
        h, _ = model.forward(params, cfg, ids, mask)
        logits = model.logits_from_hidden(params, cfg, h[:, :-1]).astype(jnp.float32)
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
             chunk: int = 64, given: np.ndarray | None = None) -> dict[str, Any]:
    """Means over every answer of `es`, plus the raw arrays (numpy) for analysis.
    `given` `[T, docs, seq]`: thought tokens to feed (`fed_thoughts`) instead of sampling."""
    outs = []
    for i in range(0, len(es.docs), chunk):
        sl = slice(i, i + chunk)
        key = jax.random.fold_in(jax.random.key(seed), 1_000_000 + i)
        extra = () if given is None else (given[:, sl],)
        outs.append(jax.device_get(fn(params, es.batch["input_ids"][sl],
                                      es.batch["attention_mask"][sl], es.positions[sl], key,
                                      *extra)))
    raw = {k: np.concatenate([o[k] for o in outs], axis=1 if k == "thought" else 0)
           for k in outs[0]}
    ok = es.positions >= 0
    out = {k: float(raw[k][ok].mean()) for k in ("nll_base", "hit_base", "nll_think",
                                                 "hit_think", "nll_thought_side",
                                                 "hit_thought_side", "nll_calibration",
                                                 "hit_calibration", "weight")}
    th = raw["thought"]  # [T, docs, P]
    if th.shape[0]:
        has = (th == es.intermediates[None]).any(axis=0)
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
    return out


def _first_entity(th: np.ndarray) -> np.ndarray:
    """Byte id of the first entity byte of each thought `[T, ...]` -> `[...]` (-1: none)."""
    isd = np.isin(th, np.frombuffer(ENTITIES.encode(), np.uint8).astype(th.dtype))
    idx = np.argmax(isd, axis=0)
    val = np.take_along_axis(th, idx[None], axis=0)[0]
    return np.where(isd.any(axis=0), val, -1)


# ------------------------------------------------------------------ runs


PRETRAIN_FIELDS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "seq_len",
                   "explicit_frac", "pretrain_steps", "pretrain_batch", "pretrain_lr")


def pretrained(p: Protocol, seed: int, log: Callable[[str], None],
               cache_dir: str | None = None) -> Params:
    """`pretrain(p, seed)`, read from `cache_dir` when an identical run was saved there
    (the run is deterministic: same fields, same params)."""
    if not cache_dir:
        return pretrain(p, seed, log)
    import hashlib
    import pickle

    key = json.dumps([seed] + [getattr(p, f) for f in PRETRAIN_FIELDS])
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

    arm: "plain" | "thinking" | "pause". Returns (final params, training metrics every
    `log_every` steps, eval curve points).
    """
    cfg = model_config(p)
    opt, sched = make_optimizer(p.lr, p.steps, warmup_steps=p.warmup, end_lr_ratio=0.1,
                                weight_decay=0.01)
    state = init_state(params, opt)
    if arm == "plain":
        step = make_plain_step(cfg, opt)
    else:
        tc = thought_config(p, n_ahead, "pause" if arm == "pause" else "sample")
        step = make_train_step(cfg, tc, opt, schedule=sched, seed=seed)
    data = train_batches(p, FINETUNE_DATA_SEED + seed, p.batch)
    marks = set(np.linspace(0, p.steps, p.curve_points).round().astype(int).tolist())
    history, curve, window = [], [], []
    t0 = time.time()
    for i in range(p.steps + 1):
        if i in marks:
            curve.append({"step": i, **curve_fn(state.params, i)})
        if i == p.steps:
            break
        state, m = step(state, next(data))
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
    return {k: v for k, v in ev.items() if k != "raw"}


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
             split: str = "eval") -> dict[str, Any]:
    """Every arm from the pretrained `lm` with `seed` (thought params, thought sampling,
    data order); evaluated on `split`."""
    cfg = model_config(p)
    sets = {"skipped": eval_set(p, split, False, p.eval_docs),
            "explicit": eval_set(p, split, True, p.eval_docs)}
    curve_set = eval_set(p, split, False, p.curve_docs)
    arms = [("plain", p.n_ahead), ("thinking", p.n_ahead), ("pause", p.n_ahead)]
    arms += [("thinking", n) for n in p.sweep if n != p.n_ahead]
    out: dict[str, Any] = {"seed": seed, "arms": {}}
    start = add_thought_params(lm, cfg, seed, p.embedding_scale, p.init_token)
    ev_fn = make_eval_fn(cfg, thought_config(p, p.n_ahead))
    out["pretrained"] = {f: summary_of(evaluate(ev_fn, start, es, seed))
                         for f, es in sets.items()}
    for arm, n in arms:
        fn = make_eval_fn(cfg, thought_config(p, n, "pause" if arm == "pause" else "sample"))

        def curve_fn(params: Params, step: int, fn: Callable = fn) -> dict:
            ev = evaluate(fn, params, curve_set, seed + step)
            return {k: ev[k] for k in ("nll_base", "nll_think", "nll_thought_side", "weight",
                                       "intermediate_in_thought") if k in ev}

        t1 = time.time()
        params, hist, curve = finetune(p, arm, n, jax.tree.map(jnp.copy, start), seed,
                                       curve_fn, log)
        evs = {f: evaluate(fn, params, es, seed) for f, es in sets.items()}
        name = arm if arm != "thinking" else f"thinking_n{n}"
        out["arms"][name] = {"n_ahead": n, "time_s": time.time() - t1,
                             **{f: summary_of(ev) for f, ev in evs.items()},
                             "history": hist, "curve": curve,
                             "examples": examples(evs["skipped"], sets["skipped"])
                             if arm != "plain" else []}
        if name == f"thinking_n{p.n_ahead}":
            for kind in ("oracle", "random"):
                fed = fed_thoughts(sets["skipped"], kind, thought_config(p, n).num_sampled,
                                   seed)
                out["arms"][f"{kind}_thought"] = {"skipped": summary_of(
                    evaluate(fn, params, sets["skipped"], seed, given=fed))}
        s = out["arms"][name]["skipped"]
        log(f"  {name} seed {seed}: skipped answer nll base {s['nll_base']:.3f} thinking "
            f"{s['nll_think']:.3f}; acc base {s['hit_base']:.3f} thinking {s['hit_think']:.3f}"
            + (f"; intermediate in thought {s['intermediate_in_thought']:.3f}"
               if "intermediate_in_thought" in s else ""))
    return out


# ------------------------------------------------------------------ results


def _mean_and_seeds(values: list[float]) -> tuple[float, list[float]]:
    return float(np.mean(values)), [float(v) for v in values]


def collect(p: Protocol, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """results.json: means over seeds with the per-seed values beside them."""
    main = f"thinking_n{p.n_ahead}"

    def table(form: str, metric_base: str, metric_think: str) -> dict[str, Any]:
        cols = {
            "base": [s["arms"][main][form][metric_base] for s in per_seed],
            "thinking": [s["arms"][main][form][metric_think] for s in per_seed],
            "pause": [s["arms"]["pause"][form][metric_think] for s in per_seed],
            "pause_base": [s["arms"]["pause"][form][metric_base] for s in per_seed],
            "plain_lm": [s["arms"]["plain"][form][metric_base] for s in per_seed],
            "pretrained": [s["pretrained"][form][metric_base] for s in per_seed],
            "calibration_only": [s["arms"][main][form][metric_think.replace("think",
                                                                             "calibration")]
                                 for s in per_seed],
        }
        if form == "skipped":  # thoughts fed to the trained thinking model
            for arm in ("oracle_thought", "random_thought"):
                cols[arm] = [s["arms"][arm][form][metric_think] for s in per_seed]
        out: dict[str, Any] = {}
        per: dict[str, list[float]] = {}
        for k, v in cols.items():
            out[k], per[k] = _mean_and_seeds(v)
        out["per_seed"] = per
        return out

    sweep = {}
    for n in p.sweep:
        name = f"thinking_n{n}"
        row: dict[str, Any] = {}
        per: dict[str, list[float]] = {}
        for k, metric in (("base", "nll_base"), ("thinking", "nll_think"),
                          ("accuracy_base", "hit_base"), ("accuracy_thinking", "hit_think"),
                          ("intermediate_in_thought", "intermediate_in_thought"),
                          ("explicit_base", "nll_base"), ("explicit_thinking", "nll_think")):
            form = "explicit" if k.startswith("explicit") else "skipped"
            row[k], per[k] = _mean_and_seeds([s["arms"][name][form][metric] for s in per_seed])
        row["per_seed"] = per
        sweep[str(n)] = row
    skip = [s["arms"][main]["skipped"] for s in per_seed]
    inter, inter_seeds = _mean_and_seeds([s["intermediate_in_thought"] for s in skip])
    first, first_seeds = _mean_and_seeds([s["first_entity_is_intermediate"] for s in skip])
    pre_inter = [s["pretrained"]["skipped"].get("intermediate_in_thought") for s in per_seed]
    return {
        "answer_nll": table("skipped", "nll_base", "nll_think"),
        "answer_accuracy": table("skipped", "hit_base", "hit_think"),
        "explicit": {"answer_nll": table("explicit", "nll_base", "nll_think"),
                     "answer_accuracy": table("explicit", "hit_base", "hit_think")},
        "n_ahead_sweep": sweep,
        "intermediate_in_thought": inter,
        "intermediate_in_thought_per_seed": inter_seeds,
        "first_thought_entity_is_intermediate": first,
        "first_thought_entity_is_intermediate_per_seed": first_seeds,
        "intermediate_in_thought_chance_per_seed": [s["intermediate_in_thought_chance"]
                                                    for s in skip],
        "intermediate_in_thought_before_training_per_seed": pre_inter,
        "seeds": list(p.seeds),
        "protocol": dataclasses.asdict(p),
        "per_seed": per_seed,
    }


def plot(results: dict[str, Any], path: str) -> bool:
    """Answer-NLL curves (thinking / pause / plain LM) and the n_ahead curve; False
    when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    p = results["protocol"]
    main = f"thinking_n{p['n_ahead']}"
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    lines = [(main, "nll_think", "Quiet-STaR, thinking", "C0", "-"),
             (main, "nll_base", "Quiet-STaR, base (no thought)", "C0", ":"),
             ("pause", "nll_think", "pause control", "C1", "-"),
             ("plain", "nll_base", "plain LM control", "C2", "-")]
    for arm, key, label, color, style in lines:
        for i, s in enumerate(results["per_seed"]):
            c = s["arms"][arm]["curve"]
            ax.plot([q["step"] for q in c], [q[key] for q in c], color=color, ls=style,
                    alpha=0.9, label=label if i == 0 else None)
    ax.set_xlabel("training step after pretraining")
    ax.set_ylabel("answer-token NLL, held-out skipped (nats)")
    ax.legend(fontsize=8)
    ax.set_title("skipped-step answers over training")
    ns = sorted(results["n_ahead_sweep"], key=int)
    for key, label, style in (("thinking", "thinking", "-o"), ("base", "base", ":o")):
        for i in range(len(results["seeds"])):
            bx.plot([int(n) for n in ns],
                    [results["n_ahead_sweep"][n]["per_seed"][key][i] for n in ns], style,
                    color="C0", alpha=0.5, label=f"{label} (per seed)" if i == 0 else None)
        bx.plot([int(n) for n in ns], [results["n_ahead_sweep"][n][key] for n in ns], style,
                color="k", label=f"{label} (mean)")
    bx.axhline(results["answer_nll"]["plain_lm"], color="C2", label="plain LM")
    bx.axhline(results["answer_nll"]["pause"], color="C1", label=f"pause (n_ahead "
               f"{p['n_ahead']})")
    bx.set_xlabel("n_ahead (thought = start, n_ahead - 3 sampled tokens, end)")
    bx.set_ylabel("answer-token NLL, held-out skipped (nats)")
    bx.set_xticks([int(n) for n in ns])
    bx.legend(fontsize=8)
    bx.set_title("thought length")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt(row: dict[str, Any], key: str, digits: int = 3) -> str:
    per = ", ".join(f"{v:.{digits}f}" for v in row["per_seed"][key])
    return f"{row[key]:.{digits}f} ({per})"


def markdown(results: dict[str, Any]) -> str:
    """The tables of docs/EXPERIMENTS.md: means over seeds, per-seed values in brackets."""
    nll, acc = results["answer_nll"], results["answer_accuracy"]
    enll, eacc = results["explicit"]["answer_nll"], results["explicit"]["answer_accuracy"]
    rows = [("pretrained checkpoint (no thought)", "pretrained"),
            ("plain LM control (no thought)", "plain_lm"),
            ("pause control, base (no thought)", "pause_base"),
            ("pause control, with pause thought", "pause"),
            ("Quiet-STaR, base (no thought)", "base"),
            ("Quiet-STaR, thinking", "thinking"),
            ("Quiet-STaR, calibration only (thought logits zeroed)", "calibration_only")]
    out = ["| model | skipped: answer NLL | skipped: accuracy | explicit: answer NLL | "
           "explicit: accuracy |", "| --- | --- | --- | --- | --- |"]
    for label, key in rows:
        out.append(f"| {label} | {_fmt(nll, key)} | {_fmt(acc, key)} | {_fmt(enll, key)} | "
                   f"{_fmt(eacc, key)} |")
    out += ["", "| thoughts fed to the trained thinking model | skipped: answer NLL | "
            "skipped: accuracy |", "| --- | --- | --- |"]
    for label, key in (("sampled (its own)", "thinking"),
                       ("oracle: the true intermediate", "oracle_thought"),
                       ("random entity", "random_thought")):
        out.append(f"| {label} | {_fmt(nll, key)} | {_fmt(acc, key)} |")
    out += ["", "| n_ahead | sampled tokens | skipped NLL base | skipped NLL thinking | "
            "accuracy base | accuracy thinking | intermediate in thought |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for n, row in sorted(results["n_ahead_sweep"].items(), key=lambda kv: int(kv[0])):
        out.append(f"| {n} | {int(n) - 3} | {_fmt(row, 'base')} | {_fmt(row, 'thinking')} | "
                   f"{_fmt(row, 'accuracy_base')} | {_fmt(row, 'accuracy_thinking')} | "
                   f"{_fmt(row, 'intermediate_in_thought')} |")
    return "\n".join(out) + "\n"


def parse_overrides(p: Protocol, items: list[str]) -> Protocol:
    """`name=value` strings -> a Protocol with those fields changed (tuples as 4,6,8)."""
    kw: dict[str, Any] = {}
    types = {f.name: f.type for f in dataclasses.fields(Protocol)}
    for item in items:
        name, _, value = item.partition("=")
        if name not in types:
            raise SystemExit(f"--set {item}: unknown field {name!r}")
        current = getattr(p, name)
        if isinstance(current, tuple):
            kw[name] = tuple(int(v) for v in value.split(",") if v)
        else:
            kw[name] = type(current)(value)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory (results.json, plot)")
    ap.add_argument("--quick", action="store_true", help="reduced run (<= 10 min)")
    ap.add_argument("--tune", action="store_true", help="tune knobs on the tune split")
    ap.add_argument("--cache", default=None, help="keep/reuse the pretrained LM here")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="change one Protocol field (repeatable)")
    args = ap.parse_args(argv)
    p = parse_overrides(QUICK if args.quick else FULL, args.set)
    os.makedirs(args.out, exist_ok=True)
    log_file = open(os.path.join(args.out, "log.txt"), "a")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    t0 = time.time()
    log(f"latent_steps: {'quick' if args.quick else 'full'} protocol {dataclasses.asdict(p)}")
    lm = pretrained(p, PRETRAIN_SEED, log, args.cache)
    t_pre = time.time() - t0
    if args.tune:
        res = tune(p, lm, args.out, log)
        log(f"best on the tune split: {res['best']} ({time.time() - t0:.0f}s)")
        return 0
    per_seed = []
    for seed in p.seeds:
        per_seed.append(run_seed(p, seed, lm, log))
    results = collect(p, per_seed)
    results["pretrain_time_s"] = t_pre
    results["wall_time_s"] = time.time() - t0
    results["quick"] = bool(args.quick)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plotted = plot(results, os.path.join(args.out, "latent_steps.png"))
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(results))
    a = results["answer_nll"]
    log(f"answer NLL (held-out skipped): base {a['base']:.3f} thinking {a['thinking']:.3f} "
        f"pause {a['pause']:.3f} plain LM {a['plain_lm']:.3f}; intermediate in thought "
        f"{results['intermediate_in_thought']:.3f}; {results['wall_time_s']:.0f}s"
        + ("" if plotted else " (no plot: matplotlib is not installed)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
