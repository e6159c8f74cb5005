"""`python -m quietstar_jax.generation`: generate text with thoughts from the command line.

    python -m quietstar_jax.generation MODEL --prompt "Once upon a time" [--prompt ...]
        [--prompts-file FILE] [--max-new-tokens 64] [--n-ahead 12]
        [--thought-sampling sample|greedy] [--thought-temperature T]
        [--greedy | --temperature 1 --top-p 1] [--mode thinking|base|both]
        [--show-thoughts] [--ignore-eos] [--mask-special-thought-tokens] [--seed 0]
        [--gate-threshold T | --gate-rate R] [--dtype float32] [--out generations.json]

MODEL is a Hugging Face directory or a training workdir / checkpoint step directory.
Prints each completion (and, with --show-thoughts, every new token with the thought
that preceded it and the mixing weight, one line each: special tokens by name,
newlines and other control characters escaped), the speed in tokens/s, when thinking
the think rate (share of new tokens preceded by a thought) and thought tokens per new
token (n_ahead - 1 per thought), and writes JSON. With a trained think gate,
--gate-threshold T thinks only where the gate's logit exceeds T, --gate-rate R before
a share R of the tokens (a running threshold; `generate`'s gate_threshold / gate_rate).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
from absl import flags

from quietstar_jax.cli_common import (
    define_thinking_flags,
    inference_thought_config,
    load_cli_model,
    printable,
    show_tokens,
    write_json,
)
from quietstar_jax.command_line import CommandLine, flag_definer, run_cli
from quietstar_jax.generation.cached import generate_text, thought_tokens_fed
from quietstar_jax.protocols import Tokenizer


def _define(fv: flags.FlagValues) -> None:
    f = flag_definer(fv)
    define_thinking_flags(f, fv)

    f(flags.DEFINE_multi_string, "prompt", [], "a prompt (repeatable)")
    f(flags.DEFINE_string, "prompts-file", None, "a file with one prompt per line")
    f(flags.DEFINE_integer, "max-new-tokens", 64, "new tokens per prompt")
    f(flags.DEFINE_float, "thought-temperature", None, "temperature of the thought tokens")
    f(flags.DEFINE_boolean, "greedy", False, "greedy real tokens")
    f(flags.DEFINE_float, "temperature", 1.0, "temperature of the real tokens")
    f(flags.DEFINE_float, "top-p", 1.0, "nucleus sampling of the real tokens")
    f(flags.DEFINE_enum, "mode", "thinking",
      "generate with thoughts, as the base LM (no thoughts), or both",
      enum_values=["thinking", "base", "both"])
    f(flags.DEFINE_boolean, "show-thoughts", False,
      "print every new token with the thought before it")
    f(flags.DEFINE_boolean, "ignore-eos", False,
      "do not stop at the end-of-sequence token: always --max-new-tokens")
    f(flags.DEFINE_string, "out", "generations.json", "JSON output path")


COMMAND = CommandLine("quietstar_jax.generation", "quietstar-generate",
                      "Generate text with Quiet-STaR thoughts. MODEL is a Hugging Face model "
                      "directory or a training checkpoint.", _define, positional=("model",))


def _show(item: dict[str, Any], tokenizer: Tokenizer, show_thoughts: bool) -> str:
    lines = [item["prompt"] + "\u2502" + item["completion"]]
    if show_thoughts and "thoughts" in item:
        shown = ([show_tokens(tokenizer, ids) for ids in item["thought_ids"]]
                 if "thought_ids" in item else [printable(t) for t in item["thoughts"]])
        for tok, thought, w in zip(item["tokens"], shown, item["mixing_weights"], strict=True):
            lines.append(f"  <|startthought|>{thought}<|endthought|>  w={w:+.3f}  -> "
                         f"{show_tokens(tokenizer, [tok])}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; bad input ends with one `error: ...` line (exit 2)."""
    return run_cli(_run, argv, COMMAND.prog)


def _check_args(args: SimpleNamespace, prompts: list[str]) -> None:
    """Reject bad flag values, naming the flag (ValueError: exit status 2)."""
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts-file")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if not args.temperature > 0:
        raise ValueError(f"--temperature={args.temperature} must be > 0; for greedy decoding "
                         "use --greedy")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p={args.top_p} must be in (0, 1]")
    if args.thought_temperature is not None and not args.thought_temperature > 0:
        raise ValueError(f"--thought-temperature={args.thought_temperature} must be > 0; for "
                         "greedy thoughts use --thought-sampling greedy")
    if args.gate_rate is not None and not 0 <= args.gate_rate <= 1:
        raise ValueError(f"--gate-rate={args.gate_rate} must be a share in [0, 1]")
    if (args.gate_rate is not None or args.gate_threshold is not None) and args.mode == "base":
        raise ValueError("--gate-threshold / --gate-rate choose where to think: they need "
                         "--mode thinking or both")


def _read_prompts(path: str) -> list[str]:
    """The non-blank lines of a UTF-8 prompts file; a line that is not UTF-8 is an error
    naming the file, the line and the byte (ValueError: exit status 2)."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"--prompts-file {path!r}: line {line} is not UTF-8 text (byte "
                         f"0x{data[e.start]:02x} at column {column}: {e.reason})") from None
    return [ln for ln in text.splitlines() if ln.strip()]


def _run(argv: Sequence[str] | None) -> int:
    args = COMMAND.parse(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += _read_prompts(args.prompts_file)
    _check_args(args, prompts)
    cfg, params, tok, ckpt_tc = load_cli_model(args.model, args.dtype)
    tc = inference_thought_config(tok, ckpt_tc, args.n_ahead, args.thought_sampling,
                        args.thought_temperature,
                        mask_special_tokens=args.mask_special_thought_tokens)
    modes = ["thinking", "base"] if args.mode == "both" else [args.mode]
    results: dict[str, Any] = {"model": str(args.model), "n_ahead": tc.n_ahead,
                               "thought_tokens": tc.num_sampled}
    eos = {"eos_token_id": None} if args.ignore_eos else {}
    gate = {"gate_threshold": args.gate_threshold, "gate_rate": args.gate_rate}
    for mode in modes:
        t0 = time.perf_counter()
        out = generate_text(params, cfg, tc, tok, prompts, max_new_tokens=args.max_new_tokens,
                            rng=jax.random.key(args.seed), think=mode == "thinking",
                            greedy=args.greedy, temperature=args.temperature,
                            top_p=args.top_p, return_thoughts=True, **eos,
                            **(gate if mode == "thinking" else {}))
        seconds = time.perf_counter() - t0
        results[mode] = out
        n_new = sum(len(item["tokens"]) for item in out)
        results.setdefault("speed", {})[mode] = {"new_tokens": n_new, "seconds": seconds,
                                                 "tokens_per_s": n_new / seconds}
        print(f"== thinking (n_ahead {tc.n_ahead})" if mode == "thinking"
              else "== base (no thoughts)")
        for item in out:
            print(_show(item, tok, args.show_thoughts))
        print(f"[{mode}] {n_new} new tokens in {seconds:.2f} s: {n_new / seconds:.1f} tokens/s "
              "(compile included)", file=sys.stderr)
        if mode == "thinking":
            rate = sum(sum(item["thought_before"]) for item in out) / max(n_new, 1)
            fed = sum(int(thought_tokens_fed(item["thought_before"],
                                             item["thought_lengths"]).sum()) for item in out)
            results["think_rate"] = rate
            results["thought_tokens_per_token"] = fed / max(n_new, 1)
            how = ("every token" if args.gate_threshold is None and args.gate_rate is None
                   else f"gate threshold {args.gate_threshold}" if args.gate_rate is None
                   else f"gate rate target {args.gate_rate}")
            print(f"[thinking] think rate {rate:.3f} ({how}), "
                  f"{fed / max(n_new, 1):.2f} thought tokens per new token", file=sys.stderr)
    write_json(args.out, results)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
