"""Checkpoints: preemption (SIGTERM) and resume are bit-exact; NaN never checkpointed;
only the last N kept; export to Hugging Face at the end."""

from __future__ import annotations

import json
import logging
import os
import signal

import _tiny_train
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quietstar_jax.train import loop
from quietstar_jax.train.checkpoint import Checkpointer

# Timing and host-side values differ between runs by nature; everything else must not.
UNTIMED = ("step_time_s", "tokens_per_s")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    # Identical programs across the runs below compile once.
    return str(tmp_path_factory.mktemp("xla_cache"))


def tiny_config(cache_dir, **overrides):
    """Two micro-batches per update, the last 2 checkpoints kept."""
    return _tiny_train.tiny_config(
        cache_dir, **{"grad_accum": 2, "keep_checkpoints": 2, **overrides})


def records(summary):
    return [{k: v for k, v in r.items() if k not in UNTIMED} for r in summary["history"]]


@pytest.fixture(scope="module")
def straight(cache_dir, tmp_path_factory):
    """Six steps without interruption, exporting a Hugging Face checkpoint at the end."""
    work = tmp_path_factory.mktemp("straight")
    export = str(work / "hf_export")
    summary = loop.run(tiny_config(cache_dir, export_hf_dir=export), str(work / "run"))
    return summary, export


def test_interrupted_and_resumed_run_is_bit_identical(straight, cache_dir, tmp_path):
    full, _ = straight
    assert full["final_step"] == 6 and not full["preempted"]

    def preempt_at_3(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the real handler, as on preemption

    work = str(tmp_path / "run")
    handler = signal.getsignal(signal.SIGTERM)
    first = loop.run(tiny_config(cache_dir), work, on_step=preempt_at_3)
    assert first["preempted"] and first["final_step"] == 3
    assert first["checkpoints"] == [2, 3]  # periodic, then the one SIGTERM asked for
    assert signal.getsignal(signal.SIGTERM) is handler  # the previous handler is back
    second = loop.run(tiny_config(cache_dir), work)
    assert second["start_step"] == 3 and second["final_step"] == 6

    resumed = records(first) + records(second)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    # Losses, rewards, thought log-probs (the sampled thoughts), grad norms, lr and the
    # data (batch hashes): all equal, bit for bit.
    assert resumed == records(full)
    assert len({r["batch_hash"] for r in resumed}) == 6
    for a, b in zip(jax.tree.leaves(full["final_state"]), jax.tree.leaves(second["final_state"]),
                    strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # The metrics file holds each step once, in order.
    with open(os.path.join(work, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 7))


def test_last_checkpoints_are_kept_and_complete(straight):
    full, _ = straight
    ckpt_dir = os.path.join(full["workdir"], "checkpoints")
    assert full["checkpoints"] == [4, 6]  # every 2 steps, keep 2
    assert sorted(os.listdir(ckpt_dir)) == ["4", "6"]  # no temporary directories left
    # A half-written step (orbax's temporary name) is never taken as the latest.
    os.makedirs(os.path.join(ckpt_dir, "8.orbax-checkpoint-tmp-123", "state"))
    assert Checkpointer(ckpt_dir).latest_step() == 6
    # Running again with the finished workdir resumes at the end: nothing to do.
    again = loop.run(tiny_config(None), full["workdir"])
    assert again["start_step"] == 6 and again["history"] == []


def test_workdir_holds_metrics_and_tensorboard(straight):
    full, _ = straight
    work = full["workdir"]
    with open(os.path.join(work, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for key in ("loss", "nll_base", "nll_thought", "policy_loss", "reward_mean", "reward_std",
                "mixing_weight_mean", "lr", "grad_norm", "tokens_per_s", "step_time_s"):
        assert key in rows[-1], key
    assert rows[0]["lr"] == 0.0 and rows[2]["lr"] == pytest.approx(1e-2)  # warm-up of 2
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(
        os.path.join(work, "tb")))
    assert json.load(open(os.path.join(work, "config.json")))["num_steps"] == 6


def test_export_holds_the_final_params_in_the_authors_layout(straight):
    full, export = straight
    from safetensors.numpy import load_file

    from quietstar_jax import hf

    tensors = load_file(os.path.join(export, "model.safetensors"))
    for key in ("start_embedding", "end_embedding", "talk_head.0.0.weight",
                "talk_head.0.4.weight"):
        assert key in tensors, key
    _, params, _ = hf.load_pretrained(export, add_thought_tokens=False)
    final = full["final_state"].params
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("metric, message", [
    ("policy_loss", "step 4: component policy_loss"),
    ("grad_norm", "non-finite gradient at step 4"),  # a finite loss with a broken update
])
def test_nan_stops_without_checkpointing_the_bad_step(cache_dir, tmp_path, monkeypatch, metric,
                                                      message):
    real = loop.make_train_step

    def poisoned(*args, **kwargs):
        step_fn = real(*args, **kwargs)

        def step(state, batch):
            n = int(state.step)
            state, metrics = step_fn(state, batch)
            if n == 3:  # the 4th update
                metrics = dict(metrics, **{metric: metrics[metric] * jnp.nan})
            return state, metrics

        return step

    monkeypatch.setattr(loop, "make_train_step", poisoned)
    work = str(tmp_path / "run")
    with pytest.raises(FloatingPointError, match=message):
        loop.run(tiny_config(cache_dir), work)
    # Step 4 would have been checkpointed (every 2 steps): only step 2 is on disk.
    assert Checkpointer(os.path.join(work, "checkpoints")).latest_step() == 2


def _abandoned_tensorstore_read_logs(tmp_path, caplog) -> list[str]:
    """Run the real case in a fresh event loop: a task awaiting a tensorstore open that
    fails, never awaited by anyone, then collected; return asyncio's error records."""
    import asyncio
    import gc

    import tensorstore as ts

    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "gone")}}

    async def abandon() -> None:
        task = asyncio.ensure_future(ts.open(spec))
        await asyncio.wait([task])
        del task

    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(abandon())
        gc.collect()
    return [r.getMessage().splitlines()[0] for r in caplog.records if r.name == "asyncio"]


def test_abandoned_tensorstore_reads_are_not_logged_while_checkpointing(tmp_path, caplog):
    """A damaged step's restore leaves tensorstore reads whose errors asyncio logs as
    "Task exception was never retrieved" when they are collected; the trainer has already
    said the step is damaged, so those records are dropped (not at --verbosity=0)."""
    from quietstar_jax.train.checkpoint import _LibraryNoise

    # An earlier Checkpointer in this process installed the filter for good: take it out
    # for the unfiltered baseline, so the next acquire puts it back.
    logging.getLogger("asyncio").removeFilter(_LibraryNoise._asyncio_filter)
    _LibraryNoise._asyncio_filtered = False
    unfiltered = _abandoned_tensorstore_read_logs(tmp_path, caplog)
    assert any(m.startswith("Task exception was never retrieved") for m in unfiltered)
    _LibraryNoise.acquire()
    try:
        assert _abandoned_tensorstore_read_logs(tmp_path, caplog) == []
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.INFO)  # what train.py --verbosity=0 sets
        try:
            assert _abandoned_tensorstore_read_logs(tmp_path, caplog) == unfiltered
        finally:
            absl_logger.setLevel(level)
    finally:
        _LibraryNoise.release()


def test_checkpoint_of_the_flat_layer_layout_is_refused_naming_it(tmp_path):
    """A checkpoint written before the decoder layer held `attn` and `mlp` submodules has
    the layer params side by side (`params.layers.q`): one CheckpointError saying so,
    never a restore into the wrong places."""
    from quietstar_jax.model import ModelConfig, init_params
    from quietstar_jax.train.checkpoint import CheckpointError

    cfg = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_layers=1,
                      num_heads=2, num_kv_heads=1)
    params = init_params(cfg, jax.random.key(0))
    layers = params["layers"]
    flat = {"attn_norm": layers["attn_norm"], "mlp_norm": layers["mlp_norm"],
            **layers["attn"], **layers["mlp"]}
    ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    try:
        ckpt.save(1, {"params": {**params, "layers": flat}}, {"position": 0})
        ckpt.wait()
        abstract = jax.eval_shape(lambda: {"params": params})
        with pytest.raises(CheckpointError, match=r"flat layer layout .*params\.layers\.q; "
                                                  r"now params\.layers\.attn\.q"):
            ckpt.check_matches(1, abstract)
        ckpt.save(2, {"params": params}, {"position": 0})  # today's layout: accepted
        ckpt.wait()
        ckpt.check_matches(2, abstract)
    finally:
        ckpt.close()
