"""The trainer's config schema: every field, its type and default, and its checks.

`base_config()` is the full tree; the files in `configs/` start from it and change
values. `validate_config` rejects, with one line naming the field, anything the
trainer cannot run (unknown keys, wrong types, impossible numbers) before any
data is read or anything is compiled. `thought_config` builds the ThoughtConfig.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ml_collections import ConfigDict, config_dict

from quietstar_jax.model import RUNTIME_FIELDS, ModelConfig
from quietstar_jax.thought import ThoughtConfig

DATA_SOURCES = ("generated", "files", "tfds", "hf")
FILE_FORMATS = ("auto", "text", "jsonl", "parquet")
TEXT_SPLITS = ("blank_line", "line", "file")
# ThoughtConfig fields that come from the tokenizer unless set explicitly.
_TOKEN_FIELDS = ("start_token_id", "end_token_id", "pad_token_id")


class ConfigError(ValueError):
    """A config value the trainer cannot run with (one line, names the field)."""


def _thought_defaults() -> ConfigDict:
    c = ConfigDict()
    for f in dataclasses.fields(ThoughtConfig):
        if f.name in _TOKEN_FIELDS or f.name in ("pause_token_id", "think_k"):
            setattr(c, f.name, config_dict.placeholder(int))
        elif f.name == "think_lengths":
            setattr(c, f.name, config_dict.placeholder(tuple))
        else:
            setattr(c, f.name, f.default)
    return c


# ModelConfig fields that come from the tokenizer (an inline model's byte tokenizer).
TOKENIZER_MODEL_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id")
# The inline demo model: its shape (ModelConfig has no default for it) and where it
# differs from ModelConfig's defaults. Every other field is the dataclass's default.
_INLINE_MODEL = dict(hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4,
                     num_kv_heads=2, rms_norm_eps=1e-5, max_position_embeddings=512,
                     tie_word_embeddings=True)


def _model_defaults() -> ConfigDict:
    """config.model: where the model comes from (`hf_path`, `tokenizer`), then every
    ModelConfig field but the tokenizer's, read off the dataclass (defaults, the inline
    demo model's shape; None-default fields as int placeholders)."""
    c = ConfigDict()
    c.hf_path = config_dict.placeholder(str)  # set: load this checkpoint
    c.tokenizer = "byte"  # tokenizer of an inline model (only "byte")
    for f in dataclasses.fields(ModelConfig):
        if f.name in TOKENIZER_MODEL_FIELDS:
            continue
        value = _INLINE_MODEL.get(f.name, f.default)
        setattr(c, f.name, config_dict.placeholder(int) if value is None else value)
    return c


def model_architecture_fields() -> tuple[str, ...]:
    """The fields of config.model that describe an inline model's architecture (what a
    checkpoint's config.json says instead): all ModelConfig fields but the tokenizer's
    and RUNTIME_FIELDS."""
    return tuple(f.name for f in dataclasses.fields(ModelConfig)
                 if f.name not in TOKENIZER_MODEL_FIELDS and f.name not in RUNTIME_FIELDS)


def base_config() -> ConfigDict:
    """Every field the trainer reads, with defaults (the demo of `configs/default.py`
    changes only a few of them)."""
    c = ConfigDict()
    c.seed = 0  # params init, thought sampling (folded with the step), data order

    # Model: a Hugging Face checkpoint directory, or a fresh Llama described inline by
    # ModelConfig's fields. The runtime fields (model.RUNTIME_FIELDS) apply to a loaded
    # checkpoint too: bfloat16 compute with float32 master weights is dtype="bfloat16",
    # param_dtype="float32"; attention "xla" (portable) or "cudnn" (GPU flash kernel,
    # BENCHMARKS.md); vocab_chunk: vocabulary columns per step of the fused output
    # projections (memory vs speed).
    c.model = _model_defaults()

    c.thought = _thought_defaults()
    # True: thoughts never draw the tokenizer's special tokens (eos, bos, pad, ...),
    # added to thought.masked_token_ids. Off by default, as the authors.
    c.thought.mask_special_tokens = False
    # Thought-length curriculum: "step:n_ahead,..." (e.g. "0:4,200:8,400:12"); from the
    # update that starts at `step` on, n_ahead is that value (before the first entry,
    # config.thought.n_ahead). Empty: config.thought.n_ahead throughout.
    c.thought_schedule = ""

    c.data = ConfigDict()
    c.data.source = "generated"  # generated | files | tfds | hf
    c.data.path = config_dict.placeholder(str)  # files: path, glob, or comma-separated list
    c.data.format = "auto"  # auto (by extension) | text | jsonl | parquet
    c.data.text_split = "blank_line"  # text files: blank_line | line | file
    c.data.text_field = "text"  # jsonl / parquet / tfds / hf column
    c.data.num_documents = 20000  # generated: how many problems
    c.data.tfds_name = config_dict.placeholder(str)
    c.data.tfds_split = "train"
    c.data.tfds_data_dir = config_dict.placeholder(str)
    c.data.hf_name = config_dict.placeholder(str)
    c.data.hf_config = config_dict.placeholder(str)
    c.data.hf_split = "train"
    c.data.seq_len = 128
    c.data.seed = 0  # order of documents and windows
    c.data.shuffle = True
    c.data.add_bos = True

    c.optim = ConfigDict()
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 20
    c.optim.end_lr_ratio = 0.0  # linear decay from lr to lr * end_lr_ratio at num_steps
    c.optim.weight_decay = 0.001
    c.optim.decay_norms_and_biases = False
    c.optim.clip_norm = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8

    c.batch_size = 8  # sequences per optimiser step, all processes together
    c.grad_accum = 1  # micro-batches per step
    # dtype of the micro-batches' gradient sum: "float32", or "params" (the params' own
    # dtype; with bfloat16 params it saves half the sum's memory, docs/SHARDING.md)
    c.grad_accum_dtype = "float32"
    c.num_steps = 100
    c.log_every = 10
    c.eval_every = 50  # reward page; 0: only at the end
    c.eval_examples = 2  # sequences shown on the reward page; 0: no page
    c.checkpoint_every = 50  # 0: only at the end (and on SIGTERM)
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.export_hf_dir = config_dict.placeholder(str)  # set: export a HF directory at the end
    # A non-empty export_hf_dir is refused before training unless this is set; then the
    # export replaces its own files there and keeps every other file.
    c.export_hf_overwrite = False
    c.mesh = (1, -1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices
    c.progress_bar = True
    # Set: keep compiled programs here (jax's persistent compilation cache), so a
    # resumed or repeated run skips compiling.
    c.compilation_cache_dir = config_dict.placeholder(str)
    return c


# ------------------------------------------------------------------ validation


def _walk(cfg: ConfigDict, leaf: Callable[[ConfigDict, str], Any] = lambda c, k: c[k],
          prefix: str = "config") -> dict[str, Any]:
    """{"config.a.b": leaf(parent, "b")} over every non-ConfigDict field."""
    out = {}
    for key in cfg.keys():
        name = f"{prefix}.{key}"
        if isinstance(cfg[key], ConfigDict):
            out |= _walk(cfg[key], leaf, name)
        else:
            out[name] = leaf(cfg, key)
    return out


def _field_types(cfg: ConfigDict) -> dict[str, Any]:
    """The declared type of every field (a placeholder's too), by dotted name."""
    return _walk(cfg, lambda c, k: c.get_ref(k).get_type())


def _type_ok(value: Any, want: Any) -> bool:
    if value is None:
        return True
    if want is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if want is tuple:
        return isinstance(value, tuple | list)
    return isinstance(value, want)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate_config(config: ConfigDict) -> None:
    """Raise ConfigError (one line, naming the field) for anything that cannot run."""
    schema = _field_types(base_config())
    given = _walk(config)
    for name, value in given.items():
        if name not in schema:
            raise ConfigError(f"unknown config key {name}")
        if not _type_ok(value, schema[name]):
            raise ConfigError(
                f"{name}={value!r} has type {type(value).__name__}, expected "
                f"{schema[name].__name__}")
    missing = sorted(set(schema) - set(given))
    _check(not missing, f"config lacks {', '.join(missing)}")

    c = config
    for name in ("batch_size", "grad_accum", "num_steps", "log_every", "keep_checkpoints"):
        _check(c[name] >= 1, f"config.{name}={c[name]} must be >= 1")
    for name in ("eval_every", "checkpoint_every", "eval_examples"):
        _check(c[name] >= 0, f"config.{name}={c[name]} must be >= 0 (0: only at the end)")
    _check(c.batch_size % c.grad_accum == 0,
           f"config.batch_size={c.batch_size} is not divisible by config.grad_accum="
           f"{c.grad_accum} (every micro-batch must have the same number of sequences)")
    _check(c.grad_accum_dtype in ("float32", "params"),
           f"config.grad_accum_dtype={c.grad_accum_dtype!r} must be 'float32' or 'params'")
    _check(len(c.mesh) == 3, f"config.mesh={tuple(c.mesh)} must be (data, fsdp, tensor)")

    d = c.data
    _check(d.source in DATA_SOURCES, f"config.data.source={d.source!r} must be one of "
                                     f"{DATA_SOURCES}")
    _check(d.format in FILE_FORMATS, f"config.data.format={d.format!r} must be one of "
                                     f"{FILE_FORMATS}")
    _check(d.text_split in TEXT_SPLITS, f"config.data.text_split={d.text_split!r} must be one "
                                        f"of {TEXT_SPLITS}")
    _check(d.source != "files" or bool(d.path),
           "config.data.path must be set when config.data.source='files'")
    _check(d.source != "tfds" or bool(d.tfds_name),
           "config.data.tfds_name must be set when config.data.source='tfds'")
    _check(d.source != "hf" or bool(d.hf_name),
           "config.data.hf_name must be set when config.data.source='hf'")
    _check(d.num_documents >= 1, f"config.data.num_documents={d.num_documents} must be >= 1")
    t = c.thought
    _check(d.seq_len >= t.n_ahead_talk + 2,
           f"config.data.seq_len={d.seq_len} must be >= config.thought.n_ahead_talk + 2 = "
           f"{t.n_ahead_talk + 2} (no position would carry a reward)")
    _check(t.get("think_k") is None or t.think_k <= d.seq_len,
           f"config.thought.think_k={t.get('think_k')} exceeds config.data.seq_len={d.seq_len} "
           "(at most every position can think)")

    o = c.optim
    _check(o.lr >= 0, f"config.optim.lr={o.lr} must be >= 0")
    _check(o.warmup_steps >= 0, f"config.optim.warmup_steps={o.warmup_steps} must be >= 0")
    _check(o.clip_norm > 0, f"config.optim.clip_norm={o.clip_norm} must be > 0")
    _check(o.weight_decay >= 0, f"config.optim.weight_decay={o.weight_decay} must be >= 0")
    _check(0 <= o.end_lr_ratio <= 1, f"config.optim.end_lr_ratio={o.end_lr_ratio} must be "
                                     "in [0, 1]")
    _check_positions(c)
    _check_export_dir(c)
    if c.model.hf_path is None:
        _check(c.model.tokenizer == "byte",
               f"config.model.tokenizer={c.model.tokenizer!r}: an inline model (no "
               "config.model.hf_path) supports only the 'byte' tokenizer")
        try:
            ModelConfig(vocab_size=256, **model_fields(c.model))  # its own checks
        except ValueError as e:
            raise ConfigError(f"config.model: {e}") from None
    else:
        defaults = base_config().model
        for name in model_architecture_fields():
            _check(c.model[name] == defaults[name],
                   f"config.model.{name}={c.model[name]!r} describes an inline model; the "
                   f"checkpoint at config.model.hf_path={c.model.hf_path!r} has its own "
                   "(config.json): unset it")
    probe_ids = {"start_token_id": 0, "end_token_id": 1, "pad_token_id": 0}
    try:
        thought_config(c, probe_ids)
    except ValueError as e:
        raise ConfigError(f"config.thought: {e}") from None
    _check(not (t.get("think_lengths") and c.thought_schedule),
           f"config.thought_schedule={c.thought_schedule!r} changes n_ahead, which "
           f"config.thought.think_lengths={t.get('think_lengths')} replaces (the thoughts "
           "have those lengths): set one of them")
    for _, n_ahead in parse_thought_schedule(c.thought_schedule):
        try:
            thought_config(c, probe_ids).replace(n_ahead=n_ahead)
        except ValueError as e:
            raise ConfigError(f"config.thought_schedule={c.thought_schedule!r}: {e}") from None


def _max_positions(config: ConfigDict) -> tuple[int, str] | None:
    """(max_position_embeddings, where it comes from) of the configured model; None
    when a checkpoint's config.json cannot be read (loading reports that later)."""
    if config.model.hf_path is None:
        return config.model.max_position_embeddings, "config.model.max_position_embeddings"
    from quietstar_jax import hf

    try:
        cfg = hf.model_config_from_hf(config.model.hf_path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return cfg.max_position_embeddings, f"{config.model.hf_path}/config.json"


def _check_positions(config: ConfigDict) -> None:
    """Training rows must fit the model's position range."""
    limit = _max_positions(config)
    if limit is None:
        return
    n, where = limit
    seq_len = config.data.seq_len
    _check(seq_len <= n, f"config.data.seq_len={seq_len} exceeds the model's "
                         f"max_position_embeddings={n} ({where})")
    # Every position thinks: the thought of the last one (position seq_len - 1) and its
    # talk run n_ahead + n_ahead_talk - 2 steps past it, one position id each.
    t = config.thought
    try:
        schedule = parse_thought_schedule(config.thought_schedule)
    except ConfigError:
        return  # reported with the rest of config.thought_schedule's checks
    lengths = t.get("think_lengths")
    longest = ([("config.thought.think_lengths: the longest thought's n_ahead", max(lengths) + 3)]
               if lengths and all(isinstance(v, int) for v in lengths) else [])
    name, n_ahead = max([("config.thought.n_ahead", t.n_ahead)] + longest
                        + [(f"config.thought_schedule={config.thought_schedule!r}: n_ahead", k)
                           for _, k in schedule], key=lambda x: x[1])
    steps = n_ahead + t.n_ahead_talk - 2
    _check(seq_len + steps <= n,
           f"{name}={n_ahead}: the thought and talk of a position run n_ahead + n_ahead_talk "
           f"- 2 = {steps} positions past it, so the last of config.data.seq_len={seq_len} "
           f"positions thinks up to position {seq_len - 1 + steps}, past the model's "
           f"max_position_embeddings={n} ({where}); use n_ahead <= "
           f"{n - seq_len - t.n_ahead_talk + 2} or a smaller seq_len")


def _check_export_dir(config: ConfigDict) -> None:
    """`config.export_hf_dir` must be new or empty (or `export_hf_overwrite` set), checked
    before training rather than after it."""
    if not config.export_hf_dir:
        return
    from quietstar_jax.hf.pretrained import check_export_target

    try:
        check_export_target(config.export_hf_dir, config.export_hf_overwrite,
                            flag="--config.export_hf_overwrite=True")
    except FileExistsError as e:
        raise ConfigError(f"config.export_hf_dir: {e}") from None


def thought_config(config: ConfigDict, token_ids: dict[str, int],
                   special_token_ids: tuple[int, ...] = ()) -> ThoughtConfig:
    """ThoughtConfig from `config.thought`; token ids not set there come from
    `token_ids` (the tokenizer's start/end/pad ids). With
    `config.thought.mask_special_tokens`, `special_token_ids` (the tokenizer's eos,
    bos, pad, ...) join `masked_token_ids`."""
    fields = {f.name for f in dataclasses.fields(ThoughtConfig)}
    kw = {k: config.thought[k] for k in config.thought.keys() if k in fields}
    kw["init_token"] = thought_init_text(config.thought)
    for k in _TOKEN_FIELDS:
        if kw.get(k) is None:
            kw[k] = token_ids[k]
    if config.thought.get("mask_special_tokens"):
        kw["masked_token_ids"] = tuple(sorted(set(kw.get("masked_token_ids") or ())
                                              | set(special_token_ids)))
    return ThoughtConfig(**kw)


def thought_init_text(thought: ConfigDict) -> str | None:
    """`config.thought.init_token`, the text the new thought embeddings start from; an
    empty string (or None) means zero-initialised embeddings."""
    return thought.get("init_token") or None


def parse_thought_schedule(text: str) -> tuple[tuple[int, int], ...]:
    """`"0:4,200:8"` -> `((0, 4), (200, 8))`: (first update, n_ahead) pairs, steps
    strictly increasing. "" -> (). Raises ConfigError naming config.thought_schedule."""
    text = (text or "").strip()
    if not text:
        return ()
    points: list[tuple[int, int]] = []
    for item in text.split(","):
        step, sep, n_ahead = item.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            point = (int(step), int(n_ahead))
        except ValueError:
            raise ConfigError(f"config.thought_schedule={text!r}: entry {item.strip()!r} is "
                              "not step:n_ahead (e.g. '0:4,200:8')") from None
        _check(point[0] >= 0, f"config.thought_schedule={text!r}: step {point[0]} must be "
                              ">= 0")
        _check(not points or point[0] > points[-1][0],
               f"config.thought_schedule={text!r}: steps must be strictly increasing")
        points.append(point)
    return tuple(points)


def n_ahead_at(schedule: tuple[tuple[int, int], ...], step: int, default: int) -> int:
    """n_ahead of the update that starts with `step` updates done: the value of the last
    schedule entry at or before `step`, else `default`."""
    n = default
    for first, n_ahead in schedule:
        if first <= step:
            n = n_ahead
    return n


def model_fields(model: ConfigDict) -> dict[str, Any]:
    """The ModelConfig fields `config.model` sets: all but the tokenizer's
    (TOKENIZER_MODEL_FIELDS), for `model_setup.inline_model_config`."""
    return {f.name: model[f.name] for f in dataclasses.fields(ModelConfig)
            if f.name not in TOKENIZER_MODEL_FIELDS}
