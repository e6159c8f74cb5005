"""The paper's setting: Mistral-7B on OpenWebMath (docs/ALGORITHM.md, section 10:
Optimisation in the paper's setting).

Every number is the authors' released code's: AdamW at 1e-6, weight decay 0.001,
20 warm-up steps then linear decay, clipping at 1.0, 8 sequences per step in 2
micro-batches of 4 (each sequence thinks twice), sequences of 256 tokens, n_ahead 12
(start, 9 sampled tokens, end; n_ahead also counts the base step), each thought scored
on 4 true tokens, bfloat16 compute.

Needs a local Hugging Face checkpoint (e.g. `huggingface-cli download
mistralai/Mistral-7B-v0.1 --local-dir checkpoints/Mistral-7B-v0.1`; give another
path with `--config.model.hf_path`) and the `datasets` package for
`open-web-math/open-web-math` (or point `--config.data.source=files
--config.data.path=...` at local jsonl/parquet files).

Sized for one host with 8 GPUs of 80 GB: float32 master weights and Adam moments are
sharded over 4-way FSDP x 2-way tensor parallelism (`--config.mesh="(1,4,2)"`); each
micro-batch of 4 sequences splits over the 4 FSDP groups. The CPU compiler's memory
plan of one micro-batch gives 21.7 GB per device (18.9 GB with bfloat16 params;
BENCHMARKS.md, memory plan); the TPU compiler's figures, for the whole step with its
2-micro-batch accumulation, are below.
With more chips, raise `batch_size` so that batch_size / grad_accum stays divisible by
data x fsdp.

TPU slices, as the TPU compiler itself sizes this step (`benchmarks/tpu_compile.py`,
32 layers extrapolated from compiles at 2 and 4; BENCHMARKS.md):
  v5p-8 (4 chips):   --config.mesh="(1,4,1)"                  60.6 of 102 GB per chip
                     (micro-batches up to 32 sequences by the per-sequence slope)
  v5e-16 (16 chips): --config.mesh="(1,4,4)" --config.model.param_dtype=bfloat16
                     11.5 of 17.2 GB (float32 masters: 17.5, does not fit)
  v4-8 (4 chips):    --config.mesh="(1,4,1)" --config.model.param_dtype=bfloat16
                     --config.grad_accum_dtype=params          32.3 of 34.4 GB
                     (with the float32 gradient sum: 39.5, does not fit)
  v4-16 (8 chips):   --config.mesh="(1,4,2)"                  30.5 of 34.4 GB per chip
  v5p-32 (16 chips): --config.mesh="(1,4,4)"                  17.2 of 102 GB per chip
"""

from quietstar_jax.train.config import base_config


def get_config():
    config = base_config()
    config.model.hf_path = "checkpoints/Mistral-7B-v0.1"
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.scan_layers = True
    config.model.remat = "full"

    # ThoughtConfig defaults are the authors' (n_ahead 12, n_ahead_talk 4, 2 passes,
    # policy_loss_beta 1e6, reinforce temperature 3, embedding scale 100).

    config.data.source = "hf"
    config.data.hf_name = "open-web-math/open-web-math"
    config.data.hf_split = "train"
    config.data.text_field = "text"
    config.data.seq_len = 256

    config.optim.lr = 1e-6
    config.optim.warmup_steps = 20
    config.optim.weight_decay = 0.001
    config.optim.clip_norm = 1.0

    config.batch_size = 8
    config.grad_accum = 2
    config.num_steps = 1000
    config.log_every = 10
    config.eval_every = 100
    config.checkpoint_every = 100
    config.keep_checkpoints = 3
    config.mesh = (1, 4, 2)
    config.export_hf_dir = "checkpoints/quietstar-mistral-7b"
    return config
