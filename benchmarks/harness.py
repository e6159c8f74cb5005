"""What every benchmark shares: the trainer's step and state, a timing Stepper, memory and
CPU readings, the machine/version/source record, and a subprocess runner.

The update step is the trainer's own (`quietstar_jax.train.step.make_train_step`), with
its optimizer (`config.optim` of the trainer's `base_config`: global-norm clipping,
AdamW with its decay mask, the warm-up schedule), its state (`init_state`, donated) and
its shardings (`state_shardings`, on a mesh the step is traced under, as the trainer
does; step_benchmark.py uses a one-device mesh, the memory plans their simulated ones);
the plain baseline is the same step with `loss_fn=next_token_loss_fn`. Thought configs
come from the trainer's builder (`train.config.thought_config`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# --------------------------------------------------------------------------- source trees


@contextlib.contextmanager
def revision_tree(rev: str) -> Iterator[str]:
    """A detached git worktree of revision `rev` of this repository, removed on exit.

    Made beside the repository (a hidden directory in its parent), so that its
    `../shared` is the repository's: the presets' data paths are relative to the tree."""
    tree = tempfile.mkdtemp(prefix=".rev_tree_", dir=os.path.dirname(ROOT))
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-q", tree, rev],
                   check=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], check=False)
        shutil.rmtree(tree, ignore_errors=True)


# --------------------------------------------------------------------------- trainer pieces


def trainer_config(**thought: Any) -> Any:
    """The trainer's `base_config()` with `config.thought` fields overridden."""
    from quietstar_jax.train.config import base_config

    config = base_config()
    for k, v in thought.items():
        config.thought[k] = v
    return config


def thought_config(token_ids: dict[str, int] | int, **fields: Any) -> Any:
    """ThoughtConfig by the trainer's builder. token_ids: a tokenizer's
    `{start,end,pad}_token_id`, or a vocabulary size (synthetic models: start v - 2,
    end v - 1, pad 0)."""
    from quietstar_jax.train.config import thought_config as build

    if isinstance(token_ids, int):
        v = token_ids
        token_ids = {"start_token_id": v - 2, "end_token_id": v - 1, "pad_token_id": 0}
    return build(trainer_config(**fields), token_ids)


def optimizer() -> tuple[Any, Any]:
    """(optimizer, schedule) of the trainer's default `config.optim`."""
    from quietstar_jax.train.step import optimizer_from_config

    config = trainer_config()
    return optimizer_from_config(config.optim, config.num_steps)


def init_model(cfg: Any, seed: int, mesh: Any = None) -> Any:
    """Random model + thought params (sharded on `mesh` when given, as the trainer)."""
    import jax

    from quietstar_jax import model, sharding
    from quietstar_jax.thought import init_thought_params

    def init(key: Any) -> Any:
        p = model.init_params(cfg, key)
        return {**p, "thought": init_thought_params(p, cfg, jax.random.fold_in(key, 1), 5)}

    key = jax.random.key(seed)
    if mesh is None:
        return jax.eval_shape(init, key)
    return sharding.sharded_init(init, mesh, sharding.params_logical_axes(cfg), key)


def train_setup(cfg: Any, mesh: Any, params: Any) -> dict[str, Any]:
    """The trainer's optimizer, schedule and shardings for `params` (arrays or abstract)."""
    from quietstar_jax import sharding
    from quietstar_jax.train.step import state_shardings

    opt, schedule = optimizer()
    p_sh = sharding.param_shardings(mesh, params, sharding.params_logical_axes(
        cfg, with_gate="think_gate" in params))
    return {"optimizer": opt, "schedule": schedule, "mesh": mesh,
            "state_sharding": state_shardings(mesh, opt, params, p_sh)}


def make_step(cfg: Any, tc: Any, setup: dict[str, Any], *, plain: bool | str = False,
              batch_sharding: Any = None, seed: int = 0) -> Any:
    """The trainer's jitted update (Quiet-STaR, or the plain next-token baseline:
    `plain=True` the chunked vocabulary path, `plain="fast"` materialised logits)."""
    from quietstar_jax import sharding
    from quietstar_jax.train.step import (
        make_train_step,
        materialised_next_token_loss_fn,
        next_token_loss_fn,
    )

    mesh = setup["mesh"]
    loss_fn = (materialised_next_token_loss_fn(cfg, tc) if plain == "fast" else
               next_token_loss_fn(cfg, tc) if plain else None)
    return make_train_step(
        cfg, tc, setup["optimizer"], schedule=setup["schedule"], seed=seed, mesh=mesh,
        state_sharding=setup["state_sharding"],
        batch_sharding=batch_sharding or sharding.batch_sharding(mesh),
        loss_fn=loss_fn)


def initial_state(setup: dict[str, Any], params: Any) -> Any:
    """`init_state` placed in the state shardings (as the trainer's `initial_state`)."""
    import jax

    from quietstar_jax.train.step import init_state

    return jax.jit(lambda p: init_state(p, setup["optimizer"]),
                   out_shardings=setup["state_sharding"])(params)


def shard_bytes(tree: Any, shardings: Any) -> int:
    """Bytes of one device's shards of `tree` (arrays or ShapeDtypeStructs)."""
    import jax
    import numpy as np

    return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True))


# --------------------------------------------------------------------------- timing


class Stepper:
    """A compiled trainer step that carries the (donated) TrainState along in `holder`."""

    def __init__(self, fn: Any, holder: dict[str, Any], name: str):
        import jax

        from quietstar_jax import sharding
        from quietstar_jax.train.host_memory import release_freed_heap

        self.name, self.holder, self.mesh = name, holder, holder["mesh"]
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            (holder["state"], holder["batch"]))
        t0 = time.perf_counter()
        with sharding.use_mesh(self.mesh):
            lowered = fn.lower(*abstract)
        t1 = time.perf_counter()
        self.compiled = lowered.compile()
        t2 = time.perf_counter()
        release_freed_heap()  # as the trainer does after compiling
        self.lower_s, self.compile_s = t1 - t0, t2 - t1
        self.loss: float | None = None
        self.metrics: dict[str, Any] = {}  # the last call's metrics (device arrays)
        self.cpu_times: list[float] = []  # process CPU seconds of each call

    def __call__(self) -> float:
        import jax

        h = self.holder
        c0 = os.times()
        t0 = time.perf_counter()
        h["state"], metrics = self.compiled(h["state"], h["batch"])
        jax.block_until_ready((h["state"], metrics))
        dt = time.perf_counter() - t0
        c1 = os.times()
        self.cpu_times.append(c1.user + c1.system - c0.user - c0.system)
        self.metrics = metrics
        self.loss = float(metrics["loss"])
        return dt


def summary(times: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "times_s": times}


def cost_flops(compiled: Any) -> float | None:
    """XLA's `cost_analysis()['flops']` of a compiled program, if the backend has it."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(ca, list | tuple):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])


def memory_analysis(compiled: Any) -> dict[str, int] | None:
    """Argument, output, temporary, alias and code bytes of a compiled program."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if ma is None:
        return None
    return {k: int(getattr(ma, k + "_size_in_bytes")) for k in
            ("argument", "output", "temp", "alias", "generated_code")}


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


# --------------------------------------------------------------------------- memory, CPU


def proc_status() -> dict[str, int]:
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


def reset_peak_rss() -> bool:
    """Reset VmHWM (Linux `clear_refs` 5) so later readings give a phase's own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def ru_maxrss() -> int:
    """Peak resident set of this process so far, bytes (ru_maxrss is KiB on Linux)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def device_peak_bytes() -> int | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", 0)) or None


def cpu_snapshot() -> tuple[float, float, float]:
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


def contention(a: tuple[float, float, float], b: tuple[float, float, float]) -> dict[str, float]:
    """CPU use between two snapshots, in cores: this process's, and every other
    process's (machine busy minus ours; steal time counts as busy)."""
    wall = b[0] - a[0]
    mine = (b[1] - a[1]) / wall
    return {"own_cores": mine, "other_cores": (b[2] - a[2]) / wall - mine}


WAIT_IDLE = {"max_s": 0.0, "cores": 0.3}


def wait_idle(max_s: float, cores: float = 0.3, window: float = 10.0) -> dict[str, float]:
    """Wait (at most `max_s`) until the machine's busy CPU, averaged over `window`
    seconds, is below `cores`: on a shared machine, start each measurement when the
    others are quiet. Returns the seconds waited and the last reading."""
    t0 = time.perf_counter()
    while True:
        a = cpu_snapshot()
        time.sleep(window)
        b = cpu_snapshot()
        busy = (b[2] - a[2]) / (b[0] - a[0])
        if busy < cores or time.perf_counter() - t0 > max_s:
            return {"waited_s": time.perf_counter() - t0, "busy_cores_before": busy}


# --------------------------------------------------------------------------- environment


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
    """The commit and a hash of the measured code (model, thoughts, loss, the train step
    may be edited between runs: the figures belong to this state)."""
    out: dict[str, Any] = {}
    try:
        out["commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "quietstar_jax"],
                               capture_output=True, text=True).stdout.split("\n")
        out["dirty_files"] = sorted(x[3:] for x in dirty if x.strip())
    except OSError:
        pass
    for name in ("model.py", "thought/parallel.py", "thought/loss.py", "train/step.py"):
        path = os.path.join(ROOT, "quietstar_jax", name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                out[f"sha1_{name}"] = hashlib.sha1(f.read()).hexdigest()[:12]
    return out


# --------------------------------------------------------------------------- subprocesses


def run_worker(script: str, args: list[str], *, env: dict[str, str] | None = None,
               timeout: float | None = None, tag: str = "RESULT") -> dict[str, Any]:
    """Run `python script *args` in a fresh process; return the JSON it printed after
    `tag `, or {"error", "returncode", "wall_s"}."""
    cmd = [sys.executable, os.path.abspath(script), *args]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                           env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "returncode": None,
                "wall_s": time.perf_counter() - t0}
    lines = [x for x in p.stdout.splitlines() if x.startswith(tag + " ")]
    if p.returncode or not lines:
        why = (p.stderr or p.stdout)[-4000:]
        if p.returncode == -9 and not why.strip():
            why = "killed by SIGKILL (out of memory?)"
        return {"error": why, "returncode": p.returncode, "wall_s": time.perf_counter() - t0}
    r = json.loads(lines[-1][len(tag) + 1:])
    if isinstance(r, dict):
        r.setdefault("wall_s", time.perf_counter() - t0)
    return r


def worker_main(argv: list[str], fn: Callable[[Any], Any], tag: str = "RESULT") -> bool:
    """In a worker process (`argv[1] == "--worker"`): print `tag` + JSON of
    `fn(json.loads(argv[2]))` and return True; else False."""
    if len(argv) > 2 and argv[1] == "--worker":
        print(f"{tag} " + json.dumps(fn(json.loads(argv[2]))), flush=True)
        return True
    return False


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


def fmt_bytes(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.2f} GiB"
