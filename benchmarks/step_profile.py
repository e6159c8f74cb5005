"""Where the Quiet-STaR step's time goes, by phase: `step_benchmark.py --profile`.

    python benchmarks/step_benchmark.py --profile [flags]    # runs this file's worker

The step is the trainer's (step_benchmark.build). Its phases carry `jax.named_scope`s
in the library code (thought.rollout: base_pass, thought_steps, thought_block,
sampling, reinforce_logp, replayed_backward; loss: mixing_head, nll, policy_loss;
train.step: optimizer), so every op of the compiled program has its phase in its
`op_name` metadata (`jit(step)/jvp(base_pass)/...`, and `transpose(...)` for the
backward pass). `jax.profiler` traces a few steps; each traced XLA op's time (container
ops such as while loops left out, their bodies' ops are traced themselves) is summed by
phase and by forward/backward. On a multi-core CPU ops of different threads overlap,
so pin to one core (`taskset -c 0`) to make op times add up to the step time.
"""

from __future__ import annotations

import glob
import os
import re
import statistics
import sys
import tempfile
from typing import Any

import harness as H

SCOPES = ("base_pass", "thought_steps", "thought_block", "sampling", "reinforce_logp",
          "replayed_backward", "mixing_head", "nll", "policy_loss", "optimizer")
CONTAINERS = ("kWhile", "kConditional", "kCall", "kAsyncStart", "kAsyncDone")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_SCOPE = re.compile(r"\b(" + "|".join(SCOPES) + r")\b")


def op_table(compiled: Any) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (opcode, op_name metadata) of a compiled program."""
    out = {}
    for module in compiled.runtime_executable().hlo_modules():
        for comp in module.computations():
            for ins in comp.instructions():
                m = _OP_NAME.search(ins.to_string())
                out[ins.name] = (str(ins.opcode).split(".")[-1], m.group(1) if m else "")
    return out


def phase_of(op_name: str) -> tuple[str, str]:
    """(forward | backward, outermost named scope or "(other)") of an op."""
    direction = "backward" if "transpose(" in op_name else "forward"
    m = _SCOPE.search(op_name)
    scope = m.group(1) if m else "(other)"
    if scope == "optimizer":
        direction = "optimizer"
    return direction, scope


def op_seconds(trace_dir: str) -> dict[str, float]:
    """Traced seconds per HLO op name (all threads) of the newest trace under trace_dir."""
    import jax

    path = max(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
               key=os.path.getmtime)
    out: dict[str, float] = {}
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for e in line.events:
                op = dict(e.stats).get("hlo_op")
                if op:
                    out[op] = out.get(op, 0.0) + e.duration_ns / 1e9
    return out


def profile(spec: dict[str, Any], steps: int = 2) -> dict[str, Any]:
    """Trace `steps` Quiet-STaR updates; their op seconds per step by phase."""
    import jax
    from step_benchmark import build

    c = spec["config"]
    b = build(c)
    st = H.Stepper(b["qs"], b["holder"], "qs")
    for _ in range(max(c["warmup"], 1)):
        st()
    ops = op_table(st.compiled)
    snap = H.cpu_snapshot()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            times = [st() for _ in range(steps)]
        seconds = op_seconds(trace_dir)
    cpu = H.contention(snap, H.cpu_snapshot())
    tables: dict[str, dict[str, float]] = {"scope": {}, "direction": {}, "direction_scope": {},
                                           "opcode": {}}
    top = []
    for op, t in sorted(seconds.items(), key=lambda x: -x[1]):
        opcode, op_name = ops.get(op, ("?", ""))
        if opcode in CONTAINERS:
            continue
        direction, scope = phase_of(op_name)
        for table, key in (("scope", scope), ("direction", direction),
                           ("direction_scope", f"{direction} | {scope}"), ("opcode", opcode)):
            tables[table][key] = tables[table].get(key, 0.0) + t / steps
        if len(top) < 40:
            top.append({"op": op, "s_per_step": t / steps, "opcode": opcode,
                        "op_name": op_name[-200:]})
    total = sum(tables["scope"].values())
    return {
        "config": c,
        "step_times_s": times,
        "cpu_s_per_step": statistics.median(st.cpu_times[-steps:]),
        "cpu_during_timing": cpu,
        "traced_op_seconds_per_step": total,
        **{f"by_{k}_s_per_step": dict(sorted(v.items(), key=lambda x: -x[1]))
           for k, v in tables.items()},
        "top_ops": top,
    }


if __name__ == "__main__":
    H.worker_main(sys.argv, profile)
