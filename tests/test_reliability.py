"""Damaged files and bad input in the trainer and the Hugging Face loader: each ends
in one line naming the problem (or, for a damaged newest checkpoint, a fall-back to
the newest intact one), never a traceback from deep inside a library."""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path
from test_checkpoint_resume import tiny_config
from test_train_cli import train_py

from quietstar_jax import hf
from quietstar_jax.train import SetupError, loop
from quietstar_jax.train.config import ConfigError, validate_config


def _stderr_lines(out) -> list[str]:
    return [ln for ln in out.stderr.splitlines() if ln.strip() and "WARNING:absl" not in ln]


def truncated_copy(src: Path, dest: Path) -> Path:
    """A copy of the Hugging Face directory `src` whose model.safetensors is cut in half."""
    shutil.copytree(src, dest)
    weights = dest / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    return dest


# ------------------------------------------------------------------ safetensors


def test_truncated_safetensors_is_a_value_error_naming_the_file(tmp_path):
    bad = truncated_copy(shared_path("data", "stories260K-hf"), tmp_path / "m")
    with pytest.raises(ValueError) as e:
        hf.load_pretrained(bad)
    msg = str(e.value)
    assert str(bad / "model.safetensors") in msg and "\n" not in msg
    assert "not a readable safetensors file" in msg


def test_truncated_safetensors_in_train_cli_is_one_line(tmp_path):
    bad = truncated_copy(shared_path("data", "stories260K-hf"), tmp_path / "m")
    out = train_py("--config.model.hf_path=" + str(bad), "--config.data.num_documents=16",
                   "--workdir", str(tmp_path / "w"), timeout=300)
    lines = _stderr_lines(out)
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), out.stderr[-2000:]
    assert str(bad / "model.safetensors") in lines[0]
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("cli", ["generate", "evaluate"])
def test_truncated_safetensors_in_inference_clis_is_one_line(cli, tmp_path, capsys):
    from quietstar_jax import evaluate, generate_cli

    bad = truncated_copy(shared_path("data", "stories260K-hf"), tmp_path / "m")
    if cli == "generate":
        rc = generate_cli.main([str(bad), "--prompt", "Once", "--out", str(tmp_path / "g.json")])
    else:
        rc = evaluate.main([str(bad), "--tasks", "perplexity", "--text", str(tmp_path / "t.txt"),
                            "--out", str(tmp_path / "e.json")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0], err


# ------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run: checkpoints 2 and 4 (written synchronously), a reward
    page at step 4, summary.json."""
    cache = str(tmp_path_factory.mktemp("xla_cache"))
    work = tmp_path_factory.mktemp("finished") / "run"
    config = tiny_config(cache, num_steps=4, async_checkpointing=False, keep_checkpoints=3,
                         eval_examples=1, eval_every=0)
    summary = loop.run(config, str(work))
    assert summary["checkpoints"] == [2, 4]
    return config, work, summary


def _damage(step_dir: Path, kind: str) -> None:
    if kind == "truncated array file":
        files = [f for f in glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True)
                 if os.path.isfile(f)]
        biggest = max(files, key=os.path.getsize)
        with open(biggest, "r+b") as f:
            f.truncate(os.path.getsize(biggest) // 2)
    elif kind == "_METADATA deleted":
        os.remove(step_dir / "state" / "_METADATA")
    elif kind == "item directory deleted":
        shutil.rmtree(step_dir / "state")
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated array file", "_METADATA deleted",
                                  "item directory deleted"])
def test_damaged_newest_checkpoint_falls_back_and_is_kept(finished, kind, tmp_path, capfd):
    config, work, _ = finished
    wd = tmp_path / "run"
    shutil.copytree(work, wd)
    _damage(wd / "checkpoints" / "4", kind)
    before = sorted(os.listdir(wd / "checkpoints" / "4"))
    c = config.copy_and_resolve_references()
    c.num_steps = 6
    summary = loop.run(c, str(wd))
    err = capfd.readouterr().err
    assert summary["start_step"] == 2 and summary["final_step"] == 6
    assert "checkpoint step 4" in err and "damaged and skipped" in err, err
    assert summary["checkpoints"] == [2, 4, 6]  # step 4 written anew from the resumed run
    kept = wd / "checkpoints.damaged" / "4"
    assert sorted(os.listdir(kept)) == before  # moved aside whole, not deleted
    assert f"moved the damaged checkpoint step 4 to {kept}" in err


def test_no_intact_checkpoint_is_one_line_naming_the_directory(finished, tmp_path):
    config, work, _ = finished
    wd = tmp_path / "run"
    shutil.copytree(work, wd)
    for step in (2, 4):
        _damage(wd / "checkpoints" / str(step), "_METADATA deleted")
    c = config.copy_and_resolve_references()
    c.num_steps = 6
    with pytest.raises(SetupError) as e:
        loop.run(c, str(wd))
    msg = str(e.value)
    assert msg.startswith(f"no intact checkpoint in {wd / 'checkpoints'}") and "\n" not in msg
    assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4"]  # nothing removed


def test_resume_with_another_model_shape_is_one_line(finished, tmp_path):
    """The default config's model (hidden 64) on a workdir trained with hidden 16."""
    _, work, _ = finished
    wd = tmp_path / "run"
    shutil.copytree(work, wd)
    out = train_py("--workdir", str(wd), "--config.data.num_documents=64",
                   "--config.progress_bar=False", timeout=300)
    lines = _stderr_lines(out)
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: checkpoint step 4"), lines
    assert "params.embed has shape (260, 16) in the checkpoint but (260, 64) in the model" \
        in lines[0]
