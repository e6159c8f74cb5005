"""Generation speed: cached thinking generation vs recomputing everything per token.

    python benchmarks/generation_benchmark.py [--model DIR] [--prompt-len 256]
        [--n-ahead 12] [--new-tokens 64] [--recompute-tokens 16] [--batch 1]
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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import harness as H
import jax
import numpy as np

from quietstar_jax.generation import cached as G
from quietstar_jax.generation import reference as R
from quietstar_jax.model import ModelConfig
from quietstar_jax.sharding import make_mesh

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
        raise SystemExit(f"error: model directory {model} does not exist")
    cfg = ModelConfig(vocab_size=514, hidden_size=64, intermediate_size=172, num_layers=5,
                      num_heads=8, num_kv_heads=4, eos_token_id=None)
    params = H.init_model(cfg, seed, make_mesh((1, -1, 1)))
    tc = H.thought_config(cfg.vocab_size, n_ahead=n_ahead, n_ahead_talk=1, n_passes=1,
                          sampling="greedy")  # thought ids 512, 513; pad 0
    rng = np.random.default_rng(seed)
    prompts = rng.integers(3, 512, (batch, prompt_len)).tolist()
    return cfg, params, tc, prompts, "tiny random llama (stories260K shape)"


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--n-ahead", type=int, default=12)
    p.add_argument("--new-tokens", type=int, default=64, help="cached generators")
    p.add_argument("--recompute-tokens", type=int, default=16, help="recompute generator")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-recompute", action="store_true",
                   help="skip the recompute-everything generator (slow on real models)")
    p.add_argument("--out", default="generation_benchmark.json")
    a = p.parse_args(argv)
    cfg, params, tc, prompts, name = _load(a.model, a.n_ahead, a.prompt_len, a.batch, a.seed)
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
    base_tps = res["cached_base"]["tokens_per_s"]
    of_base = {k: res[k]["tokens_per_s"] / base_tps
               for k in ("cached_thinking", "cached_thinking_sampled")}
    report = {
        "model": name, "prompt_len": a.prompt_len, "batch": a.batch, "n_ahead": tc.n_ahead,
        "thought_tokens": tc.num_sampled, "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "runs": res, "cached_vs_recompute_speedup": ratio,
        "same_tokens": same, "thinking_over_base": of_base,
        "floor_over_base": 1 / (tc.n_ahead - 1 + 1),
    }
    print(f"{'generator':>20}  {'new tokens':>10}  {'seconds':>8}  {'tokens/s':>9}")
    for key, r in res.items():
        print(f"{key:>20}  {r['new_tokens']:>10}  {r['seconds']:>8.3f}  "
              f"{r['tokens_per_s']:>9.1f}")
    if ratio is not None:
        print(f"cached thinking is {ratio:.1f}x faster than recomputing everything "
              f"(prompt {a.prompt_len} tokens, n_ahead {tc.n_ahead}, batch {a.batch}; "
              f"same tokens: {same})")
    print(f"thinking / base tokens/s: greedy thoughts 1/{1 / of_base['cached_thinking']:.1f}, "
          f"sampled thoughts 1/{1 / of_base['cached_thinking_sampled']:.1f} (floor 1/"
          f"{tc.n_ahead}: {tc.n_ahead - 1} thought steps + 1 base step per token)")
    print(json.dumps(report, indent=1))
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
