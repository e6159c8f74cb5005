"""Quiet-STaR on a real pretrained model: Karpathy's 260K-parameter TinyStories Llama
(Hugging Face format) trained on TinyStories text.

Paths default to the project's `shared/data` folder next to the repository; give
another folder as `--config configs/stories260k.py:/path/to/data` (it must hold
`stories260K-hf/` and `tinystories/tinystories_val_head.txt`) or set the fields
`--config.model.hf_path` and `--config.data.path`.
"""

import os

from quietstar_jax.train.config import base_config

_DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                             "data")


def get_config(data_root: str = ""):
    root = os.path.normpath(data_root or _DEFAULT_DATA)
    config = base_config()
    config.model.hf_path = os.path.join(root, "stories260K-hf")

    # The authors' thought settings, with shorter thoughts to suit CPU: 5 sampled thought
    # tokens, each thought scored on the next 4 true tokens, 2 thoughts per sequence.
    config.thought.n_ahead = 8
    config.thought.n_ahead_talk = 4
    config.thought.n_passes = 2

    config.data.source = "files"
    config.data.path = os.path.join(root, "tinystories", "tinystories_val_head.txt")
    config.data.text_split = "blank_line"  # paragraphs (story boundaries are not kept)
    config.data.seq_len = 128

    # The authors' optimiser, with a learning rate suited to a 260K model and 50 steps.
    config.optim.lr = 1e-4
    config.optim.warmup_steps = 10
    config.optim.weight_decay = 0.001
    config.optim.clip_norm = 1.0

    config.batch_size = 8
    config.grad_accum = 2
    config.num_steps = 50
    config.log_every = 5
    config.eval_every = 25
    config.checkpoint_every = 25
    return config
