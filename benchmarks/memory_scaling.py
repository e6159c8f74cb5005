"""Per-device memory of the compiled update step as the FSDP mesh grows.

    python benchmarks/memory_scaling.py [--devices=1,2,4,8] [--tensor 1] [--preset medium]
                                        [--platform cpu|gpu|tpu]

For each device count N it starts a subprocess with N simulated CPU devices,
builds the mesh (data=1, fsdp=N/tensor, tensor), lowers and compiles (never runs)
the trainer's Quiet-STaR update step (`train.step.make_train_step` with its default
optimizer, state and shardings; benchmarks/harness.py) on abstract inputs, and reads XLA's
`compiled.memory_analysis()`. It prints per-device argument bytes (parameters +
optimiser state + batch), the parameter + optimiser bytes the shardings ask for
(computed independently from the shard shapes), temporaries, and the largest
all-gather in the compiled HLO; it fails if an all-gather produces a full
`[batch * n_passes, seq, vocab]` logits array, or any logits with the whole
vocabulary gathered. `--json PATH` writes the rows.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Sequence
from types import SimpleNamespace

from absl import flags

from quietstar_jax.command_line import CommandLine, define_integer_list

PRESETS = {
    # ~21M parameters: big enough that parameters dominate the arguments.
    "medium": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_layers=4,
                   num_heads=8, num_kv_heads=4),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2),
    # Mistral-7B's shapes (+2 thought tokens); compile-only, slow on CPU.
    "mistral7b": dict(vocab_size=32002, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, sliding_window=4096,
                      model_type="mistral"),
}

_SHAPE = re.compile(r"\b([a-z]+[0-9]*)\[([\d,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s+all-gather(?:-start)?\(")


def all_gather_shapes(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of every all-gather's result in an HLO module's text.

    Handles `all-gather` and the asynchronous `all-gather-start`, whose result is a
    tuple (operand, result): the largest shape of the result type is the gathered one.
    """
    out = []
    for line in hlo.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        shapes = [(d, tuple(int(x) for x in dims.split(",") if x))
                  for d, dims in _SHAPE.findall(m.group(1))]
        if shapes:
            out.append(max(shapes, key=lambda s: math.prod(s[1])))
    return out


def worker(args: SimpleNamespace) -> dict:
    """Compile the trainer's step on this process's devices; return one table row."""
    import harness as H
    import jax
    import jax.numpy as jnp

    from quietstar_jax import sharding
    from quietstar_jax.model import ModelConfig
    from quietstar_jax.train.step import abstract_state

    if args.no_constraints:  # to see what XLA does without the activation constraints
        import quietstar_jax.model

        quietstar_jax.model.constrain = lambda x, axes: x
    n = args.n_devices
    if jax.device_count() < n:
        raise SystemExit(f"asked for {n} devices, JAX sees {jax.device_count()}")
    preset = dict(PRESETS[args.preset])
    if args.layers:
        preset["num_layers"] = args.layers
    cfg = ModelConfig(**preset, dtype=args.dtype, param_dtype=args.dtype, remat=args.remat)
    v = cfg.vocab_size
    tc = H.thought_config(v, n_ahead=args.n_ahead, n_ahead_talk=args.n_ahead_talk, n_passes=2)
    mesh = sharding.make_mesh((1, -1, args.tensor), jax.devices()[:n])
    sharding.check_parallelism(mesh, cfg, args.batch)
    abstract_params = H.init_model(cfg, 0)  # shapes only
    setup = H.train_setup(cfg, mesh, abstract_params)  # the trainer's optimizer, shardings
    st_sh = setup["state_sharding"]
    state = abstract_state(setup["optimizer"], abstract_params, st_sh)
    b_sh = sharding.batch_sharding(mesh)
    batch = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32, sharding=b_sh)
    with sharding.use_mesh(mesh):
        step = H.make_step(cfg, tc, setup)
        compiled = step.lower(state, {"input_ids": batch, "attention_mask": batch}).compile()
    mem = compiled.memory_analysis()

    state_bytes = (H.shard_bytes(state.params, st_sh.params)
                   + H.shard_bytes(state.opt_state, st_sh.opt_state))
    full_state = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                     for x in jax.tree.leaves((state.params, state.opt_state)))
    rows = args.batch * tc.n_passes
    gathers = all_gather_shapes(compiled.as_text())
    # Logits gathered along the vocabulary: an all-gather whose result has the whole
    # vocabulary last and is not a weight. (A weight such as lm_head [hidden, vocab]
    # can have a logits-like shape; gathering weights is what FSDP does.) The global
    # [rows, seq, vocab] array is the worst case; a data shard's rows with the whole
    # vocabulary (a tensor-split vocabulary gathered) is counted too.
    weights = {tuple(sorted(x.shape)) for x in jax.tree.leaves(abstract_params)}
    logits_gathers = [s for _, s in gathers
                      if len(s) >= 2 and s[-1] == v and tuple(sorted(s)) not in weights]
    logits_full = [s for s in logits_gathers if math.prod(s[:-1]) >= rows * args.seq]
    biggest = max(gathers, key=lambda g: math.prod(g[1]), default=None)
    return {
        "devices": n,
        "mesh": dict(mesh.shape),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "state_bytes_from_shardings": int(state_bytes),
        "full_state_bytes": int(full_state),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "num_all_gathers": len(gathers),
        "largest_all_gather": f"{biggest[0]}{list(biggest[1])}" if biggest else "-",
        "full_logits_all_gathers": [list(s) for s in logits_full],
        "vocab_logits_all_gathers": [list(s) for s in logits_gathers],
        "logits_shape": [rows, args.seq, v],
    }


def _mib(b: int) -> str:
    return f"{b / 2**20:.2f}"


def _define(fv: flags.FlagValues) -> None:
    define_integer_list("devices", [1, 2, 4, 8], "device counts, comma-separated", fv)
    flags.DEFINE_integer("tensor", 1, "tensor axis size", flag_values=fv)
    flags.DEFINE_enum("preset", "medium", sorted(PRESETS), "model shapes", flag_values=fv)
    flags.DEFINE_string("dtype", "float32", "compute and parameter dtype", flag_values=fv)
    flags.DEFINE_integer("layers", None, "override the preset's layers", flag_values=fv)
    flags.DEFINE_enum("remat", "none", ["none", "full", "dots"], "rematerialisation",
                      flag_values=fv)
    flags.DEFINE_integer("batch", 8, "sequences", flag_values=fv)
    flags.DEFINE_integer("seq", 64, "sequence length", flag_values=fv)
    flags.DEFINE_integer("n_ahead", 4, "thought length", flag_values=fv)
    flags.DEFINE_integer("n_ahead_talk", 2, "talk steps", flag_values=fv)
    flags.DEFINE_boolean("no_constraints", False, "compile without the model's activation "
                         "constraints (for comparison)", flag_values=fv)
    flags.DEFINE_string("json", None, "write the rows to this file", flag_values=fv)
    flags.DEFINE_string("platform", "cpu", "cpu: N simulated CPU devices; anything else (gpu, "
                        "tpu): the first N devices JAX sees", flag_values=fv)
    flags.DEFINE_boolean("worker", False, "internal: compile in this process", flag_values=fv)
    flags.DEFINE_integer("n_devices", 1, "internal: the worker's device count", flag_values=fv)


COMMAND = CommandLine.script("benchmarks/memory_scaling.py",
                             " ".join(__doc__.split("\n\n")[0].split()), _define)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; bad flags end with one `PROG: error: ...` line (exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return COMMAND.main(lambda args: _run(args, argv), argv)


def _run(args: SimpleNamespace, argv: list[str]) -> None:
    """The table of every device count, each compiled in a worker given `argv`."""
    if args.worker:
        print("ROW " + json.dumps(worker(args)), flush=True)
        return
    import harness as H

    rows = []
    for n in args.devices:
        env = dict(os.environ)
        if args.platform == "cpu":  # simulated devices; elsewhere the first N real ones
            env.update(JAX_PLATFORMS="cpu",
                       XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                                 f"--xla_force_host_platform_device_count={n}")
        row = H.run_worker(__file__, ["--worker", "--n_devices", str(n), *argv],
                           env=env, tag="ROW")
        if "error" in row:
            sys.exit(f"worker with {n} devices failed:\n{row['error'][-3000:]}")
        row.pop("wall_s", None)
        rows.append(row)

    base = rows[0]
    print(f"preset={args.preset} dtype={args.dtype} batch={args.batch} seq={args.seq} "
          f"n_ahead={args.n_ahead} n_ahead_talk={args.n_ahead_talk} tensor={args.tensor} "
          f"remat={args.remat}{' NO activation constraints' if args.no_constraints else ''}; "
          f"params+Adam state, unsharded: {_mib(base['full_state_bytes'])} MiB")
    print("| devices | mesh (data, fsdp, tensor) | argument MiB / device | x of 1 device "
          "| params+opt MiB / device (shardings) | temp MiB / device | all-gathers "
          "| largest all-gather | full-logits all-gathers | full-vocab logits all-gathers |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["mesh"]
        print(f"| {r['devices']} | ({m['data']}, {m['fsdp']}, {m['tensor']}) "
              f"| {_mib(r['argument_bytes'])} "
              f"| {r['argument_bytes'] / base['argument_bytes']:.3f} "
              f"(1/N = {base['devices'] / r['devices']:.3f}) "
              f"| {_mib(r['state_bytes_from_shardings'])} | {_mib(r['temp_bytes'])} "
              f"| {r['num_all_gathers']} | {r['largest_all_gather']} "
              f"| {len(r['full_logits_all_gathers'])} | {len(r['vocab_logits_all_gathers'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if r["vocab_logits_all_gathers"]]
    if bad:
        sys.exit(f"FAIL: logits gathered along the vocabulary (full logits "
                 f"{bad[0]['logits_shape']}): {[r['vocab_logits_all_gathers'] for r in bad]}")


if __name__ == "__main__":
    sys.exit(main())
