"""Two JAX processes on loopback train like one process, and their checkpoint moves meshes.

Two processes (jax.distributed over 127.0.0.1 with gloo CPU collectives), each with
2 simulated CPU devices, run 3 update steps of a tiny model on a (1, 2, 2) mesh,
each feeding only its half of every global batch, and write an orbax checkpoint
together. Then one process with 4 devices runs 4 steps from scratch on the same
mesh, and restores the two-process checkpoint onto a (2, 1, 2) mesh and runs the
4th step from it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _mesh_helpers import COMPARED, RTOL, WORKER, load_run, rel_norm, run_worker, worker_env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(spec: dict, timeout: int = 600) -> None:
    """Start the worker as processes 0 and 1 of one job; fail with their stderr."""
    env = worker_env()
    port = free_port()
    procs = []
    for pid in range(2):
        s = dict(spec, distributed={"port": port, "num_processes": 2, "process_id": pid})
        procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(s)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    errors = []
    try:
        for pid, p in enumerate(procs):
            _, err = p.communicate(timeout=timeout)
            if p.returncode:
                errors.append(f"process {pid} exited {p.returncode}:\n{err[-3000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not errors, "\n".join(errors)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("multiprocess")
    ckpt = str(out / "ckpt_step3")
    run_two_processes({"devices": 2, "out": str(out), "runs": [
        {"name": "two_proc", "mesh": [1, 2, 2], "steps": 3, "save_ckpt": ckpt}]})
    run_worker({"devices": 4, "out": str(out), "runs": [
        {"name": "one_proc", "mesh": [1, 2, 2], "steps": 4},
        {"name": "restored", "mesh": [2, 1, 2], "steps": 1, "restore_ckpt": ckpt}]})
    return out


@pytest.mark.slow
def test_two_processes_give_the_one_process_loss_trace(runs: Path) -> None:
    two, _ = load_run(runs, "two_proc")
    one, _ = load_run(runs, "one_proc")
    with open(runs / "two_proc.p1.json") as f:
        two_p1 = json.load(f)
    assert two["process_count"] == 2 and one["process_count"] == 1
    assert two["mesh"] == one["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    # Each process fed only its own half of the global batch.
    assert (two["rows"], two_p1["rows"]) == ([0, 4], [4, 8])
    assert one["rows"] == [0, 8]
    assert len(two["trace"]) == 3
    worst = 0.0
    for step, (a, b) in enumerate(zip(two["trace"], one["trace"][:3], strict=True)):
        for k in COMPARED:
            d = abs(a[k] - b[k]) / abs(b[k])
            worst = max(worst, d)
            assert d <= RTOL, (step, k, a[k], b[k])
    print(f"\ntwo processes vs one: max relative loss difference {worst:.2e}")


@pytest.mark.slow
def test_checkpoint_of_two_processes_restores_on_another_mesh(runs: Path) -> None:
    two, two_arrays = load_run(runs, "two_proc")
    one, one_arrays = load_run(runs, "one_proc")
    res, res_arrays = load_run(runs, "restored")
    assert res["process_count"] == 1
    assert res["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2} != two["mesh"]
    assert res["start_step"] == 3
    finals = [k for k in two_arrays if k.startswith("final")]
    assert len(finals) == 19
    for k in finals:
        # The restored parameters are exactly the ones the two processes saved.
        np.testing.assert_array_equal(res_arrays["init" + k[5:]], two_arrays[k], err_msg=k)
        # ... and the 4th step from them lands where an uninterrupted run lands.
        assert rel_norm(res_arrays[k], one_arrays[k]) <= RTOL, k
    a, b = res["trace"][0], one["trace"][3]
    for k in COMPARED:
        assert abs(a[k] - b[k]) <= RTOL * abs(b[k]), (k, a[k], b[k])
