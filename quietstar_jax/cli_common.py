"""Shared pieces of the evaluation and generation command lines: load a model, its
thought config, print tables and tokens, write JSON (their flags: `command_line`).

`load_cli_model` opens a Hugging Face directory (`config.json` + safetensors +
tokenizer, via `hf.load_pretrained`) or a training checkpoint: a workdir of
`quietstar_jax.train.run` (its latest finished step) or one step directory, for
models trained from a Hugging Face checkpoint (`model.hf_path`). The checkpoints'
layout and format are `train.checkpoint`'s (`training_step_dir`,
`load_checkpoint_params`); this module only reads the run's `config.json`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quietstar_jax.model import ModelConfig, Params
from quietstar_jax.protocols import Tokenizer
from quietstar_jax.thought import SamplingMode, ThoughtConfig


def _restore_training_checkpoint(
    path: Path, dtype: str
) -> tuple[ModelConfig, Params, Any, ThoughtConfig]:
    """Params of a training checkpoint (`train.checkpoint.load_checkpoint_params`),
    with the architecture and tokenizer of the workdir config's `model.hf_path` and
    the ThoughtConfig of its `thought` group."""
    from ml_collections import ConfigDict

    from quietstar_jax import hf
    from quietstar_jax.train.checkpoint import load_checkpoint_params, training_step_dir
    from quietstar_jax.train.config import thought_config

    workdir, step_dir = training_step_dir(path)
    config = json.loads((workdir / "config.json").read_text(encoding="utf-8"))
    model = config.get("model", {})
    hf_path = model.get("hf_path")
    if not hf_path:
        raise ValueError(f"{workdir}: the training config has no model.hf_path (an inline "
                         "model with the byte tokenizer); export it with "
                         "config.export_hf_dir and evaluate that directory")
    if not Path(hf_path).is_dir():
        raise FileNotFoundError(f"{workdir}: model.hf_path {hf_path!r} (for the architecture "
                                "and tokenizer) does not exist")
    cfg = hf.model_config_from_hf(hf_path, dtype, model.get("param_dtype"))
    tok = hf.load_tokenizer(hf_path)
    if tok is None:
        raise ValueError(f"{hf_path}: no tokenizer files")
    hf.check_tokenizer_fits(tok, cfg.vocab_size, hf_path)
    ids = hf.add_thought_tokens(tok)
    cfg = cfg.replace(vocab_size=max(cfg.vocab_size, len(tok)))
    params = load_checkpoint_params(step_dir)
    hf.check_finite_params(params, str(step_dir))
    if "thought" not in params:
        raise ValueError(f"{step_dir}: the checkpoint has no thought params")
    rows = params["embed"].shape[0]
    if rows != cfg.vocab_size:
        raise ValueError(f"{step_dir}: embedding has {rows} rows, but {hf_path} with thought "
                         f"tokens has a vocabulary of {cfg.vocab_size}")
    # The trainer's own builder, on the thought group the run was trained with.
    saved = ConfigDict({"thought": config.get("thought", {})})
    return cfg, params, tok, thought_config(saved, ids, hf.special_token_ids(tok))


def load_cli_model(
    path: str | Path, dtype: str = "float32"
) -> tuple[ModelConfig, Params, Any, ThoughtConfig | None]:
    """(config, params, tokenizer, thought config or None) of a model directory.

    A directory with `config.json` and no `checkpoints/` is a Hugging Face checkpoint
    (thought tokens added, thought params loaded or initialised); a training workdir
    or `checkpoints/<step>` directory is a training checkpoint, whose ThoughtConfig
    comes with it.
    """
    from quietstar_jax.train.checkpoint import CHECKPOINTS_DIR

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    if (path / "config.json").is_file() and not (path / CHECKPOINTS_DIR).is_dir():
        from quietstar_jax import hf

        cfg, params, tok = hf.load_pretrained(path, dtype=dtype)
        if tok is None:
            raise ValueError(f"{path}: no tokenizer files; evaluation and generation need one")
        return cfg, params, tok, None
    return _restore_training_checkpoint(path, dtype)


def inference_thought_config(
    tokenizer: Tokenizer,
    base: ThoughtConfig | None,
    n_ahead: int | None,
    sampling: SamplingMode,
    temperature: float | None = None,
    *,
    mask_special_tokens: bool = False,
) -> ThoughtConfig:
    """ThoughtConfig for inference: the checkpoint's (or the defaults), with n_ahead,
    sampling and thought temperature overridden when given, thought ids from the
    tokenizer when unset, and n_ahead_talk = n_passes = 1. With `mask_special_tokens`
    thoughts never draw the tokenizer's special tokens (`hf.special_token_ids`)."""
    from quietstar_jax import hf

    tc = base or ThoughtConfig()
    kw: dict[str, Any] = {"n_ahead_talk": 1, "n_passes": 1, "sampling": sampling}
    if n_ahead is not None:
        kw["n_ahead"] = n_ahead
    if temperature is not None:
        kw["thought_temperature"] = temperature
    if tc.start_token_id is None or tc.end_token_id is None or tc.pad_token_id is None:
        kw |= hf.thought_token_ids(tokenizer)
    if mask_special_tokens:
        kw["masked_token_ids"] = tuple(sorted(set(tc.masked_token_ids)
                                              | set(hf.special_token_ids(tokenizer))))
    return tc.replace(**kw)


def define_thinking_flags(define: Any, flag_values: Any, scope: str = "") -> None:
    """The flags generate and evaluate share (`define`: a `command_line.flag_definer` of
    `flag_values`):
    the thought length, how thoughts are drawn, the special-token mask, the seed, the
    think gate (`--gate-threshold` or `--gate-rate`, at most one) and the compute dtype.
    `scope` prefixes the gate flags' help (e.g. "cot: ")."""
    from absl import flags

    define(flags.DEFINE_integer, "n-ahead", None, "thought length n_ahead (start + n_ahead "
           "- 3 sampled tokens + end); default: the checkpoint's, else 12")
    define(flags.DEFINE_enum, "thought-sampling", "sample", "how thought tokens are drawn",
           enum_values=["sample", "greedy"])
    define(flags.DEFINE_boolean, "mask-special-thought-tokens", False,
           "thoughts never draw the tokenizer's special tokens (eos, bos, pad, ...); off "
           "by default, as the authors")
    define(flags.DEFINE_integer, "seed", 0, "random seed")
    define(flags.DEFINE_float, "gate-threshold", None, f"{scope}think only where the think "
           "gate's logit exceeds this (a checkpoint trained with a gate)")
    define(flags.DEFINE_float, "gate-rate", None, f"{scope}think before this share of the "
           "tokens, by a running threshold on the think gate's logit (in [0, 1])")
    flags.mark_flags_as_mutual_exclusive(["gate-threshold", "gate-rate"],
                                         flag_values=flag_values)
    define(flags.DEFINE_enum, "dtype", "float32", "compute dtype",
           enum_values=["float32", "bfloat16", "float16"])


def printable(text: str) -> str:
    """`text` on one line: backslashes, newlines, tabs and other non-printable
    characters escaped as in a Python string literal."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def show_tokens(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """Token ids as one line of text: special tokens (eos, bos, pad, ...) as their
    names, e.g. `</s>`, never dropped; everything non-printable escaped."""
    special = set(tokenizer.all_special_ids)
    parts: list[str] = []
    run: list[int] = []
    for i in [int(t) for t in ids]:
        if i in special:
            if run:
                parts.append(printable(tokenizer.decode(run)))
                run = []
            parts.append(printable(tokenizer.convert_ids_to_tokens(i)))
        else:
            run.append(i)
    if run:
        parts.append(printable(tokenizer.decode(run)))
    return "".join(parts)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of `rows` (dicts) with the given columns."""
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths, strict=True))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON (NaN/inf as null), creating parent folders."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(obj), indent=1) + "\n", encoding="utf-8")
