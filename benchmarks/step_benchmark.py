"""Training-step benchmark: the Quiet-STaR update step against a plain next-token step.

    python benchmarks/step_benchmark.py                       # issue 7's CPU config + sweeps
    python benchmarks/step_benchmark.py --sweep none --steps 5
    python benchmarks/step_benchmark.py --preset gpu-1b       # bfloat16 1B Llama, seq 512 (GPU)
    python benchmarks/step_benchmark.py --profile             # where the step's time goes
    python benchmarks/step_benchmark.py --sweep none --think-k 8  # + sparse and fast plain

Both steps are the trainer's own update, `train.step.make_train_step` (see
benchmarks/harness.py: the trainer's optimizer, state, shardings and mesh), on the same
params and rows (`batch` sequences repeated `n_passes` times):

* Quiet-STaR: the trainer's step as it ships (`quietstar_loss`: the parallel rollout,
  NLL of the base and talk steps, REINFORCE), then clipping and AdamW;
* plain: the same step with `loss_fn=train.step.next_token_loss_fn` (the mean
  next-token NLL of `model.forward` on the same rows, n_ahead = 1 style);
* with `--think-k K`, also sparse: the Quiet-STaR step with `ThoughtConfig.think_k = K`
  and a think gate (only K positions per row think, `quietstar_jax/sparse.py`), and
  fast plain: the plain step with materialised logits
  (`train.step.materialised_next_token_loss_fn`), the fastest plain step on small
  batches; the ratios against it are in `sparse_ratios`.

Each configuration runs in a fresh subprocess, so its peak resident set (CPU) or
peak device memory (GPU/TPU) is its own. Times are after compilation (lowering and
compile times are reported separately), medians of `--steps` timed steps after
`--warmup` untimed ones, each ended by `jax.block_until_ready`. On the main
configuration the two steps are also timed interleaved (one Quiet-STaR step, then
plain steps, per round), so that a noisy machine loads both alike; the ratio is
reported both ways.

FLOPs are counted analytically (benchmarks/flops.py), both as the useful causal count
and as executed, and XLA's `cost_analysis()['flops']` of both compiled steps is
reported beside them. `--profile` (benchmarks/step_profile.py) traces the Quiet-STaR
step with `jax.profiler` and sums its ops' time by the named scope of the phase they
belong to. Output: a JSON file (`--out`), the JSON on stdout after the line `JSON`,
and a short table on the console (stderr).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import harness as H
from absl import flags
from flops import analytic_flops, peak_flops

HERE = os.path.dirname(os.path.abspath(__file__))

# Configuration fields every run carries (flags of the same names).
DEFAULTS: dict[str, Any] = dict(
    hidden=256, intermediate=768, layers=4, heads=8, kv_heads=4, head_dim=None, vocab=2048,
    model_type="mistral", batch=4, seq=128, n_passes=2, n_ahead=12, n_ahead_talk=4,
    dtype="float32", param_dtype="float32", remat="none", plain_remat=None, attention="xla",
    scan_layers=True,
    steps=5, warmup=2, plain_steps=None, interleave=0, seed=0, hf_path=None, text_path=None,
    think_k=None,
)

# The real SmolLM2-135M (Llama, 30 layers, vocab 49,152 + 2 thought tokens, tied head),
# converted once by `python ../shared/data/smollm2-135m/to_hf.py DIR` into a cache dir.
SMOLLM2_DIR = os.environ.get(
    "QUIETSTAR_SMOLLM2", os.path.expanduser("~/.cache/quietstar/smollm2-135m-hf"))
OPENWEBMATH = os.path.join(HERE, "..", "..", "shared", "data", "openwebmath",
                           "openwebmath_samples.txt")

PRESETS: dict[str, dict[str, Any]] = {
    # Issue 7: the authors' small Mistral-style model on CPU, float32. Full
    # rematerialisation is the leanest Quiet-STaR step on CPU and as fast as any other
    # policy (recomputing a layer costs about what writing and re-reading its
    # activations does); the plain step uses its own fastest policy ("dots"), so that
    # the ratio is not flattered by a slow baseline.
    "cpu-small": dict(DEFAULTS, remat="full", plain_remat="dots"),
    # A 1B-class Llama (TinyLlama-1.1B shapes, +2 thought tokens), bfloat16 compute with
    # float32 master weights, seq 512, full rematerialisation of each layer (without it
    # the 15 forwards' activations do not fit 80 GB; see BENCHMARKS.md).
    # The real SmolLM2-135M on OpenWebMath text, 2 sequences x 64 tokens, with every
    # numeric default of `load_pretrained` (remat=None: not overridden).
    "smollm2": dict(DEFAULTS, hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3,
                    head_dim=64, vocab=49154, model_type="llama", batch=2, seq=64,
                    remat=None, hf_path=SMOLLM2_DIR, text_path=OPENWEBMATH, steps=3,
                    warmup=1),
    # The same model in bfloat16 (float32 masters) at sequence 512, for a GPU.
    "gpu-smollm2": dict(DEFAULTS, hidden=576, intermediate=1536, layers=30, heads=9,
                        kv_heads=3, head_dim=64, vocab=49154, model_type="llama", batch=8,
                        seq=512, dtype="bfloat16", remat=None, hf_path=SMOLLM2_DIR,
                        text_path=OPENWEBMATH, steps=10, warmup=3),
    "gpu-1b": dict(DEFAULTS, hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4,
                   vocab=32002, model_type="llama", seq=512, dtype="bfloat16",
                   param_dtype="float32", remat="full", steps=10, warmup=3),
}

SWEEPS = {"seq": [64, 128, 256, 512], "n_ahead": [4, 8, 12, 16, 24]}


# --------------------------------------------------------------------------- the steps


def model_config(c: dict[str, Any]) -> Any:
    from quietstar_jax.model import ModelConfig

    return ModelConfig(
        vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
        num_layers=c["layers"], num_heads=c["heads"], num_kv_heads=c["kv_heads"],
        head_dim=c["head_dim"], model_type=c["model_type"], dtype=c["dtype"],
        param_dtype=c["param_dtype"], remat=c["remat"], scan_layers=c["scan_layers"],
        attention=c["attention"])


def _pretrained(c: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """(cfg, tc, params, ids) of the real checkpoint at c["hf_path"] with the defaults
    of `load_pretrained` (only dtypes and an explicit remat overridden), and the first
    `seq` tokens of the first `batch` documents of c["text_path"]."""
    import numpy as np

    import quietstar_jax as qs

    if not os.path.isdir(c["hf_path"]):
        sys.exit(f"step_benchmark: error: no checkpoint at {c['hf_path']}: make it with "
                 f"`python ../shared/data/smollm2-135m/to_hf.py {c['hf_path']}` (or set "
                 "QUIETSTAR_SMOLLM2)")
    kw = {} if c["remat"] is None else {"remat": c["remat"]}
    cfg, params, tok = qs.load_pretrained(c["hf_path"], c["dtype"], param_dtype=c["param_dtype"],
                                          **kw)
    want = dict(hidden_size=c["hidden"], intermediate_size=c["intermediate"],
                num_layers=c["layers"], num_heads=c["heads"], num_kv_heads=c["kv_heads"],
                vocab_size=c["vocab"])
    got = {k: getattr(cfg, k) for k in want}
    if got != want:
        sys.exit(f"step_benchmark: error: {c['hf_path']} has {got}, the preset says {want}")
    with open(c["text_path"]) as f:
        docs = [line for line in f.read().splitlines() if line.strip()]
    rows = [tok(d)["input_ids"][: c["seq"]] for d in docs if len(tok(d)["input_ids"]) >= c["seq"]]
    rows = (rows * c["batch"])[: c["batch"]]
    tc = H.thought_config(qs.thought_token_ids(tok), n_ahead=c["n_ahead"],
                          n_ahead_talk=c["n_ahead_talk"], n_passes=c["n_passes"])
    return cfg, tc, params, np.array(rows, np.int32)


def build(c: dict[str, Any]) -> dict[str, Any]:
    """The trainer's Quiet-STaR and plain steps (jitted, not compiled) and `holder`: the
    TrainState, the batch and the mesh they run on."""
    import jax
    import numpy as np

    from quietstar_jax import sharding

    # One device (the figures are per chip), as a mesh made current like the trainer's.
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    if c["hf_path"]:
        cfg, tc, params, ids = _pretrained(c)
    else:
        cfg = model_config(c)
        tc = H.thought_config(c["vocab"], n_ahead=c["n_ahead"], n_ahead_talk=c["n_ahead_talk"],
                              n_passes=c["n_passes"])
        params = H.init_model(cfg, c["seed"], mesh)
        rng = np.random.default_rng(c["seed"])
        ids = rng.integers(3, c["vocab"] - 2, (c["batch"], c["seq"])).astype(np.int32)
    setup = H.train_setup(cfg, mesh, params)
    b_sh = sharding.batch_sharding(mesh)
    batch = {"input_ids": jax.device_put(ids, b_sh),
             "attention_mask": jax.device_put(np.ones_like(ids), b_sh)}
    plain_cfg = cfg.replace(remat=c["plain_remat"] or cfg.remat)
    holder = {"state": H.initial_state(setup, params), "batch": batch, "mesh": mesh}
    out = dict(cfg=cfg, tc=tc, holder=holder,
               qs=H.make_step(cfg, tc, setup, seed=c["seed"]),
               plain=H.make_step(plain_cfg, tc, setup, plain=True, seed=c["seed"]))
    if c["think_k"]:  # sparse thoughts with a think gate, and the fast plain baseline
        from quietstar_jax.thought import init_gate_params

        params_g = {**params, "think_gate": init_gate_params(cfg, jax.random.key(c["seed"]))}
        setup_g = H.train_setup(cfg, mesh, params_g)
        out["holder_sparse"] = {"state": H.initial_state(setup_g, params_g), "batch": batch,
                                "mesh": mesh}
        out["sparse"] = H.make_step(cfg, tc.replace(think_k=c["think_k"]), setup_g,
                                    seed=c["seed"])
        out["fast_plain"] = H.make_step(plain_cfg, tc, setup, plain="fast", seed=c["seed"])
    return out


def measure(st: H.Stepper, c: dict[str, Any], n_steps: int, cpu: bool) -> dict[str, Any]:
    """Warm up, then time `n_steps` calls of a compiled step; memory and CPU readings."""
    compile_hwm = H.proc_status().get("VmHWM")
    for _ in range(c["warmup"]):
        st()
    H.reset_peak_rss()
    snap = H.cpu_snapshot()
    st.cpu_times.clear()
    times = [st() for _ in range(n_steps)]
    cpu_s = list(st.cpu_times)
    r = {
        "lower_s": st.lower_s, "compile_s": st.compile_s,
        "xla_flops": H.cost_flops(st.compiled),
        "memory_analysis": H.memory_analysis(st.compiled),
        "loss": st.loss,
        "peak_rss_process_bytes": H.ru_maxrss() if cpu else None,
        "peak_rss_compile_phase_bytes": compile_hwm if cpu else None,
        "peak_rss_steps_phase_bytes": H.proc_status().get("VmHWM") if cpu else None,
        "peak_device_bytes": H.device_peak_bytes() if not cpu else None,
        "cpu_during_timing": H.contention(snap, H.cpu_snapshot()),
        # Process CPU seconds per step (all threads): less sensitive to other load
        # than wall time; / cores = the step time with both cores to ourselves.
        "cpu_s_median": statistics.median(cpu_s),
        "cpu_s": cpu_s,
        **H.summary(times),
    }
    r["input_tokens_per_s"] = c["batch"] * c["seq"] / r["median_s"]
    return r


def interleaved(qs: H.Stepper, plain: H.Stepper, rounds: int) -> dict[str, Any]:
    """One Quiet-STaR step, then the median of 3 plain steps, per round."""
    out = []
    snap = H.cpu_snapshot()
    for _ in range(rounds):
        tq = qs()
        tp = statistics.median(plain() for _ in range(3))
        out.append({"qs_s": tq, "plain_s": tp, "ratio": tq / tp})
    return {"rounds": out,
            "qs_median_s": statistics.median(r["qs_s"] for r in out),
            "plain_median_s": statistics.median(r["plain_s"] for r in out),
            "ratio_median": statistics.median(r["ratio"] for r in out),
            "cpu_during_timing": H.contention(snap, H.cpu_snapshot())}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration: mode `both` (Quiet-STaR then plain), `qs` or `plain`."""
    c, mode = spec["config"], spec["mode"]
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    env = H.environment()
    cpu = env["backend"] == "cpu"
    b = build(c)
    res: dict[str, Any] = {"config": c, "mode": mode, "env": env,
                           "input_tokens_per_step": c["batch"] * c["seq"],
                           "rows": c["batch"] * c["n_passes"],
                           "rss_after_init_bytes": H.proc_status().get("VmRSS"),
                           "flops": analytic_flops(c)}
    steppers = {}
    names = ("qs", "plain") + (("sparse", "fast_plain") if c["think_k"] else ())
    for name in names:
        if mode in ("both", name) or (mode == "qs" and name == "sparse"):
            H.reset_peak_rss()
            holder = b["holder_sparse"] if name == "sparse" else b["holder"]
            steppers[name] = H.Stepper(b[name], holder, name)
            n = c["steps"] if name in ("qs", "sparse") else c["plain_steps"] or 3 * c["steps"]
            res[name] = measure(steppers[name], c, n, cpu)
    if "sparse" in res:
        sp = res["sparse"]["median_s"]
        res["sparse_ratios"] = {
            "sparse_over_qs": sp / res["qs"]["median_s"],
            **({"sparse_over_plain": sp / res["plain"]["median_s"],
                "sparse_over_fast_plain": sp / res["fast_plain"]["median_s"],
                "qs_over_fast_plain": res["qs"]["median_s"] / res["fast_plain"]["median_s"],
                "plain_over_fast_plain": (res["plain"]["median_s"]
                                          / res["fast_plain"]["median_s"])}
               if "fast_plain" in res else {}),
        }
        res["sparse"]["think_rate"] = float(steppers["sparse"].metrics["think_rate"])
    if mode == "both":
        res["ratio_of_medians"] = res["qs"]["median_s"] / res["plain"]["median_s"]
        if c["interleave"]:
            res["interleaved"] = interleaved(steppers["qs"], steppers["plain"], c["interleave"])
        res["matmul_flops_per_s"] = H.matmul_rates(c)
    fl = res["flops"]
    pk = None if cpu else peak_flops(env["device_kind"], c["dtype"])
    for name in steppers:
        r = res[name]
        if f"{name}_useful" not in fl:  # sparse / fast plain: XLA's count only
            if r["xla_flops"]:
                r["achieved_flops_per_s_xla"] = r["xla_flops"] / r["median_s"]
            continue
        r["achieved_flops_per_s_useful"] = fl[f"{name}_useful"] / r["median_s"]
        r["achieved_flops_per_s_dense"] = fl[f"{name}_dense"] / r["median_s"]
        if r["xla_flops"]:
            r["achieved_flops_per_s_xla"] = r["xla_flops"] / r["median_s"]
        r["mfu_useful"] = fl[f"{name}_useful"] / r["median_s"] / pk if pk else None
    res.update(peak_flops_per_s=pk, loadavg_start=load0, loadavg_end=os.getloadavg(),
               wall_s=time.perf_counter() - t_start)
    return res


# --------------------------------------------------------------------------- driver


def run_config(c: dict[str, Any], mode: str, script: str = __file__) -> dict[str, Any]:
    """`worker({config, mode})` in a fresh Python process (after waiting for quiet)."""
    w = H.WAIT_IDLE
    waited = H.wait_idle(w["max_s"], w["cores"]) if w["max_s"] else {}
    r = H.run_worker(script, ["--worker", json.dumps({"config": c, "mode": mode})])
    if "error" in r:
        r.update(config=c, mode=mode)
    r["wait_idle"] = waited
    return r


def main_config(c: dict[str, Any], repeat: int) -> dict[str, Any]:
    """The main config `repeat` times; the run with the least other CPU load."""
    main_c = dict(c, interleave=c["interleave"] or c["steps"])
    H.log(f"main config: {json.dumps(main_c)}")
    repeats = []
    for i in range(repeat):
        r = run_config(main_c, "both")
        repeats.append(r)
        if "error" not in r:
            H.log(f"  run {i}: Quiet-STaR {r['qs']['median_s']:.3f} s, plain "
                  f"{r['plain']['median_s']:.3f} s, other processes' CPU "
                  f"{r['qs']['cpu_during_timing']['other_cores']:.2f} cores")
    ok = [r for r in repeats if "error" not in r]
    best = min(ok, key=lambda r: r["qs"]["cpu_during_timing"]["other_cores"]) if ok \
        else repeats[-1]
    return {"main": best, **({"main_repeats": repeats} if repeat > 1 else {})}


def sweeps(args: SimpleNamespace, c: dict[str, Any], main_r: dict[str, Any]) -> dict:
    out: dict[str, list[dict[str, Any]]] = {}
    todo = {"all": ["seq", "n_ahead"], "none": []}.get(args.sweep, [args.sweep])
    for name in todo:
        out[name] = []
        for val in getattr(args, f"sweep_{name}"):
            sc = dict(c, **{name: val}, steps=args.sweep_steps,
                      warmup=min(c["warmup"], 1), interleave=0)
            if val == c[name]:
                out[name].append(main_r)
                continue
            H.log(f"sweep {name}={val} ...")
            # The plain step does not depend on n_ahead: time it only in the seq sweep.
            mode = "both" if name == "seq" else "qs"
            r = run_config(sc, mode)
            if r.get("returncode") == -9 and sc["remat"] != "full" and args.oom_remat:
                H.log(f"  {name}={val} ran out of memory; again with remat=full")
                oom = r
                r = run_config(dict(sc, remat="full"), mode)
                r["fallback"] = {"reason": "out of memory with remat=" + sc["remat"],
                                 "failed_run": oom}
            out[name].append(r)
            H.log(f"  failed: {r['error'][-500:]}" if "error" in r else
                  f"  {name}={val}: {r['qs']['median_s']:.3f} s/step "
                  f"(compile {r['qs']['compile_s']:.1f} s)")
    return out


def variants(args: SimpleNamespace, c: dict[str, Any], main_r: dict[str, Any]) -> list:
    """remat none|full|dots x scan_layers true|false (Quiet-STaR step)."""
    out = []
    for remat in ("none", "full", "dots"):
        for scan in (True, False):
            if remat == c["remat"] and scan == c["scan_layers"]:
                out.append(main_r)
                continue
            H.log(f"variant remat={remat} scan_layers={scan} ...")
            out.append(run_config(dict(c, remat=remat, scan_layers=scan,
                                       steps=args.sweep_steps, warmup=min(c["warmup"], 1),
                                       interleave=0), "qs"))
    return out


def generation_figures(args: SimpleNamespace) -> dict[str, Any]:
    """Cached vs recompute thinking generation (benchmarks/generation_benchmark.py)."""
    import subprocess

    out = os.path.join(HERE, "results", "generation_from_step_benchmark.json")
    cmd = [sys.executable, os.path.join(HERE, "generation_benchmark.py"),
           *args.generation_args.split()]
    if "--out" not in args.generation_args and "--json" not in args.generation_args:
        cmd += ["--out", out]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    res: dict[str, Any] = {"command": " ".join(cmd), "returncode": p.returncode,
                           "stdout_tail": p.stdout[-3000:], "stderr_tail": p.stderr[-2000:]}
    if os.path.exists(out):
        with open(out) as f:
            res["result"] = json.load(f)
    return res


def _row(r: dict[str, Any]) -> str:
    c = r["config"]
    if "error" in r:
        return f"| seq {c['seq']} n_ahead {c['n_ahead']} | ERROR {r['error'][-200:]!r} |"
    q = r["qs"]
    mem = q.get("peak_rss_process_bytes") or q.get("peak_device_bytes")
    note = " (remat=full: OOM without)" if "fallback" in r else ""
    return (f"| {c['seq']}{note} | {c['n_ahead']} | {q['median_s']:.3f} | "
            f"{q['input_tokens_per_s']:.1f} | {q['compile_s']:.1f} | {H.fmt_bytes(mem)} |")


def report(results: dict[str, Any], out: str) -> None:
    """The console table (stderr) and the JSON on stdout after the line `JSON`."""
    main_r = results["main"]
    fl = main_r["flops"]
    H.log("\n| step | median s | input tok/s | compile s | peak mem | analytic GFLOP "
          "| XLA GFLOP | achieved GFLOP/s |\n|---|---|---|---|---|---|---|---|")
    for name, k in (("Quiet-STaR", "qs"), ("plain", "plain")):
        r = main_r[k]
        mem = r.get("peak_rss_process_bytes") or r.get("peak_device_bytes")
        xf = f"{r['xla_flops'] / 1e9:.1f}" if r.get("xla_flops") else "-"
        H.log(f"| {name} | {r['median_s']:.3f} | {r['input_tokens_per_s']:.1f} "
              f"| {r['compile_s']:.1f} | {H.fmt_bytes(mem)} | {fl[k + '_useful'] / 1e9:.1f} "
              f"| {xf} | {r['achieved_flops_per_s_useful'] / 1e9:.1f} |")
    for name, k in (("sparse (think_k)", "sparse"), ("fast plain", "fast_plain")):
        if k not in main_r:
            continue
        r = main_r[k]
        mem = r.get("peak_rss_process_bytes") or r.get("peak_device_bytes")
        xf = f"{r['xla_flops'] / 1e9:.1f}" if r.get("xla_flops") else "-"
        H.log(f"| {name} | {r['median_s']:.3f} | {r['input_tokens_per_s']:.1f} "
              f"| {r['compile_s']:.1f} | {H.fmt_bytes(mem)} | - | {xf} | - |")
    if "sparse_ratios" in main_r:
        H.log("sparse step (think_k=" + str(main_r["config"]["think_k"]) + "): " + ", ".join(
            f"{k} {v:.2f}" for k, v in main_r["sparse_ratios"].items()))
    inter = main_r.get("interleaved", {})
    H.log(f"ratio Quiet-STaR / plain: {main_r['ratio_of_medians']:.2f} (medians), "
          f"{inter.get('ratio_median', float('nan')):.2f} (interleaved); theory "
          f"{fl['ratio_useful']:.2f} (useful), {fl['ratio_dense']:.2f} (as executed)")
    for name, rs in results["sweeps"].items():
        H.log(f"\nsweep {name}:\n| seq | n_ahead | s/step | input tok/s | compile s "
              "| peak mem |\n|---|---|---|---|---|---|")
        for r in rs:
            H.log(_row(r))
    H.log(f"\nload average at start {results['loadavg_start']}, end "
          f"{results['loadavg_end']}; wrote {out}")
    print("JSON")
    print(json.dumps(results))


def _define(fv: flags.FlagValues) -> None:
    # Imported here, not at the top: compare_hlo.py imports this module with the package
    # of another tree, which may predate the working tree's command lines.
    from quietstar_jax.command_line import define_integer_list

    flags.DEFINE_enum("preset", "cpu-small", sorted(PRESETS), "the configuration the other "
                      "flags change", flag_values=fv)
    for k, v in DEFAULTS.items():
        if k == "scan_layers":
            continue
        if k == "think_k":
            flags.DEFINE_integer(k, None, "sparse thoughts: also time the step with this "
                                 "many thinking positions per row (and a think gate) and a "
                                 "plain step with materialised logits", flag_values=fv)
            flags.DEFINE_alias("think-k", k, flag_values=fv)
        elif isinstance(v, int) or v is None and k in ("head_dim", "plain_steps"):
            flags.DEFINE_integer(k, None, f"(preset cpu-small: {v})", flag_values=fv)
        else:
            flags.DEFINE_string(k, None, f"(preset cpu-small: {v})", flag_values=fv)
    flags.DEFINE_enum("scan_layers", None, ["true", "false"], "(preset cpu-small: true)",
                      flag_values=fv)
    flags.DEFINE_enum("sweep", "all", ["none", "seq", "n_ahead", "all"], "the sweeps run",
                      flag_values=fv)
    flags.DEFINE_integer("sweep_steps", 3, "timed steps per sweep point", flag_values=fv)
    define_integer_list("sweep_seq", SWEEPS["seq"], "sequence lengths of the seq sweep", fv)
    define_integer_list("sweep_n_ahead", SWEEPS["n_ahead"], "n_ahead of the n_ahead sweep", fv)
    flags.DEFINE_boolean("oom_remat", True, "rerun a sweep point killed for memory with "
                         "remat=full (marked)", flag_values=fv)
    flags.DEFINE_boolean("variants", False, "also time remat none|full|dots x scan_layers "
                         "true|false", flag_values=fv)
    flags.DEFINE_boolean("profile", False, "profile the main config's Quiet-STaR step by phase "
                         "(step_profile.py)", flag_values=fv)
    flags.DEFINE_boolean("generation", False, "also run benchmarks/generation_benchmark.py",
                         flag_values=fv)
    flags.DEFINE_string("generation_args", "", "arguments for generation_benchmark.py",
                        flag_values=fv)
    flags.DEFINE_string("out", None, "JSON path (default benchmarks/results/"
                        "step_<backend-preset>.json)", flag_values=fv)
    flags.DEFINE_float("wait_idle", 0.0, "before each measured config wait up to this many "
                       "seconds for the machine to be idle (shared machines)", flag_values=fv)
    flags.DEFINE_float("idle_cores", 0.3, "'idle': other processes' CPU use below this many "
                       "cores", flag_values=fv)
    flags.DEFINE_integer("repeat", 1, "measure the main config this many times (fresh "
                         "processes); the report uses the run with the least other CPU load",
                         flag_values=fv)


def config_of(args: SimpleNamespace) -> dict[str, Any]:
    """The config: the preset with any flag of DEFAULTS' names applied."""
    c = dict(PRESETS[args.preset])
    for k in DEFAULTS:
        v = getattr(args, k)
        if v is not None:
            c[k] = (v == "true") if k == "scan_layers" else v
    return c


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: 0 done, 1 the main config failed, 2 bad flags (one line)."""
    from quietstar_jax.command_line import CommandLine  # not at the top: see _define

    summary = " ".join(__doc__.split("\n\n")[0].split())
    argv = list(sys.argv[1:] if argv is None else argv)
    command = CommandLine.script("benchmarks/step_benchmark.py", summary, _define)
    return command.main(lambda args: _run(args, argv), argv)


def _run(args: SimpleNamespace, argv: list[str]) -> int:
    """The main config, the sweeps and what the flags add; the JSON records `argv`."""
    c = config_of(args)
    H.WAIT_IDLE.update(max_s=args.wait_idle, cores=args.idle_cores)
    t_all = time.perf_counter()
    results: dict[str, Any] = {"preset": args.preset, "argv": argv,
                               "loadavg_start": os.getloadavg(), **main_config(c, args.repeat)}
    main_r = results["main"]
    if "error" in main_r:
        H.log("main config failed:\n" + main_r["error"])
        return 1
    env = results["env"] = main_r["env"]
    H.log(f"backend {env['backend']} devices {env['devices']} ({env['cpu_model']}, "
          f"{env['cpu_affinity']} cores usable)")
    results["sweeps"] = sweeps(args, c, main_r)
    if args.variants:
        results["variants"] = variants(args, c, main_r)
    if args.profile:
        H.log("profile ...")
        results["profile"] = run_config(c, "profile", os.path.join(HERE, "step_profile.py"))
    if args.generation:
        if args.wait_idle:
            H.wait_idle(args.wait_idle, args.idle_cores)
        results["generation"] = generation_figures(args)
    results.update(loadavg_end=os.getloadavg(), wall_s=time.perf_counter() - t_all)
    out = args.out or os.path.join(HERE, "results", f"step_{env['backend']}_{args.preset}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    report(results, out)
    return 0


if __name__ == "__main__":
    if not H.worker_main(sys.argv, worker):  # a config's run (run_config), else the command
        sys.exit(main())
