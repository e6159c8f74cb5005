"""Damaged files and bad input in the trainer and the Hugging Face loader: each ends
in one line naming the problem (or, for a damaged newest checkpoint, a fall-back to
the newest intact one), never a traceback from deep inside a library."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
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
    from quietstar_jax.evaluation import cli as evaluate
    from quietstar_jax.generation import cli as generate_cli

    bad = truncated_copy(shared_path("data", "stories260K-hf"), tmp_path / "m")
    if cli == "generate":
        rc = generate_cli.main([str(bad), "--prompt", "Once", "--out", str(tmp_path / "g.json")])
    else:
        (tmp_path / "t.txt").write_text("Once upon a time. " * 100)
        rc = evaluate.main([str(bad), "--tasks", "perplexity", "--text", str(tmp_path / "t.txt"),
                            "--out", str(tmp_path / "e.json")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2
    assert len(err) == 1 and ": error: " in err[0] and str(bad) in err[0], err


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


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated array file", "_METADATA deleted",
                                  "item directory deleted"])
def test_damaged_newest_checkpoint_falls_back_and_is_kept(finished, kind, tmp_path, caplog):
    config, work, _ = finished
    wd = tmp_path / "run"
    shutil.copytree(work, wd)
    _damage(wd / "checkpoints" / "4", kind)
    before = sorted(os.listdir(wd / "checkpoints" / "4"))
    c = config.copy_and_resolve_references()
    c.num_steps = 6
    summary = loop.run(c, str(wd))
    err = caplog.text  # the loop logs its warnings (train.py shows them on stderr)
    assert summary["start_step"] == 2 and summary["final_step"] == 6
    assert "checkpoint step 4" in err and "damaged and skipped" in err, err
    assert summary["checkpoints"] == [2, 4, 6]  # step 4 written anew from the resumed run
    kept = wd / "checkpoints.damaged" / "4"
    assert sorted(os.listdir(kept)) == before  # moved aside whole, not deleted
    assert f"moved it to {kept}" in err  # in the same line


@pytest.mark.slow
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


def test_second_run_on_a_finished_workdir_keeps_the_summary(finished, tmp_path):
    config, work, first = finished
    wd = tmp_path / "run"
    shutil.copytree(work, wd)
    earlier = json.loads((wd / "summary.json").read_text())
    assert earlier["reward_pages"] and earlier["compile_time_s"] is not None
    pages = [p.replace(str(work), str(wd)) for p in earlier["reward_pages"]]
    earlier["reward_pages"] = pages  # as if the run had been made in the copy
    (wd / "summary.json").write_text(json.dumps(earlier))
    summary = loop.run(config, str(wd))
    assert summary["start_step"] == summary["final_step"] == 4 and not summary["history"]
    again = json.loads((wd / "summary.json").read_text())
    assert again["reward_pages"] == pages
    assert again["compile_time_s"] == earlier["compile_time_s"]


# ------------------------------------------------------------------ config validation


def test_seq_len_past_max_positions_is_rejected_at_validation(tmp_path, monkeypatch):
    from test_train_cli import load_config, no_compile

    c = load_config("default")
    c.data.seq_len = 600
    with pytest.raises(ConfigError, match=r"config.data.seq_len=600 exceeds the model's "
                                          r"max_position_embeddings=512 "
                                          r"\(config.model.max_position_embeddings\)"):
        validate_config(c)
    stories = shared_path("data", "stories260K-hf")
    c = load_config("stories260k", str(stories.parent))
    c.data.seq_len = 1024
    with pytest.raises(ConfigError, match=rf"seq_len=1024 exceeds the model's "
                                          rf"max_position_embeddings=512 \({stories}/config.json"):
        validate_config(c)
    no_compile(monkeypatch)
    monkeypatch.setattr(hf, "load_params", lambda *a, **k: pytest.fail("loaded the weights"))
    with pytest.raises(SetupError, match="seq_len=1024 exceeds"):
        loop.run(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------ timing and the log


@pytest.fixture(scope="module")
def timed_run(tmp_path_factory):
    """Ten steps with a (synchronous) checkpoint after each and a reward page every
    third, recording when the loop asks for each batch; stdout captured (the loop's
    lines as train.py shows them: `console.show_logs`)."""
    import contextlib
    import io

    from quietstar_jax.console import show_logs
    from quietstar_jax.train import data

    cache = str(tmp_path_factory.mktemp("xla_cache"))
    calls: list[float] = []
    original = data.TokenBatches.__next__

    def timed_next(self):
        calls.append(time.time())
        return original(self)

    data.TokenBatches.__next__ = timed_next
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), show_logs():
            config = tiny_config(cache, num_steps=10, checkpoint_every=1,
                                 async_checkpointing=False, eval_examples=1, eval_every=3,
                                 keep_checkpoints=2)
            summary = loop.run(config, str(tmp_path_factory.mktemp("timed") / "run"))
            end = time.time()
    finally:
        data.TokenBatches.__next__ = original
    return summary, calls, end, out.getvalue()


@pytest.mark.slow
def test_step_times_sum_to_the_loops_wall_time(timed_run):
    """From the second step on (the first may still warm up), the logged step times add
    up to the wall time between asking for step 2's batch and the end of the run:
    checkpoint and reward-page time is charged to the step that wrote them."""
    summary, calls, end, _ = timed_run
    steps = summary["history"]
    assert [r["step"] for r in steps] == list(range(1, 11)) and len(calls) == 10
    logged = sum(r["step_time_s"] for r in steps[1:])
    wall = end - calls[1]
    assert abs(logged - wall) <= 0.1 * wall, (logged, wall)
    for r in steps:
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_time_s"])


@pytest.mark.slow
def test_compile_is_announced_with_its_time_and_not_charged_to_a_step(timed_run):
    summary, _, _, out = timed_run
    lines = out.splitlines()
    i = lines.index("compiling the train step ...")
    m = re.fullmatch(r"compiled the train step in ([\d.]+) s", lines[i + 1])
    assert m and float(m.group(1)) == pytest.approx(summary["compile_time_s"], abs=0.1)
    assert lines[i + 2].startswith("step 1: ")


def test_log_line_shows_the_nll_and_the_weighted_policy_term(timed_run):
    summary, _, _, out = timed_run
    beta = 10.0  # tiny_config's policy_loss_beta
    for r in summary["history"]:
        assert r["policy_term"] == pytest.approx(beta * r["policy_loss"])
        assert r["loss"] == pytest.approx(r["nll_loss"] + r["policy_term"], rel=1e-5, abs=1e-6)
    line = next(ln for ln in out.splitlines() if ln.startswith("step 10: "))
    assert re.match(r"step 10: loss=\S+ nll_loss=\S+ policy_term=\S+ ", line), line


def test_pad_equal_to_eos_is_said(timed_run):
    *_, out = timed_run
    assert ("note: the pad id 256 is the tokenizer's eos id, so eos targets are ignored in "
            "the loss like padding") in out


# ------------------------------------------------------------------ special tokens


@pytest.mark.slow
def test_mask_special_tokens_keeps_them_out_of_training_thoughts(tmp_path):
    import jax

    from quietstar_jax.thought.loss import quietstar_details

    c = tiny_config(None, **{"thought.mask_special_tokens": True, "thought.n_ahead": 8,
                             "thought.thought_temperature": 1000.0})
    c.compilation_cache_dir = None
    setup = loop._Setup(c, str(tmp_path / "w"))
    tc = setup.tc
    assert tc.masked_token_ids == (256, 257)  # the byte tokenizer's <eos> (= pad), <bos>
    batch = next(setup.data)

    def thoughts(tc):
        d = quietstar_details(setup.model.params, setup.model.cfg, tc, batch["input_ids"],
                              batch["attention_mask"], jax.random.key(0))
        return set(np.asarray(d["rollout"].thought_tokens).ravel().tolist())

    assert thoughts(tc.replace(masked_token_ids=())) & {256, 257}  # the test can see them
    drawn = thoughts(tc)
    assert not drawn & {256, 257} and len(drawn) > 100
    assert base_default_is_off()


def base_default_is_off() -> bool:
    from quietstar_jax.train.config import base_config

    return base_config().thought.mask_special_tokens is False


# ------------------------------------------------------------------ data files


def test_corrupt_jsonl_and_parquet_name_the_file_and_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from quietstar_jax.train.data import DataError, file_source

    bad_utf8 = tmp_path / "a.jsonl"
    bad_utf8.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{bad_utf8}:2: not valid UTF-8"):
        file_source(str(bad_utf8))
    bad_json = tmp_path / "b.jsonl"
    bad_json.write_text('{"text": "fine"}\n\n{"text": "cut\n')
    with pytest.raises(DataError, match=rf"^{bad_json}:3: not valid JSON"):
        file_source(str(bad_json))
    damaged = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [f"document {i} " * 20 for i in range(200)]}), damaged)
    raw = bytearray(damaged.read_bytes())
    raw[8:len(raw) // 2] = b"\x55" * (len(raw) // 2 - 8)  # pages overwritten, footer intact
    damaged.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"^{damaged}: not a readable parquet file") as e:
        file_source(str(damaged))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ export


def test_interrupted_export_never_leaves_a_directory_under_the_final_name(tmp_path,
                                                                         monkeypatch):
    import safetensors.numpy

    cfg, params, tok = hf.load_pretrained(shared_path("data", "stories260K-hf"))
    target = tmp_path / "export"
    real_save = safetensors.numpy.save_file
    written = []

    def interrupted(tensors, filename, metadata=None):
        if written:
            raise KeyboardInterrupt  # e.g. Ctrl-C during the second shard
        written.append(filename)
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.numpy, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hf.save_pretrained(target, params, cfg, tok, max_shard_size="200KB")
    assert written and not target.exists()
    assert os.listdir(tmp_path) == []  # the temporary directory is gone too
    monkeypatch.setattr(safetensors.numpy, "save_file", real_save)
    hf.save_pretrained(target, params, cfg, tok, max_shard_size="200KB")
    before = {p: p.read_bytes() for p in target.iterdir()}
    written.clear()
    monkeypatch.setattr(safetensors.numpy, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):  # replacing it (overwrite) is interrupted
        hf.save_pretrained(target, params, cfg, tok, max_shard_size="200KB", overwrite=True)
    assert {p: p.read_bytes() for p in target.iterdir()} == before  # the old export intact
    assert os.listdir(tmp_path) == ["export"]
