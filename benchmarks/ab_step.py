"""Interleaved A/B of the trainer's compiled step between two source trees: is the
working tree as fast as git revision `--base`?

    python benchmarks/ab_step.py --base e5eb315 --preset=cpu-small --rounds=20
    python benchmarks/ab_step.py --base e5eb315 --preset=smollm2 --rounds=8 --out ab.json

Each side is a long-lived process with its own tree's package and benchmark code (the
base checked out into a temporary worktree, as `compare_hlo.py` does): it builds the
step of a `step_benchmark.py` preset (`build`), compiles it (`harness.Stepper`) and warms
it up. The driver then alternates one timed step of each side, `--rounds` times, the
order flipped every round (ABBA...), so a drift of this shared host's speed (often
10-30 % over minutes) hits both sides alike; one process steps while the other waits.
Printed: each side's XLA FLOPs, temporaries and median step (tokens/s), the ratio of
medians (working tree / base) and the median of the per-round ratios with a bootstrap
95 % interval. `compare_hlo.py` says whether the two programs are the same; this script
times them when they are not.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from absl import flags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TAG = "AB_STEP "  # the worker's protocol lines on stdout (anything else is ignored)


# --------------------------------------------------------------------------- worker


def worker(preset: str, warmup: int) -> None:
    """One side (run in a subprocess whose working directory is that tree's
    benchmarks/): build and compile the preset's Quiet-STaR step, warm it up, then answer
    "step" (one timed step) and "quit" on stdin."""
    sys.path.insert(0, os.getcwd())  # the side's step_benchmark and harness, not ours
    import step_benchmark as SB

    c = dict(SB.PRESETS[preset], think_k=None)
    built = SB.build(c)
    st = SB.H.Stepper(built["qs"], built["holder"], "qs")
    for _ in range(warmup):
        st()
    mem = SB.H.memory_analysis(st.compiled) or {}
    ids = built["holder"]["batch"]["input_ids"]
    _say({"xla_flops": SB.H.cost_flops(st.compiled), "temp_bytes": mem.get("temp"),
          "compile_s": st.compile_s, "tokens": int(ids.shape[0] * ids.shape[1])})
    for line in sys.stdin:
        if line.strip() != "step":
            break
        dt = st()
        _say({"step_s": dt, "loss": st.loss})


def _say(d: dict[str, Any]) -> None:
    print(TAG + json.dumps(d), flush=True)


class Side:
    """A worker process of one tree, driven over its stdin/stdout."""

    def __init__(self, tree: str, preset: str, warmup: int):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, os.path.join(tree, "benchmarks")]))
        self.tree = tree
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker",
             json.dumps({"preset": preset, "warmup": warmup})],
            cwd=os.path.join(tree, "benchmarks"), env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
        sys.exit(f"ab_step: error: the worker of {self.tree} ended (rc {self.proc.wait()})")

    def step(self) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self._read()["step_s"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()


# --------------------------------------------------------------------------- driver


def bootstrap_median(x: Sequence[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval of the median of `x`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    a = np.asarray(x)
    meds = np.median(rng.choice(a, (n, len(a))), axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def interleave(base: Side, new: Side, rounds: int) -> dict[str, Any]:
    """`rounds` pairs of timed steps, the order flipped every round."""
    t_base: list[float] = []
    t_new: list[float] = []
    for r in range(rounds):
        if r % 2 == 0:
            t_base.append(base.step())
            t_new.append(new.step())
        else:
            t_new.append(new.step())
            t_base.append(base.step())
    ratios = [n / b for n, b in zip(t_new, t_base, strict=True)]
    lo, hi = bootstrap_median(ratios)
    return {"base_s": t_base, "new_s": t_new, "ratio_of_medians":
            statistics.median(t_new) / statistics.median(t_base),
            "median_ratio": statistics.median(ratios), "median_ratio_95": [lo, hi]}


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("base", None, "git revision to compare the working tree with",
                        flag_values=fv)
    flags.DEFINE_string("preset", "cpu-small", "a step_benchmark preset", flag_values=fv)
    flags.DEFINE_integer("rounds", 12, "timed steps per side, interleaved", flag_values=fv)
    flags.DEFINE_integer("warmup", 2, "untimed steps per side after compiling",
                         flag_values=fv)
    flags.DEFINE_string("out", None, "JSON path for every time (optional)", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: 0 done, 2 bad flags (one line)."""
    from quietstar_jax.command_line import CommandLine

    summary = " ".join(__doc__.split("\n\n")[0].split())
    return CommandLine.script("benchmarks/ab_step.py", summary, _define).main(_run, argv)


def _run(args: SimpleNamespace) -> int:
    from quietstar_jax.command_line import UsageError

    if not args.base:
        raise UsageError("--base REV is required")
    if args.rounds < 2:
        raise UsageError(f"--rounds={args.rounds}: at least 2")
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", args.base], text=True,
                         capture_output=True)
    if rev.returncode != 0:
        raise UsageError(f"--base {args.base}: not a git revision of {ROOT}")
    base_rev = rev.stdout.strip()
    sys.path.insert(0, HERE)
    import harness as H

    with H.revision_tree(base_rev) as base_tree:
        base = Side(base_tree, args.preset, args.warmup)
        new = Side(ROOT, args.preset, args.warmup)
        try:
            r = interleave(base, new, args.rounds)
        finally:
            base.close()
            new.close()
    tokens = new.info["tokens"]
    for name, side, times in (
            (f"base {base_rev}", base, r["base_s"]), ("working tree", new, r["new_s"])):
        med = statistics.median(times)
        print(f"{args.preset:10s} {name:16s} XLA GFLOP {side.info['xla_flops'] / 1e9:.2f}  "
              f"temporaries {(side.info['temp_bytes'] or 0) / 1e9:.3f} GB  median step "
              f"{med:.3f} s ({tokens / med:.1f} tokens/s)")
    lo, hi = r["median_ratio_95"]
    print(f"{args.preset:10s} working tree / base: ratio of medians {r['ratio_of_medians']:.3f},"
          f" median of {args.rounds} paired ratios {r['median_ratio']:.3f} [{lo:.3f}, {hi:.3f}]")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"preset": args.preset, "base": base_rev, "rounds": args.rounds,
                       "base_info": base.info, "new_info": new.info, **r}, f, indent=1)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # one side's process: driven over stdin, no flags
        worker(**json.loads(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
