"""Quiet-STaR on the real SmolLM2-135M (Llama: 30 layers, hidden 576, vocab 49,152 + 2
thought tokens, tied head) on OpenWebMath text.

The model is SmolLM2-135M-Instruct converted once to a float32 Hugging Face directory
in a cache folder (never into the repository):

    pip install gguf accelerate
    python ../shared/data/smollm2-135m/to_hf.py ~/.cache/quietstar/smollm2-135m-hf

`--config configs/smollm2.py:/path/to/hf-dir` (or `--config.model.hf_path`) points at
another copy; `--config.data.path` at other text. The numeric policy is the one
BENCHMARKS.md measured for this model on CPU: full rematerialisation of each layer
(without it the 15 forwards' activations take ~16 GB at 2 x 64 tokens) and the fused,
chunked vocabulary projections (`model.vocab_chunk`, default 8192 columns).
"""

import os

from quietstar_jax.train.config import base_config

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_MODEL = os.environ.get(
    "QUIETSTAR_SMOLLM2", os.path.expanduser("~/.cache/quietstar/smollm2-135m-hf"))
_DEFAULT_TEXT = os.path.join(_HERE, "..", "..", "shared", "data", "openwebmath",
                             "openwebmath_samples.txt")


def get_config(hf_path: str = ""):
    config = base_config()
    config.model.hf_path = hf_path or _DEFAULT_MODEL
    config.model.remat = "full"

    # The authors' thought settings (n_ahead 12, n_ahead_talk 4, 2 passes).
    config.data.source = "files"
    config.data.path = os.path.normpath(_DEFAULT_TEXT)
    config.data.text_split = "line"  # one document per line
    config.data.seq_len = 64

    # The authors' optimiser (AdamW 1e-6, decay 0.001, clipping 1.0, 20 warm-up steps).
    config.optim.lr = 1e-6
    config.optim.warmup_steps = 20
    config.optim.weight_decay = 0.001
    config.optim.clip_norm = 1.0

    config.batch_size = 2
    config.grad_accum = 1
    config.num_steps = 20
    config.log_every = 1
    config.eval_every = 10
    config.checkpoint_every = 10
    return config
