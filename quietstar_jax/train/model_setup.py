"""The model a config describes: a Hugging Face checkpoint or a fresh inline Llama,
with its tokenizer and thought params, placed on the mesh.

Params are created (or loaded) straight into their shardings, so a model larger
than one device never has to fit on one.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from jax.sharding import Mesh

from quietstar_jax import sharding
from quietstar_jax.model import RUNTIME_FIELDS, ModelConfig, Params, init_params
from quietstar_jax.thought import init_gate_params, init_thought_params
from quietstar_jax.train.config import model_fields, thought_init_text
from quietstar_jax.train.tokenizer import ByteTokenizer, HFTokenizer, TextTokenizer


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    params: Params
    tokenizer: TextTokenizer
    hf_tokenizer: Any | None  # the transformers tokenizer, for export


def inline_model_config(model: Any, vocab_size: int) -> ModelConfig:
    """ModelConfig of `config.model` without `hf_path`: its fields (`model_fields`, read
    off the dataclass), the vocabulary size and the byte tokenizer's bos/eos ids."""
    return ModelConfig(vocab_size=vocab_size, bos_token_id=ByteTokenizer.bos_token_id,
                       eos_token_id=ByteTokenizer.eos_token_id, **model_fields(model))


def build_inline_model(model: Any, thought: Any, mesh: Mesh, seed: int) -> LoadedModel:
    """A random-init Llama with the byte tokenizer and fresh thought params."""
    tok = ByteTokenizer()
    cfg = inline_model_config(model, tok.vocab_size)
    init_token = tok.init_token_id(thought_init_text(thought))

    def init(key: jax.Array) -> Params:
        k_model, k_thought = jax.random.split(key)
        params = init_params(cfg, k_model)
        params["thought"] = init_thought_params(params, cfg, k_thought, init_token,
                                                thought.embedding_scale)
        return params

    params = sharding.sharded_init(init, mesh, sharding.params_logical_axes(cfg),
                                   jax.random.key(seed))
    return LoadedModel(cfg, add_think_gate(params, cfg, thought, mesh, seed), tok, None)


def wants_think_gate(thought: Any) -> bool:
    """Sparse thoughts (`config.thought.think_k` set) with a gate loss
    (`gate_loss_weight` > 0) train a think gate; without one, positions are random."""
    return thought.get("think_k") is not None and thought.get("gate_loss_weight", 0.0) > 0


def add_think_gate(params: Params, cfg: ModelConfig, thought: Any, mesh: Mesh,
                   seed: int) -> Params:
    """`params` with fresh think gate params (`params["think_gate"]`, placed on the
    mesh) when the config trains one (`wants_think_gate`); unchanged otherwise."""
    if not wants_think_gate(thought) or "think_gate" in params:
        return params
    axes = sharding.params_logical_axes(cfg, with_thought=False, with_gate=True)
    lengths = thought.get("think_lengths")
    n_lengths = len(lengths) if lengths else 1  # one output per thought length
    gate = sharding.sharded_init(lambda key: init_gate_params(cfg, key, n_lengths), mesh,
                                 axes["think_gate"], jax.random.fold_in(jax.random.key(seed), 25))
    return {**params, "think_gate": gate}


def load_hf_model(model: Any, thought: Any, mesh: Mesh, seed: int) -> LoadedModel:
    """The checkpoint at `config.model.hf_path` with thought tokens and params (new
    thought params start from `config.thought.init_token`, stored divided by
    `config.thought.embedding_scale`)."""
    from quietstar_jax import hf

    path = model.hf_path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"config.model.hf_path={path!r} does not exist or is not a "
                                "directory")
    cfg, params, hf_tok = hf.load_pretrained(
        path, sharding=sharding.sharding_by_path(mesh), rng=jax.random.key(seed),
        init_token=thought_init_text(thought), embedding_scale=thought.embedding_scale,
        **{name: model[name] for name in RUNTIME_FIELDS})
    if hf_tok is None:
        raise FileNotFoundError(f"config.model.hf_path={path!r} has no tokenizer files; the "
                                "trainer needs the checkpoint's tokenizer")
    params = add_think_gate(params, cfg, thought, mesh, seed)
    return LoadedModel(cfg, params, HFTokenizer(hf_tok), hf_tok)


def model_for_training(config: Any, mesh: Mesh) -> LoadedModel:
    """The model of `config` (see `quietstar_jax.train.config.base_config`)."""
    if config.model.hf_path:
        return load_hf_model(config.model, config.thought, mesh, config.seed)
    return build_inline_model(config.model, config.thought, mesh, config.seed)


def count_params(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
