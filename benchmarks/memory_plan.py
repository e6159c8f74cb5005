"""Memory plan of the paper's setting: the Mistral-7B Quiet-STaR update step, FSDP over
8 devices, from XLA's memory analysis of the compiled step (nothing is allocated).

    python benchmarks/memory_plan.py                          # 6 variants, 32 layers
    python benchmarks/memory_plan.py --layers=4,8 --extrapolate 32
    python benchmarks/memory_plan.py --preset gpu-1b --devices 1

Each variant runs in a subprocess with `--xla_force_host_platform_device_count=N`
simulated CPU devices. Parameters and the AdamW state are abstract
(`jax.eval_shape` ShapeDtypeStructs carrying the trainer's shardings,
`train.step.state_shardings`); the trainer's update step (`train.step.make_train_step`
with its default optimizer: global-norm clipping 1.0, AdamW with weight decay 0.001 and
its decay mask, state donated; benchmarks/harness.py) is lowered and compiled, never
run, and
`compiled.memory_analysis()` gives per-device argument, output, alias and temporary
bytes. Per-device peak = arguments + outputs - aliased (donated) + temporaries.

Caveat: this is the CPU compiler's buffer assignment. A GPU or TPU compile of the same
program fuses and schedules differently (and the CPU backend may upcast bfloat16 dots
to float32), so treat the figures as an estimate to within tens of percent; the state
bytes (parameters, gradients, optimiser moments) are exact.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import harness as H
from absl import flags

from quietstar_jax.command_line import CommandLine, define_integer_list

HERE = os.path.dirname(os.path.abspath(__file__))

PRESETS: dict[str, dict[str, Any]] = {
    # Mistral-7B (+2 thought tokens), the paper's training setting.
    "mistral7b": dict(vocab_size=32002, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, sliding_window=4096,
                      model_type="mistral", batch=4, seq=256),
    # The GPU benchmark preset of step_benchmark.py (TinyLlama-1.1B shapes).
    "gpu-1b": dict(vocab_size=32002, hidden_size=2048, intermediate_size=5632, num_layers=22,
                   num_heads=32, num_kv_heads=4, model_type="llama", batch=4, seq=512),
}

# (label, compute dtype, param dtype, remat)
VARIANTS = [
    ("f32 master, no remat", "bfloat16", "float32", "none"),
    ("f32 master, remat dots", "bfloat16", "float32", "dots"),
    ("f32 master, remat full", "bfloat16", "float32", "full"),
    ("bf16 params, no remat", "bfloat16", "bfloat16", "none"),
    ("bf16 params, remat dots", "bfloat16", "bfloat16", "dots"),
    ("bf16 params, remat full", "bfloat16", "bfloat16", "full"),
]

ACCELERATORS = {"80 GB GPU (A100/H100)": 80e9, "32 GB TPU v4 core": 32 * 2**30}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Compile the trainer's update step on this process's devices; return the memory
    analysis."""
    import jax
    import jax.numpy as jnp

    from quietstar_jax import sharding
    from quietstar_jax.model import ModelConfig
    from quietstar_jax.train.step import abstract_state

    m = dict(spec["model"])
    batch, seq = m.pop("batch"), m.pop("seq")
    m["num_layers"] = spec["layers"]
    cfg = ModelConfig(**m, dtype=spec["dtype"], param_dtype=spec["param_dtype"],
                      remat=spec["remat"], scan_layers=True)
    tc = H.thought_config(cfg.vocab_size, n_ahead=spec["n_ahead"],
                          n_ahead_talk=spec["n_ahead_talk"], n_passes=spec["n_passes"])
    mesh = sharding.make_mesh(tuple(spec.get("mesh") or (1, -1, 1)))
    # The loss repeats the `batch` sequences n_passes times; the model's activation
    # constraints split those rows over the mesh (the token ids themselves are replicated:
    # 4 sequences cannot be split 8 ways, their 8 rows can).
    sharding.check_parallelism(mesh, cfg, batch * tc.n_passes)
    abstract_params = H.init_model(cfg, 0)  # shapes only
    setup = H.train_setup(cfg, mesh, abstract_params)  # the trainer's optimizer, shardings
    b_sh = sharding.batch_sharding(mesh) if batch % sharding.data_parallel_size(mesh) == 0 \
        else sharding.replicated(mesh)
    step = H.make_step(cfg, tc, setup, batch_sharding=b_sh)
    st_sh = setup["state_sharding"]
    state = abstract_state(setup["optimizer"], abstract_params, st_sh)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=b_sh)
    t0 = time.perf_counter()
    with sharding.use_mesh(mesh):
        lowered = step.lower(state, {"input_ids": ids, "attention_mask": ids})
        t1 = time.perf_counter()
        compiled = lowered.compile()
    t2 = time.perf_counter()
    ma = compiled.memory_analysis()
    hlo = compiled.as_text()
    if spec.get("dump_hlo"):
        with open(spec["dump_hlo"], "w") as f:
            f.write(hlo)

    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))
    arg, out, alias, temp = (int(getattr(ma, f"{k}_size_in_bytes"))
                             for k in ("argument", "output", "alias", "temp"))
    return {
        "devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "layers": spec["layers"],
        "n_params": n_params,
        "param_bytes_per_device": H.shard_bytes(state.params, st_sh.params),
        "opt_state_bytes_per_device": H.shard_bytes(state.opt_state, st_sh.opt_state),
        "argument_bytes": arg,
        "output_bytes": out,
        "alias_bytes": alias,
        "temp_bytes": temp,
        "generated_code_bytes": int(ma.generated_code_size_in_bytes),
        "peak_bytes": arg + out - alias + temp,
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "largest_buffers": largest_buffers(hlo),
    }


_DT_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
             "f64": 8, "s64": 8, "u64": 8}


def largest_buffers(hlo_text: str, n: int = 15) -> list[dict[str, Any]]:
    """The `n` largest array results in an HLO module's text (per device after SPMD
    partitioning): bytes, shape, opcode and JAX op_name. Tuples are skipped."""
    import re

    inst = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]\S*\s+([\w\-]+)\(")
    seen = []
    for line in hlo_text.splitlines():
        m = inst.match(line)
        if not m or m.group(2) not in _DT_BYTES:
            continue
        dims = [int(x) for x in m.group(3).split(",") if x]
        size = math.prod(dims) * _DT_BYTES[m.group(2)]
        on = re.search(r'op_name="([^"]*)"', line)
        seen.append({"bytes": size, "shape": f"{m.group(2)}{dims}", "opcode": m.group(4),
                     "name": m.group(1), "op_name": on.group(1)[-120:] if on else ""})
    seen.sort(key=lambda r: -r["bytes"])
    return seen[:n]


def run(spec: dict[str, Any], devices: int, timeout: float) -> dict[str, Any]:

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                          + f" --xla_force_host_platform_device_count={devices}").strip())
    r = H.run_worker(__file__, ["--worker", json.dumps(spec)], env=env, timeout=timeout)
    r.pop("returncode", None)
    return r


def extrapolate(rows: list[dict[str, Any]], layers: int) -> dict[str, Any]:
    """Fit bytes = a + b * layers through the two largest layer counts; evaluate."""
    rows = sorted(rows, key=lambda r: r["layers"])[-2:]
    (r0, r1), out = rows, {"layers": layers, "extrapolated_from": [r["layers"] for r in rows]}
    for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes",
              "param_bytes_per_device", "opt_state_bytes_per_device"):
        slope = (r1[k] - r0[k]) / (r1["layers"] - r0["layers"])
        out[k] = int(r1[k] + slope * (layers - r1["layers"]))
    return out


def _gb(b: float) -> str:
    return f"{b / 1e9:.1f}"


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_enum("preset", "mistral7b", sorted(PRESETS), "model shapes", flag_values=fv)
    flags.DEFINE_integer("devices", 8, "simulated CPU devices", flag_values=fv)
    define_integer_list("mesh", None, "mesh shape DATA,FSDP,TENSOR (default 1,devices,1, all "
                        "FSDP); sets --devices", fv, length=3)
    define_integer_list("layers", None, "layer counts to compile, comma-separated (default: "
                        "the preset's)", fv)
    flags.DEFINE_integer("extrapolate", None, "extrapolate linearly in layers to this count",
                         flag_values=fv)
    flags.DEFINE_list("variants", None, "labels (or indices) of VARIANTS to run, "
                      "comma-separated (default all)", flag_values=fv)
    flags.DEFINE_integer("n_ahead", 12, "thought length", flag_values=fv)
    flags.DEFINE_integer("n_ahead_talk", 4, "talk steps", flag_values=fv)
    flags.DEFINE_integer("n_passes", 2, "thought passes", flag_values=fv)
    flags.DEFINE_integer("batch", None, "sequences (rows / n_passes)", flag_values=fv)
    flags.DEFINE_integer("seq", None, "sequence length", flag_values=fv)
    flags.DEFINE_float("timeout", 3600.0, "per compile, seconds", flag_values=fv)
    flags.DEFINE_string("out", None, "JSON path (default benchmarks/results/"
                        "memory_plan_<preset>.json)", flag_values=fv)
    flags.DEFINE_string("dump_hlo", None, "write each compiled HLO to this folder",
                        flag_values=fv)


COMMAND = CommandLine.script("benchmarks/memory_plan.py",
                             " ".join(__doc__.split("\n\n")[0].split()), _define)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; bad flags end with one `PROG: error: ...` line (exit 2)."""
    return COMMAND.main(_run, argv)


def _run(args: SimpleNamespace) -> None:
    if args.mesh:
        args.devices = math.prod(args.mesh)
    model = dict(PRESETS[args.preset])
    if args.batch:
        model["batch"] = args.batch
    if args.seq:
        model["seq"] = args.seq
    layer_counts = args.layers or [model["num_layers"]]
    variants = VARIANTS
    if args.variants:
        variants = [v for i, v in enumerate(VARIANTS)
                    if v[0] in args.variants or str(i) in args.variants]
    results: dict[str, Any] = {"preset": args.preset, "model": model, "devices": args.devices,
                               "mesh": args.mesh or [1, args.devices, 1],
                               "n_ahead": args.n_ahead, "n_ahead_talk": args.n_ahead_talk,
                               "n_passes": args.n_passes, "loadavg_start": os.getloadavg(),
                               "variants": []}
    for label, dtype, pdtype, remat in variants:
        rows = []
        for layers in layer_counts:
            spec = dict(model=model, layers=layers, dtype=dtype, param_dtype=pdtype,
                        remat=remat, n_ahead=args.n_ahead, n_ahead_talk=args.n_ahead_talk,
                        n_passes=args.n_passes, mesh=args.mesh)
            if args.dump_hlo:
                spec["dump_hlo"] = os.path.join(
                    args.dump_hlo, f"{args.preset}_{pdtype}_{remat}_{layers}l.hlo.txt")
            print(f"{label}, {layers} layers ...", file=sys.stderr, flush=True)
            r = run(spec, args.devices, args.timeout)
            if "error" in r:
                print(f"  failed: {r['error'][-800:]}", file=sys.stderr, flush=True)
            else:
                print(f"  peak {_gb(r['peak_bytes'])} GB/device (temp {_gb(r['temp_bytes'])}),"
                      f" compile {r['compile_s']:.0f} s", file=sys.stderr, flush=True)
            rows.append(r)
        entry: dict[str, Any] = {"label": label, "dtype": dtype, "param_dtype": pdtype,
                                 "remat": remat, "compiled": rows}
        ok = [r for r in rows if "error" not in r]
        if args.extrapolate and len(ok) >= 2:
            entry["estimate"] = extrapolate(ok, args.extrapolate)
        elif ok:
            entry["estimate"] = max(ok, key=lambda r: r["layers"])
        if "estimate" in entry:
            entry["fits"] = {k: entry["estimate"]["peak_bytes"] <= cap
                             for k, cap in ACCELERATORS.items()}
        results["variants"].append(entry)

    results["loadavg_end"] = os.getloadavg()
    out = args.out or os.path.join(HERE, "results", f"memory_plan_{args.preset}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)

    n_layers = args.extrapolate or max(layer_counts)
    print(f"\n{args.preset}, {n_layers} layers, {args.devices} devices, mesh (data, fsdp, "
          f"tensor) = {tuple(results['mesh'])}, "
          f"{model['batch']} seqs x {args.n_passes} passes x {model['seq']} tokens, "
          f"n_ahead {args.n_ahead}, n_ahead_talk {args.n_ahead_talk}; GB = 1e9 bytes per device")
    print("| variant | params | opt state | arguments | temporaries | peak | fits 80 GB GPU "
          "| fits 32 GB TPU v4 |")
    print("|---|---|---|---|---|---|---|---|")
    for e in results["variants"]:
        est = e.get("estimate")
        if not est:
            print(f"| {e['label']} | failed | | | | | | |")
            continue
        f = e["fits"]
        print(f"| {e['label']} | {_gb(est['param_bytes_per_device'])} "
              f"| {_gb(est['opt_state_bytes_per_device'])} | {_gb(est['argument_bytes'])} "
              f"| {_gb(est['temp_bytes'])} | {_gb(est['peak_bytes'])} "
              f"| {'yes' if f['80 GB GPU (A100/H100)'] else 'no'} "
              f"| {'yes' if f['32 GB TPU v4 core'] else 'no'} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    if not H.worker_main(sys.argv, worker):  # a variant's compile (run), else the command
        sys.exit(main())
