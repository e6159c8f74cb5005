"""Meshes, sharding rules, activation constraints and bad-input errors.

The mesh-equivalence tests run `tests/_mesh_worker.py` in a subprocess with 8
simulated CPU devices (XLA_FLAGS must be set before jax is imported): one device,
then meshes (8,1,1), (2,4,1), (2,2,2), (1,4,2), 3 update steps each on the same
data, thoughts and initial parameters.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from _mesh_helpers import COMPARED, RTOL, load_run, rel_norm, run_worker
from jax.sharding import AbstractMesh, PartitionSpec

from quietstar_jax import distributed, sharding
from quietstar_jax.model import ModelConfig, param_shapes
from quietstar_jax.thought import thought_param_shapes

MESHES = {"m811": (8, 1, 1), "m241": (2, 4, 1), "m222": (2, 2, 2), "m142": (1, 4, 2)}
STEPS = 3


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mesh_runs")
    runs = [{"name": "single", "mesh": [1, 1, 1], "devices": 1, "steps": STEPS}]
    runs += [{"name": n, "mesh": list(m), "steps": STEPS} for n, m in MESHES.items()]
    run_worker({"devices": 8, "out": str(out), "runs": runs, "hf_check": {"mesh": [2, 2, 2]}})
    return out


@pytest.fixture(scope="module")
def mesh_222_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One device and the (2, 2, 2) mesh only (every axis split): the default run's check."""
    out = tmp_path_factory.mktemp("mesh_222_run")
    runs = [{"name": "single", "mesh": [1, 1, 1], "devices": 1, "steps": STEPS},
            {"name": "m222", "mesh": list(MESHES["m222"]), "steps": STEPS}]
    run_worker({"devices": 8, "out": str(out), "runs": runs})
    return out


# --------------------------------------------------------------------------- equivalence


def test_data_fsdp_and_tensor_mesh_matches_one_device(mesh_222_run: Path) -> None:
    """The default run's mesh check: (2, 2, 2) splits every axis at once; the slow tier
    runs the four meshes (`test_mesh_matches_one_device`)."""
    check_mesh_matches_one_device(mesh_222_run, "m222")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MESHES))
def test_mesh_matches_one_device(mesh_runs: Path, name: str) -> None:
    check_mesh_matches_one_device(mesh_runs, name)


def check_mesh_matches_one_device(runs: Path, name: str) -> None:
    """Run `name` of `runs` (a worker's output) against its one-device run: the loss trace
    and the final parameters within RTOL, the same initialisation, the same updates."""
    base_meta, base = load_run(runs, "single")
    meta, arrs = load_run(runs, name)
    assert tuple(meta["mesh"].values()) == MESHES[name]
    assert len(meta["trace"]) == len(base_meta["trace"]) == STEPS
    loss_diff = 0.0
    for step, (m, b) in enumerate(zip(meta["trace"], base_meta["trace"], strict=True)):
        for k in COMPARED:
            d = abs(m[k] - b[k]) / abs(b[k])
            loss_diff = max(loss_diff, d)
            assert d <= RTOL, (name, step, k, m[k], b[k])
        # The pre-clipping gradient norm (~1e5 here: policy_loss_beta = 1e6) sums many
        # large terms in a mesh-dependent order; float32 gives it ~1e-5 relative noise.
        assert abs(m["grad_norm"] - b["grad_norm"]) <= 1e-4 * b["grad_norm"], (name, step, m, b)
    finals = [k for k in base if k.startswith("final")]
    assert len(finals) == 19
    worst, worst_upd = {}, 0.0
    for k in finals:
        init_k = "init" + k[len("final"):]
        # Sharded initialisation gives the very same numbers on every mesh.
        np.testing.assert_array_equal(arrs[init_k], base[init_k], err_msg=init_k)
        worst[k] = rel_norm(arrs[k], base[k])
        assert worst[k] <= RTOL, (name, k, worst[k])
        # The updates themselves (not only the parameters) agree.
        upd = rel_norm(arrs[k] - arrs[init_k], base[k] - base[init_k])
        assert upd <= 1e-3, (name, k, "update", upd)
        worst_upd = max(worst_upd, upd)
        assert np.linalg.norm(base[k] - base[init_k]) > 0, f"{k} did not move"
    print(f"\n{name}: max relative loss difference {loss_diff:.2e}, max relative parameter "
          f"difference {max(worst.values()):.2e} ({max(worst, key=worst.get)}), max relative "
          f"update difference {worst_upd:.2e}")


def expected_specs(mesh: tuple[int, int, int]) -> dict[str, tuple]:
    """The spec each parameter of the tiny model must get, written out by hand."""
    f = "fsdp" if mesh[1] > 1 else None
    t = "tensor" if mesh[2] > 1 else None
    return {
        "['embed']": (t, f), "['lm_head']": (f, t), "['final_norm']": (),
        "['layers']['attn_norm']": (), "['layers']['mlp_norm']": (),
        "['layers']['attn']['q']": (None, f, t, None),
        "['layers']['attn']['k']": (None, f, t, None),
        "['layers']['attn']['v']": (None, f, t, None),
        "['layers']['attn']['o']": (None, t, None, f),
        "['layers']['mlp']['gate']": (None, f, t), "['layers']['mlp']['up']": (None, f, t),
        "['layers']['mlp']['down']": (None, t, f),
        "['thought']['start_emb']": (f,), "['thought']['end_emb']": (f,),
        "['thought']['mix']['w0']": (None, f), "['thought']['mix']['b0']": (f,),
        "['thought']['mix']['w1']": (None, f), "['thought']['mix']['b1']": (f,),
        "['thought']['mix']['w2']": (f, None),
    }


def _norm_spec(spec) -> tuple:
    spec = list(spec)
    while spec and spec[-1] is None:
        spec.pop()
    return tuple(tuple(s) if isinstance(s, list) else s for s in spec)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MESHES))
def test_parameter_and_optimizer_shardings_follow_rules(mesh_runs: Path, name: str) -> None:
    meta, _ = load_run(mesh_runs, name)
    mesh = MESHES[name]
    want = {k: _norm_spec(v) for k, v in expected_specs(mesh).items()}
    assert {k: _norm_spec(v) for k, v in meta["param_specs"].items()} == want
    assert {k: _norm_spec(v) for k, v in meta["mu_specs"].items()} == want
    assert meta["step_spec"] == []
    # Every device holds exactly its share, no more.
    for key in want:
        share = _share(key, mesh, want[key])
        assert meta["shard_shapes"][key] == [list(share)] * 8, (key, share)


def _tiny_shapes() -> dict[str, tuple[int, ...]]:
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2)
    shapes = {**param_shapes(cfg), "thought": thought_param_shapes(cfg)}
    flat = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    return {jax.tree_util.keystr(p): s for p, s in flat[0]}


def _share(key: str, mesh: tuple[int, int, int], spec: tuple) -> tuple[int, ...]:
    """The shape of one device's slice of param `key` under `spec`."""
    shape = _tiny_shapes()[key]
    spec = spec + (None,) * (len(shape) - len(spec))
    sizes = dict(zip(sharding.MESH_AXES, mesh, strict=True))
    return tuple(d // (sizes[a] if a else 1) for d, a in zip(shape, spec, strict=True))


@pytest.mark.slow
def test_hf_checkpoint_loads_straight_into_shardings(mesh_runs: Path) -> None:
    """`hf.load_params(..., sharding=sharding_by_path(mesh))`: every device gets only its
    slice (the rules' spec), and the values are the saved ones."""
    with open(mesh_runs / "hf_check.json") as f:
        got = json.load(f)
    assert got["equal"]
    want = {k: _norm_spec(v) for k, v in expected_specs((2, 2, 2)).items()}
    assert {k: _norm_spec(v) for k, v in got["specs"].items()} == want
    for key, shapes in got["shard_shapes"].items():
        assert len(shapes) == 8
        assert shapes == [list(_share(key, (2, 2, 2), want[key]))] * 8, key


# --------------------------------------------------------------------------- rules


def test_resolve_mesh_shape() -> None:
    assert sharding.resolve_mesh_shape((1, -1, 1), 8) == (1, 8, 1)
    assert sharding.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    assert sharding.resolve_mesh_shape({"fsdp": -1, "tensor": 2}, 8) == (1, 4, 2)
    with pytest.raises(ValueError, match=r"has 4 devices but JAX sees 8"):
        sharding.resolve_mesh_shape((2, 2, 1), 8)
    with pytest.raises(ValueError, match=r"8 devices are not divisible by 3"):
        sharding.resolve_mesh_shape((3, -1, 1), 8)
    with pytest.raises(ValueError, match="at most one axis"):
        sharding.resolve_mesh_shape((-1, -1, 1), 8)
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.resolve_mesh_shape({"model": 2}, 2)


def test_make_mesh_rejects_wrong_device_count() -> None:
    dev = jax.devices()[:1]
    mesh = sharding.make_mesh((1, -1, 1), dev)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match=r"\{'data': 2, 'fsdp': 1, 'tensor': 1\} has 2 devices "
                                         r"but JAX sees 1"):
        sharding.make_mesh((2, 1, 1), dev)


def test_logical_to_spec_rules() -> None:
    mesh = AbstractMesh((2, 4, 2), sharding.MESH_AXES)
    spec = sharding.logical_to_spec
    assert spec(("layers", "embed", "heads", "head_dim"), (2, 32, 4, 8), mesh) == \
        PartitionSpec(None, "fsdp", "tensor")
    assert spec(("batch", "seq", "act_embed"), (8, 16, 32), mesh) == \
        PartitionSpec(("data", "fsdp"))
    # A dimension its axes do not divide stays replicated (vocab 33 on tensor 2).
    assert spec(("vocab", "embed"), (33, 32), mesh) == PartitionSpec(None, "fsdp")
    # A mesh axis is used once per array: the second "embed" stays replicated.
    assert spec(("embed", "embed"), (32, 32), mesh) == PartitionSpec("fsdp")
    # Size-1 axes are dropped.
    small = AbstractMesh((1, 4, 1), sharding.MESH_AXES)
    assert spec(("batch", "seq", "vocab"), (8, 16, 64), small) == PartitionSpec("fsdp")
    with pytest.raises(ValueError, match="no sharding rule"):
        spec(("embd",), (32,), mesh)
    with pytest.raises(ValueError, match="do not match shape"):
        spec(("embed",), (32, 4), mesh)


def test_check_parallelism_names_the_numbers() -> None:
    cfg = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_layers=1,
                      num_heads=6, num_kv_heads=3)
    sharding.check_parallelism(AbstractMesh((2, 2, 3), sharding.MESH_AXES), cfg, 8)
    with pytest.raises(ValueError, match=r"global batch 6 is not divisible by the data-parallel "
                                         r"size 4 \(data=2 x fsdp=2\)"):
        sharding.check_parallelism(AbstractMesh((2, 2, 1), sharding.MESH_AXES), cfg, 6)
    with pytest.raises(ValueError, match=r"num_heads=6 is not divisible by the tensor axis "
                                         r"size 4"):
        sharding.check_parallelism(AbstractMesh((1, 1, 4), sharding.MESH_AXES), cfg, 8)
    with pytest.raises(ValueError, match=r"num_kv_heads=3 is not divisible by the tensor axis "
                                         r"size 2"):
        sharding.check_parallelism(AbstractMesh((1, 1, 2), sharding.MESH_AXES),
                                   cfg, 8)


def test_state_shardings_follow_params() -> None:
    from quietstar_jax.train.step import make_optimizer, state_shardings

    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=4, num_kv_heads=2)
    axes = sharding.params_logical_axes(cfg)
    shapes = {**param_shapes(cfg), "thought": thought_param_shapes(cfg)}
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, np.float32), shapes,
                            is_leaf=lambda x: isinstance(x, tuple))
    opt, _ = make_optimizer(1e-3, 10, weight_decay=1e-3)
    p_sh = sharding.param_shardings(mesh, abstract, axes)
    st = state_shardings(mesh, opt, abstract, p_sh)
    adam = st.opt_state[1][0]
    assert jax.tree.structure(adam.mu) == jax.tree.structure(p_sh)
    assert jax.tree.leaves(adam.mu) == jax.tree.leaves(p_sh)
    assert adam.count.spec == PartitionSpec()
    assert st.step.spec == PartitionSpec()
    # Besides the two moments only counters (Adam's, the schedule's), all replicated.
    leaves = jax.tree.leaves(st.opt_state)
    n_params = len(jax.tree.leaves(p_sh))
    assert len(leaves) == 2 * n_params + 2
    moments = {id(x) for x in jax.tree.leaves((adam.mu, adam.nu))}
    assert all(x.spec == PartitionSpec() for x in leaves if id(x) not in moments)


def test_constrain_is_a_noop_without_mesh() -> None:
    x = jax.numpy.ones((2, 3, 4))
    assert sharding.constrain(x, ("batch", "seq", "act_embed")) is x
    out = jax.jit(lambda y: sharding.constrain(y, ("batch", "seq", "vocab")) * 2)(x)
    np.testing.assert_array_equal(np.asarray(out), 2 * np.ones((2, 3, 4)))


def test_constrain_pins_sharding_under_mesh() -> None:
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    with sharding.use_mesh(mesh):
        out = jax.jit(lambda y: sharding.constrain(y, ("batch", "seq", "vocab")))(
            jax.numpy.ones((2, 3, 4)))
    assert out.sharding.mesh.axis_names == sharding.MESH_AXES
    with pytest.raises(ValueError, match=r"do not match the shape \(2, 3\)"):
        with sharding.use_mesh(mesh):
            jax.jit(lambda y: sharding.constrain(y, ("batch",)))(jax.numpy.ones((2, 3)))


# --------------------------------------------------------------------------- distributed


def test_distributed_settings_from_args_and_env() -> None:
    assert distributed.distributed_settings(environ={}) is None
    env = {"QUIETSTAR_COORDINATOR_ADDRESS": "10.0.0.1:1234", "QUIETSTAR_NUM_PROCESSES": "4",
           "QUIETSTAR_PROCESS_ID": "3"}
    assert distributed.distributed_settings(environ=env) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    # Arguments win over the environment; JAX_* names work too.
    jenv = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert distributed.distributed_settings(process_id=1, environ=jenv)["process_id"] == 1
    assert distributed.distributed_settings(num_processes=1, environ={}) is None
    with pytest.raises(ValueError, match=r"process_id=4 is outside \[0, 4\)"):
        distributed.distributed_settings("h:1", 4, 4, environ={})
    with pytest.raises(ValueError, match="missing process_id"):
        distributed.distributed_settings("h:1", 2, environ={})
    with pytest.raises(ValueError, match=r"num_processes='two' is not an integer"):
        distributed.distributed_settings("h:1", "two", 0, environ={})
    # A multi-host TPU slice or SLURM job: JAX discovers the rest by itself.
    assert distributed.distributed_settings(
        environ={"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == {}
    assert distributed.distributed_settings(environ={"SLURM_NTASKS": "8"}) == {}
    assert distributed.distributed_settings(environ={"SLURM_NTASKS": "1"}) is None


def test_single_process_helpers() -> None:
    assert distributed.maybe_initialize(environ={}) is False
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    b_sh = sharding.batch_sharding(mesh)
    assert sharding.process_rows(b_sh, 8) == slice(0, 8)
    x = np.arange(24, dtype=np.int32).reshape(8, 3)
    g = distributed.global_batch(x, b_sh, 8)
    np.testing.assert_array_equal(np.asarray(g), x)
    with pytest.raises(ValueError, match=r"supplied 4 rows; its share of the global batch 8 "
                                         r"is rows 0:8"):
        distributed.global_batch(x[:4], b_sh, 8)
    assert math.prod(g.shape) == 24


def test_memory_benchmark_finds_all_gathers_in_hlo() -> None:
    """The benchmark's HLO scan (which checks for gathered logits) reads both forms."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_scaling.py"
    spec = importlib.util.spec_from_file_location("memory_scaling", path)
    ms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ms)
    hlo = (
        "  %all-gather.3 = f32[16,64,8192]{2,1,0} all-gather(f32[2,64,8192]{2,1,0} %x), "
        "dimensions={0}\n"
        "  %ags = (bf16[64,4096]{1,0}, bf16[512,4096]{1,0}) all-gather-start(bf16[64,4096]"
        "{1,0} %w), dimensions={0}\n"
        "  %agd = bf16[512,4096]{1,0} all-gather-done((bf16[64,4096]{1,0}, bf16[512,4096]"
        "{1,0}) %ags)\n"
        "  %add = f32[16]{0} add(f32[16]{0} %a, f32[16]{0} %b)\n"
    )
    assert ms.all_gather_shapes(hlo) == [("f32", (16, 64, 8192)), ("bf16", (512, 4096))]
