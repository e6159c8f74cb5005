"""A tiny trainer config (1-layer Llama, byte tokenizer, generated data) that trains,
checkpoints and resumes in seconds; shared by the checkpoint and curriculum tests."""

from __future__ import annotations

from typing import Any

from ml_collections import ConfigDict

from quietstar_jax.train.config import base_config


def tiny_config(cache_dir: str | None, **overrides: Any) -> ConfigDict:
    """6 updates of 4 sequences x 24 tokens, a checkpoint every 2; `overrides` set
    dotted fields (e.g. `thought_schedule="0:4,2:5"`, `grad_accum=2`)."""
    c = base_config()
    c.model.hidden_size = 16
    c.model.intermediate_size = 24
    c.model.num_layers = 1
    c.model.num_heads = 2
    c.model.num_kv_heads = 1
    c.thought.n_ahead = 4
    c.thought.n_ahead_talk = 2
    c.thought.policy_loss_beta = 10.0
    c.data.seq_len = 24
    c.data.num_documents = 64
    c.optim.lr = 1e-2
    c.optim.warmup_steps = 2
    c.batch_size = 4
    c.num_steps = 6
    c.log_every = 1
    c.checkpoint_every = 2
    c.eval_examples = 0
    c.progress_bar = False
    c.compilation_cache_dir = cache_dir
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def get_config(cache_dir: str | None = None) -> ConfigDict:
    """`python train.py --config tests/_tiny_train.py[:CACHE_DIR]`: the tiny config as a
    config file, for tests that run the real command line (seconds per run)."""
    return tiny_config(cache_dir or None)
