"""Compile and step time of the trainer's update step on stories260K.

The real pretrained 260K-parameter TinyStories Llama, the default ThoughtConfig
(n_ahead=12, n_ahead_talk=4, n_passes=2), TinyStories text cut to `--seq` tokens; the
step is `train.step.make_train_step` with the trainer's optimizer, state and shardings
(benchmarks/harness.py).

    python benchmarks/stories260k_step.py [--model DIR] [--text FILE] [--batch 4] [--seq 128]
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import harness as H
import jax
import numpy as np
from absl import flags

import quietstar_jax as qs
from quietstar_jax import sharding
from quietstar_jax.command_line import CommandLine

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("model", str(SHARED / "stories260K-hf"), "the Hugging Face model "
                        "directory", flag_values=fv)
    flags.DEFINE_string("text", str(SHARED / "tinystories" / "tinystories_val_head.txt"),
                        "the text the rows are cut from", flag_values=fv)
    flags.DEFINE_integer("batch", 4, "sequences", flag_values=fv)
    flags.DEFINE_integer("seq", 128, "tokens per sequence", flag_values=fv)
    flags.DEFINE_integer("steps", 5, "timed steps", flag_values=fv)


COMMAND = CommandLine.script("benchmarks/stories260k_step.py", __doc__.splitlines()[0], _define)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; bad flags end with one `PROG: error: ...` line (exit 2)."""
    return COMMAND.main(_run, argv)


def _run(args: SimpleNamespace) -> None:
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
    sys.exit(main())
