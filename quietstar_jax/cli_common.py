"""Shared pieces of the evaluation and generation command lines.

`load_model` opens a Hugging Face directory (`config.json` + safetensors +
tokenizer, via `hf.load_pretrained`) or a training checkpoint (via the restore
function `quietstar_jax.train` provides, when it provides one).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quietstar_jax.model import ModelConfig, Params
from quietstar_jax.thoughts import ThoughtConfig


def _restore_training_checkpoint(path: Path, dtype: str) -> tuple[ModelConfig, Params, Any,
                                                                    ThoughtConfig | None]:
    try:
        from quietstar_jax.train import checkpoint as ckpt  # type: ignore[attr-defined]
    except ImportError:
        raise ValueError(f"{path} is not a Hugging Face directory (no config.json) and this "
                         "installation has no training-checkpoint reader "
                         "(quietstar_jax.train.checkpoint)") from None
    restore = getattr(ckpt, "restore_for_inference", None)
    if restore is None:
        raise ValueError(f"{path}: quietstar_jax.train.checkpoint has no "
                         "restore_for_inference(path, dtype) -> (cfg, params, tokenizer, "
                         "thought_config)")
    return restore(path, dtype=dtype)


def load_model(
    path: str | Path, dtype: str = "float32"
) -> tuple[ModelConfig, Params, Any, ThoughtConfig | None]:
    """(config, params, tokenizer, thought config or None) of a model directory.

    A directory with `config.json` is a Hugging Face checkpoint (thought tokens added,
    thought params loaded or initialised); anything else is tried as a training
    checkpoint, whose ThoughtConfig comes with it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    if (path / "config.json").is_file():
        from quietstar_jax import hf

        cfg, params, tok = hf.load_pretrained(path, dtype=dtype)
        if tok is None:
            raise ValueError(f"{path}: no tokenizer files; evaluation and generation need one")
        return cfg, params, tok, None
    return _restore_training_checkpoint(path, dtype)


def thought_config(
    tokenizer: Any,
    base: ThoughtConfig | None,
    n_ahead: int | None,
    sampling: str,
    temperature: float | None = None,
) -> ThoughtConfig:
    """ThoughtConfig for inference: the checkpoint's (or the defaults), with n_ahead,
    sampling and thought temperature overridden when given, thought ids from the
    tokenizer when unset, and n_ahead_talk = n_passes = 1."""
    from quietstar_jax import hf

    tc = base or ThoughtConfig()
    kw: dict[str, Any] = {"n_ahead_talk": 1, "n_passes": 1, "sampling": sampling}
    if n_ahead is not None:
        kw["n_ahead"] = n_ahead
    if temperature is not None:
        kw["thought_temperature"] = temperature
    if tc.start_token_id is None or tc.end_token_id is None or tc.pad_token_id is None:
        kw |= hf.thought_token_ids(tokenizer)
    return tc.replace(**kw)


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
