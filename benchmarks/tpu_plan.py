"""The full-model TPU memory table from `benchmarks/tpu_compile.py`'s JSON files.

    python benchmarks/tpu_plan.py benchmarks/results/tpu_compile/mistral7b_*.json --layers 32

Groups the compiles by slice, mesh, micro-batch and accumulation count; fits per-chip
bytes = a + b * layers through the two smallest layer counts of each group and
extrapolates to `--layers`; where a group has a third layer count, prints the fit's
error there (the check that the per-layer slope extrapolates). Where one slice and mesh
has compiles at two micro-batch sizes (at the same two layer counts), fits peak = a +
b*L + c*m + d*L*m and gives the per-sequence cost at `--layers` and the largest
micro-batch that fits (a multiple of data x fsdp). Prints a markdown table and writes
it as JSON (`--out`).
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from absl import flags

from quietstar_jax.command_line import CommandLine

GB = 1e9
KEYS = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes")


def _line(points: list[tuple[int, float]], x: float) -> float:
    (x0, y0), (x1, y1) = points[:2]
    return y0 + (y1 - y0) / (x1 - x0) * (x - x0)


def extrapolate(rows: list[dict[str, Any]], layers: int) -> dict[str, Any]:
    """Per-chip bytes at `layers` from the two smallest layer counts of `rows` (one slice,
    mesh and micro-batch), and the fit's relative error at any further count."""
    rows = sorted(rows, key=lambda r: r["model"]["num_layers"])
    fit, check = rows[:2], rows[2:]
    out: dict[str, Any] = {"from_layers": [r["model"]["num_layers"] for r in fit]}
    for k in KEYS:
        pts = [(r["model"]["num_layers"], r["per_chip"][k]) for r in fit]
        out[k] = _line(pts, layers)
    # The roofline estimate's compute term (analytic FLOPs, linear in layers).
    out["roofline_compute_s"] = _line(
        [(r["model"]["num_layers"], r["roofline_estimate"]["compute_s"]) for r in fit], layers)
    r0 = fit[0]
    out["roofline_tokens_per_s_per_chip"] = (r0["batch_size"] * r0["seq_len"]
                                             / out["roofline_compute_s"] / r0["chips"])
    out["checks"] = []
    for r in check:
        n = r["model"]["num_layers"]
        pred = _line([(q["model"]["num_layers"], q["per_chip"]["peak_bytes"]) for q in fit], n)
        out["checks"].append({"layers": n, "predicted_peak": pred,
                              "compiled_peak": r["per_chip"]["peak_bytes"],
                              "error": pred / r["per_chip"]["peak_bytes"] - 1})
    return out


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("layers", 32, "extrapolate to this many layers", flag_values=fv)
    flags.DEFINE_string("out", None, "write the table as JSON here", flag_values=fv)


COMMAND = CommandLine.script("benchmarks/tpu_plan.py",
                             " ".join(__doc__.split("\n\n")[0].split()), _define,
                             variadic="files")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; bad flags end with one `PROG: error: ...` line (exit 2)."""
    return COMMAND.main(_run, argv)


def _run(args: SimpleNamespace) -> None:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for path in args.files:
        with open(path) as f:
            r = json.load(f)
        mesh = tuple(r["mesh"].values())
        m = r["model"]
        accum = (r["grad_accum"], r.get("grad_accum_dtype", "float32"))
        groups[(r["topology"], r["num_slices"], mesh, r["micro_batch"], accum,
                m["param_dtype"], m["remat"])].append(r)

    table = []
    for (topo, slices, mesh, micro, (accum, accum_dtype), _, _), rows in sorted(
            groups.items()):
        if len({r["model"]["num_layers"] for r in rows}) < 2:
            continue
        est = extrapolate(rows, args.layers)
        r0 = rows[0]
        hbm = r0["per_chip"].get("chip_hbm_gib", r0["per_chip"]["hbm_gib"]) * 2**30
        table.append({"topology": topo, "num_slices": slices, "chips": r0["chips"],
                      "mesh": mesh, "micro_batch": micro, "grad_accum": accum,
                      "grad_accum_dtype": accum_dtype,
                      "layers": args.layers,
                      "hbm_bytes": hbm, "fits": est["peak_bytes"] <= hbm,
                      "compile_s": [round(r["compile_s"]) for r in rows],
                      "param_dtype": r0["model"]["param_dtype"],
                      "remat": r0["model"]["remat"], **est})

    # Per-sequence cost from a slice/mesh compiled at two micro-batch sizes.
    by_mesh: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for t in table:
        by_mesh[(t["topology"], t["num_slices"], t["mesh"], t["param_dtype"],
                 t["grad_accum"], t["grad_accum_dtype"])].append(t)
    for (_, _, mesh, *_), ts in by_mesh.items():
        if len(ts) < 2:
            continue
        ts = sorted(ts, key=lambda t: t["micro_batch"])[:2]
        per_seq = (ts[1]["peak_bytes"] - ts[0]["peak_bytes"]) / (
            ts[1]["micro_batch"] - ts[0]["micro_batch"])
        step = mesh[0] * mesh[1]
        room = ts[0]["hbm_bytes"] - ts[0]["peak_bytes"]
        largest = ts[0]["micro_batch"] + step * math.floor(room / per_seq / step)
        for t in ts:
            t["per_sequence_bytes"] = per_seq
            t["largest_micro_batch"] = largest

    print(f"per-chip GB (1e9 bytes), {args.layers} layers extrapolated from compiles at the "
          "layer counts shown")
    print("| slice | chips | mesh (data, fsdp, tensor) | params | micro-batch x accumulated "
          "| from layers "
          "| arguments | temporaries | **peak** | HBM | fits | check at a third count "
          "| roofline step (estimate) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t in table:
        chk = "; ".join(f"{c['layers']} layers: line {c['predicted_peak'] / GB:.2f} vs "
                        f"compiled {c['compiled_peak'] / GB:.2f} ({100 * c['error']:+.1f} %)"
                        for c in t["checks"]) or "-"
        print(f"| {t['topology']} | {t['chips']} | {t['mesh']} | {t['param_dtype']} "
              f"| {t['micro_batch']} x {t['grad_accum']}"
              f"{' (sum in params dtype)' if t['grad_accum_dtype'] == 'params' else ''} "
              f"| {t['from_layers']} | {t['argument_bytes'] / GB:.1f} "
              f"| {t['temp_bytes'] / GB:.1f} | **{t['peak_bytes'] / GB:.1f}** "
              f"| {t['hbm_bytes'] / GB:.1f} | {'yes' if t['fits'] else 'no'} | {chk} "
              f"| {t['roofline_compute_s']:.2f} s, "
              f"{t['roofline_tokens_per_s_per_chip']:.0f} tok/s/chip |")
    for t in table:
        if "per_sequence_bytes" in t and t["micro_batch"] == min(
                u["micro_batch"] for u in table if u["topology"] == t["topology"]
                and u["grad_accum"] == t["grad_accum"]):
            print(f"{t['topology']} mesh {t['mesh']} {t['param_dtype']} params: "
                  f"{t['per_sequence_bytes'] / GB:.2f} GB per sequence of the micro-batch at "
                  f"{args.layers} layers; largest micro-batch that fits "
                  f"{t['largest_micro_batch']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(table, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
