"""Bad input to the evaluation and generation command lines and APIs: one line,
exit status 2; thoughts printed one line per token; the special-token mask; the
README's notebook snippet runs as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from conftest import REPO_ROOT, shared_path

from quietstar_jax import hf
from quietstar_jax.evaluation import cli as evaluate_cli
from quietstar_jax.evaluation import tasks as evaluate
from quietstar_jax.generation import cached as G
from quietstar_jax.generation import cli as generate_cli
from quietstar_jax.thought import ThoughtConfig


@pytest.fixture(scope="module")
def stories_dir() -> Path:
    return shared_path("data", "stories260K-hf")


@pytest.fixture(scope="module")
def stories(stories_dir):
    return hf.load_pretrained(stories_dir)


def _err_lines(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def _one_error(capsys, *needles: str) -> str:
    lines = _err_lines(capsys)
    assert len(lines) == 1 and ": error: " in lines[0], lines
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ positions


def test_generate_past_max_positions_is_an_error_naming_both_numbers(stories, stories_dir,
                                                                    tmp_path, capsys):
    cfg, params, tok = stories
    assert cfg.max_position_embeddings == 512
    prompt = [1] + [300] * 499  # 500 tokens
    with pytest.raises(ValueError, match=r"a prompt of 500 tokens \+ max_new_tokens=64 = 564 "
                                         r"positions exceeds the model's "
                                         r"max_position_embeddings=512"):
        G.generate(params, cfg, None, [prompt], max_new_tokens=64, think=False, greedy=True)
    rc = generate_cli.main([str(stories_dir), "--prompt", "Once upon a time " * 150,
                            "--max-new-tokens", "64", "--out", str(tmp_path / "g.json")])
    assert rc == 2
    _one_error(capsys, "max_new_tokens=64", "max_position_embeddings=512")


def test_evaluate_chunk_len_past_max_positions_is_an_error(stories, stories_dir, tmp_path,
                                                           capsys):
    cfg, params, tok = stories
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a cat. " * 200)
    with pytest.raises(ValueError, match="chunk_len=600.*max_position_embeddings=512"):
        evaluate.evaluate_perplexity(params, cfg, None, tok, text, chunk_len=600)
    rc = evaluate_cli.main([str(stories_dir), "--tasks", "perplexity", "--text", str(text),
                        "--chunk-len", "600", "--out", str(tmp_path / "e.json")])
    assert rc == 2
    _one_error(capsys, "chunk_len=600", "max_position_embeddings=512")
    assert not (tmp_path / "e.json").exists()


# ------------------------------------------------------------------ exit codes


@pytest.mark.parametrize("argv, needle", [
    (["evaluate", "--tasks", "mmlu"], "unknown task(s) ['mmlu']"),
    (["evaluate", "--tasks", "perplexity"], "the perplexity task needs --text FILE"),
    (["evaluate", "--tasks", "perplexity", "--text", "/no/such.txt"], "is not a file"),
    (["generate"], "give at least one --prompt"),
    (["generate", "--prompt", "Hi", "--max-new-tokens", "0"], "--max-new-tokens=0"),
    (["generate", "--prompt", "Hi", "--temperature", "0"],
     "--temperature=0.0 must be > 0; for greedy decoding use --greedy"),
    (["generate", "--prompt", "Hi", "--top-p", "0"], "--top-p=0.0 must be in (0, 1]"),
])
def test_bad_input_exits_2_with_one_line(argv, needle, stories_dir, capsys):
    main = evaluate_cli.main if argv[0] == "evaluate" else generate_cli.main
    assert main([str(stories_dir), *argv[1:]]) == 2
    _one_error(capsys, needle)


@pytest.mark.parametrize("module", ["evaluation", "generation"])
def test_exit_status_of_the_module_commands(module, stories_dir):
    extra = ["--tasks", "mmlu"] if module == "evaluation" else []
    out = subprocess.run([sys.executable, "-m", f"quietstar_jax.{module}", str(stories_dir),
                          *extra], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=REPO_ROOT)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(
        f"python -m quietstar_jax.{module}: error: "), out.stderr[-2000:]


# ------------------------------------------------------------------ progress, speed, eos


def test_evaluate_prints_progress_while_a_task_runs(stories_dir, tmp_path, capsys):
    data = shared_path("data")
    rc = evaluate_cli.main([str(stories_dir), "--tasks", "gsm8k,perplexity", "--limit", "3",
                        "--gsm8k", str(data / "gsm8k"), "--no-thinking",
                        "--text", str(data / "tinystories" / "tinystories_val_head.txt"),
                        "--max-chunks", "2", "--out", str(tmp_path / "e.json")])
    assert rc == 0
    err = capsys.readouterr().err
    assert "[gsm8k] running" in err and re.search(r"\[gsm8k\] 3/3 examples \(\d+ s", err), err
    assert re.search(r"\[perplexity\] 2/2 chunks \(\d+ s", err), err
    assert err.index("[gsm8k] running") < err.index("[gsm8k] 3/3") < err.index("[gsm8k] done")


def test_generate_cli_ignore_eos_and_tokens_per_s(stories_dir, tmp_path, capsys, monkeypatch):
    calls = []

    def fake_generate_text(params, cfg, tc, tok, prompts, **kw):
        calls.append(kw)
        return [{"prompt": p, "tokens": [5] * 7, "completion": "x"} for p in prompts]

    monkeypatch.setattr(generate_cli, "generate_text", fake_generate_text)
    out = tmp_path / "g.json"
    base = [str(stories_dir), "--prompt", "Hi", "--prompt", "Ho", "--mode", "base",
            "--out", str(out)]
    assert generate_cli.main(base + ["--ignore-eos"]) == 0
    assert generate_cli.main(base) == 0
    assert calls[0]["eos_token_id"] is None and "eos_token_id" not in calls[1]
    err = capsys.readouterr().err
    assert re.search(r"\[base\] 14 new tokens in [\d.]+ s: [\d.]+ tokens/s", err), err
    speed = json.loads(out.read_text())["speed"]["base"]
    assert speed["new_tokens"] == 14 and speed["tokens_per_s"] > 0


# ------------------------------------------------------------------ thoughts


def test_thoughts_with_special_tokens_are_shown_escaped_one_line_each(stories):
    _, _, tok = stories
    newline = tok.convert_tokens_to_ids("<0x0A>")
    thought = [newline, tok.eos_token_id, tok.bos_token_id, newline]
    item = {"prompt": "Hi", "completion": " there", "tokens": [newline, 300],
            "thoughts": [tok.decode(thought)] * 2, "thought_ids": [thought] * 2,
            "mixing_weights": [0.1, -0.2]}
    lines = generate_cli._show(item, tok, True).splitlines()
    assert len(lines) == 3  # the completion, then one line per new token
    assert lines[1].startswith("  <|startthought|>\\n</s><s>\\n<|endthought|>  w=+0.100  -> ")
    assert lines[1].endswith("-> \\n")


def _thought_ids(path: Path) -> set[int]:
    items = json.loads(path.read_text())["thinking"]
    return {t for item in items for row in item["thought_ids"] for t in row}


@pytest.mark.slow
def test_mask_special_thought_tokens(stories, stories_dir, tmp_path, capsys):
    """Near-uniform thoughts (temperature 1000) over 514 ids draw eos/bos/unk often
    enough to see (3 x 48 x 9 draws: ~7.5 expected, none with probability ~5e-4); with
    the option on they never do."""
    from quietstar_jax.cli_common import inference_thought_config as thought_config

    _, _, tok = stories
    specials = set(hf.special_token_ids(tok))
    assert specials == {tok.unk_token_id, tok.bos_token_id, tok.eos_token_id}
    tc = thought_config(tok, None, 8, "sample", 1000.0, mask_special_tokens=True)
    assert set(tc.masked_token_ids) == specials
    assert thought_config(tok, None, 8, "sample", 1000.0).masked_token_ids == ()
    args = [str(stories_dir), "--prompt", "Once upon a time", "--prompt", "Lily saw a dog",
            "--prompt", "The sun", "--max-new-tokens", "48", "--n-ahead", "12",
            "--thought-temperature", "1000", "--ignore-eos"]
    assert generate_cli.main(args + ["--out", str(tmp_path / "off.json")]) == 0
    assert generate_cli.main(args + ["--mask-special-thought-tokens",
                                     "--out", str(tmp_path / "on.json")]) == 0
    capsys.readouterr()
    assert _thought_ids(tmp_path / "off.json") & specials  # the test can see them
    drawn = _thought_ids(tmp_path / "on.json")
    assert not drawn & specials and len(drawn) > 100


# ------------------------------------------------------------------ pad token


def _tokenizer_dir(src: Path, dest: Path, pad: str | None) -> Path:
    dest.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dest / name).write_bytes((src / name).read_bytes())
    if pad is not None:
        cfg = json.loads((dest / "tokenizer_config.json").read_text())
        cfg["pad_token"] = pad
        (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dest


def test_a_distinct_pad_token_is_used_everywhere(stories_dir, tmp_path):
    """stories260K has no pad token (pad = eos, as SmolLM2 and Mistral); given one
    (here its <unk>, id 0), every place that picks the pad id takes it."""
    from quietstar_jax.cli_common import inference_thought_config as thought_config
    from quietstar_jax.train.tokenizer import HFTokenizer

    plain = hf.load_tokenizer(_tokenizer_dir(stories_dir, tmp_path / "plain", None))
    padded = hf.load_tokenizer(_tokenizer_dir(stories_dir, tmp_path / "padded", "<unk>"))
    for tok in (plain, padded):
        hf.add_thought_tokens(tok)
    assert plain.pad_token_id is None and padded.pad_token_id == 0
    assert hf.thought_token_ids(plain)["pad_token_id"] == plain.eos_token_id == 2
    assert hf.thought_token_ids(padded)["pad_token_id"] == 0
    assert HFTokenizer(padded).thought_token_ids()["pad_token_id"] == 0
    assert thought_config(padded, None, None, "sample").pad_token_id == 0
    assert thought_config(padded, ThoughtConfig(), None, "sample").pad_token_id == 0
    assert evaluate._pad_id(padded, None) == 0
    # generation: the thought config's pad id (0) pads the prompts, not the eos id (2)
    cfg, _, _ = hf.load_pretrained(stories_dir)
    req = G.prepare_request(cfg, thought_config(padded, None, None, "sample"), [[5, 6, 7]],
                            max_new_tokens=2, rng=jax.random.key(0), think=True,
                            greedy=True, temperature=1.0, top_p=1.0, eos_token_id=2,
                            pad_token_id=None, pad_to_multiple=16)
    assert req.pad_id == 0 and int(req.ids[0, 0]) == 0


# ------------------------------------------------------------------ README


@pytest.mark.slow
def test_readme_notebook_snippet_runs_jitted(stories_dir, monkeypatch):
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## In a notebook", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    assert "jax.jit(qs.quietstar_loss" in code and "static_argnums" in code
    code = code.replace('"path/to/hf-model"', repr(str(stories_dir)))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    loss, metrics = scope["loss"], scope["metrics"]
    assert bool(jax.numpy.isfinite(loss)) and "nll_loss" in metrics
    assert scope["logits"].shape[-1] == scope["config"].vocab_size
