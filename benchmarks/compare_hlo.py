"""Paired A/B of the compiled training step between two source trees: is the program the
same?

    python benchmarks/compare_hlo.py --base 5401b0c                  # toy + SmolLM2
    python benchmarks/compare_hlo.py --base HEAD~1 --preset cpu-small --step sparse --think-k 8
    python benchmarks/compare_hlo.py --base HEAD~1 --preset=cpu-small,smollm2

For each `step_benchmark.py` preset, the chosen step (`qs`: the think-everywhere
Quiet-STaR step as it ships; `plain`; `sparse` with `--think-k`) is built and compiled
for this host by the code of the working tree and by the code of git revision `--base`
(checked out into a temporary worktree), each in its own subprocess. Printed per side:
XLA's FLOPs, the temporaries, and a hash of the optimised HLO's instructions with their
metadata and the debug tables (source files, function names, stack frames) removed, and
a canonical hash of the same lines with every %name replaced by its order of first
appearance (a change in tracing order renames instructions without changing the
program). Equal hashes mean the two trees compile to the same program, so neither can be faster or
leaner on this backend; a refactor that should not change the step is checked this way,
and a timing A/B (`step_benchmark.py` on each tree) is then only needed when the hashes
differ. Exit status 1 when they differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from absl import flags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# An HLO instruction line or a computation header; everything else (the debug tables of
# file names, function names and stack frames) names source locations, not the program.
_PROGRAM_LINE = re.compile(r"^\s*(ROOT )?%?[A-Za-z_.0-9-]+ = |^ENTRY|^%|^[a-z_]+\.")
_METADATA = re.compile(r", metadata=\{[^}]*\}|, stack_frame_id=[0-9]+")


def _program_lines(hlo_text: str) -> list[str]:
    """An optimised HLO module's instruction and computation lines, metadata removed."""
    return [_METADATA.sub("", ln) for ln in hlo_text.splitlines() if _PROGRAM_LINE.match(ln)]


def program_hash(hlo_text: str) -> tuple[str, int]:
    """(sha1 prefix, instruction count) of an optimised HLO module's instructions, metadata
    and debug tables removed."""
    lines = _program_lines(hlo_text)
    body = "\n".join(lines)
    return hashlib.sha1(body.encode()).hexdigest()[:16], sum(" = " in ln for ln in lines)


# %names, and the unprefixed parameter names of computation headers ("(p.12: f32[])")
_NAME = re.compile(r"%[A-Za-z_][A-Za-z_.0-9-]*|\b[A-Za-z_][A-Za-z_0-9-]*(?:\.[0-9]+)+(?=: )")


def canonical_hash(hlo_text: str) -> str:
    """sha1 prefix of the program lines (as `program_hash`) with every instruction,
    computation and parameter name replaced by its order of first appearance: equal when
    two programs differ only in the names the tracing order gave them."""
    names: dict[str, str] = {}
    body = _NAME.sub(lambda m: names.setdefault(m.group(0), f"%v{len(names)}"),
                     "\n".join(_program_lines(hlo_text)))
    return hashlib.sha1(body.encode()).hexdigest()[:16]


def child(preset: str, step: str, think_k: int | None) -> dict[str, Any]:
    """Build and compile one step with the side's code (run inside a subprocess whose
    working directory is that tree's benchmarks/, `run_side`)."""
    # This file's directory (the working tree's benchmarks/) is first on sys.path; the
    # side's own step_benchmark and harness must win, or an older base would be built by
    # the working tree's benchmark code.
    sys.path.insert(0, os.getcwd())
    import step_benchmark as SB

    c = dict(SB.PRESETS[preset], think_k=think_k)
    built = SB.build(c)
    holder = built["holder_sparse"] if step == "sparse" else built["holder"]
    st = SB.H.Stepper(built[step], holder, step)
    cost = st.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    text = st.compiled.as_text()
    digest, n = program_hash(text)
    return {"hlo_sha1": digest, "hlo_canonical": canonical_hash(text), "instructions": n,
            "xla_flops": float(cost["flops"]),
            "temp_bytes": int(st.compiled.memory_analysis().temp_size_in_bytes),
            "compile_s": round(st.compile_s, 1)}


def run_side(tree: str, preset: str, step: str, think_k: int | None) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, os.path.join(tree, "benchmarks")]))
    cmd = [sys.executable, os.path.abspath(__file__), "--child",
           json.dumps({"preset": preset, "step": step, "think_k": think_k})]
    # the benchmark module and the package come from `tree`; this script only drives them
    out = subprocess.run(cmd, env=env, cwd=os.path.join(tree, "benchmarks"), text=True,
                         capture_output=True)
    if out.returncode != 0:
        sys.exit(f"compare_hlo: error: {preset}/{step} failed in {tree}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("base", None, "git revision to compare the working tree with",
                        flag_values=fv)
    flags.DEFINE_list("preset", ["cpu-small", "smollm2"], "step_benchmark presets, "
                      "comma-separated (default: the toy and SmolLM2-135M)", flag_values=fv)
    flags.DEFINE_enum("step", "qs", ["qs", "plain", "sparse"], "the step compiled",
                      flag_values=fv)
    flags.DEFINE_integer("think-k", None, "think_k of the sparse step", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: 0 same program, 1 different, 2 bad flags (one line)."""
    # Imported here, not at the top: a side's child process (`--child`) runs this file
    # with that tree's package, which may predate the working tree's command lines.
    from quietstar_jax.command_line import CommandLine

    summary = " ".join(__doc__.split("\n\n")[0].split())
    return CommandLine.script("benchmarks/compare_hlo.py", summary, _define).main(_run, argv)


def _run(args: SimpleNamespace) -> int:
    from quietstar_jax.command_line import UsageError

    if args.step == "sparse" and not args.think_k:
        raise UsageError("--step sparse needs --think-k")
    if not args.base:
        raise UsageError("--base REV is required")
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", args.base], text=True,
                         capture_output=True)
    if rev.returncode != 0:
        raise UsageError(f"--base {args.base}: not a git revision of {ROOT}")
    base_rev = rev.stdout.strip()
    differ = False
    sys.path.insert(0, HERE)
    import harness as H

    with H.revision_tree(base_rev) as base_tree:
        for preset in args.preset:
            sides = {f"base {base_rev}": run_side(base_tree, preset, args.step, args.think_k),
                     "working tree": run_side(ROOT, preset, args.step, args.think_k)}
            for name, r in sides.items():
                print(f"{preset:10s} {args.step:6s} {name:16s} hlo {r['hlo_sha1']} "
                      f"canonical {r.get('hlo_canonical', '-')} "
                      f"({r['instructions']} instructions)  XLA GFLOP "
                      f"{r['xla_flops'] / 1e9:.2f}  temporaries {r['temp_bytes'] / 1e9:.3f} GB"
                      f"  compile {r['compile_s']} s")
            a, b = sides.values()
            same = a["hlo_sha1"] == b["hlo_sha1"]
            renamed = not same and a.get("hlo_canonical") == b.get("hlo_canonical")
            differ |= not (same or renamed)
            verdict = ("same program" if same else
                       "same program up to instruction names" if renamed else
                       "DIFFERENT programs")
            print(f"{preset:10s} {args.step:6s} -> {verdict}")
    return 1 if differ else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:  # run_side's process: one side's compile, no flags
        print(json.dumps(child(**json.loads(sys.argv[2]))))
        sys.exit(0)
    sys.exit(main())
