"""`python train.py`: configs, overrides, one-line errors on bad input, a tiny
end-to-end run of the default config, the stories260k config on the real model,
and the reward page."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quietstar_jax.train import SetupError, loop
from quietstar_jax.train.config import ConfigError, base_config, validate_config
from quietstar_jax.train.reward_page import render_page, reward_colour

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def load_config(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def train_py(*args, cwd=REPO, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def no_compile(monkeypatch):
    """Make any attempt to build the train step fail: errors must come before it."""
    def forbidden(*a, **k):
        raise AssertionError("the train step was built before the input was checked")

    monkeypatch.setattr(loop, "make_train_step", forbidden)


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", ["default", "stories260k", "smollm2", "mistral7b_openwebmath"])
def test_shipped_configs_validate(name):
    validate_config(load_config(name))


def test_mistral_config_is_the_papers_setting():
    c = load_config("mistral7b_openwebmath")
    assert (c.optim.lr, c.optim.weight_decay, c.optim.warmup_steps, c.optim.clip_norm) == (
        1e-6, 0.001, 20, 1.0)
    assert (c.batch_size, c.grad_accum, c.data.seq_len) == (8, 2, 256)
    assert (c.thought.n_ahead, c.thought.n_ahead_talk, c.thought.n_passes) == (12, 4, 2)
    assert (c.thought.policy_loss_beta, c.thought.reinforce_temperature) == (1e6, 3.0)
    assert (c.model.dtype, c.model.param_dtype) == ("bfloat16", "float32")
    assert c.data.hf_name == "open-web-math/open-web-math"


def test_config_checks_name_the_field():
    c = base_config()
    c.optim.unknown_knob = 1
    with pytest.raises(ConfigError, match="unknown config key config.optim.unknown_knob"):
        validate_config(c)
    c = base_config()
    c.data.seq_len = 3
    with pytest.raises(ConfigError, match="config.data.seq_len=3"):
        validate_config(c)
    c = base_config()
    c.data.source = "files"
    with pytest.raises(ConfigError, match="config.data.path must be set"):
        validate_config(c)


def test_model_config_is_the_dataclass_fields():
    """config.model holds every ModelConfig field but the tokenizer's (and where the model
    comes from), so the two cannot drift; an inline model is that dataclass; ModelConfig's
    own checks and a checkpoint's architecture set by hand are named errors."""
    import dataclasses

    from quietstar_jax.model import ModelConfig
    from quietstar_jax.train.model_setup import inline_model_config
    from quietstar_jax.train.tokenizer import ByteTokenizer

    c = base_config()
    want = {f.name for f in dataclasses.fields(ModelConfig)} - {
        "vocab_size", "bos_token_id", "eos_token_id"}
    assert set(c.model.keys()) == want | {"hf_path", "tokenizer"}
    c.model.sliding_window, c.model.attention_bias = 8, True
    cfg = inline_model_config(c.model, 300)
    assert (cfg.sliding_window, cfg.attention_bias, cfg.hidden_size) == (8, True, 64)
    assert (cfg.vocab_size, cfg.eos_token_id) == (300, ByteTokenizer.eos_token_id)
    c = base_config()
    c.model.num_kv_heads = 3
    with pytest.raises(ConfigError, match="config.model: .*num_kv_heads"):
        validate_config(c)
    c = base_config()
    c.model.hf_path, c.model.num_layers = "checkpoints/x", 3
    with pytest.raises(ConfigError, match="config.model.num_layers=3 describes an inline "
                                          "model"):
        validate_config(c)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("args, message", [
    (["--config.thought.n_ahed=16"],
     "unknown config key --config.thought.n_ahed (Did you mean \"n_ahead\""),
    (["--config.num_steps=abc"], "--config.num_steps=abc"),
    (["--config.batch_size=6", "--config.grad_accum=4"],
     "config.batch_size=6 is not divisible by config.grad_accum=4"),
    (["--config.data.source=files", "--config.data.path=/no/such/file.txt"],
     "data file '/no/such/file.txt' does not exist"),
    (["--config", "configs/no_such_config.py"], "could not be loaded"),
])
def test_cli_bad_input_is_one_line(args, message, tmp_path):
    out = train_py(*args, "--workdir", str(tmp_path / "w"), timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), out.stderr[-2000:]
    assert message in lines[0]
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_setup_errors_come_before_compiling(tmp_path, monkeypatch):
    no_compile(monkeypatch)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    cases = [
        ({"data.source": "files", "data.path": str(empty)}, "has no documents"),
        ({"model.hf_path": str(tmp_path / "nope")}, "does not exist"),
        ({"batch_size": 6, "grad_accum": 4}, "not divisible by config.grad_accum"),
        ({"mesh": (2, 1, 1)}, "JAX sees 1"),
        ({"thought.n_ahead": 2}, "n_ahead=2"),
    ]
    for overrides, message in cases:
        c = load_config("default")
        for key, value in overrides.items():
            node = c
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        with pytest.raises(SetupError, match=message) as e:
            loop.run(c, str(tmp_path / "w"))
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------ end to end


def test_default_config_end_to_end_small(tmp_path):
    """`python train.py` with the default config, made smaller and shorter by overrides:
    trains, checkpoints, logs, writes the reward page; the loss falls."""
    work = tmp_path / "w"
    out = train_py(
        "--workdir", str(work), "--config.num_steps=12", "--config.log_every=4",
        "--config.checkpoint_every=6", "--config.eval_every=12", "--config.model.num_layers=1",
        "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
        "--config.data.seq_len=48", "--config.thought.n_ahead=4",
        "--config.optim.warmup_steps=2", "--config.progress_bar=False",
        cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(os.listdir(work / "checkpoints")) == ["12", "6"]
    rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert rows[-1]["nll_base"] < rows[0]["nll_base"] - 0.1
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert os.listdir(work / "tb")
    page = (work / "reward_pages" / "step_0000012.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    assert page.count('class="t"') > 40 and "data-thought=" in page
    assert "step 12:" in out.stdout or "step 12:" in out.stderr


@pytest.mark.slow
def test_stories260k_config_trains_the_real_model(tmp_path):
    if not (SHARED_DATA / "stories260K-hf").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    c = load_config("stories260k", str(SHARED_DATA))
    c.num_steps = 2
    c.data.seq_len = 32
    c.batch_size = 2
    c.grad_accum = 1
    c.thought.n_ahead = 5
    c.thought.n_ahead_talk = 2
    c.eval_every = 2
    c.eval_examples = 1
    c.progress_bar = False
    summary = loop.run(c, str(tmp_path / "w"))
    assert summary["num_params"] > 260_000  # the pretrained weights plus thought params
    first = summary["history"][0]
    # A trained model: far below the uniform loss over 514 tokens (6.24 nats).
    assert first["nll_base"] < 3.0 and np.isfinite(first["loss"])
    page = Path(summary["reward_pages"][0]).read_text()
    assert "data-thought=" in page


# ------------------------------------------------------------------ reward page


def test_reward_page_colours_tokens_and_escapes_thoughts():
    pieces = ["<b>", " one", " two", "\n"]
    rewards = [0.5, -0.25, float("nan"), float("nan")]
    thoughts = ['say "<script>"', "hm", None, None]
    page = render_page("t & t", [(pieces, rewards, thoughts)], note="n")
    assert "<script>" not in page and "&lt;b&gt;" in page and "t &amp; t" in page
    assert reward_colour(0.5, 0.5) in page  # the largest reward at full strength
    assert reward_colour(-0.25, 0.5) in page
    assert "reward +0.500" in page and "reward -0.250" in page
    assert page.count("data-thought=") == 2  # no thought shown where none was scored
    assert reward_colour(1.0, 1.0).startswith("rgba(0, 160, 60")
    assert reward_colour(-1.0, 1.0).startswith("rgba(210, 30, 30")
