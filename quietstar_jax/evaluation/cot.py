"""Zero-shot chain-of-thought GSM8K, as the authors' `zero-shotcot-eval.py` runs it.

Per question: prompt `"Q: " + question + "\\nA: Let's think step by step."`, sample
`n_votes` solutions (temperature 0.9) of up to `max_solution_tokens` tokens, each
cut at the first eos/bos/pad token or where "Q:" or "\\n\\n\\n" occurs a second time
in the decoded text; then the decoded text, right-stripped, plus
`"\\nTherefore, the answer (arabic numerals) is"` is re-encoded and continued for
`answer_tokens` tokens at the same temperature; the vote is the first integer of that
continuation (commas removed, no sign); the prediction is the majority vote, scored
against the first integer after the answer's `#### `.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from quietstar_jax.evaluation.data import COT_FINAL_ANSWER, cot_prompt
from quietstar_jax.evaluation.metrics import extract_first_integer, majority_vote
from quietstar_jax.generation.cached import generate, thought_tokens_fed
from quietstar_jax.model import ModelConfig, Params
from quietstar_jax.protocols import Tokenizer
from quietstar_jax.thought import ThoughtConfig

STOP_STRINGS = ("Q:", "\n\n\n")


def cut_at_repeat(text: str, stops: Sequence[str] = STOP_STRINGS) -> str:
    """Cut `text` before the second occurrence of any stop string (the prompt holds the
    first "Q:"), whichever comes first."""
    cut = len(text)
    for s in stops:
        first = text.find(s)
        if first >= 0:
            second = text.find(s, first + len(s))
            if second >= 0:
                cut = min(cut, second)
    return text[:cut]


def _stop_ids(tokenizer: Tokenizer) -> set[int]:
    return {int(t) for t in (tokenizer.eos_token_id, tokenizer.bos_token_id,
                             tokenizer.pad_token_id) if t is not None}


def _generate_rows(
    params: Params,
    cfg: ModelConfig,
    tc: ThoughtConfig | None,
    prompts: Sequence[Sequence[int]],
    *,
    think: bool,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    rng: jax.Array,
    pad_to_multiple: int,
    eos_id: int | None,
    log: Callable[[str], None] | None = None,
    gate: dict[str, float | None] | None = None,
    counts: dict[str, int] | None = None,
) -> list[list[int]]:
    """Generate for many prompts in fixed-size batches (sorted by length, the last
    batch filled with repeats), returning the new tokens of each prompt.

    gate: `generate`'s gate_threshold / gate_rate (when thinking); counts: when given,
    its "tokens", "thoughts" and "thought_tokens" are increased by the new tokens of the
    prompts (up to each one's eos; the repeats that fill the last batch not counted),
    the thoughts that preceded them and the tokens those thoughts fed."""
    order = np.argsort([len(p) for p in prompts], kind="stable")
    out: list[list[int]] = [[] for _ in prompts]
    gate = gate if think and gate else {}
    n_batches = -(-len(order) // batch_size)
    for k, start in enumerate(range(0, len(order), batch_size)):
        if log is not None:
            log(f"batch {k + 1}/{n_batches}")
        idx = list(order[start:start + batch_size])
        batch = [prompts[i] for i in idx]
        batch += [batch[-1]] * (batch_size - len(batch))
        gen = generate(params, cfg, tc, batch, max_new_tokens=max_new_tokens,
                       rng=jax.random.fold_in(rng, k), think=think, greedy=temperature == 0,
                       temperature=temperature if temperature > 0 else 1.0,
                       eos_token_id=eos_id, pad_to_multiple=pad_to_multiple, **gate)
        toks, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
        fired = (np.asarray(gen.thought_mask) if gen.thought_mask is not None
                 else np.full(toks.shape, think))
        for r, i in enumerate(idx):
            out[i] = toks[r, :lengths[r]].tolist()
            if counts is not None:
                counts["tokens"] = counts.get("tokens", 0) + int(lengths[r])
                counts["thoughts"] = counts.get("thoughts", 0) + int(fired[r, :lengths[r]].sum())
                if gen.thought_lengths is not None:
                    live = slice(0, lengths[r])
                    fed = thought_tokens_fed(fired[r, live], gen.thought_lengths[r, live])
                    counts["thought_tokens"] = counts.get("thought_tokens", 0) + int(fed.sum())
    return out


def run_cot(
    params: Params,
    cfg: ModelConfig,
    tc: ThoughtConfig | None,
    tokenizer: Tokenizer,
    rows: Sequence[dict[str, str]],
    *,
    think: bool,
    n_votes: int = 8,
    temperature: float = 0.9,
    max_solution_tokens: int = 384,
    answer_tokens: int = 12,
    batch_size: int = 64,
    rng: jax.Array,
    pad_to_multiple: int = 64,
    log: Callable[[str], None] | None = None,
    gate_threshold: float | None = None,
    gate_rate: float | None = None,
) -> dict[str, Any]:
    """Chain-of-thought majority-vote accuracy over GSM8K rows (`question`, `answer`).

    think: generate with thoughts (tc's n_ahead) or as the base LM.
    log: called with progress lines (e.g. `print`).
    gate_threshold / gate_rate: with thinking, think only where the think gate fires
      (`generate`'s options; the model's params need a `think_gate`).
    Returns {"accuracy", "questions", "votes", "mean_solution_tokens", "per_question":
    [{"question", "truth", "votes", "prediction", "correct", "solutions"}], and when
    thinking "think_rate" (share of the generated tokens, solutions and answers, up to
    each one's eos, preceded by a thought) and "thought_tokens_per_token" (its sampled
    tokens + 2 per thought)}.
    """
    if n_votes < 1 or max_solution_tokens < 1 or answer_tokens < 1:
        raise ValueError("n_votes, max_solution_tokens and answer_tokens must be >= 1")
    stops = _stop_ids(tokenizer)
    prompt_texts = [cot_prompt(r["question"]) for r in rows]
    prompt_ids = [list(tokenizer(t)["input_ids"]) for t in prompt_texts]
    flat = [p for p in prompt_ids for _ in range(n_votes)]
    counts: dict[str, int] = {}
    common = dict(think=think, temperature=temperature, batch_size=batch_size,
                  pad_to_multiple=pad_to_multiple, eos_id=tokenizer.eos_token_id,
                  gate={"gate_threshold": gate_threshold, "gate_rate": gate_rate},
                  counts=counts)
    stage = lambda name: None if log is None else (lambda m: log(f"{name}: {m}"))
    sols = _generate_rows(params, cfg, tc, flat, max_new_tokens=max_solution_tokens,
                          rng=jax.random.fold_in(rng, 0), log=stage("solutions"), **common)
    texts, sol_lens = [], []
    for p, s in zip(flat, sols, strict=True):
        cut = next((k for k, t in enumerate(s) if t in stops), len(s))
        sol_lens.append(cut)
        text = cut_at_repeat(tokenizer.decode(p + s[:cut], skip_special_tokens=True))
        texts.append(text.rstrip() + COT_FINAL_ANSWER)
    final_ids = [list(tokenizer(t)["input_ids"]) for t in texts]
    answers = _generate_rows(params, cfg, tc, final_ids, max_new_tokens=answer_tokens,
                             rng=jax.random.fold_in(rng, 1), log=stage("answers"), **common)
    per_q, correct = [], 0
    for q, row in enumerate(rows):
        votes, sol_texts = [], []
        for v in range(n_votes):
            k = q * n_votes + v
            cont = tokenizer.decode(answers[k], skip_special_tokens=True)
            votes.append(extract_first_integer(cont))
            sol_texts.append(texts[k] + cont)
        pred = majority_vote(votes)
        truth = extract_first_integer(row["answer"].split("#### ")[-1])
        correct += int(pred is not None and pred == truth)
        per_q.append({"question": row["question"], "truth": truth, "votes": votes,
                      "prediction": pred, "correct": pred is not None and pred == truth,
                      "solutions": sol_texts})
    res = {"accuracy": correct / max(len(rows), 1), "questions": len(rows), "votes": n_votes,
           "mean_solution_tokens": float(np.mean(sol_lens)) if sol_lens else 0.0,
           "per_question": per_q}
    if think:
        n = max(counts.get("tokens", 0), 1)
        res |= {"think_rate": counts.get("thoughts", 0) / n,
                "thought_tokens_per_token": counts.get("thought_tokens", 0) / n}
    return res
