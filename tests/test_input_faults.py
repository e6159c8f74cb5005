"""Bad input found before anything runs (issue 23): each case runs the real command
line in a subprocess, as a user does, and wants one line, exit status 2, and nothing
lost or computed from garbage.

- a non-empty Hugging Face export directory (train.py's `export_hf_dir`,
  `hf.save_pretrained`): refused unless overwrite, and never a file the export did
  not write deleted;
- a tokenizer with more tokens than the model's embedding rows;
- NaN / inf weights (generation and evaluation), named at load;
- `--limit` below 1 in evaluation;
- a thought so long that it runs past the model's positions (`n_ahead=1000`), in
  training, generation and evaluation, before compiling;
- a `--prompts-file` that is not UTF-8, named with its line;
- base results labelled as base (not `n_ahead 1`), and the docs' flag lists.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, shared_path

from quietstar_jax import hf
from quietstar_jax.model import ModelConfig, init_params

FAST = 180  # seconds: an input error comes before any compile; a hang past this fails


def _run(args: list[str], cwd: Path = REPO_ROOT, timeout: int = FAST
         ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


# Every command's error line starts with the command's name, as it was called.
GEN_ERROR = "python -m quietstar_jax.generation: error: "
EVAL_ERROR = "python -m quietstar_jax.evaluation: error: "


def _one_error(out: subprocess.CompletedProcess[str], prefix: str, *needles: str) -> str:
    """The run ended with exit status 2 and exactly one non-blank stderr line, starting
    with `prefix` and holding every needle; returns that line."""
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith(prefix), out.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _generate(*args: str, timeout: int = FAST) -> subprocess.CompletedProcess[str]:
    return _run(["-m", "quietstar_jax.generation", *args], timeout=timeout)


def _evaluate(*args: str, timeout: int = FAST) -> subprocess.CompletedProcess[str]:
    return _run(["-m", "quietstar_jax.evaluation", *args], timeout=timeout)


def _train(*args: str, cwd: Path, timeout: int = FAST) -> subprocess.CompletedProcess[str]:
    return _run([str(REPO_ROOT / "train.py"), *args], cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def stories_dir() -> Path:
    return shared_path("data", "stories260K-hf")


def _copy_model(src: Path, dest: Path, edit: dict[str, np.ndarray] | None = None,
                config: dict | None = None) -> Path:
    """A copy of checkpoint directory `src` with some tensors (and config.json keys)
    replaced."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dest)
    if edit:
        tensors = load_file(str(dest / "model.safetensors")) | edit
        save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    if config:
        cfg = json.loads((dest / "config.json").read_text()) | config
        (dest / "config.json").write_text(json.dumps(cfg))
    return dest


# ------------------------------------------------------------------ export


_TINY_TRAIN = ("--config.num_steps=1", "--config.model.num_layers=1",
               "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
               "--config.data.seq_len=24", "--config.thought.n_ahead=4",
               "--config.thought.n_ahead_talk=2", "--config.batch_size=2",
               "--config.eval_examples=0", "--config.progress_bar=False")


def test_train_refuses_a_non_empty_export_dir_before_training(tmp_path):
    """An export into a directory holding a user's file stops at config validation
    (no checkpoint written, nothing compiled), and the file is untouched."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "notes.txt").write_text("mine")
    out = _train("--workdir", str(tmp_path / "w"), f"--config.export_hf_dir={export}",
                 *_TINY_TRAIN, cwd=tmp_path)
    _one_error(out, "train.py: error: ", f"config.export_hf_dir: export directory "
               f"'{export}' is not empty (1 entry: 'notes.txt')",
               "--config.export_hf_overwrite=True")
    assert (export / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(export)) == ["notes.txt"]
    assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.slow
def test_train_export_with_overwrite_keeps_the_users_files(tmp_path):
    """With `export_hf_overwrite=True` the export lands beside the user's file, which
    stays, and the directory loads."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "notes.txt").write_text("mine")
    out = _train("--workdir", str(tmp_path / "w"), f"--config.export_hf_dir={export}",
                 "--config.export_hf_overwrite=True", *_TINY_TRAIN, cwd=tmp_path,
                 timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (export / "notes.txt").read_text() == "mine"
    assert {"config.json", "model.safetensors", hf.EXPORT_MANIFEST} <= set(os.listdir(export))
    cfg, params, _ = hf.load_pretrained(export, add_thought_tokens=False)
    assert "thought" in params and cfg.num_layers == 1


@pytest.mark.slow
def test_export_dir_filled_during_training_is_refused_and_the_run_kept(tmp_path):
    """The directory was checked before training; one created meanwhile is refused at
    export time too (ExportError, one line naming it and the saved step), and kept."""
    import _tiny_train

    from quietstar_jax.train import ExportError, loop

    export = tmp_path / "export"

    def fill(step: int) -> None:
        export.mkdir()
        (export / "late.txt").write_text("theirs")

    c = _tiny_train.tiny_config(None, num_steps=1, export_hf_dir=str(export))
    with pytest.raises(ExportError, match=r"is not empty \(1 entry: 'late.txt'\).*; nothing "
                                          r"exported \(the trained step 1 is saved in ") as e:
        loop.run(c, str(tmp_path / "w"), on_step=fill)
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(export)) == ["late.txt"]
    assert os.listdir(tmp_path / "w" / "checkpoints") == ["1"]


def _tiny() -> tuple[ModelConfig, dict]:
    import jax

    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2,
                      num_heads=2, num_kv_heads=1, max_position_embeddings=64)
    return cfg, init_params(cfg, jax.random.key(0))


def test_save_pretrained_never_deletes_files_it_did_not_write(tmp_path):
    """The library path of every export: a non-empty directory is refused before
    anything is written; with overwrite=True the export replaces its own files (a
    sharded export's shards are removed when the next one is a single file), and the
    user's files, even one named like a shard, stay."""
    cfg, params = _tiny()
    target = tmp_path / "export"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"is not empty \(1 entry: 'notes.txt'\); "
                                              r".*overwrite=True"):
        hf.save_pretrained(target, params, cfg)
    assert sorted(os.listdir(target)) == ["notes.txt"]
    assert os.listdir(tmp_path) == ["export"]  # no temporary directory left behind
    hf.save_pretrained(target, params, cfg, max_shard_size=20_000, overwrite=True)
    shards = sorted(p.name for p in target.glob("model-*.safetensors"))
    assert len(shards) > 1 and (target / hf.SAFE_WEIGHTS_INDEX_NAME).is_file()
    (target / "model-00099-of-00099.safetensors").write_text("the user's, not ours")
    with pytest.raises(FileExistsError, match="is not empty"):  # an earlier export too
        hf.save_pretrained(target, params, cfg)
    hf.save_pretrained(target, params, cfg, overwrite=True)  # one file this time
    left = set(os.listdir(target))
    assert {"notes.txt", "model-00099-of-00099.safetensors", "model.safetensors",
            "config.json", hf.EXPORT_MANIFEST} == left
    assert (target / "notes.txt").read_text() == "mine"
    _, loaded, _ = hf.load_pretrained(target, add_thought_tokens=False)
    np.testing.assert_array_equal(np.asarray(loaded["embed"]), np.asarray(params["embed"]))
    file = tmp_path / "a_file"
    file.write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        hf.save_pretrained(file, params, cfg, overwrite=True)
    assert file.read_text() == "x"


# ------------------------------------------------------------------ tokenizer size


@pytest.mark.slow
@pytest.mark.parametrize("command", ["generation", "train"])
def test_tokenizer_larger_than_the_embedding_is_one_line(command, stories_dir, tmp_path):
    """stories260K's 512-token tokenizer with a model of 500 embedding rows: the ids
    500..511 would read rows that do not exist (before: the rows were made up as
    the mean row and the command ran on)."""
    from safetensors.numpy import load_file

    embed = load_file(str(stories_dir / "model.safetensors"))["model.embed_tokens.weight"]
    model = _copy_model(stories_dir, tmp_path / "m", {"model.embed_tokens.weight": embed[:500]},
                        {"vocab_size": 500})
    if command == "generation":
        out = _generate(str(model), "--prompt", "Once", "--max-new-tokens", "2", "--mode",
                        "base", "--greedy", "--out", str(tmp_path / "g.json"))
    else:
        text = tmp_path / "t.txt"
        text.write_text("Once upon a time there was a cat. " * 40)
        out = _train("--config", str(REPO_ROOT / "configs" / "stories260k.py"),
                     f"--config.model.hf_path={model}", f"--config.data.path={text}",
                     "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    prefix = {"train": "train.py: error: ", "generation": GEN_ERROR}.get(command, EVAL_ERROR)
    _one_error(out, prefix, f"{model}: the tokenizer has 512 tokens but the model's "
               "embedding has 500 rows", "ids 500..511")
    assert not (tmp_path / "g.json").exists()
    assert not (tmp_path / "w" / "checkpoints").exists()


# ------------------------------------------------------------------ NaN / inf weights


@pytest.mark.parametrize("command", ["generation", "evaluation", "train"])
def test_non_finite_weights_are_named_at_load(command, stories_dir, tmp_path):
    from safetensors.numpy import load_file

    key = "model.layers.2.self_attn.q_proj.weight"
    q = load_file(str(stories_dir / "model.safetensors"))[key].copy()
    q[3, 5] = q[7, 1] = np.nan
    q[9, 0] = np.inf
    model = _copy_model(stories_dir, tmp_path / "m", {key: q})
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a cat. " * 40)
    if command == "generation":
        out = _generate(str(model), "--prompt", "Once", "--max-new-tokens", "2",
                        "--out", str(tmp_path / "o.json"))
    elif command == "evaluation":
        out = _evaluate(str(model), "--tasks", "perplexity", "--text", str(text),
                        "--chunk-len", "32", "--max-chunks", "1", "--out",
                        str(tmp_path / "o.json"))
    else:
        out = _train("--config", str(REPO_ROOT / "configs" / "stories260k.py"),
                     f"--config.model.hf_path={model}", f"--config.data.path={text}",
                     "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    prefix = {"train": "train.py: error: ", "generation": GEN_ERROR}.get(command, EVAL_ERROR)
    _one_error(out, prefix, f"{model}/model.safetensors: tensor {key!r} holds non-finite "
               "values (2 NaN, 1 inf of 4096; the first at [3, 5])")
    assert not (tmp_path / "o.json").exists()
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_non_finite_params_of_a_training_workdir_are_named(stories_dir, tmp_path):
    """Generation from a training workdir (orbax params, model.hf_path for the
    architecture): a NaN param is named at load."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    _, params, _ = hf.load_pretrained(stories_dir)
    params = dict(params)
    params["final_norm"] = params["final_norm"].at[7].set(jnp.nan)
    wd = tmp_path / "wd"
    step = (wd / "checkpoints" / "5").resolve()
    step.mkdir(parents=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(step / "state", {"params": params, "step": 5})
    ckpt.wait_until_finished()
    (wd / "config.json").write_text(json.dumps({
        "model": {"hf_path": str(stories_dir), "param_dtype": "float32"},
        "thought": {"n_ahead": 4, "n_ahead_talk": 4, "n_passes": 2}}))
    out = _generate(str(wd), "--prompt", "Once", "--max-new-tokens", "2",
                    "--out", str(tmp_path / "g.json"))
    _one_error(out, GEN_ERROR, f"{step}: params['final_norm'] holds non-finite values (1 NaN, "
               "0 inf of 64; the first at [7])")
    assert not (tmp_path / "g.json").exists()


def test_non_finite_params_of_a_training_checkpoint_are_named():
    """The check of params restored from a training checkpoint (already on devices)."""
    import jax.numpy as jnp

    cfg, params = _tiny()
    hf.check_finite_params(params, "ckpt")  # finite: no error
    params["layers"]["mlp"]["down"] = params["layers"]["mlp"]["down"].at[1, 2, 3].set(jnp.inf)
    with pytest.raises(ValueError, match=r"^ckpt: params\['layers'\]\['mlp'\]\['down'\] holds "
                                         r"non-finite values \(0 NaN, 1 inf of \d+; the "
                                         r"first at \[1, 2, 3\]\)"):
        hf.check_finite_params(params, "ckpt")


# ------------------------------------------------------------------ --limit


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_evaluate_limit_below_one_is_one_line(limit, stories_dir, tmp_path):
    out = _evaluate(str(stories_dir), "--tasks", "gsm8k", "--gsm8k",
                    str(shared_path("data", "gsm8k")), "--limit", limit, "--no-thinking",
                    "--out", str(tmp_path / "e.json"))
    _one_error(out, EVAL_ERROR, f"--limit={limit} must be >= 1")
    assert not (tmp_path / "e.json").exists()


# ------------------------------------------------------------------ n_ahead


def test_train_thought_past_max_positions_stops_before_compiling(tmp_path):
    """The default config (an inline model of 512 positions, seq_len 96) with
    n_ahead=1000: one line with the bound, before anything compiles (before: a
    warning, then minutes of compiling)."""
    out = _train("--workdir", str(tmp_path / "w"), "--config.thought.n_ahead=1000",
                 cwd=tmp_path)
    _one_error(out, "train.py: error: ", "config.thought.n_ahead=1000",
               "run n_ahead + n_ahead_talk - 2 = 1000 positions past it",
               "thinks up to position 1095", "max_position_embeddings=512",
               "use n_ahead <= 416")
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_generate_thought_past_max_positions_is_one_line(stories_dir, tmp_path):
    out = _generate(str(stories_dir), "--prompt", "Once upon a time", "--max-new-tokens", "8",
                    "--n-ahead", "1000", "--out", str(tmp_path / "g.json"))
    _one_error(out, GEN_ERROR, "n_ahead=1000", "max_position_embeddings=512",
               "use n_ahead <= ")
    assert not (tmp_path / "g.json").exists()


def test_evaluate_thought_past_max_positions_is_one_line(stories_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a cat. " * 40)
    out = _evaluate(str(stories_dir), "--tasks", "perplexity", "--text", str(text),
                    "--chunk-len", "32", "--n-ahead", "1000", "--out", str(tmp_path / "e.json"))
    _one_error(out, EVAL_ERROR, "n_ahead=1000", "chunk_len=32 (position 31)",
               "max_position_embeddings=512", "use n_ahead <= 481")
    assert not (tmp_path / "e.json").exists()


def test_evaluate_gsm8k_thought_past_max_positions_is_an_error_before_scoring(stories_dir,
                                                                             tmp_path):
    """GSM8K / CommonsenseQA know their longest answer position once the examples are
    tokenized: the error comes then (after the task's "running" line), before any
    scoring compiles."""
    out = _evaluate(str(stories_dir), "--tasks", "gsm8k", "--gsm8k",
                    str(shared_path("data", "gsm8k")), "--limit", "2", "--n-ahead", "1000",
                    "--out", str(tmp_path / "e.json"))
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(lines) == 2 and lines[0].startswith("[gsm8k] running"), out.stderr[-3000:]
    assert lines[1].startswith(EVAL_ERROR + "n_ahead=1000: "), lines
    assert "the last scored position of gsm8k example" in lines[1]
    assert "max_position_embeddings=512; use n_ahead <= " in lines[1]
    assert not (tmp_path / "e.json").exists()


def test_thought_bounds_are_exact():
    """The largest n_ahead the lines offer fits; one more does not (library paths)."""
    import jax

    from quietstar_jax.evaluation import tasks
    from quietstar_jax.generation import cached
    from quietstar_jax.thought import ThoughtConfig

    cfg = ModelConfig(vocab_size=514, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, max_position_embeddings=512)
    ids = dict(start_token_id=512, end_token_id=513, pad_token_id=2)
    # generation: the thought before the last new token follows position P + n - 2
    for n_ahead, ok in ((500, True), (501, False)):
        tc = ThoughtConfig(n_ahead=n_ahead, n_ahead_talk=1, n_passes=1, **ids)
        call = lambda tc=tc: cached.prepare_request(  # noqa: E731
            cfg, tc, [[5] * 6], max_new_tokens=8, rng=jax.random.key(0), think=True,
            greedy=True, temperature=1.0, top_p=1.0, eos_token_id=None, pad_token_id=None,
            pad_to_multiple=1)
        if ok:
            call()
        else:
            with pytest.raises(ValueError, match="use n_ahead <= 500"):
                call()
    # evaluation: the last scored position of a chunk is chunk_len - 1
    tasks.check_perplexity_thoughts(32, ThoughtConfig(n_ahead=481, **ids), cfg)
    with pytest.raises(ValueError, match="use n_ahead <= 481"):
        tasks.check_perplexity_thoughts(32, ThoughtConfig(n_ahead=482, **ids), cfg)


# ------------------------------------------------------------------ --prompts-file


def test_prompts_file_not_utf8_names_file_and_line(stories_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"Once upon a time\nLily saw a \xff\xfe dog\nThe sun\n")
    out = _generate(str(stories_dir), "--prompts-file", str(prompts),
                    "--out", str(tmp_path / "g.json"))
    _one_error(out, GEN_ERROR, f"--prompts-file '{prompts}': line 2 is not UTF-8 text "
               "(byte 0xff at column 12")
    assert not (tmp_path / "g.json").exists()


# ------------------------------------------------------------------ labels and docs


@pytest.mark.slow
def test_base_results_are_labelled_base_not_n_ahead_1(stories_dir, tmp_path):
    out = _generate(str(stories_dir), "--prompt", "Once", "--max-new-tokens", "2",
                    "--mode", "base", "--greedy", "--out", str(tmp_path / "g.json"),
                    timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "== base (no thoughts)" in out.stdout and "n_ahead 1" not in out.stdout
    out = _evaluate(str(stories_dir), "--tasks", "gsm8k", "--gsm8k",
                    str(shared_path("data", "gsm8k")), "--limit", "2", "--no-thinking",
                    "--out", str(tmp_path / "e.json"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    header, _, row = out.stdout.strip().splitlines()[:3]
    column = header.split().index("n_ahead")
    assert row.split()[:column + 1] == ["gsm8k", "base", "-"], out.stdout
    assert json.loads((tmp_path / "e.json").read_text())["results"]["gsm8k"]["n_ahead"] is None


def test_docs_list_what_they_must():
    from quietstar_jax.generation import cli

    evaluation_md = (REPO_ROOT / "docs" / "EVALUATION.md").read_text()
    flags = [f"--{name}" for name in cli.COMMAND.flag_values()]
    assert {"--prompts-file", "--thought-temperature", "--seed", "--dtype"} <= set(flags)
    assert [f for f in flags if f not in evaluation_md] == []
    training_md = (REPO_ROOT / "docs" / "TRAINING.md").read_text()
    smollm2_row = next(ln for ln in training_md.splitlines()
                       if ln.startswith("| `configs/smollm2.py`"))
    assert "pip install gguf accelerate" in smollm2_row
    architecture_md = (REPO_ROOT / "docs" / "ARCHITECTURE.md").read_text()
    configs = architecture_md.split("configs/", 1)[1].split("quietstar_jax/", 1)[0]
    for name in sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.py")):
        assert name in configs, name
