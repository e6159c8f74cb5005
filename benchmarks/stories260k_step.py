"""Compile and step time of jit(value_and_grad(quietstar_loss)) on stories260K.

The real pretrained 260K-parameter TinyStories Llama, the default ThoughtConfig
(n_ahead=12, n_ahead_talk=4, n_passes=2), TinyStories text cut to `--seq` tokens.

    python benchmarks/stories260k_step.py [--model DIR] [--text FILE] [--batch 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import quietstar_jax as qs

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(SHARED / "stories260K-hf"))
    p.add_argument("--text", default=str(SHARED / "tinystories" / "tinystories_val_head.txt"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()

    cfg, params, tok = qs.load_pretrained(args.model)
    tc = qs.ThoughtConfig(**qs.thought_token_ids(tok))
    text = Path(args.text).read_text()[: 200 * args.seq * args.batch]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    need = args.batch * args.seq
    batch = jnp.asarray(np.asarray(ids[:need]).reshape(args.batch, args.seq))
    mask = jnp.ones_like(batch)

    def loss_fn(p, key):
        return qs.quietstar_loss(p, cfg, tc, batch, mask, key)

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    t0 = time.perf_counter()
    compiled = step.lower(params, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    times, losses = [], []
    for i in range(args.steps):
        t0 = time.perf_counter()
        (loss, metrics), grads = jax.block_until_ready(compiled(params, jax.random.key(i)))
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    out = {
        "model": args.model, "batch": args.batch, "seq": args.seq,
        "thought_config": {"n_ahead": tc.n_ahead, "n_ahead_talk": tc.n_ahead_talk,
                           "n_passes": tc.n_passes},
        "compile_s": round(compile_s, 2), "step_s_median": round(statistics.median(times), 4),
        "input_tokens_per_s": round(need / statistics.median(times), 1),
        "loss": losses[-1], "nll_base": float(metrics["nll_base"]),
        "nll_thought": float(metrics["nll_thought"]), "backend": jax.default_backend(),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
