"""Training-step benchmark: the Quiet-STaR update step against a plain next-token step.

    python benchmarks/step_benchmark.py                       # issue 7's CPU config + sweeps
    python benchmarks/step_benchmark.py --sweep none --steps 5
    python benchmarks/step_benchmark.py --preset gpu-1b       # bfloat16 1B Llama, seq 512 (GPU)
    python benchmarks/step_benchmark.py --profile             # where the step's time goes

Both steps are full updates on the same params, optimiser (global-norm clipping 1.0,
then AdamW, weight decay 0.001) and rows (`batch` sequences repeated `n_passes`
times):

* Quiet-STaR: `value_and_grad(quietstar_loss)` (the parallel rollout, NLL of the
  base and talk steps, REINFORCE) + the optimiser update;
* plain: the mean next-token NLL of `model.forward` + `logits_from_hidden` on the
  same rows (n_ahead = 1 style) + the same optimiser update.

Each configuration runs in a fresh subprocess, so its peak resident set (CPU) or
peak device memory (GPU/TPU) is its own. Times are after compilation (lowering and
compile times are reported separately), medians of `--steps` timed steps after
`--warmup` untimed ones, each ended by `jax.block_until_ready`. On the main
configuration the two steps are also timed interleaved (one Quiet-STaR step, then
plain steps, per round), so that a noisy machine loads both alike; the ratio is
reported both ways.

FLOPs are counted analytically (matmuls only: the base pass, one forward over all
positions per thought/talk step with attention over the base keys plus the
position's own keys, the logits where they are computed, the mixing head; backward
= 2x forward), both as the useful causal count and as executed (dense scores over
all base keys), and XLA's `cost_analysis()['flops']` of both compiled steps is
reported beside them. Output: a JSON file (`--out`), the JSON on stdout after the
line `JSON`, and a short table on the console (stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))

# Configuration fields every run carries (flags of the same names).
DEFAULTS: dict[str, Any] = dict(
    hidden=256, intermediate=768, layers=4, heads=8, kv_heads=4, head_dim=None, vocab=2048,
    model_type="mistral", batch=4, seq=128, n_passes=2, n_ahead=12, n_ahead_talk=4,
    dtype="float32", param_dtype="float32", remat="none", plain_remat=None, attention="xla",
    scan_layers=True,
    steps=5, warmup=2, plain_steps=None, interleave=0, seed=0, hf_path=None, text_path=None,
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

# Dense peak FLOP/s per chip by device kind (substring, lower case) and compute dtype.
PEAK_FLOPS = {
    # GPUs: dense tensor-core peaks (bf16/fp16; float32 is the TF32 tensor-core peak).
    "h200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "h100": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "a100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "l4": {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12},
    "a10": {"bfloat16": 125e12, "float16": 125e12, "float32": 62.5e12},
    # TPUs (per chip).
    "tpu v4": {"bfloat16": 275e12, "float32": 275e12 / 2},
    "tpu v5 lite": {"bfloat16": 197e12},
    "tpu v5e": {"bfloat16": 197e12},
    "tpu v5p": {"bfloat16": 459e12},
    "tpu v5": {"bfloat16": 459e12},
    "tpu v6": {"bfloat16": 918e12},
}


# --------------------------------------------------------------------------- FLOPs


def analytic_flops(c: dict[str, Any]) -> dict[str, float]:
    """Matmul FLOPs of one update step, Quiet-STaR and plain (forward + 2x backward).

    `useful` counts the causal attention a query needs (base keys j <= i); `dense` counts
    what the implementation computes (scores against all L base keys, then masked).
    Elementwise work (norms, rope, softmax, sampling, the optimiser) is not counted.
    """
    h, m, nl, v = c["hidden"], c["intermediate"], c["layers"], c["vocab"]
    nh, nkv = c["heads"], c["kv_heads"]
    d = c["head_dim"] or h // nh
    rows, seq = c["batch"] * c["n_passes"], c["seq"]
    tok = rows * seq
    linear = nl * (2 * h * (nh + 2 * nkv) * d + 2 * nh * d * h + 6 * h * m)  # per token
    attn_key = nl * 4 * nh * d  # per (query, key) pair: q.k and p.v
    logits = 2 * h * v  # per token
    mix = 2 * (2 * h * h + h * h + h)  # mixing head per token
    causal_keys = rows * seq * (seq + 1) / 2
    dense_keys = rows * seq * seq
    steps = c["n_ahead"] + c["n_ahead_talk"] - 2
    n_sample_logits = c["n_ahead"] - 3  # logits r_{s-1} for each sampled token
    n_talk = c["n_ahead_talk"]
    own_keys = tok * sum(range(1, steps + 1))  # step s sees its own keys of steps 1..s

    out = {}
    for kind, base_keys in (("useful", causal_keys), ("dense", dense_keys)):
        plain_fwd = tok * (linear + logits) + attn_key * base_keys
        qs_fwd = (
            plain_fwd  # base pass + base logits
            + steps * (tok * linear + attn_key * base_keys)  # thought/talk step forwards
            + attn_key * own_keys
            + (n_sample_logits + n_talk) * tok * logits
            + n_talk * tok * mix
        )
        out[f"plain_{kind}"] = 3.0 * plain_fwd
        out[f"qs_{kind}"] = 3.0 * qs_fwd
        out[f"ratio_{kind}"] = qs_fwd / plain_fwd
    # A breakdown of the useful Quiet-STaR forward (fractions), for the report.
    parts = {
        "base_pass_linear": tok * linear,
        "base_pass_attention": attn_key * causal_keys,
        "base_logits": tok * logits,
        "thought_steps_linear": steps * tok * linear,
        "thought_steps_attention_ctx": steps * attn_key * causal_keys,
        "thought_steps_attention_own": attn_key * own_keys,
        "sampling_logits": n_sample_logits * tok * logits,
        "talk_logits": n_talk * tok * logits,
        "mixing_head": n_talk * tok * mix,
    }
    total = sum(parts.values())
    out["qs_forward_parts"] = {k: x / total for k, x in parts.items()}
    return out


# --------------------------------------------------------------------------- the worker


def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes (Linux), else {}."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS", "VmHWM")):
                    out[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux `clear_refs` 5) so later readings give a phase's own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss() -> int:
    """Peak resident set of this process so far, bytes (ru_maxrss is KiB on Linux)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _cpu_snapshot() -> tuple[float, float, float]:
    """(wall seconds, this process's CPU seconds, whole machine's busy CPU seconds)."""
    t = os.times()
    busy = float("nan")
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...: busy = all but idle, iowait
        busy = (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return time.perf_counter(), t.user + t.system, busy


def _contention(a: tuple[float, float, float], b: tuple[float, float, float]) -> dict[str, float]:
    """CPU use between two snapshots, in cores: this process's, and every other
    process's (machine busy minus ours; steal time counts as busy)."""
    wall = b[0] - a[0]
    mine = (b[1] - a[1]) / wall
    return {"own_cores": mine, "other_cores": (b[2] - a[2]) / wall - mine}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Machine, versions and thread settings (imports jax)."""
    import jax
    import jaxlib
    import numpy as np
    import optax

    dev = jax.devices()
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in dev],
        "device_kind": dev[0].device_kind,
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "threads_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                    "TF_NUM_INTRAOP_THREADS")
                        if k in os.environ},
    }
    try:
        import flax

        env["flax"] = flax.__version__
    except ImportError:
        pass
    env["source"] = source_state()
    return env


def source_state() -> dict[str, Any]:
    """The commit and a hash of the measured code (model, thoughts, loss may be edited
    between runs: the figures belong to this state)."""
    import hashlib

    root = os.path.dirname(HERE)
    out: dict[str, Any] = {}
    try:
        out["commit"] = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "quietstar_jax"],
                               capture_output=True, text=True).stdout.split("\n")
        out["dirty_files"] = sorted(x[3:] for x in dirty if x.strip())
    except OSError:
        pass
    for name in ("model.py", "thoughts.py", "loss.py"):
        path = os.path.join(root, "quietstar_jax", name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                out[f"sha1_{name}"] = hashlib.sha1(f.read()).hexdigest()[:12]
    return out


def peak_flops(device_kind: str, dtype: str) -> float | None:
    kind = device_kind.lower()
    for key, table in PEAK_FLOPS.items():
        if key in kind:
            return table.get(dtype)
    return None


def _configs(c: dict[str, Any]):
    from quietstar_jax.model import ModelConfig
    from quietstar_jax.thoughts import ThoughtConfig

    v = c["vocab"]
    cfg = ModelConfig(
        vocab_size=v, hidden_size=c["hidden"], intermediate_size=c["intermediate"],
        num_layers=c["layers"], num_heads=c["heads"], num_kv_heads=c["kv_heads"],
        head_dim=c["head_dim"], model_type=c["model_type"], dtype=c["dtype"],
        param_dtype=c["param_dtype"], remat=c["remat"], scan_layers=c["scan_layers"],
        attention=c["attention"],
    )
    tc = ThoughtConfig(n_ahead=c["n_ahead"], n_ahead_talk=c["n_ahead_talk"],
                       n_passes=c["n_passes"], start_token_id=v - 2, end_token_id=v - 1,
                       pad_token_id=0)
    return cfg, tc


def _pretrained(c: dict[str, Any]):
    """(cfg, tc, params, ids) of the real checkpoint at c["hf_path"] with the defaults
    of `load_pretrained` (only dtypes and an explicit remat overridden), and the first
    `seq` tokens of the first `batch` documents of c["text_path"]."""
    import jax.numpy as jnp
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
    tc = qs.ThoughtConfig(n_ahead=c["n_ahead"], n_ahead_talk=c["n_ahead_talk"],
                          n_passes=c["n_passes"], **qs.thought_token_ids(tok))
    return cfg, tc, params, jnp.asarray(np.array(rows), jnp.int32)


def build(c: dict[str, Any]) -> dict[str, Any]:
    """Params, optimiser state, a batch and the two update functions (not jitted)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from quietstar_jax import model
    from quietstar_jax.loss import hidden_nll, masked_mean, quietstar_loss
    from quietstar_jax.thoughts import init_thought_params, shift_left
    from quietstar_jax.train.step import make_optimizer

    # The trainer's own optimizer: global-norm clipping, AdamW with its decay mask.
    opt, _ = make_optimizer(1e-6, total_steps=1000, weight_decay=0.001)
    if c["hf_path"]:
        cfg, tc, params, ids = _pretrained(c)
    else:
        cfg, tc = _configs(c)

        def init(key):
            p = model.init_params(cfg, key)
            return {**p, "thought": init_thought_params(p, cfg, jax.random.fold_in(key, 1), 5)}

        params = jax.jit(init)(jax.random.key(c["seed"]))
        rng = np.random.default_rng(c["seed"])
        ids = jnp.asarray(rng.integers(3, c["vocab"] - 2, (c["batch"], c["seq"])), jnp.int32)
    plain_cfg = cfg.replace(remat=c["plain_remat"] or cfg.remat)
    opt_state = jax.jit(opt.init)(params)
    mask = jnp.ones_like(ids)

    def qs_update(params, opt_state, ids, mask, step):
        key = jax.random.fold_in(jax.random.key(c["seed"]), step)
        (loss, _), grads = jax.value_and_grad(quietstar_loss, has_aux=True)(
            params, cfg, tc, ids, mask, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def plain_loss(params, ids, mask):
        x = jnp.repeat(ids, tc.n_passes, axis=0)
        m = jnp.repeat(mask, tc.n_passes, axis=0)
        h, _ = model.forward(params, plain_cfg, x, m)
        t = shift_left(x, 1)
        ok = shift_left(m.astype(bool), 1) & (t != tc.pad_token_id)
        nll = hidden_nll(params, plain_cfg, h, jnp.where(ok, t, 0))
        return masked_mean(jnp.where(ok, nll, 0.0), ok)

    def plain_update(params, opt_state, ids, mask, step):
        del step
        loss, grads = jax.value_and_grad(plain_loss)(params, ids, mask)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return dict(cfg=cfg, tc=tc, params=params, opt_state=opt_state, ids=ids, mask=mask,
                qs_update=qs_update, plain_update=plain_update, opt=opt)


def _cost_flops(compiled: Any) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(ca, list | tuple):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])


def _memory_analysis(compiled: Any) -> dict[str, int] | None:
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if ma is None:
        return None
    return {k: int(getattr(ma, k + "_size_in_bytes")) for k in
            ("argument", "output", "temp", "alias", "generated_code")}


class Stepper:
    """A compiled update that carries (donated) params and optimiser state along."""

    def __init__(self, fn, state: dict[str, Any], name: str):
        import jax

        self.name = name
        t0 = time.perf_counter()
        lowered = jax.jit(fn, donate_argnums=(0, 1)).lower(
            state["params"], state["opt_state"], state["ids"], state["mask"], 0)
        t1 = time.perf_counter()
        self.compiled = lowered.compile()
        t2 = time.perf_counter()
        from quietstar_jax.train.host_memory import release_freed_heap

        release_freed_heap()  # as the trainer does after compiling
        self.lower_s, self.compile_s = t1 - t0, t2 - t1
        self.state = state
        self.n = 0
        self.loss = None
        self.cpu_times: list[float] = []  # process CPU seconds of each call

    def __call__(self) -> float:
        import jax

        s = self.state
        c0 = os.times()
        t0 = time.perf_counter()
        s["params"], s["opt_state"], loss = self.compiled(
            s["params"], s["opt_state"], s["ids"], s["mask"], self.n)
        jax.block_until_ready((s["params"], s["opt_state"], loss))
        dt = time.perf_counter() - t0
        c1 = os.times()
        self.cpu_times.append(c1.user + c1.system - c0.user - c0.system)
        self.n += 1
        self.loss = float(loss)
        return dt


def _device_peak_bytes() -> int | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", 0)) or None


def matmul_rates(c: dict[str, Any], reps: int = 20) -> dict[str, float]:
    """XLA matmul throughput (FLOP/s) at the model's shapes on this backend: the
    achievable rate that bounds the steps (tokens x hidden @ hidden x mlp, the logits
    projection, and one large square matmul)."""
    import jax
    import jax.numpy as jnp

    tok = c["batch"] * c["n_passes"] * c["seq"]
    dt = jnp.dtype(c["dtype"])
    shapes = {"mlp_up [tok,h]x[h,m]": (tok, c["hidden"], c["intermediate"]),
              "logits [tok,h]x[h,v]": (tok, c["hidden"], c["vocab"]),
              "square 2048^3": (2048, 2048, 2048)}
    out = {}
    for name, (m, k, n) in shapes.items():
        a = jnp.ones((m, k), dt)
        b = jnp.ones((k, n), dt)
        f = jax.jit(lambda a, b: a @ b)
        jax.block_until_ready(f(a, b))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(f(a, b))
            ts.append(time.perf_counter() - t0)
        out[name] = 2 * m * k * n / statistics.median(ts)
    return out


def _summary(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "times_s": times}


def worker(c: dict[str, Any], mode: str) -> dict[str, Any]:
    """Measure one configuration: mode `both` (Quiet-STaR then plain), `qs` or `plain`."""
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    env = environment()
    import jax

    backend = jax.default_backend()
    b = build(c)
    state = {k: b[k] for k in ("params", "opt_state", "ids", "mask")}
    tokens = c["batch"] * c["seq"]
    rss_after_init = _proc_status().get("VmRSS")
    res: dict[str, Any] = {"config": c, "mode": mode, "env": env,
                           "input_tokens_per_step": tokens,
                           "rows": c["batch"] * c["n_passes"],
                           "rss_after_init_bytes": rss_after_init,
                           "flops": analytic_flops(c)}

    def measure(name: str, fn, n_steps: int) -> Stepper:
        _reset_peak_rss()
        st = Stepper(fn, state, name)
        compile_hwm = _proc_status().get("VmHWM")
        for _ in range(c["warmup"]):
            st()
        _reset_peak_rss()
        snap = _cpu_snapshot()
        st.cpu_times.clear()
        times = [st() for _ in range(n_steps)]
        cpu_s = list(st.cpu_times)
        cpu = _contention(snap, _cpu_snapshot())
        run_hwm = _proc_status().get("VmHWM")
        r = {
            "lower_s": st.lower_s, "compile_s": st.compile_s,
            "xla_flops": _cost_flops(st.compiled),
            "memory_analysis": _memory_analysis(st.compiled),
            "loss": st.loss,
            "peak_rss_process_bytes": _ru_maxrss() if backend == "cpu" else None,
            "peak_rss_compile_phase_bytes": compile_hwm if backend == "cpu" else None,
            "peak_rss_steps_phase_bytes": run_hwm if backend == "cpu" else None,
            "peak_device_bytes": _device_peak_bytes() if backend != "cpu" else None,
            "cpu_during_timing": cpu,
            # Process CPU seconds per step (all threads): less sensitive to other load
            # than wall time; / cores = the step time with both cores to ourselves and
            # no idle waiting.
            "cpu_s_median": statistics.median(cpu_s),
            "cpu_s": cpu_s,
            **_summary(times),
        }
        r["input_tokens_per_s"] = tokens / r["median_s"]
        res[name] = r
        return st

    if mode in ("both", "qs"):
        qs = measure("qs", b["qs_update"], c["steps"])
    if mode in ("both", "plain"):
        plain = measure("plain", b["plain_update"], c["plain_steps"] or 3 * c["steps"])
    if mode == "both":
        res["ratio_of_medians"] = res["qs"]["median_s"] / res["plain"]["median_s"]
        if c["interleave"]:
            rounds = []
            snap = _cpu_snapshot()
            for _ in range(c["interleave"]):
                tq = qs()
                tp = statistics.median(plain() for _ in range(3))
                rounds.append({"qs_s": tq, "plain_s": tp, "ratio": tq / tp})
            res["interleaved"] = {
                "rounds": rounds,
                "qs_median_s": statistics.median(r["qs_s"] for r in rounds),
                "plain_median_s": statistics.median(r["plain_s"] for r in rounds),
                "ratio_median": statistics.median(r["ratio"] for r in rounds),
                "cpu_during_timing": _contention(snap, _cpu_snapshot()),
            }
    if mode == "both":
        res["matmul_flops_per_s"] = matmul_rates(c)
    fl = res["flops"]
    pk = peak_flops(env["device_kind"], c["dtype"]) if backend != "cpu" else None
    for name in ("qs", "plain"):
        if name in res:
            r = res[name]
            r["achieved_flops_per_s_useful"] = fl[f"{name}_useful"] / r["median_s"]
            r["achieved_flops_per_s_dense"] = fl[f"{name}_dense"] / r["median_s"]
            if r["xla_flops"]:
                r["achieved_flops_per_s_xla"] = r["xla_flops"] / r["median_s"]
            r["mfu_useful"] = fl[f"{name}_useful"] / r["median_s"] / pk if pk else None
    res["peak_flops_per_s"] = pk
    res["loadavg_start"] = load0
    res["loadavg_end"] = os.getloadavg()
    res["wall_s"] = time.perf_counter() - t_start
    return res


# --------------------------------------------------------------------------- profile


def _hlo_metadata(hlo_text: str) -> dict[str, dict[str, Any]]:
    """HLO instruction name -> {op_name, stack, text} from a compiled module's text.

    `stack` is the Python call stack of the op, innermost first, as
    (file, function, line) from the module's StackFrames table.
    """
    import re

    files: dict[str, str] = {}
    funcs: dict[str, str] = {}
    locs: dict[str, tuple[str, str, int]] = {}
    frames: dict[str, tuple[str, str]] = {}
    section = None
    ent = re.compile(r"^(\d+)\s+(.*)$")
    kv = re.compile(r"(\w+)=(\d+)")
    out: dict[str, dict[str, Any]] = {}
    offset = 0
    inst = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")
    meta = re.compile(r"metadata=\{([^}]*)\}")
    for line in hlo_text.splitlines():
        s = line.strip()
        if s in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = s
            continue
        if section and ent.match(s):
            i, rest = ent.match(s).groups()
            if section == "FileNames":
                files[i] = rest.strip('"')
            elif section == "FunctionNames":
                funcs[i] = rest.strip('"')
            elif section == "FileLocations":
                d = dict(kv.findall(rest))
                locs[i] = (d.get("file_name_id", ""), d.get("function_name_id", ""),
                           int(d.get("line", 0)))
            else:
                d = dict(kv.findall(rest))
                frames[i] = (d.get("file_location_id", ""), d.get("parent_frame_id", ""))
            continue
        if not s:
            continue
        if section is not None:
            offset = _parent_offset(frames)
        section = None
        m = inst.match(line)
        if not m:
            continue
        d: dict[str, Any] = {"text": s[:300]}
        md = meta.search(line)
        if md:
            on = re.search(r'op_name="([^"]*)"', md.group(1))
            d["op_name"] = on.group(1) if on else ""
            sf = re.search(r"stack_frame_id=(\d+)", md.group(1))
            stack = []
            fid = sf.group(1) if sf else None
            seen = set()
            while fid and fid in frames and fid not in seen:
                seen.add(fid)
                loc_id, parent = frames[fid]
                f, fn, ln = locs.get(loc_id, ("", "", 0))
                stack.append((files.get(f, "?"), funcs.get(fn, "?"), ln))
                # XLA 0.10's text printer writes parent_frame_id one too high (a root
                # frame names itself); see _parent_offset.
                fid = str(int(parent) - offset) if parent else None
            d["stack"] = stack
        out[m.group(1)] = d
    return out


def _parent_offset(frames: dict[str, tuple[str, str]]) -> int:
    """1 if the StackFrames table's parent ids are printed one too high (some frame is its
    own parent, as jaxlib 0.10 prints them), else 0."""
    return int(any(parent == fid for fid, (_, parent) in frames.items()))


def _src(frame: tuple[str, str, int]) -> str:
    import linecache

    f, fn, ln = frame
    code = linecache.getline(f, ln).strip()
    return f"{os.path.basename(f)}:{ln} {fn}: {code[:70]}"


def _categorise(md: dict[str, Any]) -> tuple[str, str, str]:
    """(phase, region, operation) of an HLO op from its JAX metadata.

    phase: forward | backward | optimizer. region: the outermost line of thoughts.py /
    loss.py / the benchmark on the op's stack (which part of the step: base pass,
    thought steps, sampling, talk logits, ...). operation: the innermost line of the
    package (which computation: a q/k/v projection, attention scores, softmax, ...).
    """
    op_name = md.get("op_name", "")
    stack = md.get("stack", [])
    if any("optax" in f for f, _, _ in stack) or "optax" in op_name:
        return "optimizer", "optax update", "optax"
    phase = "backward" if "transpose(" in op_name else "forward"
    pkg = [fr for fr in stack if "quietstar_jax" in fr[0]]
    if not pkg:
        return phase, "(no package frame)", op_name.split("/")[-1] or "(no metadata)"
    # The line of thoughts.rollout (else of loss.quietstar_objective) on the stack says
    # which part of the step an op belongs to.
    region_fr = (next((fr for fr in pkg if fr[1] == "rollout"), None)
                 or next((fr for fr in pkg if fr[1] == "quietstar_objective"), None)
                 or pkg[-1])
    return phase, _src(region_fr), _src(pkg[0])


def _self_times(events: list[dict[str, Any]]) -> dict[str, float]:
    """Per HLO op, the seconds of its thunk events minus nested thunk events (a while
    loop's body ops run inside its event)."""
    by_tid: dict[Any, list[dict[str, Any]]] = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") == "X" and "hlo_op" in args and not e["name"].startswith("end:"):
            by_tid.setdefault(e.get("tid"), []).append(e)
    out: dict[str, float] = {}
    for evs in by_tid.values():
        evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0.0)))
        stack: list[list[Any]] = []  # [end, op, child_time]

        def close(item: list[Any], stack: list[list[Any]]) -> None:
            _, op, dur, child = item
            out[op] = out.get(op, 0.0) + (dur - child) / 1e6
            if stack:
                stack[-1][3] += dur

        for e in evs:
            ts, dur = e["ts"], e.get("dur", 0.0)
            while stack and stack[-1][0] <= ts:
                close(stack.pop(), stack)
            stack.append([ts + dur, e["args"]["hlo_op"], dur, 0.0])
        while stack:
            close(stack.pop(), stack)
    return out


def profile_trace(c: dict[str, Any], trace_dir: str, steps: int = 2) -> dict[str, Any]:
    """Trace `steps` Quiet-STaR updates; sum XLA thunk self-times by op, phase, region."""
    import glob
    import gzip
    import linecache

    import jax

    from quietstar_jax import loss, model, thoughts

    # Snapshot the package's source now, so that the lines quoted in the profile are the
    # ones compiled even if the files change while it runs.

    for mod in (loss, model, thoughts):
        linecache.getlines(mod.__file__)
    # Full Python stacks in the HLO metadata (the default keeps 10 frames, too few to
    # reach the rollout from inside a scanned layer).
    jax.config.update("jax_traceback_in_locations_limit", 200)
    b = build(c)
    state = {k: b[k] for k in ("params", "opt_state", "ids", "mask")}
    st = Stepper(b["qs_update"], state, "qs")
    for _ in range(c["warmup"]):
        st()
    meta = _hlo_metadata(st.compiled.as_text())
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    snap = _cpu_snapshot()
    times = [st() for _ in range(steps)]
    cpu = _contention(snap, _cpu_snapshot())
    jax.profiler.stop_trace()
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                             recursive=True), key=os.path.getmtime)
    with gzip.open(paths[-1]) as f:
        d = json.load(f)
    by_op = _self_times(d["traceEvents"] if isinstance(d, dict) else d)
    total = sum(by_op.values())
    agg: dict[str, dict[str, float]] = {"phase": {}, "region": {}, "operation": {},
                                        "phase_region": {}, "kind": {}, "phase_kind": {},
                                        "region_kind": {}}
    top, noframe = [], []

    def add(table: str, key: str, t: float) -> None:
        agg[table][key] = agg[table].get(key, 0.0) + t / steps

    for op, t in sorted(by_op.items(), key=lambda x: -x[1]):
        md = meta.get(op, {})
        phase, region, operation = _categorise(md)
        text = md.get("text", "")
        kind = ("matmul (dot / ynn_fusion)" if (" dot(" in text or "ynn_fusion" in op
                                                or "__onednn" in text)
                else "copy / transpose" if (" copy(" in text or " transpose(" in text)
                else "while/control" if " while(" in text
                else "fusion (elementwise, reduce)" if " fusion(" in text else "other")
        add("phase", phase, t)
        add("region", region, t)
        add("operation", f"{phase} | {operation}", t)
        add("phase_region", f"{phase} | {region}", t)
        add("kind", kind, t)
        add("phase_kind", f"{phase} | {kind}", t)
        add("region_kind", f"{region[:60]} | {kind}", t)
        if region == "(no package frame)" and len(noframe) < 25:
            noframe.append({"op": op, "s_per_step": t / steps, "hlo": text[:240]})
        if len(top) < 50:
            top.append({"op": op, "s_per_step": t / steps, "phase": phase, "region": region,
                        "operation": operation, "op_name": md.get("op_name", "")[-160:],
                        "hlo": text[:240]})
    srt = {k: dict(sorted(v.items(), key=lambda x: -x[1])) for k, v in agg.items()}
    return {
        "step_times_s": times,
        "cpu_s_per_step": statistics.median(st.cpu_times[-steps:]),
        "cpu_during_timing": cpu,
        "traced_op_seconds_per_step": total / steps,
        **{f"by_{k}_s_per_step": v for k, v in srt.items()},
        "top_ops": top,
        "top_ops_without_package_frame": noframe,
    }


def profile_components(c: dict[str, Any], reps: int = 3) -> dict[str, Any]:
    """Time the step's pieces as separate jitted functions (forward and forward+backward)."""
    import jax
    import jax.numpy as jnp

    from quietstar_jax import model
    from quietstar_jax.loss import quietstar_loss, token_nll
    from quietstar_jax.thoughts import mask_thought_logits, mixed_hidden

    b = build(c)
    cfg, tc, params = b["cfg"], b["tc"], b["params"]
    rows, seq = c["batch"] * c["n_passes"], c["seq"]
    ids = jnp.repeat(b["ids"], tc.n_passes, axis=0)
    mask = jnp.ones_like(ids)
    key = jax.random.key(0)

    def timeit(fn, *args) -> dict[str, float]:
        f = jax.jit(fn)
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        first = time.perf_counter() - t0
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts.append(time.perf_counter() - t0)
        return {"median_s": statistics.median(ts), "compile_and_first_s": first}

    def fwd_bwd(loss):
        return jax.value_and_grad(loss)

    out: dict[str, Any] = {}
    # Base pass: causal forward + base logits + NLL.
    def base_loss(p):
        h, kv = model.forward(p, cfg, ids, mask)
        z = model.logits_from_hidden(p, cfg, h)
        return jnp.mean(token_nll(z, ids)) + 0.0 * jnp.sum(kv.k[..., 0, 0])

    out["base_pass_fwd"] = timeit(base_loss, params)
    out["base_pass_fwd_bwd"] = timeit(fwd_bwd(base_loss), params)

    h0, kv0 = jax.jit(lambda p: model.forward(p, cfg, ids, mask))(params)
    idx = jnp.arange(seq)
    ctx_mask = jnp.broadcast_to((idx[None, :] <= idx[:, None])[None], (rows, seq, seq))
    positions = jnp.broadcast_to(idx, (rows, seq))
    emb = jax.random.normal(key, (rows, seq, cfg.hidden_size), cfg.compute_dtype) * 0.02

    def step_loss(p, kv0, own, s):
        own_mask = jnp.ones((rows, seq, s), bool)
        h, kv = model.decoder(p, cfg, emb, positions + s, ctx=(kv0, ctx_mask),
                              own=(tuple(own), own_mask))
        return jnp.mean(h * h) + 0.0 * jnp.sum(kv.k[..., 0, 0])

    for s in sorted({1, tc.num_steps // 2, tc.num_steps}):
        own = [model.KV(kv0.k * 0.5, kv0.v * 0.5) for _ in range(s - 1)]
        f = lambda p, kv, o, s=s: step_loss(p, kv, o, s)
        out[f"thought_step_{s}_fwd"] = timeit(f, params, kv0, own)
        out[f"thought_step_{s}_fwd_bwd"] = timeit(
            jax.value_and_grad(f, argnums=(0, 1, 2)), params, kv0, own)

    # One sampling step: logits of the previous step, mask, sample, REINFORCE log-prob.
    def sample_loss(p, h):
        r = mask_thought_logits(model.logits_from_hidden(p, cfg, h), tc)
        tok = jax.random.categorical(key, r)
        logp = jax.nn.log_softmax(r / tc.reinforce_temperature, axis=-1)
        return jnp.mean(jnp.take_along_axis(logp, tok[..., None], axis=-1))

    out["sampling_step_logits_fwd"] = timeit(sample_loss, params, h0)
    out["sampling_step_logits_fwd_bwd"] = timeit(
        jax.value_and_grad(sample_loss, argnums=(0, 1)), params, h0)

    # One talk step: mixing head, mixed logits, NLL.
    def talk_loss(p, h):
        mixed, _ = mixed_hidden(p, tc, h0, h, tc.n_ahead)
        return jnp.mean(token_nll(model.logits_from_hidden(p, cfg, mixed), ids))

    out["talk_step_mix_logits_fwd"] = timeit(talk_loss, params, h0)
    out["talk_step_mix_logits_fwd_bwd"] = timeit(
        jax.value_and_grad(talk_loss, argnums=(0, 1)), params, h0)

    # The whole loss: forward only, and forward + backward (no optimiser).
    def full_loss(p):
        return quietstar_loss(p, cfg, tc, b["ids"], b["mask"], key)[0]

    out["quietstar_loss_fwd"] = timeit(full_loss, params)
    out["quietstar_loss_fwd_bwd"] = timeit(jax.value_and_grad(full_loss), params)
    grads = jax.tree.map(lambda x: x * 1e-3, params)
    opt = b["opt"]
    out["optimizer_update"] = timeit(
        lambda g, s, p: opt.update(g, s, p), grads, b["opt_state"], params)

    # Sum of the parts, as the rollout composes them.
    def med(k):
        return out[k]["median_s"]

    mid = tc.num_steps // 2
    n = tc.num_steps
    est_steps = (med("thought_step_1_fwd_bwd") + (n - 2) * med(f"thought_step_{mid}_fwd_bwd")
                 + med(f"thought_step_{n}_fwd_bwd")) if n >= 2 else med("thought_step_1_fwd_bwd")
    out["estimate_from_parts_fwd_bwd"] = {
        "base_pass": med("base_pass_fwd_bwd"),
        "thought_steps": est_steps,
        "sampling_logits": tc.num_sampled * med("sampling_step_logits_fwd_bwd"),
        "talk_logits": tc.n_ahead_talk * med("talk_step_mix_logits_fwd_bwd"),
        "optimizer": med("optimizer_update"),
    }
    out["estimate_from_parts_fwd_bwd"]["sum"] = sum(out["estimate_from_parts_fwd_bwd"].values())
    return out


# --------------------------------------------------------------------------- driver


_WAIT_IDLE = {"max_s": 0.0, "cores": 0.3}


def wait_idle(max_s: float, cores: float = 0.3, window: float = 10.0) -> dict[str, float]:
    """Wait (at most `max_s`) until the machine's busy CPU, averaged over `window`
    seconds, is below `cores`: on a shared machine, start each measurement when the
    others are quiet. Returns the seconds waited and the last reading."""
    t0 = time.perf_counter()
    busy = float("nan")
    while True:
        a = _cpu_snapshot()
        time.sleep(window)
        b = _cpu_snapshot()
        busy = (b[2] - a[2]) / (b[0] - a[0])
        if busy < cores or time.perf_counter() - t0 > max_s:
            return {"waited_s": time.perf_counter() - t0, "busy_cores_before": busy}


def run_subprocess(c: dict[str, Any], mode: str, timeout: float | None = None) -> dict[str, Any]:
    """Run `worker(c, mode)` in a fresh Python process; return its result."""
    waited = wait_idle(_WAIT_IDLE["max_s"], _WAIT_IDLE["cores"]) if _WAIT_IDLE["max_s"] else {}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, json.dumps(c)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not lines:
        why = (p.stderr or p.stdout)[-4000:]
        if p.returncode == -9 and not why.strip():
            why = "killed by SIGKILL (out of memory?)"
        return {"config": c, "mode": mode, "error": why, "returncode": p.returncode,
                "wall_s": time.perf_counter() - t0, "wait_idle": waited}
    r = json.loads(lines[-1][len("RESULT "):])
    r["wait_idle"] = waited
    return r


def _fmt_bytes(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.2f} GiB"


def _log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


def _row(r: dict[str, Any], key: str) -> str:
    c = r["config"]
    if "error" in r:
        return f"| seq {c['seq']} n_ahead {c['n_ahead']} | ERROR {r['error'][-200:]!r} |"
    q = r.get(key, {})
    mem = q.get("peak_rss_process_bytes") or q.get("peak_device_bytes")
    note = " (remat=full: OOM without)" if "fallback" in r else ""
    return (f"| {c['seq']}{note} | {c['n_ahead']} | {q['median_s']:.3f} | "
            f"{q['input_tokens_per_s']:.1f} | {q['compile_s']:.1f} | {_fmt_bytes(mem)} |")


def generation_figures(args: argparse.Namespace) -> dict[str, Any]:
    """Cached vs recompute thinking generation (benchmarks/generation_benchmark.py, if any)."""
    path = os.path.join(HERE, "generation_benchmark.py")
    if not os.path.exists(path):
        return {"status": "benchmarks/generation_benchmark.py not present"}
    out = os.path.join(HERE, "results", "generation_from_step_benchmark.json")
    cmd = [sys.executable, path, *args.generation_args.split()]
    if "--out" not in args.generation_args and "--json" not in args.generation_args:
        cmd += ["--out", out]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    res: dict[str, Any] = {"command": " ".join(cmd), "returncode": p.returncode,
                           "stdout_tail": p.stdout[-3000:], "stderr_tail": p.stderr[-2000:]}
    if os.path.exists(out):
        with open(out) as f:
            res["result"] = json.load(f)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    for k, v in DEFAULTS.items():
        if k in ("scan_layers",):
            continue
        t = int if isinstance(v, int) or v is None and k in ("head_dim", "plain_steps") else str
        ap.add_argument(f"--{k}", type=t, default=None,
                        help=f"(preset cpu-small: {v})")
    ap.add_argument("--scan_layers", choices=("true", "false"), default=None)
    ap.add_argument("--sweep", choices=("none", "seq", "n_ahead", "all"), default="all")
    ap.add_argument("--sweep_steps", type=int, default=3, help="timed steps per sweep point")
    ap.add_argument("--sweep_seq", type=int, nargs="+", default=SWEEPS["seq"])
    ap.add_argument("--sweep_n_ahead", type=int, nargs="+", default=SWEEPS["n_ahead"])
    ap.add_argument("--oom_remat", action=argparse.BooleanOptionalAction, default=True,
                    help="rerun a sweep point killed for memory with remat=full (marked)")
    ap.add_argument("--variants", action="store_true",
                    help="also time remat none|full|dots x scan_layers true|false")
    ap.add_argument("--profile", action="store_true",
                    help="profile the main config (component timings and an XLA op trace)")
    ap.add_argument("--generation", action="store_true",
                    help="also run benchmarks/generation_benchmark.py")
    ap.add_argument("--generation_args", default="",
                    help="arguments for generation_benchmark.py")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/"
                    "step_<backend-preset>.json)")
    ap.add_argument("--wait_idle", type=float, default=0.0,
                    help="before each measured config wait up to this many seconds for the "
                    "machine to be idle (shared machines)")
    ap.add_argument("--idle_cores", type=float, default=0.3,
                    help="'idle': other processes' CPU use below this many cores")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure the main config this many times (fresh processes); the "
                    "report uses the run with the least other CPU load")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--profile_worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        mode, cfg = args.worker
        print("RESULT " + json.dumps(worker(json.loads(cfg), mode)), flush=True)
        return
    if args.profile_worker:
        c = json.loads(args.profile_worker)
        res = {"config": c, "loadavg_start": os.getloadavg(),
               "components": profile_components(c)}
        res["trace"] = profile_trace(c, os.path.join("/tmp", f"qs_trace_{os.getpid()}"))
        res["loadavg_end"] = os.getloadavg()
        print("RESULT " + json.dumps(res), flush=True)
        return

    c = dict(PRESETS[args.preset])
    for k in DEFAULTS:
        v = getattr(args, k)
        if v is not None:
            c[k] = (v == "true") if k == "scan_layers" else v
    _WAIT_IDLE.update(max_s=args.wait_idle, cores=args.idle_cores)
    main_c = dict(c, interleave=c["interleave"] or c["steps"])
    t_all = time.perf_counter()
    results: dict[str, Any] = {"preset": args.preset, "argv": sys.argv[1:],
                               "loadavg_start": os.getloadavg()}
    _log(f"main config: {json.dumps(main_c)}")
    repeats = []
    for i in range(args.repeat):
        r = run_subprocess(main_c, "both")
        repeats.append(r)
        if "error" not in r:
            _log(f"  run {i}: Quiet-STaR {r['qs']['median_s']:.3f} s, plain "
                 f"{r['plain']['median_s']:.3f} s, other processes' CPU "
                 f"{r['qs']['cpu_during_timing']['other_cores']:.2f} cores")
    ok = [r for r in repeats if "error" not in r]
    main_r = min(ok, key=lambda r: r["qs"]["cpu_during_timing"]["other_cores"]) if ok \
        else repeats[-1]
    results["main"] = main_r
    if len(repeats) > 1:
        results["main_repeats"] = repeats
    if "error" in main_r:
        _log("main config failed:\n" + main_r["error"])
        sys.exit(1)
    env = main_r["env"]
    results["env"] = env
    _log(f"backend {env['backend']} devices {env['devices']} ({env['cpu_model']}, "
         f"{env['cpu_affinity']} cores usable)")

    sweeps: dict[str, list[dict[str, Any]]] = {}
    todo = ["seq", "n_ahead"] if args.sweep == "all" else [] if args.sweep == "none" else [
        args.sweep]
    for name in todo:
        sweeps[name] = []
        for val in getattr(args, f"sweep_{name}"):
            sc = dict(c, **{name: val}, steps=args.sweep_steps,
                      warmup=min(c["warmup"], 1), interleave=0)
            if val == c[name]:
                r = main_r
            else:
                _log(f"sweep {name}={val} ...")
                # The plain step does not depend on n_ahead: time it only in the seq sweep.
                mode = "both" if name == "seq" else "qs"
                r = run_subprocess(sc, mode)
                if r.get("returncode") == -9 and sc["remat"] != "full" and args.oom_remat:
                    _log(f"  {name}={val} ran out of memory; again with remat=full")
                    oom = r
                    r = run_subprocess(dict(sc, remat="full"), mode)
                    r["fallback"] = {"reason": "out of memory with remat=" + sc["remat"],
                                     "failed_run": oom}
            sweeps[name].append(r)
            if "error" in r:
                _log(f"  failed: {r['error'][-500:]}")
            else:
                _log(f"  {name}={val}: {r['qs']['median_s']:.3f} s/step "
                     f"(compile {r['qs']['compile_s']:.1f} s)")
    results["sweeps"] = sweeps

    if args.variants:
        variants = []
        for remat in ("none", "full", "dots"):
            for scan in (True, False):
                vc = dict(c, remat=remat, scan_layers=scan, steps=args.sweep_steps,
                          warmup=min(c["warmup"], 1), interleave=0)
                if remat == c["remat"] and scan == c["scan_layers"]:
                    variants.append(main_r)
                    continue
                _log(f"variant remat={remat} scan_layers={scan} ...")
                variants.append(run_subprocess(vc, "qs"))
        results["variants"] = variants

    if args.profile:
        _log("profile ...")
        waited = wait_idle(args.wait_idle, args.idle_cores) if args.wait_idle else {}
        cmd = [sys.executable, os.path.abspath(__file__), "--profile_worker", json.dumps(c)]
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        results["profile"] = (json.loads(lines[-1][7:]) if lines
                              else {"error": p.stderr[-4000:]})
        results["profile"]["wait_idle"] = waited

    if args.generation:
        if args.wait_idle:
            wait_idle(args.wait_idle, args.idle_cores)
        results["generation"] = generation_figures(args)

    results["loadavg_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - t_all
    out = args.out or os.path.join(HERE, "results", f"step_{env['backend']}_{args.preset}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)

    # Console table.
    q, p_ = main_r["qs"], main_r["plain"]
    fl = main_r["flops"]
    _log("")
    _log("| step | median s | input tok/s | compile s | peak mem | analytic GFLOP "
         "| XLA GFLOP | achieved GFLOP/s |")
    _log("|---|---|---|---|---|---|---|---|")
    for name, r in (("Quiet-STaR", q), ("plain", p_)):
        k = "qs" if r is q else "plain"
        mem = r.get("peak_rss_process_bytes") or r.get("peak_device_bytes")
        xf = f"{r['xla_flops'] / 1e9:.1f}" if r.get("xla_flops") else "-"
        _log(f"| {name} | {r['median_s']:.3f} | {r['input_tokens_per_s']:.1f} "
             f"| {r['compile_s']:.1f} | {_fmt_bytes(mem)} | {fl[k + '_useful'] / 1e9:.1f} "
             f"| {xf} | {r['achieved_flops_per_s_useful'] / 1e9:.1f} |")
    inter = main_r.get("interleaved", {})
    _log(f"ratio Quiet-STaR / plain: {main_r['ratio_of_medians']:.2f} (medians), "
         f"{inter.get('ratio_median', float('nan')):.2f} (interleaved); theory "
         f"{fl['ratio_useful']:.2f} (useful), {fl['ratio_dense']:.2f} (as executed)")
    for name, rs in sweeps.items():
        _log(f"\nsweep {name}:\n| seq | n_ahead | s/step | input tok/s | compile s | peak mem |")
        _log("|---|---|---|---|---|---|")
        for r in rs:
            _log(_row(r, "qs"))
    _log(f"\nload average at start {results['loadavg_start']}, end {results['loadavg_end']}; "
         f"wrote {out}")
    print("JSON")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
