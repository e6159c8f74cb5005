"""Hugging Face checkpoints <-> this package: configs, safetensors params, tokenizers.

The only package that knows checkpoint file formats. It reads and writes

* `config.json` of Llama, Mistral and Qwen2 causal LMs, transformers 4 and 5 forms
  (`hf.config`),
* `model.safetensors` or a sharded `model.safetensors.index.json` checkpoint, tensor
  by tensor (`hf.safetensors_io`), converting torch `[out, in]` matrices into this
  package's layout and stacking layers on a leading axis (`hf.layout`), each param
  placed on its devices or mesh before the next is read (`hf.loading`),
* the authors' Quiet-STaR layout: `start_embedding`, `end_embedding` (`[2, H]`, row
  0 is the stored value) and the mixing head `talk_head.0.{0,2,4}` (torch layout),
  which map to `params["thought"]` (`hf.authors`),
* tokenizers, with the two thought tokens `<|startthought|>` and `<|endthought|>`
  (`hf.tokenizer`),

and puts them together as checkpoint directories (`hf.pretrained`: `load_pretrained`,
`load_model`, `save_pretrained`). Every name callers use is importable from here.
"""

from __future__ import annotations

from quietstar_jax.hf.authors import AUTHORS_THOUGHT_KEYS
from quietstar_jax.hf.config import (
    ARCHITECTURES,
    CONFIG_NAME,
    PathLike,
    model_config_from_hf,
    model_config_to_hf,
)
from quietstar_jax.hf.layout import tensor_specs
from quietstar_jax.hf.loading import (
    ShardingSpec,
    check_finite_params,
    grow_vocab,
    has_authors_thought_params,
    load_params,
)
from quietstar_jax.hf.pretrained import (
    EXPORT_MANIFEST,
    check_export_target,
    load_model,
    load_pretrained,
    save_pretrained,
)
from quietstar_jax.hf.safetensors_io import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from quietstar_jax.hf.spec import TensorSpec
from quietstar_jax.hf.tokenizer import (
    END_THOUGHT_TOKEN,
    START_THOUGHT_TOKEN,
    THOUGHT_INIT_STRING,
    TOKENIZER_FILES,
    add_thought_tokens,
    check_tokenizer_fits,
    load_tokenizer,
    special_token_ids,
    thought_init_token_id,
    thought_token_ids,
)

__all__ = [
    "ARCHITECTURES",
    "AUTHORS_THOUGHT_KEYS",
    "CONFIG_NAME",
    "END_THOUGHT_TOKEN",
    "EXPORT_MANIFEST",
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "START_THOUGHT_TOKEN",
    "THOUGHT_INIT_STRING",
    "TOKENIZER_FILES",
    "PathLike",
    "ShardingSpec",
    "TensorSpec",
    "add_thought_tokens",
    "check_export_target",
    "check_finite_params",
    "check_tokenizer_fits",
    "grow_vocab",
    "has_authors_thought_params",
    "load_model",
    "load_params",
    "load_pretrained",
    "load_tokenizer",
    "model_config_from_hf",
    "model_config_to_hf",
    "save_pretrained",
    "special_token_ids",
    "tensor_specs",
    "thought_init_token_id",
    "thought_token_ids",
]
