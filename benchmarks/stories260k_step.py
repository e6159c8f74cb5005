"""Compile and step time of the trainer's update step on stories260K.

The real pretrained 260K-parameter TinyStories Llama, the default ThoughtConfig
(n_ahead=12, n_ahead_talk=4, n_passes=2), TinyStories text cut to `--seq` tokens; the
step is `train.step.make_train_step` with the trainer's optimizer, state and shardings
(benchmarks/harness.py).

    python benchmarks/stories260k_step.py [--model DIR] [--text FILE] [--batch 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import harness as H
import jax
import numpy as np

import quietstar_jax as qs
from quietstar_jax import sharding

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
    tc = H.thought_config(qs.thought_token_ids(tok))
    text = Path(args.text).read_text()[: 200 * args.seq * args.batch]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    need = args.batch * args.seq
    rows = np.asarray(ids[:need], np.int32).reshape(args.batch, args.seq)
    mesh = sharding.make_mesh((1, -1, 1))
    setup = H.train_setup(cfg, mesh, params)
    b_sh = sharding.batch_sharding(mesh)
    holder = {"state": H.initial_state(setup, params), "mesh": mesh,
              "batch": {"input_ids": jax.device_put(rows, b_sh),
                        "attention_mask": jax.device_put(np.ones_like(rows), b_sh)}}
    st = H.Stepper(H.make_step(cfg, tc, setup), holder, "qs")
    times, losses = [], []
    for _ in range(args.steps):
        times.append(st())
        losses.append(st.loss)
    out = {
        "model": args.model, "batch": args.batch, "seq": args.seq,
        "thought_config": {"n_ahead": tc.n_ahead, "n_ahead_talk": tc.n_ahead_talk,
                           "n_passes": tc.n_passes},
        "compile_s": round(st.lower_s + st.compile_s, 2),
        "step_s_median": round(statistics.median(times), 4),
        "input_tokens_per_s": round(need / statistics.median(times), 1),
        "loss": losses[-1], "nll_base": float(st.metrics["nll_base"]),
        "nll_thought": float(st.metrics["nll_thought"]), "backend": jax.default_backend(),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
