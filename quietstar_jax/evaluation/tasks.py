"""Evaluations of a Quiet-STaR model, base (no thoughts) and thinking side by side.

Functions for notebooks and for the command line (`python -m quietstar_jax.evaluation`,
`evaluation.cli`; tasks gsm8k, csqa, perplexity, cot):

* `evaluate_gsm8k`, `evaluate_csqa`: zero-shot direct answering with the authors'
  metric (docs/ALGORITHM.md, section 11: Evaluation with thoughts; see `evaluation.data`
  for the prompts and valid tokens and
  `evaluation.metrics.answer_score`): `accuracy` is the mean over examples of the product
  of renormalised true-token probabilities, `exact_match` the share of examples whose
  every scored token is the argmax over the valid tokens, `first_token_match` the
  share whose first scored token is (CommonsenseQA: the choice letter).
* `evaluate_perplexity`: base and thought-mixed NLL per token of held-out text, and
  the improvement binned by the base NLL of each token.
* `evaluate_cot`: chain-of-thought majority vote on GSM8K (`evaluation.cot`).

The thinking model is the given ThoughtConfig with `n_ahead_talk = n_passes = 1`;
thought tokens are sampled (`tc.sampling == "sample"`, keys from `seed`) or greedy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from quietstar_jax.evaluation import data as eval_data
from quietstar_jax.evaluation.cot import run_cot
from quietstar_jax.evaluation.metrics import DEFAULT_NLL_EDGES, answer_score, nll_bins
from quietstar_jax.evaluation.scoring import (
    answer_logits,
    eval_thought_config,
    length_batches,
    right_pad,
    token_nlls,
)
from quietstar_jax.model import ModelConfig, Params
from quietstar_jax.protocols import Tokenizer
from quietstar_jax.thought import ThoughtConfig
from quietstar_jax.thought import pad_id as first_pad_id

TASKS = ("gsm8k", "csqa", "perplexity", "cot")


def _prepare_tc(
    tc: ThoughtConfig | None, tokenizer: Tokenizer, cfg: ModelConfig
) -> ThoughtConfig | None:
    if tc is None:
        return None
    if tc.start_token_id is None or tc.end_token_id is None or tc.pad_token_id is None:
        from quietstar_jax import hf

        tc = tc.replace(**hf.thought_token_ids(tokenizer))
    tc = eval_thought_config(tc)
    tc.check_token_ids(cfg.vocab_size)
    return tc


def _check_limit(limit: int | None) -> None:
    """`limit` (the first N examples) is None or >= 1."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (None: all examples)")


def _check_thought_reach(tc: ThoughtConfig | None, cfg: ModelConfig, last: int, what: str,
                         fix: str) -> None:
    """The thought of position `last` (its n_ahead - 1 steps: start, sampled tokens,
    end) must stay inside the model's positions; checked before anything compiles."""
    if tc is None:
        return
    limit = cfg.max_position_embeddings
    reach = last + tc.n_ahead - 1
    if reach >= limit:
        raise ValueError(f"n_ahead={tc.n_ahead}: a thought runs n_ahead - 1 = {tc.n_ahead - 1} "
                         f"positions past its token, so {what} (position {last}) thinks up to "
                         f"position {reach}, past the model's max_position_embeddings={limit}; "
                         f"use n_ahead <= {limit - last} or {fix}")


def check_perplexity_thoughts(chunk_len: int, tc: ThoughtConfig | None,
                              cfg: ModelConfig) -> None:
    """The thought of the last scored position of a chunk (`chunk_len - 1`) must stay
    inside the model's positions."""
    _check_thought_reach(tc, cfg, chunk_len - 1, f"the last scored token of a chunk of "
                         f"chunk_len={chunk_len}", "a smaller chunk_len")


def _pad_id(tokenizer: Tokenizer, tc: ThoughtConfig | None) -> int:
    return first_pad_id(None if tc is None else tc.pad_token_id, tokenizer.pad_token_id,
                        tokenizer.eos_token_id)


def _thought_info(tc: ThoughtConfig | None) -> dict[str, Any]:
    if tc is None:  # the base model only: no thought (not a thought of length 1)
        return {"n_ahead": None, "thought_tokens": 0}
    return {"n_ahead": tc.n_ahead, "thought_tokens": tc.num_sampled,
            "thought_sampling": tc.sampling, "thought_temperature": tc.thought_temperature}


def score_examples(
    params: Params,
    cfg: ModelConfig,
    tc: ThoughtConfig | None,
    examples: Sequence[eval_data.AnswerExample],
    valid_ids: Sequence[int],
    *,
    pad_id: int,
    batch_tokens: int = 8192,
    bucket: int = 64,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, np.ndarray]:
    """Authors' score and exact match of every example, base and (with tc) thinking.

    Prompts are grouped by length rounded up to `bucket` tokens, `batch_tokens` per
    batch (one compiled program per bucket). Returns arrays `[n]` "base_score",
    "base_exact", "base_first" (the first scored token is the valid argmax: for
    CommonsenseQA the choice letter) and the same for "thinking_" (only with tc).
    log: called with a progress line after each batch.
    """
    n = len(examples)
    names = ["base"] + (["thinking"] if tc is not None else [])
    res = {}
    for name in names:
        res |= {f"{name}_score": np.zeros(n), f"{name}_exact": np.zeros(n, bool),
                f"{name}_first": np.zeros(n, bool)}
    valid = jnp.asarray(valid_ids, jnp.int32)
    rng = jax.random.key(seed)
    lengths = [len(e.ids) for e in examples]
    n_q = max(len(e.positions) for e in examples)
    done, t0 = 0, time.perf_counter()
    for k, (idx, width, rows) in enumerate(length_batches(lengths, batch_tokens, bucket)):
        ids, mask = right_pad([examples[i].ids for i in idx], width, rows, pad_id)
        q_index = np.zeros((rows, n_q), np.int32)
        q_ok = np.zeros((rows, n_q), bool)
        for r, i in enumerate(idx):
            q_index[r, :len(examples[i].positions)] = examples[i].positions
            q_ok[r, :len(examples[i].positions)] = True
        key = jax.random.fold_in(rng, k) if tc is not None and tc.sampling == "sample" else None
        base, think = answer_logits(params, jnp.asarray(ids), jnp.asarray(mask), key, valid,
                                    jnp.asarray(q_index), jnp.asarray(q_ok), cfg=cfg, tc=tc)
        outs = {"base": np.asarray(base)} | ({"thinking": np.asarray(think)} if tc else {})
        for r, i in enumerate(idx):
            ex = examples[i]
            for name, logits in outs.items():
                s, e = answer_score(logits[r, :len(ex.positions)], ex.targets)
                res[f"{name}_score"][i], res[f"{name}_exact"][i] = s, e
                res[f"{name}_first"][i] = np.argmax(logits[r, 0]) == ex.targets[0]
        done += len(idx)
        _progress(log, f"{done}/{n} examples", t0)
    return res


def _progress(log: Callable[[str], None] | None, what: str, t0: float) -> None:
    if log is not None:
        log(f"{what} ({time.perf_counter() - t0:.0f} s)")


def _direct_answer(
    task: str,
    params: Params,
    cfg: ModelConfig,
    tc: ThoughtConfig | None,
    tokenizer: Tokenizer,
    source: str | Path,
    *,
    limit: int | None,
    batch_tokens: int,
    bucket: int,
    seed: int,
    max_length: int | None,
    return_examples: bool,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    _check_limit(limit)
    tc = _prepare_tc(tc, tokenizer, cfg)
    raw = eval_data.load_rows(task, source)
    if task == "gsm8k":
        rows = eval_data.gsm8k_rows(raw)
        texts = [eval_data.gsm8k_text(r["question"], r["answer"]) for r in rows]
        valid_ids = eval_data.gsm8k_valid_ids(tokenizer)
    else:
        rows = eval_data.csqa_rows(raw)
        texts = [eval_data.csqa_text(r["question"], r["labels"], r["texts"], r["answerKey"])
                 for r in rows]
        valid_ids = eval_data.csqa_valid_ids(tokenizer)
    if limit is not None:
        texts = texts[:limit]
    pad_id = _pad_id(tokenizer, tc)
    examples = eval_data.build_examples(tokenizer, texts, valid_ids, skip_first=task == "gsm8k",
                                        pad_id=pad_id, max_length=max_length)
    if tc is not None and examples:
        k, last = max(((k, max(e.positions)) for k, e in enumerate(examples)),
                      key=lambda x: x[1])
        _check_thought_reach(tc, cfg, last, f"the last scored position of {task} example {k}",
                             "a smaller max_length")
    res = score_examples(params, cfg, tc, examples, valid_ids, pad_id=pad_id,
                         batch_tokens=batch_tokens, bucket=bucket, seed=seed, log=log)
    out: dict[str, Any] = {
        "task": task, "examples": len(examples), **_thought_info(tc),
        "valid_token_ids": list(valid_ids),
        "valid_tokens": tokenizer.convert_ids_to_tokens(list(valid_ids)),
    }
    for name in ("base", "thinking"):
        if f"{name}_score" in res:
            out[name] = {"accuracy": float(res[f"{name}_score"].mean()),
                         "exact_match": float(res[f"{name}_exact"].mean()),
                         "first_token_match": float(res[f"{name}_first"].mean())}
    out["seconds"] = time.perf_counter() - t0
    if return_examples:
        out["per_example"] = {k: v.tolist() for k, v in res.items()}
    return out


def evaluate_gsm8k(
    params: Params,
    cfg: ModelConfig,
    tc: ThoughtConfig | None,
    tokenizer: Tokenizer,
    source: str | Path = "hf",
    *,
    limit: int | None = None,
    batch_tokens: int = 8192,
    bucket: int = 64,
    seed: int = 0,
    max_length: int | None = None,
    return_examples: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Zero-shot direct-answer GSM8K (test): base and thinking `accuracy` (the authors'
    metric) and `exact_match`. tc None: base only. source: see `evaluation.data.load_rows`.
    Prompts longer than max_length keep their last max_length tokens; batching: see
    `score_examples`; `log` gets a progress line per batch. Returns {"task", "examples",
    "n_ahead", "thought_tokens", "valid_token_ids", "valid_tokens", "base": {"accuracy",
    "exact_match"}, "thinking": {...}, "seconds"} (and "per_example" arrays with
    return_examples)."""
    return _direct_answer("gsm8k", params, cfg, tc, tokenizer, source, limit=limit,
                          batch_tokens=batch_tokens, bucket=bucket, seed=seed,
                          max_length=max_length, return_examples=return_examples, log=log)


def evaluate_csqa(
    params: Params,
    cfg: ModelConfig,
    tc: ThoughtConfig | None,
    tokenizer: Tokenizer,
    source: str | Path = "hf",
    *,
    limit: int | None = None,
    batch_tokens: int = 8192,
    bucket: int = 64,
    seed: int = 0,
    max_length: int | None = None,
    return_examples: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Zero-shot direct-answer CommonsenseQA (validation), as `evaluate_gsm8k`."""
    return _direct_answer("csqa", params, cfg, tc, tokenizer, source, limit=limit,
                          batch_tokens=batch_tokens, bucket=bucket, seed=seed,
                          max_length=max_length, return_examples=return_examples, log=log)


def text_chunks(
    tokenizer: Tokenizer, text: str, chunk_len: int, *, bos: bool = False,
    join_paragraphs: bool = True, max_chunks: int | None = None,
) -> list[list[int]]:
    """Token chunks for perplexity, each with `chunk_len` predicted tokens.

    The text's paragraphs (blank-line separated) are re-joined with a single newline
    (join_paragraphs) and the whole text is encoded once without special tokens.
    bos=False: chunk k is tokens `[k L, k L + L]` (L + 1 tokens; its first token is
    context only, consecutive chunks share one token, so every token after the first
    is predicted once). bos=True: chunk k is BOS + tokens `[k L, (k + 1) L)`, the first
    token predicted from BOS alone. A shorter tail is dropped.
    """
    if chunk_len < 1:
        raise ValueError(f"chunk_len={chunk_len}: must be >= 1")
    if join_paragraphs:
        text = "\n".join(p.strip() for p in text.split("\n\n") if p.strip())
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if bos and tokenizer.bos_token_id is None:
        raise ValueError("bos=True but the tokenizer has no BOS token")
    n = len(ids) // chunk_len if bos else (len(ids) - 1) // chunk_len
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n <= 0:
        raise ValueError(f"text of {len(ids)} tokens is shorter than one chunk of {chunk_len}")
    if bos:
        return [[tokenizer.bos_token_id] + ids[k * chunk_len:(k + 1) * chunk_len]
                for k in range(n)]
    return [ids[k * chunk_len:(k + 1) * chunk_len + 1] for k in range(n)]


def _check_chunk_len(chunk_len: int, cfg: ModelConfig) -> None:
    """A chunk is `chunk_len + 1` tokens (a context token or BOS, then the scored ones)."""
    if chunk_len + 1 > cfg.max_position_embeddings:
        raise ValueError(f"chunk_len={chunk_len}: a chunk of {chunk_len} scored tokens plus one "
                         f"of context is {chunk_len + 1} positions, more than the model's "
                         f"max_position_embeddings={cfg.max_position_embeddings}")


def evaluate_perplexity(
    params: Params,
    cfg: ModelConfig,
    tc: ThoughtConfig | None,
    tokenizer: Tokenizer,
    text: str | Path,
    *,
    chunk_len: int = 256,
    max_chunks: int | None = None,
    bos: bool = False,
    join_paragraphs: bool = True,
    batch_size: int = 8,
    seed: int = 0,
    edges: Sequence[float] = DEFAULT_NLL_EDGES,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Base and thought-mixed NLL (nats/token) and perplexity of held-out text.

    text: the text itself (str) or a text file (Path). Chunking: see `text_chunks`. Returns
    {"tokens", "chunks", "chunking", "base": {"nll", "perplexity"}, "thinking": {...},
    "bins": `evaluation.metrics.nll_bins` of base vs thinking per token}. A chunk (with its
    context token or BOS) must fit the model's `max_position_embeddings`. `log` gets a
    progress line per batch.
    """
    t0 = time.perf_counter()
    _check_chunk_len(chunk_len, cfg)
    tc = _prepare_tc(tc, tokenizer, cfg)
    check_perplexity_thoughts(chunk_len, tc, cfg)
    if isinstance(text, Path):
        text = text.read_text(encoding="utf-8")
    chunks = text_chunks(tokenizer, text, chunk_len, bos=bos, join_paragraphs=join_paragraphs,
                         max_chunks=max_chunks)
    width = len(chunks[0])
    rng = jax.random.key(seed)
    base_all, think_all = [], []
    pad_id = _pad_id(tokenizer, tc)
    for k in range(0, len(chunks), batch_size):
        part = chunks[k:k + batch_size]
        ids, mask = right_pad(part, width, batch_size, pad_id)
        key = (jax.random.fold_in(rng, k) if tc is not None and tc.sampling == "sample"
               else None)
        nb, nt = token_nlls(params, jnp.asarray(ids), jnp.asarray(mask), key, cfg=cfg, tc=tc)
        base_all.append(np.asarray(nb)[:len(part)])
        if tc is not None:
            think_all.append(np.asarray(nt)[:len(part)])
        _progress(log, f"{min(k + batch_size, len(chunks))}/{len(chunks)} chunks", t0)
    base = np.concatenate(base_all).ravel()
    out: dict[str, Any] = {
        "task": "perplexity", **_thought_info(tc), "tokens": int(base.size),
        "chunks": len(chunks),
        "chunking": (f"{len(chunks)} chunks of {chunk_len} predicted tokens, "
                     + ("BOS at chunk start" if bos else "first token of each chunk is "
                        "context only (chunks share one token)")
                     + (", paragraphs re-joined with one newline" if join_paragraphs else "")),
        "base": {"nll": float(base.mean()), "perplexity": float(np.exp(base.mean()))},
    }
    if tc is not None:
        think = np.concatenate(think_all).ravel()
        out["thinking"] = {"nll": float(think.mean()), "perplexity": float(np.exp(think.mean()))}
        out["bins"] = nll_bins(base, think, edges)
    out["seconds"] = time.perf_counter() - t0
    return out


def evaluate_cot(
    params: Params,
    cfg: ModelConfig,
    tc: ThoughtConfig | None,
    tokenizer: Tokenizer,
    source: str | Path = "hf",
    *,
    limit: int | None = 128,
    shuffle_seed: int | None = 42,
    n_votes: int = 8,
    temperature: float = 0.9,
    max_solution_tokens: int = 384,
    answer_tokens: int = 12,
    batch_size: int = 64,
    seed: int = 0,
    return_examples: bool = False,
    log: Callable[[str], None] | None = None,
    gate_threshold: float | None = None,
    gate_rate: float | None = None,
) -> dict[str, Any]:
    """Chain-of-thought GSM8K majority-vote accuracy, base and (with tc) thinking.

    The questions are shuffled with `np.random.default_rng(shuffle_seed).permutation`
    (None: file order) and the first `limit` kept (the authors: 128 after a seed-42
    shuffle). gate_threshold / gate_rate: the thinking run thinks only where the think
    gate fires (`generation.generate`); its results hold "think_rate" and
    "thought_tokens_per_token" (`cot.run_cot`)."""
    t0 = time.perf_counter()
    _check_limit(limit)
    tc = _prepare_tc(tc, tokenizer, cfg)
    rows = eval_data.gsm8k_rows(eval_data.load_rows("gsm8k", source))
    if shuffle_seed is not None:
        rows = [rows[i] for i in np.random.default_rng(shuffle_seed).permutation(len(rows))]
    rows = rows[:limit] if limit is not None else rows
    rng = jax.random.key(seed)
    out: dict[str, Any] = {"task": "cot", **_thought_info(tc), "questions": len(rows),
                           "votes": n_votes, "temperature": temperature}
    variants = [("base", False)] + ([("thinking", True)] if tc is not None else [])
    for k, (name, think) in enumerate(variants):
        t1 = time.perf_counter()
        res = run_cot(params, cfg, tc, tokenizer, rows, think=think, n_votes=n_votes,
                      temperature=temperature, max_solution_tokens=max_solution_tokens,
                      answer_tokens=answer_tokens, batch_size=batch_size,
                      rng=jax.random.fold_in(rng, k),
                      log=None if log is None else (lambda m, n=name: log(f"[cot {n}] {m}")),
                      gate_threshold=gate_threshold, gate_rate=gate_rate)
        out[name] = {"accuracy": res["accuracy"],
                     "mean_solution_tokens": res["mean_solution_tokens"],
                     "seconds": time.perf_counter() - t1}
        if think:
            out[name] |= {k: res[k] for k in ("think_rate", "thought_tokens_per_token")}
            out[name]["gate"] = ({"threshold": gate_threshold} if gate_threshold is not None
                                 else {"rate": gate_rate} if gate_rate is not None else None)
        if return_examples:
            out[name]["per_question"] = res["per_question"]
    out["seconds"] = time.perf_counter() - t0
    return out
