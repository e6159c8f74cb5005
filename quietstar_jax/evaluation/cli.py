"""`python -m quietstar_jax.evaluation`: evaluate a model from the command line.

    python -m quietstar_jax.evaluation MODEL --tasks gsm8k,csqa,perplexity,cot
        [--gsm8k hf|FILE] [--csqa hf|FILE] [--text FILE] [--n-ahead 12] [--limit N]
        [--no-thinking] [--gate-threshold T | --gate-rate R] [--out eval_results.json]

MODEL is a Hugging Face directory or a training workdir / checkpoint step directory.
Runs each task base and thinking side by side (`evaluation.tasks`), reports progress
on stderr, prints a table of the results and writes them as JSON. When thinking, each
task's think rate (share of tokens preceded by a thought) and thought tokens per
token are printed: the scored tasks (gsm8k, csqa, perplexity) think at every
position (rate 1); the generated one (cot) thinks everywhere too, or with a trained
think gate only where it fires (--gate-threshold T: its logit above T; --gate-rate R:
before a share R of the tokens, by a running threshold), and reports the rate it
realised.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from absl import flags

from quietstar_jax.cli_common import (
    define_thinking_flags,
    format_table,
    inference_thought_config,
    load_cli_model,
    write_json,
)
from quietstar_jax.command_line import CommandLine, flag_definer, run_cli
from quietstar_jax.evaluation.tasks import (
    TASKS,
    _check_chunk_len,
    check_perplexity_thoughts,
    evaluate_cot,
    evaluate_csqa,
    evaluate_gsm8k,
    evaluate_perplexity,
)


def _define(fv: flags.FlagValues) -> None:
    f = flag_definer(fv)
    define_thinking_flags(f, fv, scope="cot: ")

    f(flags.DEFINE_string, "tasks", "gsm8k,csqa",
      f"comma-separated subset of {','.join(TASKS)}")
    f(flags.DEFINE_string, "gsm8k", "hf",
      "GSM8K test jsonl, a folder with test.jsonl, hf[:name] or tfds:name")
    f(flags.DEFINE_string, "csqa", "hf",
      "CommonsenseQA validation jsonl, folder, hf[:name] or tfds:name")
    f(flags.DEFINE_string, "text", None, "held-out text file for perplexity")
    f(flags.DEFINE_boolean, "no-thinking", False, "evaluate the base model only")
    f(flags.DEFINE_integer, "limit", None, "first N examples (gsm8k, csqa)")
    f(flags.DEFINE_integer, "batch-tokens", 8192, "tokens per scoring batch")
    f(flags.DEFINE_integer, "max-length", None, "keep the last N tokens of longer prompts")
    f(flags.DEFINE_integer, "chunk-len", 256, "perplexity chunk length")
    f(flags.DEFINE_integer, "max-chunks", None, "perplexity: first N chunks")
    f(flags.DEFINE_boolean, "bos", False,
      "perplexity: BOS before each chunk (else its first token is context)")
    f(flags.DEFINE_integer, "cot-limit", 128, "cot: first N questions")
    f(flags.DEFINE_integer, "cot-votes", 8, "cot: sampled solutions per question")
    f(flags.DEFINE_float, "cot-temperature", 0.9, "cot: sampling temperature")
    f(flags.DEFINE_integer, "cot-solution-tokens", 384, "cot: new tokens per solution")
    f(flags.DEFINE_integer, "cot-batch-size", 64, "cot: solutions generated together")
    f(flags.DEFINE_string, "out", "eval_results.json", "JSON output path")


COMMAND = CommandLine("quietstar_jax.evaluation", "quietstar-evaluate",
                      "Evaluate a Quiet-STaR model: base (no thoughts) and thinking side by "
                      "side. MODEL is a Hugging Face model directory or a training "
                      "checkpoint.", _define, positional=("model",))


def _table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for task, r in results.items():
        for name in ("base", "thinking"):
            if name not in r:
                continue
            m = r[name]
            row = {"task": task, "model": name,
                   "n_ahead": "-" if name == "base" else r["n_ahead"]}
            if task == "perplexity":
                row |= {"metric": "nll/token", "value": m["nll"], "exact_match": "",
                        "n": r["tokens"]}
            elif task == "cot":
                row |= {"metric": "maj-vote acc", "value": m["accuracy"], "exact_match": "",
                        "n": r["questions"]}
            else:
                row |= {"metric": "authors acc", "value": m["accuracy"],
                        "exact_match": m["exact_match"],
                        "first_token": m["first_token_match"], "n": r["examples"]}
            row["seconds"] = r["seconds"]
            rows.append(row)
    return rows


def _think_line(result: dict[str, Any], n_ahead: int) -> str:
    """The think rate and thought tokens per token of a task's thinking run: the cot
    task reports what it realised, the scored tasks think at every position."""
    m = result.get("thinking", {})
    if "think_rate" not in m:
        return (f"think rate 1.000 (every position), {n_ahead - 1:.2f} thought tokens per "
                "token")
    gate = m.get("gate")
    how = ("every token" if not gate else f"gate threshold {gate['threshold']}"
           if "threshold" in gate else f"gate rate target {gate['rate']}")
    return (f"think rate {m['think_rate']:.3f} ({how}), {m['thought_tokens_per_token']:.2f} "
            "thought tokens per token")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; bad input ends with one `error: ...` line (exit 2)."""
    return run_cli(_run, argv, COMMAND.prog)


# Count flags that must be >= 1 when given (None: no limit).
_COUNTS = ("limit", "batch_tokens", "max_length", "chunk_len", "max_chunks", "cot_limit",
           "cot_votes", "cot_solution_tokens", "cot_batch_size")


def _check_args(args: SimpleNamespace) -> None:
    """Reject bad counts before the model loads, naming the flag (ValueError: exit 2)."""
    for name in _COUNTS:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}={value} must be >= 1")
    gated = args.gate_threshold is not None or args.gate_rate is not None
    if args.gate_rate is not None and not 0 <= args.gate_rate <= 1:
        raise ValueError(f"--gate-rate={args.gate_rate} must be a share in [0, 1]")
    if gated and args.no_thinking:
        raise ValueError("--gate-threshold / --gate-rate choose where to think: not with "
                         "--no-thinking")
    if gated and "cot" not in [t.strip() for t in args.tasks.split(",")]:
        raise ValueError("--gate-threshold / --gate-rate apply to the generated task (cot) "
                         "only: the scored tasks think at every position; add cot to --tasks")


def _run(argv: Sequence[str] | None) -> int:
    args = COMMAND.parse(argv)
    _check_args(args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"unknown task(s) {bad}; choose from {','.join(TASKS)}")
    if "perplexity" in tasks and not args.text:
        raise ValueError("the perplexity task needs --text FILE")
    if "perplexity" in tasks and not Path(args.text).is_file():
        raise FileNotFoundError(f"--text {args.text!r} is not a file")
    cfg, params, tok, ckpt_tc = load_cli_model(args.model, args.dtype)
    if "perplexity" in tasks:
        _check_chunk_len(args.chunk_len, cfg)
    tc = None if args.no_thinking else inference_thought_config(
        tok, ckpt_tc, args.n_ahead, args.thought_sampling,
        mask_special_tokens=args.mask_special_thought_tokens)
    if "perplexity" in tasks:  # before any task runs
        check_perplexity_thoughts(args.chunk_len, tc, cfg)
    results: dict[str, Any] = {}
    common = dict(batch_tokens=args.batch_tokens, seed=args.seed, max_length=args.max_length,
                  limit=args.limit)
    for task in tasks:
        def log(line: str, task: str = task) -> None:
            print(f"[{task}] {line}", file=sys.stderr, flush=True)

        log("running" + ("" if tc is None else f" (base and thinking, n_ahead {tc.n_ahead})")
            + "; each new prompt length compiles first")
        if task == "gsm8k":
            results[task] = evaluate_gsm8k(params, cfg, tc, tok, args.gsm8k, log=log, **common)
        elif task == "csqa":
            results[task] = evaluate_csqa(params, cfg, tc, tok, args.csqa, log=log, **common)
        elif task == "perplexity":
            results[task] = evaluate_perplexity(params, cfg, tc, tok, Path(args.text),
                                                chunk_len=args.chunk_len,
                                                max_chunks=args.max_chunks, bos=args.bos,
                                                seed=args.seed, log=log)
        else:
            results[task] = evaluate_cot(params, cfg, tc, tok, args.gsm8k, limit=args.cot_limit,
                                         n_votes=args.cot_votes,
                                         temperature=args.cot_temperature,
                                         max_solution_tokens=args.cot_solution_tokens,
                                         batch_size=args.cot_batch_size, seed=args.seed,
                                         log=lambda m: print(m, file=sys.stderr, flush=True),
                                         gate_threshold=args.gate_threshold,
                                         gate_rate=args.gate_rate)
        print(f"[{task}] done in {results[task]['seconds']:.1f}s", file=sys.stderr)
        if tc is not None:
            print(f"[{task}] thinking: {_think_line(results[task], tc.n_ahead)}",
                  file=sys.stderr)
    print(format_table(_table_rows(results),
                       ["task", "model", "n_ahead", "metric", "value", "exact_match",
                        "first_token", "n", "seconds"]))
    if "perplexity" in results and "bins" in results["perplexity"]:
        print("\nperplexity: improvement (base - thinking NLL) by base-NLL bin")
        print(format_table(results["perplexity"]["bins"],
                           ["lo", "hi", "tokens", "share", "base_nll", "thought_nll",
                            "improvement"]))
    write_json(args.out, {"model": str(args.model), "results": results})
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
