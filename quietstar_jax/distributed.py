"""Multi-process (multi-host) runs: start-up, the main process, global batches.

One JAX process runs per host (TPU pod slices, GPU clusters), or several on one
machine (CPU tests). `maybe_initialize` must run before anything touches a JAX
device. Where it finds its settings, in order:

1. the arguments (e.g. from `--coordinator_address` / `--num_processes` /
   `--process_id` flags);
2. the environment: `QUIETSTAR_COORDINATOR_ADDRESS`, `QUIETSTAR_NUM_PROCESSES`,
   `QUIETSTAR_PROCESS_ID` (or JAX's own `JAX_COORDINATOR_ADDRESS`,
   `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`);
3. a cluster JAX detects by itself: a multi-host TPU slice, SLURM or Open MPI
   with more than one task. Then `jax.distributed.initialize()` is called bare.

Otherwise the run is single-process and nothing is initialised.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

ENV_PREFIXES = ("QUIETSTAR_", "JAX_")


def _env(name: str, environ: Mapping[str, str]) -> str | None:
    for prefix in ENV_PREFIXES:
        value = environ.get(prefix + name)
        if value not in (None, ""):
            return value
    return None


def _int_setting(value: Any, name: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"distributed setting {name}={value!r} is not an integer") from None


def detected_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """Name of a multi-process cluster JAX can configure itself on, or None.

    Only the question "is this a job of more than one process?": the answers (address,
    count, id) are left to `jax.distributed.initialize`'s own detection, which has no
    public form of this question, queries the TPU metadata server, and would also
    start a one-process job under SLURM."""
    env = os.environ if environ is None else environ
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "ompi"
    return None


def distributed_settings(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any] | None:
    """The keyword arguments for `jax.distributed.initialize`, or None for one process.

    Arguments win over the environment. Raises ValueError, naming the values, for
    an incomplete or inconsistent set (e.g. a process id outside [0, num_processes)).
    """
    env = os.environ if environ is None else environ
    addr = coordinator_address or _env("COORDINATOR_ADDRESS", env)
    n = _int_setting(num_processes if num_processes is not None
                     else _env("NUM_PROCESSES", env), "num_processes")
    pid = _int_setting(process_id if process_id is not None
                       else _env("PROCESS_ID", env), "process_id")
    if addr is None and n is None and pid is None:
        return {} if detected_cluster(env) else None
    if n is not None and n < 1:
        raise ValueError(f"distributed setting num_processes={n} must be >= 1")
    if n == 1 and addr is None:
        return None
    if addr is None or n is None or pid is None:
        missing = [k for k, v in (("coordinator_address", addr), ("num_processes", n),
                                  ("process_id", pid)) if v is None]
        if detected_cluster(env) is None:
            raise ValueError(
                f"multi-process settings are incomplete: missing {', '.join(missing)} "
                f"(set them as flags or QUIETSTAR_* environment variables)"
            )
    if n is not None and pid is not None and not 0 <= pid < n:
        raise ValueError(f"distributed setting process_id={pid} is outside [0, {n})")
    return {k: v for k, v in (("coordinator_address", addr), ("num_processes", n),
                              ("process_id", pid)) if v is not None}


def maybe_initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Join a multi-process JAX job when one is configured; return whether it did.

    Call once, first thing, before any JAX device is used. Idempotent: a second call
    does nothing. `jax.distributed.initialize` fills in what the settings leave out
    from the cluster it detects, and on CPU its cross-process collectives are gloo's
    (JAX's default; `JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi` picks MPI).
    """
    env = os.environ if environ is None else environ
    if jax.distributed.is_initialized():
        return True
    settings = distributed_settings(coordinator_address, num_processes, process_id, env)
    if settings is None:
        return False
    jax.distributed.initialize(**settings)
    return True


def global_batch(
    local_rows: np.ndarray,
    sharding: jax.sharding.Sharding,
    global_batch_size: int,
) -> jax.Array:
    """A global `[global_batch_size, ...]` array from this process's rows.

    `local_rows` are rows `sharding.process_rows(sharding, global_batch_size)` of
    the global batch (every process passes its own share; together they cover it).
    """
    from quietstar_jax.sharding import process_rows

    local_rows = np.asarray(local_rows)
    shape = (global_batch_size, *local_rows.shape[1:])
    rows = process_rows(sharding, global_batch_size)
    if local_rows.shape[0] != rows.stop - rows.start:
        raise ValueError(
            f"process {jax.process_index()} supplied {local_rows.shape[0]} rows; its share of "
            f"the global batch {global_batch_size} is rows {rows.start}:{rows.stop} "
            f"({rows.stop - rows.start} rows)"
        )
    return jax.make_array_from_process_local_data(sharding, local_rows, shape)
