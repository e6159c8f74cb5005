"""Subprocess worker for the mesh and multi-process tests (not a test module).

Runs a few Quiet-STaR update steps of a tiny model on a (data, fsdp, tensor) mesh
of simulated CPU devices, through the trainer's own pieces (`train.step`'s
optimiser, state shardings and jitted step, `train.checkpoint`'s orbax
checkpointer), and writes what the tests compare:

    python tests/_mesh_worker.py '<json spec>'

The spec (JSON) holds `devices` (simulated CPU devices of this process), `out`
(a directory), `runs` (a list of {"name", "mesh", "steps"}, optionally "devices": how many of
this process's devices the run uses, default all; "save_ckpt" / "restore_ckpt": an
orbax checkpoint directory written after the steps / restored before them, the
steps then counting on from the restored step), and optionally `distributed`
({"port", "num_processes", "process_id"}), and `hf_check` ({"mesh"}: see `hf_check`).

Each run writes `<out>/<name>.json` (per-step metrics, parameter specs) and
`<out>/<name>.npz` (initial and final parameters, gathered), on process 0 only.
XLA_FLAGS must be set before jax is imported, hence a process per device count.
"""

from __future__ import annotations

import json
import os
import sys


def host_copy(tree):
    """Every array of `tree` as a full numpy array on every process."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))

def _setup(spec: dict) -> None:
    # Cheaper CPU code generation: these tests check sharding, not XLA's CPU backend.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={spec['devices']}"
        + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"


def tiny_setup():
    """The tiny model, thought settings and the trainer's optimiser used by every run."""
    from quietstar_jax.model import ModelConfig
    from quietstar_jax.thought import ThoughtConfig
    from quietstar_jax.train.step import make_optimizer

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=64,
                      initializer_range=0.1)
    # policy_loss_beta=1 (not the paper's 1e6): the REINFORCE term still shapes the
    # gradients (policy loss ~0.1 vs NLL ~4), but float32 noise is not magnified 1e6-fold
    # before Adam normalises it, so 1e-5 agreement across meshes is a fair test.
    tc = ThoughtConfig(n_ahead=4, n_ahead_talk=2, n_passes=2, start_token_id=62,
                       end_token_id=63, pad_token_id=0, policy_loss_beta=1.0)
    opt, schedule = make_optimizer(1e-3, 100, weight_decay=1e-3, clip_norm=1.0)
    return cfg, tc, opt, schedule


GLOBAL_BATCH, SEQ = 8, 12


def global_batch_numpy(step: int):
    """The whole global batch of step `step` (every process can compute it)."""
    import numpy as np

    rng = np.random.default_rng(1000 + step)
    ids = rng.integers(1, 62, size=(GLOBAL_BATCH, SEQ)).astype(np.int32)
    mask = np.ones_like(ids)
    lengths = rng.integers(SEQ - 4, SEQ + 1, size=GLOBAL_BATCH)
    for r, n in enumerate(lengths):  # right padding with pad id 0
        ids[r, n:] = 0
        mask[r, n:] = 0
    return ids, mask


def init_fn(cfg):
    import jax

    from quietstar_jax.model import init_params
    from quietstar_jax.thought import init_thought_params

    def init():
        k1, k2 = jax.random.split(jax.random.key(0))
        p = init_params(cfg, k1)
        thought = init_thought_params(p, cfg, k2, init_token_id=5)
        # A non-zero last mixing layer: thoughts change the predictions from step 0, so
        # rewards are O(1) rather than float32 rounding noise (which beta=1e6 amplifies).
        thought["mix"]["w2"] = 0.3 * jax.random.normal(jax.random.key(3), (cfg.hidden_size, 1))
        return {**p, "thought": thought}

    return init


def _mu_specs(opt_sharding) -> dict[str, list]:
    """Param path -> spec of Adam's first moment, found anywhere in the optax state."""
    import jax

    out = {}
    for path, sh in jax.tree_util.tree_leaves_with_path(opt_sharding):
        key = jax.tree_util.keystr(path)
        if ".mu[" in key:
            out[key.split(".mu", 1)[1]] = _spec(sh)
    return out


def _spec(sh) -> list:
    return [list(a) if isinstance(a, tuple) else a for a in sh.spec]


def run_one(spec: dict, run: dict) -> None:
    """One run on one mesh, through the trainer's step, state shardings and checkpoints."""
    import jax
    import numpy as np

    from quietstar_jax import distributed, sharding
    from quietstar_jax.train.checkpoint import Checkpointer
    from quietstar_jax.train.step import init_state, make_train_step, state_shardings

    cfg, tc, opt, schedule = tiny_setup()
    n_dev = run.get("devices")
    devices = jax.devices()[:n_dev] if n_dev else jax.devices()
    mesh = sharding.make_mesh(run["mesh"], devices)
    sharding.check_parallelism(mesh, cfg, GLOBAL_BATCH)
    axes = sharding.params_logical_axes(cfg)
    params = sharding.sharded_init(init_fn(cfg), mesh, axes)
    p_sh = sharding.param_shardings(mesh, params, axes)
    st_sh = state_shardings(mesh, opt, params, p_sh)
    b_sh = sharding.batch_sharding(mesh)
    state = jax.jit(lambda p: init_state(p, opt), out_shardings=st_sh)(params)
    if run.get("restore_ckpt"):
        ckpt = Checkpointer(run["restore_ckpt"], async_save=False)
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, st_sh)
        state, _ = ckpt.restore(ckpt.latest_step(), abstract)
        ckpt.close()
    start = int(jax.device_get(state.step))
    init_host = host_copy(state.params)
    rows = sharding.process_rows(b_sh, GLOBAL_BATCH)
    step_fn = make_train_step(cfg, tc, opt, schedule=schedule, seed=7, mesh=mesh,
                              state_sharding=st_sh, batch_sharding=b_sh)
    trace = []
    with sharding.use_mesh(mesh):
        for step in range(start, start + run["steps"]):
            ids, mask = global_batch_numpy(step)
            batch = {"input_ids": distributed.global_batch(ids[rows], b_sh, GLOBAL_BATCH),
                     "attention_mask": distributed.global_batch(mask[rows], b_sh, GLOBAL_BATCH)}
            state, metrics = step_fn(state, batch)
            trace.append({k: float(v) for k, v in jax.device_get(metrics).items()
                          if np.ndim(v) == 0})
    if run.get("save_ckpt"):
        ckpt = Checkpointer(run["save_ckpt"], async_save=False)
        ckpt.save(int(jax.device_get(state.step)), state, {"note": "mesh test"})
        ckpt.close()
    final_host = host_copy(state.params)
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    out = {
        "mesh": dict(mesh.shape),
        "process_count": jax.process_count(),
        "start_step": start,
        "trace": trace,
        "rows": [rows.start, rows.stop],
        "param_specs": {jax.tree_util.keystr(k): _spec(v.sharding) for k, v in leaves},
        "mu_specs": _mu_specs(st_sh.opt_state),
        "step_spec": _spec(st_sh.step),
        "shard_shapes": {jax.tree_util.keystr(k): [list(s.data.shape)
                                                   for s in v.addressable_shards]
                         for k, v in leaves},
        "process_index": jax.process_index(),
    }
    suffix = "" if jax.process_index() == 0 else f".p{jax.process_index()}"
    with open(os.path.join(spec["out"], run["name"] + suffix + ".json"), "w") as f:
        json.dump(out, f)
    if jax.process_index() == 0:
        flat = lambda t, pre: {pre + jax.tree_util.keystr(k): v
                               for k, v in jax.tree_util.tree_leaves_with_path(t)}
        np.savez(os.path.join(spec["out"], run["name"] + ".npz"),
                 **flat(init_host, "init"), **flat(final_host, "final"))


def hf_check(spec: dict) -> None:
    """Save the tiny params as a Hugging Face checkpoint, load them straight into the
    shardings of `spec["hf_check"]["mesh"]`; write per-device shard shapes and whether
    every value came back (`<out>/hf_check.json`)."""
    import jax
    import numpy as np

    from quietstar_jax import hf, sharding

    cfg, _, _, _ = tiny_setup()
    params = jax.jit(init_fn(cfg))()
    path = os.path.join(spec["out"], "hf_ckpt")
    hf.save_pretrained(path, params, cfg)
    mesh = sharding.make_mesh(spec["hf_check"]["mesh"])
    loaded = hf.load_params(path, cfg, sharding=sharding.sharding_by_path(mesh))
    flat = jax.tree_util.tree_leaves_with_path(loaded)
    out = {
        "equal": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                     zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True)),
        "specs": {jax.tree_util.keystr(k): [list(a) if isinstance(a, tuple) else a
                                            for a in v.sharding.spec] for k, v in flat},
        "shard_shapes": {jax.tree_util.keystr(k): [list(s.data.shape)
                                                   for s in v.addressable_shards]
                         for k, v in flat},
    }
    with open(os.path.join(spec["out"], "hf_check.json"), "w") as f:
        json.dump(out, f)


def main() -> None:
    spec = json.loads(sys.argv[1])
    _setup(spec)
    from quietstar_jax import distributed

    d = spec.get("distributed")
    if d:
        distributed.maybe_initialize(f"127.0.0.1:{d['port']}", d["num_processes"],
                                     d["process_id"])
    for run in spec.get("runs", []):
        run_one(spec, run)
    if spec.get("hf_check"):
        hf_check(spec)
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("worker-done")


if __name__ == "__main__":
    main()
