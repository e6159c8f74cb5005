"""What a compiled step's HLO shows: upcasts, collectives and large buffers by named scope.

    from hlo_report import hlo_report
    report = hlo_report(compiled.as_text())

Reads the optimized HLO text of one device's program (after SPMD partitioning, so every
shape is per device) and sums, per instruction result of at least `min_bytes`:

- `scopes`: for each named scope of the package (`attention`, `mlp`, `vocab`,
  `replayed_backward`, `reinforce_logp`, `base_pass`, `thought_steps`, `thought_block`,
  `optimizer`, ...), the number of such results, their largest, and the largest's shape.
  An instruction belongs to the innermost listed scope in its `op_name`. Results are
  instruction outputs, not live memory: a fusion's inner instructions never exist in
  memory, and several results share one buffer over time, so the figures rank where large
  arrays come from; the compiler's memory analysis gives the peak.
- `upcasts`: `convert` results from a 16-bit float to float32 (count, total bytes, the
  largest with their op_name): where the program widens bfloat16 arrays. The operand's
  dtype is read from the operand itself or, where the text does not type operands (TPU),
  from the instruction that defines it.
- `widened`: results the compiler computes in float32 although the program asked for
  bfloat16 (the TPU compiler's `float_type_correction_info` with original type BF16,
  e.g. elementwise ops on chips without bfloat16 vector units): count, bytes, by scope.
- `collectives`: all-gather / all-reduce / reduce-scatter / all-to-all /
  collective-permute results (count, total and largest bytes, the largest with their
  op_name): what the partitioner moves between chips, e.g. a gather of a vocabulary-split
  array.
- `custom_calls`: the custom-call targets (Pallas kernels, host offload) and their counts.

Nothing here is TPU-specific; `benchmarks/tpu_compile.py` stores it in its JSON.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1,
               "u8": 1, "f64": 8, "s64": 8, "u64": 8, "s16": 2, "u16": 2}
# Innermost first: an op inside the attention of the replayed backward is "attention".
SCOPES = ("attention", "mlp", "vocab", "mixing_head", "sampling", "reinforce_logp",
          "policy_loss", "nll", "replayed_backward", "thought_block", "thought_steps",
          "base_pass", "optimizer")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute")

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<dtype>\w+)\[(?P<dims>[\d,]*)\]\S*\s+"
    r"(?P<opcode>[\w\-]+)\((?P<operands>[^)]*)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_FIRST_OPERAND = re.compile(r"\s*(?:(\w+)\[[^\]]*\]\S*\s+)?%?([\w.\-]+)")


def instructions(hlo_text: str) -> list[dict[str, Any]]:
    """Every array-valued instruction of an HLO module's text: name, dtype, shape, bytes,
    opcode, the first operand's dtype, op_name and (custom calls) target. Tuples are
    skipped."""
    out = []
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m or m.group("dtype") not in DTYPE_BYTES:
            continue
        dims = [int(x) for x in m.group("dims").split(",") if x]
        operand = _FIRST_OPERAND.match(m.group("operands"))
        on, target = _OP_NAME.search(line), _TARGET.search(line)
        out.append({
            "name": m.group("name"), "dtype": m.group("dtype"), "dims": dims,
            "bytes": math.prod(dims) * DTYPE_BYTES[m.group("dtype")],
            "opcode": m.group("opcode"),
            "operand_dtype": operand.group(1) if operand else None,
            "operand": operand.group(2) if operand else None,
            "widened": '"original_type":"BF16"' in line and m.group("dtype") == "f32",
            "op_name": on.group(1) if on else "",
            "target": target.group(1) if target else None,
        })
    return out


def scope_of(op_name: str) -> str:
    """The innermost of `SCOPES` in an op_name's path (`transpose(jvp(attention))` counts
    as `attention`), or "other"."""
    for part in reversed(op_name.split(";")[0].split("/")):
        while (m := re.fullmatch(r"\w+\((.*)\)", part)):
            part = m.group(1)
        if part in SCOPES:
            return part
    return "other"


def _brief(i: dict[str, Any]) -> dict[str, Any]:
    return {"bytes": i["bytes"], "shape": f"{i['dtype']}{i['dims']}", "opcode": i["opcode"],
            "op_name": i["op_name"][-160:]}


def hlo_report(hlo_text: str, min_bytes: int = 1 << 20, top: int = 5) -> dict[str, Any]:
    """The summary described in the module docstring, per device, bytes as integers."""
    insts = instructions(hlo_text)
    dtype_of = {i["name"]: i["dtype"] for i in insts}
    for i in insts:
        if i["operand_dtype"] is None and i["operand"] is not None:
            i["operand_dtype"] = dtype_of.get(i["operand"])
    large = [i for i in insts if i["bytes"] >= min_bytes]

    scopes: dict[str, dict[str, Any]] = {}
    for i in large:
        s = scopes.setdefault(scope_of(i["op_name"]), {"count": 0, "largest_bytes": 0,
                                                        "largest_shape": ""})
        s["count"] += 1
        if i["bytes"] > s["largest_bytes"]:
            s["largest_bytes"], s["largest_shape"] = i["bytes"], f"{i['dtype']}{i['dims']}"

    ups = sorted((i for i in large if i["opcode"] == "convert" and i["dtype"] == "f32"
                  and i["operand_dtype"] in ("bf16", "f16")), key=lambda i: -i["bytes"])
    upcasts = {"count": len(ups), "total_bytes": sum(i["bytes"] for i in ups),
               "by_scope": dict(Counter(scope_of(i["op_name"]) for i in ups)),
               "largest": [_brief(i) for i in ups[:top]]}

    wide = sorted((i for i in large if i["widened"]), key=lambda i: -i["bytes"])
    widened = {"count": len(wide), "total_bytes": sum(i["bytes"] for i in wide),
               "by_scope": dict(Counter(scope_of(i["op_name"]) for i in wide)),
               "largest": [_brief(i) for i in wide[:top]]}

    coll = sorted((i for i in insts if i["opcode"].removesuffix("-start") in COLLECTIVES),
                  key=lambda i: -i["bytes"])
    collectives: dict[str, Any] = {}
    for kind in COLLECTIVES:
        these = [i for i in coll if i["opcode"].removesuffix("-start") == kind]
        if these:
            collectives[kind] = {"count": len(these),
                                 "total_bytes": sum(i["bytes"] for i in these),
                                 "by_scope": dict(Counter(scope_of(i["op_name"])
                                                          for i in these)),
                                 "largest": [_brief(i) for i in these[:top]]}

    custom = Counter(i["target"] for i in insts if i["opcode"] == "custom-call")
    return {"min_bytes": min_bytes, "scopes": scopes, "upcasts": upcasts, "widened": widened,
            "collectives": collectives, "custom_calls": dict(custom)}
