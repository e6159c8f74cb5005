"""The trainer's update step compiled ahead of time for a TPU slice, on any host (no TPU).

    python benchmarks/tpu_compile.py --topology v5p:2x2x1 \\
        --config configs/mistral7b_openwebmath.py --config.model.num_layers=2

With `libtpu` importable (see "libtpu" below), `jax.experimental.topologies` describes the
chips of a named slice (`v4:2x2x1` is a v4-8, `v5p:2x2x1` a v5p-8, `v5p:2x2x4` a v5p-32,
`v5e:4x4` a v5e-16; the user-facing names `v4-8`, `v5p-32`, ... work too), and the step
the trainer runs (`train.step.make_train_step` with the config's optimizer, `grad_accum`
micro-batches, `state_shardings` and batch sharding, state donated, a mesh made current
while tracing: what `python train.py --config ...` compiles) is lowered with abstract
inputs on a `(data, fsdp, tensor)` mesh of those chips and compiled by the TPU compiler
itself. Nothing is allocated and nothing runs.

The config and its overrides are taken as train.py takes them (`--config FILE`,
`--config.FIELD=VALUE`). A config whose `model.hf_path` points at a checkpoint reads its
`config.json` (no weights); without the checkpoint, the published shapes of a known
model (`KNOWN_MODELS`, by the path's last component) stand in. Shape fields given on the
command line (`--config.model.num_layers=2`) replace the checkpoint's. The mesh is
`--mesh`, else `config.mesh`, with its tensor size replaced by what the slice's chip
count leaves when the config's mesh is for another count.

Prints and writes JSON (`--out`): per-chip argument, output, donated (aliased),
temporary and peak bytes (`compiled.memory_analysis()`; peak = arguments + outputs -
aliased + temporaries), the chip's HBM (`CHIPS`), whether it fits, the compile time,
the compiler's FLOP and byte counts (`compiled.cost_analysis()`), the analytic FLOP count
(`benchmarks/flops.py`) and a roofline step-time estimate from it. XLA's cost analysis
counts the body of a loop once, not once per iteration (a scan of 2 or 4 layers reports
the same FLOPs; `tests/test_tpu_compile.py` checks it on a toy scan), so the roofline uses
the analytic count: an estimate, not a measurement.

Exit status: 0 if it fits; 2 with one line on stderr if libtpu is missing or does not
match jax, if the config is rejected, or if the step does not fit ("does not fit: needs X
GB per chip, the chip has Y GB", after the figures are printed and written).

libtpu: `pip install -e ".[tpu-aot]"` brings the libtpu that jax[tpu] pins. Installed in
the environment, libtpu makes every JAX start-up without `JAX_PLATFORMS=cpu` try (and
fail, with several lines of errors on stderr) to open a TPU, so on a host without TPUs
install it into a side directory instead and point this script at it:

    pip install --target ~/.cache/quietstar/libtpu "libtpu==0.0.42.*"   # jax 0.10.2's pin

This script looks in `--libtpu`, `$TPU_LIBRARY_PATH`, the environment, then
`$QUIETSTAR_LIBTPU_DIR` (default `~/.cache/quietstar/libtpu`).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(1, ROOT)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

DEFAULT_LIBTPU_DIR = os.path.join(os.path.expanduser("~"), ".cache", "quietstar", "libtpu")

# Published per-chip figures: HBM (GiB), dense bfloat16 peak (FLOP/s), HBM bandwidth
# (bytes/s); Google Cloud TPU system-architecture pages. `chip_config`: "megacore" where a
# chip's two TensorCores act as one JAX device (v4, v5p), as on a TPU VM.
CHIPS: dict[str, dict[str, Any]] = {
    "v4": dict(hbm_gib=32, peak_bf16=275e12, hbm_bw=1228e9, chip_config="megacore",
               kind="TPU v4"),
    "v5e": dict(hbm_gib=16, peak_bf16=197e12, hbm_bw=819e9, chip_config="default",
                kind="TPU v5 lite"),
    "v5p": dict(hbm_gib=95, peak_bf16=459e12, hbm_bw=2765e9, chip_config="megacore",
                kind="TPU v5"),
    "v6e": dict(hbm_gib=32, peak_bf16=918e12, hbm_bw=1640e9, chip_config="default",
                kind="TPU v6 lite"),
}
# Topology names libtpu knows for each generation (`v5p:` is spelled `v5:` there).
_LIBTPU_PREFIX = {"v4": "v4", "v5e": "v5e", "v5p": "v5", "v6e": "v6e"}
# User-facing slice names: v4 and v5p count TensorCores (2 per chip), v5e and v6e chips.
ALIASES = {"v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4",
           "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4",
           "v5p-64": "v5p:2x4x4", "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4",
           "v5e-16": "v5e:4x4", "v5e-32": "v5e:4x8", "v5e-64": "v5e:8x8",
           "v5e-128": "v5e:8x16", "v5e-256": "v5e:16x16", "v6e-4": "v6e:2x2",
           "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4", "v6e-256": "v6e:16x16"}

# Published shapes (the checkpoint's config.json) of models the configs name, for when
# the checkpoint is not on this host; keyed by the lower-cased last path component.
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "mistral-7b-v0.1": dict(model_type="mistral", vocab_size=32000, hidden_size=4096,
                            intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8,
                            max_position_embeddings=32768, rms_norm_eps=1e-5,
                            rope_theta=10000.0, sliding_window=4096, hidden_act="silu",
                            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}
THOUGHT_TOKENS = 2  # the tokenizer grows by the start and end thought tokens
GB = 1e9

class ToolError(RuntimeError):
    """A one-line reason to stop with exit status 2."""


# --------------------------------------------------------------------------- libtpu


def libtpu_requirement() -> str:
    """The libtpu requirement of the installed jax's `tpu` extra (e.g. `libtpu==0.0.42.*`)."""
    from importlib import metadata

    for req in metadata.requires("jax") or []:
        if req.startswith("libtpu") and "tpu" in req.split(";", 1)[-1]:
            return req.split(";", 1)[0].replace(" ", "")
    return "libtpu"


def _version_matches(version: str, requirement: str) -> bool:
    """`version` satisfies a `libtpu==X` / `libtpu==X.*` requirement (others: True)."""
    m = re.fullmatch(r"libtpu==([\w.]+?)(\.\*)?", requirement)
    if not m:
        return True
    want = m.group(1)
    return version == want or (m.group(2) is not None and version.startswith(want + "."))


def find_libtpu(explicit: str | None = None) -> tuple[str, str | None]:
    """(path of libtpu.so, its version if known), else ToolError naming what to install.

    Looks at `explicit` (a .so or a pip --target directory), `$TPU_LIBRARY_PATH`, an
    importable `libtpu`, then `$QUIETSTAR_LIBTPU_DIR` (default ~/.cache/quietstar/libtpu).
    The version comes from the package metadata beside the library."""
    import glob

    req = libtpu_requirement()
    install = (f'pip install --target {DEFAULT_LIBTPU_DIR} "{req}" (or pip install -e '
               f'".[tpu-aot]")')
    candidates = [explicit, os.environ.get("TPU_LIBRARY_PATH")]
    try:
        import libtpu  # type: ignore[import-not-found]

        candidates.append(libtpu.get_library_path())
    except ImportError:
        pass
    candidates.append(os.environ.get("QUIETSTAR_LIBTPU_DIR", DEFAULT_LIBTPU_DIR))
    for c in candidates:
        if not c:
            continue
        so = os.path.join(c, "libtpu", "libtpu.so") if os.path.isdir(c) else c
        if os.path.isdir(c) and not os.path.isfile(so):
            so = os.path.join(c, "libtpu.so")
        if not os.path.isfile(so):
            if c is explicit:
                raise ToolError(f"--libtpu {c}: no libtpu.so there; install it with {install}")
            continue
        pkg_root = os.path.dirname(os.path.dirname(so))
        dist = glob.glob(os.path.join(pkg_root, "libtpu-*.dist-info"))
        version = os.path.basename(dist[0])[len("libtpu-"):-len(".dist-info")] if dist else None
        if version is not None and not _version_matches(version, req):
            import jax

            raise ToolError(f"libtpu {version} at {so} does not match jax {jax.__version__} "
                            f"(which wants {req}); install it with {install}")
        return so, version
    import jax

    raise ToolError(f"libtpu is not installed (the TPU compiler; jax {jax.__version__} wants "
                    f"{req}); install it with {install}")


# --------------------------------------------------------------------------- topology


def parse_topology(name: str) -> dict[str, Any]:
    """`v5p:2x2x4` or `v5p-32` -> generation, libtpu topology name, chip count, dims."""
    name = ALIASES.get(name.lower(), name.lower())
    m = re.fullmatch(r"(v4|v5e|v5p|v5|v6e|v5litepod)[:](\d+(?:x\d+)*)", name)
    if not m:
        raise ToolError(f"unknown topology {name!r}: expected e.g. v4:2x2x1, v5p:2x2x4, "
                        f"v5e:4x4, v6e:2x4, or one of {', '.join(sorted(ALIASES))}")
    gen = {"v5": "v5p", "v5litepod": "v5e"}.get(m.group(1), m.group(1))
    dims = tuple(int(x) for x in m.group(2).split("x"))
    return {"generation": gen, "name": f"{gen}:{m.group(2)}",
            "libtpu_name": f"{_LIBTPU_PREFIX[gen]}:{m.group(2)}", "dims": dims,
            "chips": math.prod(dims), **CHIPS[gen]}


def topology_devices(topo: dict[str, Any], num_slices: int) -> list[Any]:
    """The compile-only devices of `num_slices` slices of `topo`."""
    from jax.experimental import topologies

    dims = topo["dims"]
    dims3 = (*dims, *(1,) * (3 - len(dims)))
    wrap = tuple(len(dims) == 3 and min(dims) >= 4 for _ in dims3)  # full 3-D tori wrap
    # Hosts of 2 x 2 chips (fewer on slices smaller than a host), as on TPU VMs.
    bounds = tuple(min(b, d) for b, d in zip((2, 2, 1), dims3, strict=True))
    kwargs: dict[str, Any] = dict(chip_config_name=topo["chip_config"], num_slices=num_slices,
                                  chips_per_host_bounds=bounds, wrap=wrap)
    try:
        desc = topologies.get_topology_desc(topology_name=topo["libtpu_name"],
                                            platform="tpu", **kwargs)
    except Exception as e:  # noqa: BLE001 - libtpu's errors are plain runtime errors
        raise ToolError(f"libtpu rejected topology {topo['name']}: "
                        f"{' '.join(str(e).split())[:300]}") from e
    return list(desc.devices)


# --------------------------------------------------------------------------- the model


def _explicit_model_fields(argv: list[str]) -> set[str]:
    """`config.model` fields given on the command line (`--config.model.X=...`)."""
    out = set()
    for a in argv:
        m = re.match(r"--config\.model\.(\w+)", a)
        if m:
            out.add(m.group(1))
    return out


def model_config(config: Any, argv: list[str]) -> tuple[Any, str]:
    """The ModelConfig `train.py` would build for `config` (without loading weights),
    and where its shapes came from."""
    from quietstar_jax import hf
    from quietstar_jax.train.config import model_architecture_fields
    from quietstar_jax.train.model_setup import inline_model_config
    from quietstar_jax.train.tokenizer import ByteTokenizer

    m = config.model
    if not m.hf_path:
        return inline_model_config(m, ByteTokenizer().vocab_size), "inline config.model"
    path = m.hf_path
    if os.path.isfile(os.path.join(path, "config.json")):
        hf_config, source = path, os.path.join(path, "config.json")
    else:
        key = os.path.basename(os.path.normpath(path)).lower()
        if key not in KNOWN_MODELS:
            raise ToolError(f"config.model.hf_path={path!r} has no config.json here and is "
                            f"not one of the known models ({', '.join(KNOWN_MODELS)}); "
                            "point it at a checkpoint directory (only config.json is read)")
        hf_config = KNOWN_MODELS[key]
        source = f"published shapes of {key} (no checkpoint here)"
    cfg = hf.model_config_from_hf(hf_config, m.dtype, m.param_dtype, source=source,
                               scan_layers=m.scan_layers, remat=m.remat,
                               attention=m.attention, vocab_chunk=m.vocab_chunk)
    cfg = cfg.replace(vocab_size=cfg.vocab_size + THOUGHT_TOKENS)
    shape_fields = model_architecture_fields()
    given = {f: m[f] for f in _explicit_model_fields(argv) if f in shape_fields}
    if given:
        cfg = cfg.replace(**given)
        source += " with " + ", ".join(f"{k}={v}" for k, v in sorted(given.items()))
    return cfg, source


def parse_mesh(text: str | None, default: Any) -> tuple[int, ...]:
    """'1,4,2' / '(1, 4, -1)' -> (1, 4, 2); None -> `default`."""
    if text is None:
        return tuple(int(x) for x in default)
    parts = [p for p in re.split(r"[\s,()\[\]]+", text) if p]
    if len(parts) != 3:
        raise ToolError(f"--mesh {text!r}: expected three sizes (data, fsdp, tensor)")
    return tuple(int(p) for p in parts)


# --------------------------------------------------------------------------- compile


def compile_step(config: Any, argv: list[str], topology: str, *, num_slices: int = 1,
                 mesh_text: str | None = None, libtpu: str | None = None,
                 hlo_path: str | None = None, hbm_gib: float | None = None) -> dict[str, Any]:
    """Compile the trainer's step of `config` for `topology`; return the report dict.

    argv: the command line (shape fields given there replace a checkpoint's); hbm_gib:
    check the fit against this instead of the chip's HBM."""
    so, version = find_libtpu(libtpu)
    os.environ["TPU_LIBRARY_PATH"] = so
    # libtpu takes a machine-wide lock file (/tmp/libtpu_lockfile) for the TPU it would
    # drive; a compile-only client drives none, so compiles may run side by side.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import flops as F
    import harness as H
    import jax
    import jax.numpy as jnp

    from quietstar_jax import sharding
    from quietstar_jax.train.config import (
        ConfigError,
        base_config,
        model_architecture_fields,
        thought_config,
        validate_config,
    )
    from quietstar_jax.train.step import (
        abstract_state,
        make_train_step,
        optimizer_from_config,
        state_shardings,
    )

    topo = parse_topology(topology)
    checked = config.copy_and_resolve_references()
    if checked.model.hf_path:  # shape overrides of a checkpoint are this tool's own
        defaults = base_config().model
        for name in model_architecture_fields():
            checked.model[name] = defaults[name]
    try:
        validate_config(checked)
    except ConfigError as e:
        raise ToolError(f"config: {e}") from e
    cfg, source = model_config(config, argv)
    v = cfg.vocab_size
    tc = thought_config(config, {"start_token_id": v - 2, "end_token_id": v - 1,
                                 "pad_token_id": cfg.eos_token_id or 0})
    tc.check_token_ids(v)
    devices = topology_devices(topo, num_slices)
    mesh_shape = parse_mesh(mesh_text, config.mesh)
    if mesh_text is None and -1 not in mesh_shape and math.prod(mesh_shape) != len(devices):
        # The config's mesh is for another device count: keep its data and fsdp sizes
        # and let tensor take the rest (v5p-8: (1, 4, 2) -> (1, 4, 1); 16 chips: (1, 4, 4)).
        mesh_shape = (*mesh_shape[:2], -1)
    try:
        mesh = sharding.make_mesh(mesh_shape, devices)
        micro = config.batch_size // config.grad_accum
        sharding.check_parallelism(mesh, cfg, micro)
    except ValueError as e:
        raise ToolError(" ".join(str(e).split())) from e
    seq = config.data.seq_len

    abstract_params = H.init_model(cfg, config.seed)  # jax.eval_shape: nothing allocated
    optimizer, schedule = optimizer_from_config(config.optim, config.num_steps)
    p_sh = sharding.param_shardings(mesh, abstract_params, sharding.params_logical_axes(cfg))
    st_sh = state_shardings(mesh, optimizer, abstract_params, p_sh)
    b_sh = sharding.batch_sharding(mesh)
    step = make_train_step(cfg, tc, optimizer, schedule=schedule,
                           grad_accum=config.grad_accum,
                           grad_accum_dtype=config.get("grad_accum_dtype", "float32"),
                           seed=config.seed, mesh=mesh,
                           state_sharding=st_sh, batch_sharding=b_sh)
    state = abstract_state(optimizer, abstract_params, st_sh)
    ids = jax.ShapeDtypeStruct((config.batch_size, seq), jnp.int32, sharding=b_sh)
    t0 = time.perf_counter()
    with sharding.use_mesh(mesh):
        lowered = step.lower(state, {"input_ids": ids, "attention_mask": ids})
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    hlo = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(hlo)
    from hlo_report import hlo_report
    from memory_plan import largest_buffers

    ma = compiled.memory_analysis()
    arg, out, alias, temp = (int(getattr(ma, f"{k}_size_in_bytes"))
                             for k in ("argument", "output", "alias", "temp"))
    peak = arg + out - alias + temp
    hbm_gib = topo["hbm_gib"] if hbm_gib is None else hbm_gib
    hbm = int(hbm_gib * 2**30)
    ca = compiled.cost_analysis()
    if isinstance(ca, list | tuple):
        ca = ca[0] if ca else {}
    ca = dict(ca or {})

    n_chips = len(devices)
    c = dict(hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
             layers=cfg.num_layers, vocab=v, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
             head_dim=cfg.head_dim, batch=config.batch_size, n_passes=tc.n_passes, seq=seq,
             n_ahead=tc.n_ahead, n_ahead_talk=tc.n_ahead_talk)
    fl = F.analytic_flops(c)
    model_flops = fl["qs_dense"]  # forward + 2x backward, attention as computed (dense)
    # Full rematerialisation runs the decoder's forward once more in the backward pass
    # (the replay); the vocabulary ops recompute their chunks too. Counted as 4/3.
    hw_flops = model_flops * (4 / 3 if cfg.remat == "full" else 1.0)
    per_chip_flops = hw_flops / n_chips
    t_compute = per_chip_flops / topo["peak_bf16"]
    bytes_ca = float(ca.get("bytes accessed", 0.0))
    t_memory = bytes_ca / topo["hbm_bw"]

    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))
    return {
        "topology": topo["name"], "libtpu_topology": topo["libtpu_name"],
        "num_slices": num_slices, "chips": n_chips,
        "device_kind": devices[0].device_kind, "chip_config": topo["chip_config"],
        "mesh": dict(mesh.shape),
        "model_source": source,
        "model": {"vocab_size": v, "hidden_size": cfg.hidden_size,
                  "intermediate_size": cfg.intermediate_size, "num_layers": cfg.num_layers,
                  "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads,
                  "dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "remat": cfg.remat,
                  "n_params": n_params},
        "thought": {"n_ahead": tc.n_ahead, "n_ahead_talk": tc.n_ahead_talk,
                    "n_passes": tc.n_passes},
        "batch_size": config.batch_size, "grad_accum": config.grad_accum,
        "grad_accum_dtype": config.get("grad_accum_dtype", "float32"),
        "micro_batch": config.batch_size // config.grad_accum, "seq_len": seq,
        "per_chip": {
            "argument_bytes": arg, "output_bytes": out, "alias_bytes": alias,
            "temp_bytes": temp, "peak_bytes": peak,
            "param_bytes": H.shard_bytes(state.params, st_sh.params),
            "opt_state_bytes": H.shard_bytes(state.opt_state, st_sh.opt_state),
            "hbm_bytes": hbm, "hbm_gib": hbm_gib, "chip_hbm_gib": topo["hbm_gib"],
        },
        "fits": peak <= hbm,
        "lower_s": t1 - t0, "compile_s": t2 - t1,
        "compiler_cost": {
            "flops": ca.get("flops"), "bytes_accessed": ca.get("bytes accessed"),
            "transcendentals": ca.get("transcendentals"),
            "note": "XLA's cost analysis counts a loop body once (the scanned layers, the "
                    "micro-batch scan): a lower bound, not the step's total",
        },
        "analytic_flops": {"model_flops_step": model_flops, "hardware_flops_step": hw_flops,
                           "hardware_flops_per_chip": per_chip_flops,
                           "ratio_to_plain": fl["ratio_dense"]},
        "roofline_estimate": {
            "note": "an estimate, not a measurement: analytic FLOPs (benchmarks/flops.py, "
                    "x4/3 for full remat) per chip / published peak bf16 FLOP/s; the memory "
                    "term uses the compiler's bytes accessed (loop bodies counted once, so a "
                    "lower bound); step >= max of the two",
            "chip_peak_bf16_flops": topo["peak_bf16"], "chip_hbm_bytes_per_s": topo["hbm_bw"],
            "compute_s": t_compute, "memory_s_lower_bound": t_memory,
            "step_s": max(t_compute, t_memory),
            "tokens_per_s_per_chip": config.batch_size * seq / max(t_compute, t_memory)
            / n_chips,
        },
        "largest_buffers": largest_buffers(hlo, 12),  # per chip, from the compiled HLO
        # upcasts, collectives and large results by named scope (benchmarks/hlo_report.py)
        "hlo_report": hlo_report(hlo),
        "libtpu": {"path": so, "version": version},
        "jax": jax.__version__,
        "source": H.source_state(),
        "argv": argv,
    }


def report_lines(r: dict[str, Any]) -> list[str]:
    """The printed summary of a report."""
    pc = r["per_chip"]
    m = r["model"]
    rf = r["roofline_estimate"]
    ca = r["compiler_cost"]
    mesh = tuple(r["mesh"].values())
    lines = [
        f"{r['topology']} ({r['chips']} chips, {r['device_kind']}), mesh (data, fsdp, tensor) "
        f"= {mesh}; {m['num_layers']} layers, {m['n_params'] / 1e9:.2f} B params "
        f"({r['model_source']}), {m['dtype']} compute, {m['param_dtype']} params, remat "
        f"{m['remat']}; {r['batch_size']} seqs ({r['grad_accum']} micro-batches of "
        f"{r['micro_batch']}) x {r['thought']['n_passes']} passes x {r['seq_len']} tokens, "
        f"n_ahead {r['thought']['n_ahead']}, talk {r['thought']['n_ahead_talk']}",
        f"per chip: arguments {pc['argument_bytes'] / GB:.2f} GB (params "
        f"{pc['param_bytes'] / GB:.2f}, optimizer {pc['opt_state_bytes'] / GB:.2f}), outputs "
        f"{pc['output_bytes'] / GB:.2f} GB, donated {pc['alias_bytes'] / GB:.2f} GB, "
        f"temporaries {pc['temp_bytes'] / GB:.2f} GB",
        f"peak per chip {pc['peak_bytes'] / GB:.2f} GB of {pc['hbm_bytes'] / GB:.1f} GB HBM "
        f"({pc['hbm_gib']} GiB): {'fits' if r['fits'] else 'DOES NOT FIT'} "
        f"({100 * pc['peak_bytes'] / pc['hbm_bytes']:.0f} %)",
        f"compile {r['compile_s']:.0f} s (lower {r['lower_s']:.0f} s); compiler's cost "
        f"analysis: {(ca['flops'] or 0):.3e} FLOPs, {(ca['bytes_accessed'] or 0):.3e} bytes "
        "(loop bodies counted once)",
        f"roofline estimate: {r['analytic_flops']['hardware_flops_per_chip']:.3e} FLOPs per "
        f"chip (analytic) -> {rf['compute_s']:.2f} s at {rf['chip_peak_bf16_flops'] / 1e12:.0f}"
        f" TFLOP/s; memory >= {rf['memory_s_lower_bound']:.3f} s; step >= {rf['step_s']:.2f} s,"
        f" <= {rf['tokens_per_s_per_chip']:.0f} tokens/s per chip",
    ]
    if "hlo_report" in r:
        hr = r["hlo_report"]
        coll = ", ".join(f"{k} {v['count']} ({v['total_bytes'] / GB:.2f} GB)"
                         for k, v in hr["collectives"].items()) or "none"
        lines.append(f"HLO (results >= 1 MiB): {hr['upcasts']['count']} bf16->f32 converts "
                     f"({hr['upcasts']['total_bytes'] / GB:.2f} GB); collectives: {coll}; "
                     f"custom calls: {hr['custom_calls'] or 'none'}")
    return lines


def default_out(r: dict[str, Any]) -> str:
    topo = r["topology"].replace(":", "_")
    mesh = "x".join(str(x) for x in r["mesh"].values())
    return os.path.join(HERE, "results", f"tpu_compile_{topo}_mesh{mesh}_"
                        f"{r['model']['num_layers']}l_b{r['micro_batch']}.json")


def _define_flags() -> None:
    """The command line's flags (defined only when run as a script, so that importing
    this module, as the tests do, leaves absl's flag registry alone)."""
    config_flags.DEFINE_config_file(
        "config", os.path.join(ROOT, "configs", "mistral7b_openwebmath.py"),
        "Config file, as train.py's; override fields with --config.FIELD=VALUE.",
        lock_config=True)
    flags.DEFINE_string("topology", None, "TPU slice: a libtpu topology name (v4:2x2x1, "
                        "v5p:2x2x4, v5e:4x4, v6e:2x4) or a slice name (v4-8, v5p-32, v5e-16).")
    flags.DEFINE_integer("num_slices", 1, "Slices joined over the mesh's data axis (multislice).")
    flags.DEFINE_string("mesh", None, "(data, fsdp, tensor), e.g. '1,4,2' or '(1,4,-1)'; "
                        "default config.mesh.")
    flags.DEFINE_string("out", None, "Write the JSON here (default benchmarks/results/"
                        "tpu_compile_<topology>_<layers>l.json).")
    flags.DEFINE_string("libtpu", None, "libtpu.so, or a directory holding it (a pip --target "
                        "directory); default: see the module docstring.")
    flags.DEFINE_bool("dump_hlo", False, "Also write the compiled HLO text next to --out.")
    flags.DEFINE_float("hbm_gib", None, "Check the fit against this many GiB per chip instead "
                       "of the chip's HBM (e.g. to keep headroom).")


def _fail(line: str) -> None:
    sys.stderr.write(f"tpu_compile.py: {line}\n")
    sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    if not f.topology:
        _fail("--topology is required (e.g. --topology v5p:2x2x1)")
    out = f.out
    try:
        r = compile_step(f.config, sys.argv, f.topology, num_slices=f.num_slices,
                         mesh_text=f.mesh, libtpu=f.libtpu, hbm_gib=f.hbm_gib,
                         hlo_path=(os.path.splitext(out)[0] + ".hlo.txt"
                                   if f.dump_hlo and out else None))
    except ToolError as e:
        _fail(str(e))
    for line in report_lines(r):
        print(line)
    out = out or default_out(r)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(r, fh, indent=1)
    print(f"wrote {out}")
    if not r["fits"]:
        pc = r["per_chip"]
        _fail(f"does not fit: needs {pc['peak_bytes'] / GB:.1f} GB per chip, the chip has "
              f"{pc['hbm_bytes'] / GB:.1f} GB")


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(" ".join(str(e).split()))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        _fail(f"bad config override: {' '.join(str(e).split())}")
    return []


if __name__ == "__main__":
    # Before jax is imported (the config file imports it): the step is compiled for the
    # TPU chips of a topology description; no backend other than the CPU's is opened.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _define_flags()
    app.run(main, flags_parser=_parse_flags)
