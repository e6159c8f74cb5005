"""Memory plan of the paper's setting: the Mistral-7B Quiet-STaR update step, FSDP over
8 devices, from XLA's memory analysis of the compiled step (nothing is allocated).

    python benchmarks/memory_plan.py                          # 6 variants, 32 layers
    python benchmarks/memory_plan.py --layers 4 8 --extrapolate 32
    python benchmarks/memory_plan.py --preset gpu-1b --devices 1

Each variant runs in a subprocess with `--xla_force_host_platform_device_count=N`
simulated CPU devices. Parameters and the AdamW state are abstract
(`jax.eval_shape` ShapeDtypeStructs carrying the FSDP shardings of
`sharding.param_shardings` / `sharding.state_shardings`); the update step
(`value_and_grad(quietstar_loss)`, global-norm clipping 1.0, AdamW with weight decay
0.001, state donated) is lowered and compiled, never run, and
`compiled.memory_analysis()` gives per-device argument, output, alias and temporary
bytes. Per-device peak = arguments + outputs - aliased (donated) + temporaries.

Caveat: this is the CPU compiler's buffer assignment. A GPU or TPU compile of the same
program fuses and schedules differently (and the CPU backend may upcast bfloat16 dots
to float32), so treat the figures as an estimate to within tens of percent; the state
bytes (parameters, gradients, optimiser moments) are exact.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

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
    """Compile the update step on this process's devices; return the memory analysis."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from quietstar_jax import sharding
    from quietstar_jax.loss import quietstar_loss
    from quietstar_jax.model import ModelConfig, init_params
    from quietstar_jax.thoughts import ThoughtConfig, init_thought_params
    from quietstar_jax.train.step import make_optimizer

    m = dict(spec["model"])
    batch, seq = m.pop("batch"), m.pop("seq")
    m["num_layers"] = spec["layers"]
    cfg = ModelConfig(**m, dtype=spec["dtype"], param_dtype=spec["param_dtype"],
                      remat=spec["remat"], scan_layers=True)
    v = cfg.vocab_size
    tc = ThoughtConfig(n_ahead=spec["n_ahead"], n_ahead_talk=spec["n_ahead_talk"],
                       n_passes=spec["n_passes"], start_token_id=v - 2, end_token_id=v - 1,
                       pad_token_id=2)
    mesh = sharding.make_mesh(tuple(spec.get("mesh") or (1, -1, 1)))
    # The loss repeats the `batch` sequences n_passes times; the model's activation
    # constraints split those rows over the mesh (the token ids themselves are replicated:
    # 4 sequences cannot be split 8 ways, their 8 rows can).
    sharding.check_parallelism(mesh, cfg, batch * tc.n_passes)
    axes = sharding.params_logical_axes(cfg)
    opt, _ = make_optimizer(1e-6, total_steps=1000, weight_decay=1e-3)  # the trainer's

    def init():
        p = init_params(cfg, jax.random.key(0))
        return {**p, "thought": init_thought_params(p, cfg, jax.random.key(1), 5)}

    abstract_params = jax.eval_shape(init)
    p_sh = sharding.param_shardings(mesh, abstract_params, axes)
    abstract_opt = jax.eval_shape(opt.init, abstract_params)
    o_sh = sharding.state_shardings(mesh, abstract_opt, axes)
    rep = sharding.replicated(mesh)
    b_sh = sharding.batch_sharding(mesh) if batch % sharding.data_parallel_size(mesh) == 0 \
        else rep

    def update(params, opt_state, ids, mask, step):
        rng = jax.random.fold_in(jax.random.key(0), step)
        (loss, _), grads = jax.value_and_grad(quietstar_loss, has_aux=True)(
            params, cfg, tc, ids, mask, rng)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def with_sh(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            tree, shardings)

    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=b_sh)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    t0 = time.perf_counter()
    with sharding.use_mesh(mesh):
        fn = jax.jit(update, in_shardings=(p_sh, o_sh, b_sh, b_sh, rep),
                     out_shardings=(p_sh, o_sh, rep), donate_argnums=(0, 1))
        lowered = fn.lower(with_sh(abstract_params, p_sh), with_sh(abstract_opt, o_sh),
                           ids, ids, step)
        t1 = time.perf_counter()
        compiled = lowered.compile()
    t2 = time.perf_counter()
    ma = compiled.memory_analysis()
    hlo = compiled.as_text()
    if spec.get("dump_hlo"):
        with open(spec["dump_hlo"], "w") as f:
            f.write(hlo)

    def shard_bytes(tree, shardings):
        return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings),
                                   strict=True))

    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))
    arg, out, alias, temp = (int(getattr(ma, f"{k}_size_in_bytes"))
                             for k in ("argument", "output", "alias", "temp"))
    return {
        "devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "layers": spec["layers"],
        "n_params": n_params,
        "param_bytes_per_device": shard_bytes(abstract_params, p_sh),
        "opt_state_bytes_per_device": shard_bytes(abstract_opt, o_sh),
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
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                           check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not lines:
        return {"error": (p.stderr or p.stdout)[-3000:], "wall_s": time.perf_counter() - t0}
    r = json.loads(lines[-1][7:])
    r["wall_s"] = time.perf_counter() - t0
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="mistral7b")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--mesh", type=int, nargs=3, default=None, metavar=("DATA", "FSDP", "TENSOR"),
                    help="mesh shape (default 1 x devices x 1, all FSDP); sets --devices")
    ap.add_argument("--layers", type=int, nargs="+", default=None,
                    help="layer counts to compile (default: the preset's)")
    ap.add_argument("--extrapolate", type=int, default=None,
                    help="extrapolate linearly in layers to this count")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="labels (or indices) of VARIANTS to run (default all)")
    ap.add_argument("--n_ahead", type=int, default=12)
    ap.add_argument("--n_ahead_talk", type=int, default=4)
    ap.add_argument("--n_passes", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="sequences (rows / n_passes)")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=3600.0, help="per compile, seconds")
    ap.add_argument("--out", default=None)
    ap.add_argument("--dump_hlo", default=None, help="write each compiled HLO to this folder")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

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
    main()
