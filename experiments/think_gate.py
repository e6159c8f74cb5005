"""Where should a thought go? The think gate against random positions, an entropy rule
and a gain oracle, on the two-hop task of experiments/latent_corpus.py.

    PYTHONPATH=. python experiments/think_gate.py --out /tmp/tg            # full
    PYTHONPATH=. python experiments/think_gate.py --out /tmp/tg --quick    # <= 10 min

Protocol (docs/EXPERIMENTS.md, "Think gate"): a small Llama pretrained as a plain LM on
the mixed corpus (the settings of experiments/latent_steps.py's Protocol; `--cache`
keeps it), then Quiet-STaR fine-tuning with sparse thoughts (`ThoughtConfig.think_k`)
and the think gate (`params["think_gate"]`) under the thought initialisation that makes
thoughts useful on this task today: the task "dash4", whose worked step is delimited by
the byte the thought embeddings start from ("-", the authors' "---"), so that
start-of-thought, m, end-of-thought reads as a worked step; the mixing head opened at
the start (`mixing_weight_offset` 1); and fine-tuning documents of the "tune" split,
compositions the LM never saw, where a thought pays at the answers (on its own "train"
problems it has memorised every answer). On held-out ("eval") skipped documents the
trained model thinks at a fraction r of each document's positions, the positions chosen
four ways:

  gated    the gate's highest logits (the think gate, `thought.ThinkGate`, on the base pass)
  random   uniformly random positions (reported as the exact expectation over draws:
           a position thinks with probability k / n)
  entropy  the highest entropy of the base prediction (`sparse.logit_stats`)
  oracle   the largest gain of the thought, base NLL - thinking NLL of the true next
           token (uses the answer: the ceiling of any selector)

A position with a thought predicts with the mixed logits after its end-of-thought
(`thought.rollout` + `thought.mixed_hidden`, one pass, n_ahead_talk = 1, as
experiments/latent_steps.py evaluates); a position without one keeps the base
prediction. A thought reads only the base pass's keys/values, so thinking at a subset
changes only those positions' predictions: the sparse evaluation is exactly the dense
rollout's thinking prediction where chosen and the base prediction elsewhere (the test
checks it against `sparse.sparse_thoughts` at the gathered positions). Measured at the
answer positions: accuracy (argmax) and NLL of the answer token; gated - random with
bootstrap 95 % intervals over answers. `never` = rate 0 (the base LM), `always` = rate 1
(the same model thinking everywhere: the think-everywhere ceiling of this model).

Also: the sparse train step's time in plain steps (the trainer's step with
`think_k` = k against the plain step with materialised logits,
`train.step.materialised_next_token_loss_fn`, same process, same model and batch).

Writes OUT/results.json, OUT/results.md, OUT/log.txt and (matplotlib) OUT/think_gate.png.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pickle
import statistics
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.latent_corpus import (  # noqa: E402
    answer_offsets,
    make_document,
    problems_of,
)
from experiments.latent_steps import (  # noqa: E402
    EVAL_DOC_SEED,
    TOK,
    encode_batch,
    params_layout,
)
from experiments.think_gate_text import TextSetup  # noqa: E402
from quietstar_jax import model  # noqa: E402
from quietstar_jax.command_line import CommandLine, UsageError  # noqa: E402
from quietstar_jax.model import ModelConfig, Params  # noqa: E402
from quietstar_jax.thought import (  # noqa: E402
    GatedQuietStarLM,
    ThoughtConfig,
    init_gate_params,
    init_thought_params,
    merge_lm,
    mix_step,
    run_rollout,
)
from quietstar_jax.thought.loss import masked_mean, token_nll  # noqa: E402
from quietstar_jax.thought.sparse import logit_stats  # noqa: E402
from quietstar_jax.train.config import base_config  # noqa: E402
from quietstar_jax.train.model_setup import inline_model_config  # noqa: E402
from quietstar_jax.train.step import (  # noqa: E402
    TrainState,
    init_state,
    make_optimizer,
    make_train_step,
    materialised_next_token_loss_fn,
)

# The seeds of experiments/latent_steps.py (same pretrained LM, same data streams).
PRETRAIN_DATA_SEED = 101
FINETUNE_DATA_SEED = 202
SELECTORS = ("gated", "random", "entropy", "oracle")


@dataclasses.dataclass(frozen=True)
class Setup:
    """Every number of a run (`--set name=value` changes one). The model, pretraining
    and Quiet-STaR fields are latent_steps' Protocol's; the rest are this experiment's."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 172
    seq_len: int = 64
    # The first two-hop task, where the dash initialisation makes thoughts useful today
    # (latent_steps' default is now a task it cannot write; docs/EXPERIMENTS.md).
    task: str = "dash4"
    explicit_frac: float = 0.5
    pretrain_steps: int = 2000
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    steps: int = 200
    batch: int = 16
    lr: float = 3e-4
    warmup: int = 20
    n_ahead: int = 4
    n_ahead_talk: int = 2
    n_passes: int = 2
    thought_temperature: float = 1.0
    policy_loss_beta: float = 10.0
    embedding_scale: float = 1.0
    init_token: str = "---"
    think_k: int = 8  # of 64 positions: 12.5 %
    think_explore: float = 0.25
    gate_cost: float = 0.0
    gate_loss_weight: float = 1.0
    # The mixing head opened at the start (w = 1 + head): the thought's prediction is
    # used from step 1, so the head learns where it pays instead of never opening.
    mixing_weight_offset: float = 1.0
    # The fine-tuning documents' split: "tune", compositions the pretrained LM never saw
    # (at their answers a thought pays, as at the held-out ones), or "train", the
    # pretrained LM's own problems, whose skipped answers it has memorised (no thought
    # pays there, so the head never opens: docs/EXPERIMENTS.md, "Think gate").
    finetune_split: str = "tune"
    seed: int = 0
    eval_docs: int = 160  # held-out skipped documents, 6 answers each
    rates: tuple[float, ...] = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)
    bootstrap: int = 2000
    cost_ks: tuple[int, ...] = (4, 8)
    cost_steps: int = 10
    log_every: int = 20
    dense_arm: bool = True  # also train the think-everywhere model (think_k None, no gate)


FULL = Setup()
QUICK = Setup(steps=100, eval_docs=96, cost_steps=5)
TEXT_FULL = TextSetup()
TEXT_QUICK = TextSetup(steps=10, eval_windows=8)


# ------------------------------------------------------------------ data and model


def train_batches(s: Setup, data_seed: int, batch: int, split: str = "train"
                  ) -> Iterator[dict[str, np.ndarray]]:
    pool = problems_of(split, s.task)
    i = 0
    while True:
        docs = [make_document(split, data_seed, i + j, explicit_frac=s.explicit_frac,
                              max_chars=s.seq_len - 4, pool=pool, task=s.task)
                for j in range(batch)]
        i += batch
        yield encode_batch(docs, s.seq_len)


def eval_docs(s: Setup, split: str = "eval") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Held-out skipped documents and their answer positions `[docs, P]` (-1: none): the
    token position whose next-token prediction is the answer."""
    pool = problems_of(split, s.task)
    docs = [make_document(split, EVAL_DOC_SEED, i, explicit_frac=0.0,
                          max_chars=s.seq_len - 4, pool=pool, task=s.task)
            for i in range(s.eval_docs)]
    width = max(len(d.problems) for d in docs)
    pos = np.full((len(docs), width), -1, np.int32)
    for r, d in enumerate(docs):
        for j, (off, _) in enumerate(answer_offsets(d)):
            pos[r, j] = off
    return encode_batch(docs, s.seq_len), pos


def model_config(s: Setup) -> ModelConfig:
    m = base_config().model
    m.hidden_size, m.num_layers, m.num_heads = s.hidden, s.layers, s.heads
    m.num_kv_heads, m.intermediate_size = s.kv_heads, s.intermediate
    m.max_position_embeddings = 256
    return inline_model_config(m, TOK.vocab_size)


def thought_config(s: Setup, think_k: int | None) -> ThoughtConfig:
    return ThoughtConfig(
        n_ahead=s.n_ahead, n_ahead_talk=s.n_ahead_talk, n_passes=s.n_passes,
        thought_temperature=s.thought_temperature, policy_loss_beta=s.policy_loss_beta,
        embedding_scale=s.embedding_scale, init_token=s.init_token or None,
        masked_token_ids=(TOK.eos_token_id, TOK.bos_token_id), think_k=think_k,
        think_explore=s.think_explore, gate_cost=s.gate_cost,
        gate_loss_weight=s.gate_loss_weight, mixing_weight_offset=s.mixing_weight_offset,
        **TOK.thought_token_ids())


def plain_step(cfg: ModelConfig, opt: optax.GradientTransformation) -> Callable:
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
        updates, o = opt.update(g, state.opt_state, state.params)
        return TrainState(state.step + 1, optax.apply_updates(state.params, updates), o), {
            "nll_base": loss}

    return jax.jit(step, donate_argnums=(0,))


PRETRAIN_FIELDS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "seq_len",
                   "task", "explicit_frac", "pretrain_steps", "pretrain_batch", "pretrain_lr")


def pretrained(s: Setup, log: Callable[[str], None], cache: str | None) -> Params:
    """The plain LM pretrained on the mixed corpus (init key 0, this Setup's pretraining
    fields); read from / written to `cache` under a key of those fields and the params'
    layout (the run is deterministic)."""
    path = None
    if cache:
        key = json.dumps([0] + [getattr(s, f) for f in PRETRAIN_FIELDS]
                         + params_layout(model_config(s)))
        path = os.path.join(cache, f"pretrained_{hashlib.sha1(key.encode()).hexdigest()[:12]}.pkl")
        if os.path.exists(path):
            log(f"pretrained LM from {path}")
            with open(path, "rb") as f:
                return jax.tree.map(jnp.asarray, pickle.load(f))
    cfg = model_config(s)
    opt, _ = make_optimizer(s.pretrain_lr, s.pretrain_steps, warmup_steps=50,
                            end_lr_ratio=0.1, weight_decay=0.01)
    state = init_state(model.init_params(cfg, jax.random.key(0)), opt)
    step = plain_step(cfg, opt)
    data = train_batches(s, PRETRAIN_DATA_SEED, s.pretrain_batch)
    t0 = time.time()
    for i in range(s.pretrain_steps):
        state, m = step(state, next(data))
        if (i + 1) % 200 == 0 or i + 1 == s.pretrain_steps:
            log(f"  pretrain step {i + 1}: nll {float(m['nll_base']):.3f} "
                f"({time.time() - t0:.0f}s)")
    if path:
        os.makedirs(cache, exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump(jax.device_get(state.params), f)
    return state.params


def with_thought_and_gate(lm: Params, s: Setup) -> Params:
    cfg = model_config(s)
    out = dict(lm)
    out["thought"] = init_thought_params(lm, cfg, jax.random.key(10_000 + s.seed),
                                         TOK.init_token_id(s.init_token or None),
                                         s.embedding_scale)
    out["think_gate"] = init_gate_params(cfg, jax.random.fold_in(jax.random.key(s.seed), 25))
    return jax.tree.map(jnp.copy, out)


def finetune(s: Setup, params: Params, log: Callable[[str], None], dense: bool = False
             ) -> tuple[Params, list[dict]]:
    """Quiet-STaR with sparse thoughts (think_k) and the think gate, the trainer's step;
    `dense`: the authors' think-everywhere objective instead (params without a gate)."""
    cfg = model_config(s)
    opt, sched = make_optimizer(s.lr, s.steps, warmup_steps=s.warmup, end_lr_ratio=0.1,
                                weight_decay=0.01)
    step = make_train_step(cfg, thought_config(s, None if dense else s.think_k), opt,
                           schedule=sched, seed=s.seed)
    state = init_state(params, opt)
    data = train_batches(s, FINETUNE_DATA_SEED + s.seed, s.batch, s.finetune_split)
    keys = ("nll_base", "nll_thought", "reward_mean", "gate_loss", "gate_positive_frac",
            "gate_accuracy", "think_rate", "mixing_weight_mean")
    hist, window, t0 = [], [], time.time()
    for i in range(s.steps):
        state, m = step(state, next(data))
        window.append(jax.device_get(m))
        if (i + 1) % s.log_every == 0 or i + 1 == s.steps:
            rec = {"step": i + 1} | {k: float(np.mean([w[k] for w in window]))
                                     for k in keys if k in window[0]}
            hist.append(rec)
            window = []
            shown = json.dumps({k: round(v, 4) for k, v in rec.items()})
            log(f"  finetune{' dense' if dense else ''} {shown} ({time.time() - t0:.0f}s)")
    return state.params, hist


# ------------------------------------------------------------------ evaluation


@functools.cache
def make_position_fn(cfg: ModelConfig, tc: ThoughtConfig) -> Callable[..., dict]:
    """Jitted (one per configuration, cached): per position of `[rows, seq]`
    documents, the NLL and argmax hit of the true next token for the base prediction
    and the thinking one (mixed logits after the end-of-thought, one pass,
    n_ahead_talk = 1), the base entropy and the gate's logit (zeros without gate
    params). All `[rows, seq]` (the last position's target is position 0's token:
    never scored)."""
    tc = tc.replace(n_ahead_talk=1, n_passes=1, think_k=None)
    s = tc.n_ahead - 1

    def fn(params: Params, ids: jax.Array, mask: jax.Array, key: jax.Array) -> dict:
        lm = merge_lm(params, cfg)  # the module, merged once
        ro = run_rollout(lm, tc, ids, mask, key)
        mixed, w = mix_step(lm.thought, tc, ro.base_hidden, ro.step_hidden[s - 1], s)
        tgt = jnp.roll(ids, -1, axis=1)

        def score(h: jax.Array) -> tuple[jax.Array, jax.Array]:
            logits = lm.logits(h).astype(jnp.float32)
            return token_nll(logits, tgt), jnp.argmax(logits, -1) == tgt

        nb, hb = score(ro.base_hidden)
        nt, ht = score(mixed)
        stats = logit_stats(lm, ro.base_hidden)
        gate = (lm.think_gate(ro.base_hidden, stats) if isinstance(lm, GatedQuietStarLM)
                else jnp.zeros(ids.shape, jnp.float32))
        return {"nll_base": nb, "hit_base": hb, "nll_think": nt, "hit_think": ht,
                "entropy": stats[..., 0], "gate": gate, "weight": w}

    return jax.jit(fn)


def per_position(fn: Callable[..., dict], params: Params, batch: dict[str, np.ndarray],
                 seed: int, chunk: int = 64) -> dict[str, np.ndarray]:
    outs = []
    for i in range(0, batch["input_ids"].shape[0], chunk):
        key = jax.random.fold_in(jax.random.key(seed), 1_000_000 + i)
        outs.append(jax.device_get(fn(params, batch["input_ids"][i:i + chunk],
                                      batch["attention_mask"][i:i + chunk], key)))
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def candidates(mask: np.ndarray) -> np.ndarray:
    """Positions that can think: non-padding with a non-padding next token `[rows, seq]`."""
    m = mask.astype(bool)
    return m & np.concatenate([m[:, 1:], np.zeros_like(m[:, :1])], axis=1)


def count_at(rate: float, cand: np.ndarray) -> np.ndarray:
    """Thoughts per row at `rate`: round(rate x the row's candidates) `[rows]`."""
    return np.round(rate * cand.sum(1)).astype(int)


def select_top(score: np.ndarray, cand: np.ndarray, k: np.ndarray, seed: int = 0
               ) -> np.ndarray:
    """bool `[rows, seq]`: each row's `k[row]` candidates of highest `score` (ties at
    random)."""
    tie = np.random.default_rng(seed).random(score.shape) * 1e-9
    s = np.where(cand, score.astype(np.float64) + tie, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(score.shape[1])[None].repeat(len(s), 0), axis=1)
    return cand & (rank < k[:, None])


def scores_of(pp: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ranking score of each deterministic selector `[rows, seq]`."""
    return {"gated": pp["gate"], "entropy": pp["entropy"],
            "oracle": pp["nll_base"] - pp["nll_think"]}


def at_answers(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """`x[r, pos[r, j]]` for every answer (pos >= 0), flattened `[answers]`."""
    rows, cols = np.nonzero(pos >= 0)
    return x[rows, pos[rows, cols]]


def outcomes(pp: dict[str, np.ndarray], mask: np.ndarray, pos: np.ndarray, rate: float
             ) -> dict[str, dict[str, np.ndarray]]:
    """Per answer `[answers]`: hit and NLL of the answer token when thinking at `rate`
    with each selector (random: the expectation over uniform draws of k of n)."""
    cand = candidates(mask)
    k = count_at(rate, cand)
    out = {}
    for name, score in scores_of(pp).items():
        think = at_answers(select_top(score, cand, k).astype(np.float64), pos)
        out[name] = think
    n = np.maximum(cand.sum(1), 1)
    p = np.broadcast_to((k / n)[:, None], mask.shape)
    out["random"] = at_answers(np.asarray(p, np.float64), pos)
    res = {}
    hb, ht = at_answers(pp["hit_base"], pos), at_answers(pp["hit_think"], pos)
    nb, nt = at_answers(pp["nll_base"], pos), at_answers(pp["nll_think"], pos)
    for name in SELECTORS:
        q = out[name]
        res[name] = {"hit": q * ht + (1 - q) * hb, "nll": q * nt + (1 - q) * nb,
                     "think_at_answer": q}
    return res


def bootstrap(d: np.ndarray, n: int, seed: int = 0) -> list[float]:
    """95 % percentile interval of the mean of `d` over `n` resamples of its entries."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), (n, len(d)))
    m = d[idx].mean(1)
    return [float(np.percentile(m, 2.5)), float(np.percentile(m, 97.5))]


def curve(pp: dict[str, np.ndarray], mask: np.ndarray, pos: np.ndarray,
          rates: tuple[float, ...], n_boot: int) -> list[dict[str, Any]]:
    cand = candidates(mask)
    rows = []
    for r in rates:
        o = outcomes(pp, mask, pos, r)
        row: dict[str, Any] = {"rate": r,
                               "realised_rate": float(count_at(r, cand).sum() / cand.sum())}
        for name in SELECTORS:
            row[name] = {"accuracy": float(o[name]["hit"].mean()),
                         "nll": float(o[name]["nll"].mean()),
                         "think_at_answer": float(o[name]["think_at_answer"].mean())}
        da = o["gated"]["hit"] - o["random"]["hit"]
        dn = o["gated"]["nll"] - o["random"]["nll"]
        row["gated_minus_random"] = {
            "accuracy": float(da.mean()), "accuracy_ci95": bootstrap(da, n_boot),
            "nll": float(dn.mean()), "nll_ci95": bootstrap(dn, n_boot, 1)}
        rows.append(row)
    return rows


def must_show(rows: list[dict[str, Any]], always: dict, never: dict) -> dict[str, Any]:
    """The issue's check: the lowest rate where gated keeps >= 90 % of always-think's
    accuracy gain over never-think; whether gated beats random there (the interval
    excludes 0 on the good side); whether that rate <= 25 %. The same for the NLL
    reduction, beside it."""
    out: dict[str, Any] = {}
    for metric, sign in (("accuracy", 1.0), ("nll", -1.0)):
        gain = sign * (always[metric] - never[metric])
        rec: dict[str, Any] = {"gain_always_over_never": gain,
                               "degenerate": bool(gain <= 0)}
        hit = None
        for row in rows:
            if sign * (row["gated"][metric] - never[metric]) >= 0.9 * gain:
                hit = row
                break
        if hit is None:
            rec.update(rate=None, gated_beats_random=False, rate_le_25pct=False)
        else:
            lo, hi = hit["gated_minus_random"][f"{metric}_ci95"]
            rec.update(rate=hit["rate"],
                       gated_minus_random=hit["gated_minus_random"][metric],
                       ci95=[lo, hi],
                       gated_beats_random=bool(lo > 0 if sign > 0 else hi < 0),
                       rate_le_25pct=bool(hit["rate"] <= 0.25))
        rec["passed"] = bool(not rec["degenerate"] and rec["gated_beats_random"]
                             and rec["rate_le_25pct"])
        out[metric] = rec
    out["passed"] = out["accuracy"]["passed"]
    return out


# ------------------------------------------------------------------ step cost


def step_cost(s: Setup, params: Params, log: Callable[[str], None]) -> dict[str, Any]:
    """Median time of the trainer's sparse step (think_k = k, with the gate) over the
    median time of the plain step with materialised logits, same process, same model
    (`params`) and a training batch; steps interleaved per round."""
    cfg = model_config(s)
    opt, sched = make_optimizer(s.lr, 1000, warmup_steps=0)
    batch = {k: jnp.asarray(v) for k, v in next(train_batches(s, 999, s.batch)).items()}
    tc = thought_config(s, None)
    plain_params = {k: v for k, v in params.items() if k != "think_gate"}
    fns = {"plain": (make_train_step(cfg, tc, opt, schedule=sched, seed=s.seed,
                                     loss_fn=materialised_next_token_loss_fn(cfg, tc)),
                     plain_params)}
    for k in s.cost_ks:
        fns[str(k)] = (make_train_step(cfg, tc.replace(think_k=k), opt, schedule=sched,
                                       seed=s.seed), params)
    states = {n: init_state(jax.tree.map(jnp.copy, p), opt) for n, (_, p) in fns.items()}
    times: dict[str, list[float]] = {n: [] for n in fns}
    for i in range(s.cost_steps + 2):  # 2 warm-up rounds (compile)
        for n, (f, _) in fns.items():
            t0 = time.perf_counter()
            states[n], m = f(states[n], batch)
            jax.block_until_ready((states[n], m))
            if i >= 2:
                times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    ratios = {n: med[n] / med["plain"] for n in fns if n != "plain"}
    log(f"step cost (median s): {json.dumps({n: round(v, 5) for n, v in med.items()})}; "
        f"in plain steps {json.dumps({n: round(v, 2) for n, v in ratios.items()})}")
    return {"ratios": ratios, "median_s": med, "steps": s.cost_steps,
            "batch": [s.batch, s.seq_len], "n_passes": s.n_passes}


# ------------------------------------------------------------------ run


def evaluate_model(s: Setup, params: Params) -> dict[str, Any]:
    """Everything results.json holds about the trained model's positions."""
    cfg = model_config(s)
    batch, pos = eval_docs(s)
    pp = per_position(make_position_fn(cfg, thought_config(s, None)), params, batch, s.seed)
    rows = curve(pp, batch["attention_mask"], pos, s.rates, s.bootstrap)
    ok = pos >= 0
    never = {"accuracy": float(at_answers(pp["hit_base"], pos).mean()),
             "nll": float(at_answers(pp["nll_base"], pos).mean())}
    always = {"accuracy": float(at_answers(pp["hit_think"], pos).mean()),
              "nll": float(at_answers(pp["nll_think"], pos).mean())}
    cand = candidates(batch["attention_mask"])
    ans = np.zeros_like(cand)
    r_, c_ = np.nonzero(ok)
    ans[r_, pos[r_, c_]] = True
    gain = pp["nll_base"] - pp["nll_think"]
    diag = {
        "answers": int(ok.sum()), "positions": int(cand.sum()),
        "answer_share_of_positions": float(ans.sum() / cand.sum()),
        "gain_mean_answer": float(gain[ans].mean()),
        "gain_mean_other": float(gain[cand & ~ans].mean()),
        "gate_mean_answer": float(pp["gate"][ans].mean()),
        "gate_mean_other": float(pp["gate"][cand & ~ans].mean()),
        "gate_positive_frac": float((pp["gate"][cand] > 0).mean()),
        "mixing_weight_answer": float(pp["weight"][ans].mean()),
        "gate_gain_spearman": _spearman(pp["gate"][cand], gain[cand]),
        "entropy_gain_spearman": _spearman(pp["entropy"][cand], gain[cand]),
    }
    return {"curve": rows, "never": never, "always": always, "diagnostics": diag,
            "_per_position": pp, "_pos": pos, "_mask": batch["attention_mask"]}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 1 else float("nan")


def run(s: Setup, out_dir: str, cache: str | None = None, cost: bool = True,
        log: Callable[[str], None] = print, text: Any = None) -> dict[str, Any]:
    """The two-hop run; with `text` (a `think_gate_text.TextSetup`) also the SmolLM2-135M
    text half, under `smollm2_text` (`{"skipped": why}` when its files are missing)."""
    t0 = time.time()
    lm = pretrained(s, log, cache)
    t_pre = time.time() - t0
    params, hist = finetune(s, with_thought_and_gate(lm, s), log)
    t_ft = time.time() - t0 - t_pre
    ev = evaluate_model(s, params)
    t_ev = time.time() - t0 - t_pre - t_ft
    res: dict[str, Any] = {k: v for k, v in ev.items() if not k.startswith("_")}
    res["must_show"] = must_show(ev["curve"], ev["always"], ev["never"])
    if s.dense_arm:  # the think-everywhere model from the same start: the ceiling's training
        t1 = time.time()
        start = {k: v for k, v in with_thought_and_gate(lm, s).items() if k != "think_gate"}
        dparams, dhist = finetune(s, start, log, dense=True)
        dev = evaluate_model(s, dparams)
        res["dense_trained"] = {
            "never": dev["never"], "always": dev["always"], "history": dhist,
            "diagnostics": dev["diagnostics"], "time_s": time.time() - t1,
            "curve": [{k: v for k, v in r.items() if k not in ("gated", "gated_minus_random")}
                      for r in dev["curve"]]}
    if cost:
        sc = step_cost(s, params, log)
        res["step_cost_plain_steps"] = sc["ratios"]
        res["step_cost"] = sc
    else:
        res["step_cost_plain_steps"] = {}
    res["history"] = hist
    res["setup"] = dataclasses.asdict(s)
    res["time_s"] = {"pretrain_or_cache": t_pre, "finetune": t_ft, "evaluate": t_ev,
                     "total": time.time() - t0}
    if text is not None:  # the SmolLM2-135M text half (think_gate_text.py)
        from experiments.think_gate_text import run_text

        try:
            res["smollm2_text"] = run_text(text, log, s.rates, s.bootstrap)
        except FileNotFoundError as e:
            log(f"SmolLM2 text half skipped: {e}")
            res["smollm2_text"] = {"skipped": str(e)}
    res["loadavg_end"] = os.getloadavg()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = report(res)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    log(md)
    log(plot(res, os.path.join(out_dir, "think_gate.png")))
    res["_eval"] = ev
    return res


def curve_table(curve_rows: list[dict[str, Any]]) -> list[str]:
    """The curve as markdown table lines (accuracy / NLL per selector, gated - random)."""
    lines = ["| rate | gated acc / NLL | random | entropy | oracle | gated - random acc "
             "[95 % CI] | gated - random NLL [95 % CI] |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in curve_rows:
        cells = [f"{row[n]['accuracy']:.3f} / {row[n]['nll']:.3f}" for n in SELECTORS]
        g = row["gated_minus_random"]
        lines.append(
            f"| {row['rate']:.2f} | " + " | ".join(cells)
            + f" | {g['accuracy']:+.3f} [{g['accuracy_ci95'][0]:+.3f}, "
            f"{g['accuracy_ci95'][1]:+.3f}] | {g['nll']:+.3f} [{g['nll_ci95'][0]:+.3f}, "
            f"{g['nll_ci95'][1]:+.3f}] |")
    return lines


def report(res: dict[str, Any]) -> str:
    lines = curve_table(res["curve"])
    nv, al = res["never"], res["always"]
    lines += ["", f"never-think: accuracy {nv['accuracy']:.3f}, NLL {nv['nll']:.3f}; "
              f"always-think: accuracy {al['accuracy']:.3f}, NLL {al['nll']:.3f}"]
    for metric in ("accuracy", "nll"):
        m = res["must_show"][metric]
        lines.append(
            f"must show ({metric}): gain always - never {m['gain_always_over_never']:+.4f}"
            + (" (none: degenerate)" if m["degenerate"] else "")
            + f"; lowest rate keeping >= 90 % of it: {m['rate']}; gated beats random there: "
            f"{m['gated_beats_random']}; rate <= 25 %: {m['rate_le_25pct']}; passed: "
            f"{m['passed']}")
    if res.get("step_cost_plain_steps"):
        lines.append("sparse step in fast plain steps: " + ", ".join(
            f"k={k}: {v:.2f}" for k, v in res["step_cost_plain_steps"].items()))
    if "dense_trained" in res:
        dn = res["dense_trained"]
        lines.append(
            f"think-everywhere trained model (no gate): never {dn['never']['accuracy']:.3f} / "
            f"{dn['never']['nll']:.3f}, always {dn['always']['accuracy']:.3f} / "
            f"{dn['always']['nll']:.3f}; its curve (random / entropy / oracle acc / NLL):")
        for r in dn["curve"]:
            lines.append(f"  rate {r['rate']:.2f}: " + "; ".join(
                f"{n} {r[n]['accuracy']:.3f} / {r[n]['nll']:.3f}"
                for n in ("random", "entropy", "oracle")))
    d = res["diagnostics"]
    lines.append("diagnostics: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else
                                             f"{k} {v}" for k, v in d.items()))
    text = res.get("smollm2_text")
    if text and "curve" in text:
        nv, al = text["never"], text["always"]
        lines += ["", "SmolLM2-135M text (every scored position; accuracy = top-1 next "
                  "token):", *curve_table(text["curve"]),
                  f"never-think: {nv['accuracy']:.3f} / {nv['nll']:.3f}; always-think: "
                  f"{al['accuracy']:.3f} / {al['nll']:.3f}",
                  "diagnostics: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else
                                              f"{k} {v}" for k, v in text["diagnostics"].items())]
    elif text:
        lines.append(f"SmolLM2-135M text half skipped: {text.get('skipped')}")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not importable: no plot (pip install -e .[experiments])"
    parts = [("two-hop answers", res)]
    if "curve" in res.get("smollm2_text", {}):
        parts.append(("SmolLM2-135M text", res["smollm2_text"]))
    fig, axes = plt.subplots(len(parts), 2, figsize=(10, 4 * len(parts)), squeeze=False)
    for row_axes, (title, part) in zip(axes, parts, strict=True):
        rates = [r["rate"] for r in part["curve"]]
        for ax, metric in zip(row_axes, ("accuracy", "nll"), strict=True):
            for n in SELECTORS:
                ax.plot(rates, [r[n][metric] for r in part["curve"]], marker="o", label=n)
            ax.axhline(part["never"][metric], color="gray", ls=":", label="never")
            ax.axhline(part["always"][metric], color="black", ls="--", label="always")
            ax.set_xlabel("think rate")
            ax.set_ylabel(f"{metric}")
            ax.set_title(title)
        row_axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return f"plot: {path}"


def parse_value(field: dataclasses.Field, text: str) -> Any:
    cur = field.default
    if isinstance(cur, tuple):
        kind = type(cur[0]) if cur else float
        return tuple(kind(v) for v in text.split(",") if v)
    if isinstance(cur, bool):
        return text.lower() in ("1", "true", "yes")
    return type(cur)(text)


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("out", None, "output directory (results.json, results.md, log.txt, "
                        "plot)", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)
    flags.DEFINE_boolean("quick", False, "reduced run (<= 10 min)", flag_values=fv)
    flags.DEFINE_string("cache", None, "directory for the pretrained LM (latent_steps' "
                        "--cache files)", flag_values=fv)
    flags.DEFINE_boolean("no-cost", False, "skip the step-cost timing", flag_values=fv)
    flags.DEFINE_boolean("no-text", False, "skip the SmolLM2-135M text half "
                         "(think_gate_text.py)", flag_values=fv)
    flags.DEFINE_multi_string("set", [], "NAME=VALUE: change one Setup field, or text_NAME "
                              "one of the text half's TextSetup (repeatable)", flag_values=fv)


COMMAND = CommandLine.script("experiments/think_gate.py",
                             " ".join(__doc__.split("\n\n")[0].split()), _define)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; bad flags end with one `PROG: error: ...` line (exit 2)."""
    return COMMAND.main(_run, argv)


def _run(a: SimpleNamespace) -> None:
    s = QUICK if a.quick else FULL
    fields = {f.name: f for f in dataclasses.fields(Setup)}
    text = TEXT_QUICK if a.quick else TEXT_FULL
    text_fields = {f"text_{f.name}": f for f in dataclasses.fields(TextSetup)}
    for kv in a.set:
        name, _, val = kv.partition("=")
        if name not in fields and name not in text_fields:
            raise UsageError(f"--set {name}: no such field (the text half's are text_<name>)")
        try:
            if name in text_fields:
                f = text_fields[name]
                text = dataclasses.replace(text, **{f.name: parse_value(f, val)})
            else:
                s = dataclasses.replace(s, **{name: parse_value(fields[name], val)})
        except ValueError as e:
            raise UsageError(f"--set {kv}: {e}") from None
    os.makedirs(a.out, exist_ok=True)
    logf = open(os.path.join(a.out, "log.txt"), "w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    run(s, a.out, a.cache, cost=not a.no_cost, log=log, text=None if a.no_text else text)
    logf.close()


if __name__ == "__main__":
    sys.exit(main())
