"""train.checkpoint's read side for evaluation and generation: which step directory a
workdir means, and the params of a step (orbax details stay in train.checkpoint)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quietstar_jax.train import checkpoint


def _save_step(workdir, step: int, params) -> None:
    import orbax.checkpoint as ocp

    ckpt = ocp.StandardCheckpointer()
    ckpt.save((workdir / checkpoint.CHECKPOINTS_DIR / str(step) / checkpoint.STATE_ITEM)
              .resolve(), {"params": params, "step": step})
    ckpt.wait_until_finished()


@pytest.fixture
def workdir(tmp_path):
    wd = tmp_path / "wd"
    (wd / checkpoint.CHECKPOINTS_DIR).mkdir(parents=True)
    (wd / "config.json").write_text(json.dumps({"model": {}}))
    for step in (2, 10):
        _save_step(wd, step, {"embed": np.full((3, 2), step, np.float32)})
    (wd / checkpoint.CHECKPOINTS_DIR / "11").mkdir()  # unfinished: no state item
    return wd


def test_workdir_means_its_newest_finished_step(workdir):
    assert checkpoint.training_step_dir(workdir) == (workdir, workdir / "checkpoints" / "10")
    params = checkpoint.load_checkpoint_params(workdir)
    np.testing.assert_array_equal(params["embed"], np.full((3, 2), 10, np.float32))


def test_step_directory(workdir):
    step_dir = workdir / "checkpoints" / "2"
    assert checkpoint.training_step_dir(step_dir) == (workdir, step_dir)
    np.testing.assert_array_equal(checkpoint.load_checkpoint_params(step_dir)["embed"],
                                  np.full((3, 2), 2, np.float32))


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no finished checkpoint"):
        checkpoint.training_step_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face directory"):
        checkpoint.training_step_dir(tmp_path / "checkpoints")


def test_damaged_step_is_one_line(workdir):
    state = workdir / "checkpoints" / "10" / "state"
    for f in state.rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"checkpoints/10: the checkpoint cannot be read") as e:
        checkpoint.load_checkpoint_params(workdir)
    assert "\n" not in str(e.value)
