"""The self-contained demo: a tiny Llama learns arithmetic word problems with thoughts.

The default of `python train.py` and of the installed `quietstar-train` command
(`configs/default.py` names it, for `--config configs/default.py`).

Needs no download and no file outside the repository: a byte-level tokenizer, a
2-layer Llama from random init, text generated from a seed. Finishes in about
two minutes on 2 CPU cores (compile included): the base LM loss falls from 5.5
nats/byte (uniform over 260 ids) to about 1.1, the loss with thoughts below it.
"""

from ml_collections import ConfigDict

from quietstar_jax.train.config import base_config


def get_config() -> ConfigDict:
    config = base_config()
    config.model.hidden_size = 64
    config.model.intermediate_size = 172
    config.model.num_layers = 2
    config.model.num_heads = 4
    config.model.num_kv_heads = 2

    config.thought.n_ahead = 5  # start, 2 sampled tokens, end
    config.thought.n_ahead_talk = 2
    config.thought.n_passes = 2
    # The authors' 1e6 assumes a pretrained LM; from random init it would drown the
    # language-modelling signal, so the demo weighs REINFORCE less.
    config.thought.policy_loss_beta = 10.0

    config.data.source = "generated"
    config.data.num_documents = 20000
    config.data.seq_len = 96

    config.optim.lr = 3e-3
    config.optim.warmup_steps = 20
    config.optim.weight_decay = 0.01

    config.batch_size = 8
    config.num_steps = 160
    config.log_every = 20
    config.eval_every = 80  # reward pages at steps 80 and 160
    config.checkpoint_every = 80
    return config
