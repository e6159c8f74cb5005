"""Helpers shared by the mesh and multi-process tests: run the worker, read its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("_mesh_worker.py")
RTOL = 1e-5  # float32 agreement asked of losses and parameters across meshes
COMPARED = ("loss", "nll_base", "nll_thought", "policy_loss")


def worker_env() -> dict[str, str]:
    """The environment of a worker: the repository importable, no inherited XLA_FLAGS."""
    env = dict(os.environ, PYTHONPATH=str(WORKER.parents[1]))
    env.pop("XLA_FLAGS", None)
    return env


def run_worker(spec: dict, timeout: int = 600) -> None:
    """Run the worker with `spec`; fail with its stderr tail when it fails."""
    res = subprocess.run([sys.executable, str(WORKER), json.dumps(spec)], env=worker_env(),
                         capture_output=True, text=True, timeout=timeout, check=False)
    assert res.returncode == 0, f"worker failed ({res.returncode}):\n{res.stderr[-4000:]}"


def load_run(out: Path, name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata json, arrays npz) that the worker wrote for run `name`."""
    with open(out / f"{name}.json") as f:
        meta = json.load(f)
    with np.load(out / f"{name}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return meta, arrays


def rel_norm(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| (the plain difference norm when b is 0)."""
    den = float(np.linalg.norm(b))
    num = float(np.linalg.norm(a - b))
    return num / den if den else num
