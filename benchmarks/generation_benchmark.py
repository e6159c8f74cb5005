"""Generation speed: cached thinking generation vs recomputing everything per token,
and the marginal speed of base, think-everywhere and gated generation.

    python benchmarks/generation_benchmark.py [--model DIR] [--prompt-len 256]
        [--n-ahead 12] [--new-tokens 64] [--recompute-tokens 16] [--batch 1]
        [--gate-rate 0.1 | --gate-threshold T] [--marginal-tokens 8,32]
        [--marginal-repeats 5] [--marginal-min-seconds 3] [--marginal-only] [--no-recompute]
        [--out generation_benchmark.json]

Both generators think before every new token (start, n_ahead - 3 thought tokens,
end), with greedy thoughts and greedy tokens so they produce the same tokens (checked
here). "recompute" is the authors' approach: for every new token one parallel
rollout over the whole sequence, every position thinking (it runs over the fixed
buffer prompt + recompute-tokens, so up to recompute-tokens / prompt-len more
positions than the current length). Each generator is compiled and run once, then
timed on `--repeats` more runs; tokens/s = batch * new tokens / median seconds. The model is
stories260K (`--model`, default ../shared/data/stories260K-hf when present) or a
tiny random Llama. Prints a table and JSON.

Marginal speed (issue 25): for base, think-everywhere and gated generation (the
think gate at `--gate-rate`, a running threshold, or `--gate-threshold`), a call of
a = 8 and one of b = 32 new tokens on the same prompts (each compiled first, then the
best of several runs); marginal tokens/s = (b - a) * batch / (t_b - t_a),
so the prefill and the call overhead cancel (a and b timed in turn, at least
`--marginal-repeats` times and `--marginal-min-seconds`); each is also given as a ratio to base
from the same run. A model without a trained gate gets a think gate with random
seeded weights (the output says so): its choices mean nothing, only its speed at the
realised rate does. With batch > 1 a gated step thinks for the firing rows only,
gathered into the smallest of 0, 1, 2, 4, ..., batch rows that holds them
(`cached.thinking_row_buckets`): "rows thinking" is the mean of that size over the
steps as a share of the batch, the share of a think-everywhere step's thought work
the gated call does ("batch steps thinking": the share of steps where any row fired).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import harness as H
import jax
import numpy as np
from absl import flags

from quietstar_jax.command_line import CommandLine, UsageError
from quietstar_jax.generation import cached as G
from quietstar_jax.generation import reference as R
from quietstar_jax.model import ModelConfig
from quietstar_jax.sharding import make_mesh
from quietstar_jax.thought import GATE_HIDDEN, init_gate_params

DEFAULT_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stories260K-hf"
DEFAULT_TEXT = DEFAULT_MODEL.parent / "tinystories" / "tinystories_val_head.txt"


def _load(model: str | None, n_ahead: int, prompt_len: int, batch: int, seed: int):
    """(cfg, params, tc, prompts, model name)."""
    path = Path(model) if model else DEFAULT_MODEL
    if path.is_dir():
        from quietstar_jax import hf

        cfg, params, tok = hf.load_pretrained(path)
        tc = H.thought_config(hf.thought_token_ids(tok), n_ahead=n_ahead, n_ahead_talk=1,
                              n_passes=1, sampling="greedy")
        text = DEFAULT_TEXT.read_text() if DEFAULT_TEXT.is_file() else "Once upon a time. " * 200
        ids = tok(text, add_special_tokens=False)["input_ids"]
        prompts = [[tok.bos_token_id] + ids[b * prompt_len:(b + 1) * prompt_len - 1]
                   for b in range(batch)]
        return cfg, params, tc, prompts, str(path)
    if model:
        raise UsageError(f"--model {model}: no such directory")
    cfg = ModelConfig(vocab_size=514, hidden_size=64, intermediate_size=172, num_layers=5,
                      num_heads=8, num_kv_heads=4, eos_token_id=None)
    params = H.init_model(cfg, seed, make_mesh((1, -1, 1)))
    tc = H.thought_config(cfg.vocab_size, n_ahead=n_ahead, n_ahead_talk=1, n_passes=1,
                          sampling="greedy")  # thought ids 512, 513; pad 0
    rng = np.random.default_rng(seed)
    prompts = rng.integers(3, 512, (batch, prompt_len)).tolist()
    return cfg, params, tc, prompts, "tiny random llama (stories260K shape)"


def _check_fits(cfg: ModelConfig, a: SimpleNamespace, lengths: tuple[int, int]) -> None:
    """The prompt, the longest call and its thoughts must fit the model's positions."""
    longest = max(a.new_tokens, a.recompute_tokens, lengths[1])
    need = a.prompt_len + longest - 2 + a.n_ahead
    if need > cfg.max_position_embeddings:
        raise UsageError(f"--prompt-len {a.prompt_len} + {longest} new tokens + "
                         f"n_ahead {a.n_ahead} needs {need} positions; the model has "
                         f"{cfg.max_position_embeddings}")


def _timed(fn: Any, repeats: int) -> tuple[G.Generation, float, list[float]]:
    """(result, first-call seconds incl. compile, seconds of `repeats` further calls)."""
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out.tokens)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn().tokens)
        times.append(time.perf_counter() - t0)
    return out, first, times


def with_gate(cfg: ModelConfig, params: dict, seed: int) -> tuple[dict, str]:
    """(params with a think gate, where it comes from): the model's own trained gate,
    or random seeded weights (output layer N(0, 1): the logits spread) when it has
    none."""
    if "think_gate" in params:
        return params, "the model's trained think gate"
    gate = init_gate_params(cfg, jax.random.key(seed + 1))
    gate["w1"] = jax.random.normal(jax.random.key(seed + 2), (GATE_HIDDEN, 1))
    return dict(params, think_gate=gate), (
        f"random think gate (seed {seed}; the model has no trained gate): the speed "
        "figure only, its choices mean nothing")


def marginal(
    variants: dict[str, Any], lengths: tuple[int, int], batch: int, repeats: int,
    min_seconds: float = 0.0,
) -> dict[str, Any]:
    """Marginal tokens/s of each variant `name -> fn(max_new_tokens) -> Generation`:
    (b - a) * batch / (best time of b tokens - best time of a tokens), each length
    compiled first, then the two lengths timed in turn (at least `repeats` times each
    and until `min_seconds` have passed: cheap calls get more tries); also the ratio
    to variant "base" and, for gated variants, the realised think rate (the b call's),
    and over the b call's last b - a tokens (those the marginal speed times) the think
    rate and the share of steps where some row thought."""
    a, b = lengths
    res: dict[str, Any] = {}
    for name, fn in variants.items():
        outs = {n: fn(n) for n in (a, b)}
        jax.block_until_ready([o.tokens for o in outs.values()])  # compile
        times: dict[int, list[float]] = {a: [], b: []}
        start = time.perf_counter()
        while len(times[a]) < repeats or time.perf_counter() - start < min_seconds:
            for n in (a, b):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(n).tokens)
                times[n].append(time.perf_counter() - t0)
        best = {n: min(ts) for n, ts in times.items()}
        dt = best[b] - best[a]
        out = outs[b]
        r = {"best_s": {str(a): best[a], str(b): best[b]}, "tries": len(times[a]),
             "marginal_tokens_per_s": (b - a) * batch / dt if dt > 0 else float("nan"),
             "think_rate": float(out.think_rate),
             "thought_tokens_per_token": float(out.thought_tokens_per_token)}
        if out.thought_mask is not None:  # over the b - a marginal tokens of the b call
            m = np.asarray(out.thought_mask)[:, a:]
            r["marginal_think_rate"] = float(m.mean())
            r["batch_steps_thinking"] = float(m.any(0).mean())
            buckets = np.asarray(G.thinking_row_buckets(m.shape[0]))
            thinking = buckets[np.searchsorted(buckets, m.sum(0))]  # rows each step thinks
            r["rows_thinking"] = float(thinking.mean() / m.shape[0])
            r["final_threshold"] = float(np.asarray(out.gate_thresholds)[-1])
        res[name] = r
        print(f"marginal {name}: {r['marginal_tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    for r in res.values():
        r["of_base"] = r["marginal_tokens_per_s"] / res["base"]["marginal_tokens_per_s"]
    return res


def _define(fv: flags.FlagValues) -> None:
    from quietstar_jax.command_line import flag_definer

    f = flag_definer(fv)

    f(flags.DEFINE_string, "model", None, "a Hugging Face model directory (default "
      "stories260K when present, else a tiny random Llama)")
    f(flags.DEFINE_integer, "prompt-len", 256, "prompt tokens")
    f(flags.DEFINE_integer, "n-ahead", 12, "thought length n_ahead")
    f(flags.DEFINE_integer, "new-tokens", 64, "cached generators")
    f(flags.DEFINE_integer, "recompute-tokens", 16, "recompute generator")
    f(flags.DEFINE_integer, "batch", 1, "prompts generated together")
    f(flags.DEFINE_integer, "repeats", 3, "timed runs (median reported)")
    f(flags.DEFINE_integer, "seed", 0, "random seed")
    f(flags.DEFINE_boolean, "no-recompute", False,
      "skip the recompute-everything generator (slow on real models)")
    f(flags.DEFINE_float, "gate-rate", None, "gated generation: target share of thinking "
      "tokens (running threshold; default 0.1 unless --gate-threshold)")
    f(flags.DEFINE_float, "gate-threshold", None,
      "gated generation: fixed threshold on the gate logit")
    flags.mark_flags_as_mutual_exclusive(["gate-rate", "gate-threshold"], flag_values=fv)
    f(flags.DEFINE_boolean, "marginal-only", False,
      "only the marginal speed of base, thinking and gated generation")
    f(flags.DEFINE_string, "marginal-tokens", "8,32",
      "a,b: the two call lengths of the marginal speed")
    f(flags.DEFINE_integer, "marginal-repeats", 5,
      "timed runs per call length (at least; best kept)")
    f(flags.DEFINE_float, "marginal-min-seconds", 3.0,
      "time each variant's two lengths for at least this long")
    f(flags.DEFINE_string, "out", "generation_benchmark.json", "JSON output path")


COMMAND = CommandLine.script("benchmarks/generation_benchmark.py",
                             " ".join(__doc__.split("\n\n")[0].split()), _define)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; bad input ends with one `PROG: error: ...` line (exit 2)."""
    return COMMAND.main(_run, argv)


def _run(a: SimpleNamespace) -> int:
    try:
        lengths = tuple(int(x) for x in a.marginal_tokens.split(","))
    except ValueError:
        lengths = ()
    if len(lengths) != 2 or not 1 <= lengths[0] < lengths[1]:
        raise UsageError(f"--marginal-tokens {a.marginal_tokens!r}: give a,b with 1 <= a < b")
    if a.gate_rate is not None and not 0 <= a.gate_rate <= 1:
        raise UsageError(f"--gate-rate {a.gate_rate} must be in [0, 1]")
    if a.gate_threshold is None and a.gate_rate is None:
        a.gate_rate = 0.1
    cfg, params, tc, prompts, name = _load(a.model, a.n_ahead, a.prompt_len, a.batch, a.seed)
    _check_fits(cfg, a, lengths)
    common = dict(greedy=True, eos_token_id=None, pad_to_multiple=1)
    runs = {
        "cached_thinking": (a.new_tokens, lambda: G.generate(
            params, cfg, tc, prompts, max_new_tokens=a.new_tokens, **common)),
        "recompute_thinking": (a.recompute_tokens, lambda: R.generate_recompute(
            params, cfg, tc, prompts, max_new_tokens=a.recompute_tokens, exact_rng=False,
            **common)),
        "cached_base": (a.new_tokens, lambda: G.generate(
            params, cfg, tc, prompts, max_new_tokens=a.new_tokens, think=False, **common)),
        # Sampled thoughts (the training default), greedy real tokens.
        "cached_thinking_sampled": (a.new_tokens, lambda: G.generate(
            params, cfg, tc.replace(sampling="sample"), prompts, max_new_tokens=a.new_tokens,
            rng=jax.random.key(a.seed), **common)),
    }
    if a.no_recompute:
        del runs["recompute_thinking"]
    if a.marginal_only:
        runs = {}
    res: dict[str, Any] = {}
    outs = {}
    for key, (n, fn) in runs.items():
        out, first, times = _timed(fn, a.repeats)
        outs[key] = np.asarray(out.tokens)
        med = float(np.median(times))
        res[key] = {"new_tokens": n, "first_call_s": first, "seconds": med, "runs_s": times,
                    "tokens_per_s": a.batch * n / med}
        print(f"{key}: {res[key]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    m = a.recompute_tokens
    if "recompute_thinking" in outs:
        same = bool((outs["cached_thinking"][:, :m] == outs["recompute_thinking"][:, :m]).all())
        ratio = res["cached_thinking"]["tokens_per_s"] / res["recompute_thinking"]["tokens_per_s"]
    else:
        same, ratio = None, None
    gparams, gate_source = with_gate(cfg, params, a.seed)
    gate_kw = ({"gate_rate": a.gate_rate} if a.gate_rate is not None
               else {"gate_threshold": a.gate_threshold})
    gate_name = ("gated_rate_" + f"{a.gate_rate:g}" if a.gate_rate is not None
                 else "gated_threshold_" + f"{a.gate_threshold:g}")
    marg = marginal({
        "base": lambda n: G.generate(params, cfg, tc, prompts, max_new_tokens=n, think=False,
                                     **common),
        "thinking": lambda n: G.generate(params, cfg, tc, prompts, max_new_tokens=n, **common),
        gate_name: lambda n: G.generate(gparams, cfg, tc, prompts, max_new_tokens=n,
                                        **gate_kw, **common),
    }, lengths, a.batch, a.marginal_repeats, a.marginal_min_seconds)
    of_base = ({k: res[k]["tokens_per_s"] / res["cached_base"]["tokens_per_s"]
                for k in ("cached_thinking", "cached_thinking_sampled")} if res else None)
    report = {
        "model": name, "prompt_len": a.prompt_len, "batch": a.batch, "n_ahead": tc.n_ahead,
        "thought_tokens": tc.num_sampled, "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "runs": res, "cached_vs_recompute_speedup": ratio,
        "same_tokens": same, "thinking_over_base": of_base,
        "floor_over_base": 1 / (tc.n_ahead - 1 + 1),
        "marginal": {"tokens": list(lengths), "repeats": a.marginal_repeats,
                     "min_seconds": a.marginal_min_seconds,
                     "gate": gate_source, **gate_kw, "runs": marg},
    }
    if res:
        print(f"{'generator':>20}  {'new tokens':>10}  {'seconds':>8}  {'tokens/s':>9}")
    for key, r in res.items():
        print(f"{key:>20}  {r['new_tokens']:>10}  {r['seconds']:>8.3f}  "
              f"{r['tokens_per_s']:>9.1f}")
    if ratio is not None:
        print(f"cached thinking is {ratio:.1f}x faster than recomputing everything "
              f"(prompt {a.prompt_len} tokens, n_ahead {tc.n_ahead}, batch {a.batch}; "
              f"same tokens: {same})")
    if of_base:
        print(f"thinking / base tokens/s: greedy thoughts 1/"
              f"{1 / of_base['cached_thinking']:.1f}, sampled thoughts 1/"
              f"{1 / of_base['cached_thinking_sampled']:.1f} (floor 1/{tc.n_ahead}: "
              f"{tc.n_ahead - 1} thought steps + 1 base step per token)")
    print(f"marginal tokens/s ((b - a) * batch / (t_b - t_a), a, b = {lengths}, best of >= "
          f"{a.marginal_repeats} tries and >= {a.marginal_min_seconds:g} s; batch {a.batch}; "
          f"greedy thoughts and tokens; {gate_source}):")
    print(f"{'variant':>22}  {'tokens/s':>9}  {'of base':>8}  {'think rate':>10}  "
          f"{'thought tok/tok':>15}  {'marginal think rate':>19}  {'batch steps thinking':>20}"
          f"  {'rows thinking':>13}")
    for key, r in marg.items():
        steps = r.get("batch_steps_thinking", r["think_rate"])
        rows = r.get("rows_thinking", r["think_rate"])
        print(f"{key:>22}  {r['marginal_tokens_per_s']:>9.1f}  1/{1 / r['of_base']:<6.2f}  "
              f"{r['think_rate']:>10.3f}  {r['thought_tokens_per_token']:>15.2f}  "
              f"{r.get('marginal_think_rate', r['think_rate']):>19.3f}  {steps:>20.3f}"
              f"  {rows:>13.3f}")
    print(f"(think rate, thought tokens per token: the {lengths[1]}-token call; marginal think "
          f"rate, batch steps thinking, rows thinking: its last {lengths[1] - lengths[0]} "
          "tokens, the ones the speed is of)")
    print(json.dumps(report, indent=1))
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
