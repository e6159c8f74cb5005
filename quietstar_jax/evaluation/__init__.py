"""Evaluation of a Quiet-STaR model, base (no thoughts) and thinking side by side.

* `tasks`: the API: `evaluate_gsm8k`, `evaluate_csqa`, `evaluate_perplexity`,
  `evaluate_cot`.
* `data`: the datasets, prompts, valid answer tokens; `metrics`: the authors' answer
  score, majority vote, NLL bins; `scoring`: base and thinking logits / NLLs at chosen
  positions; `cot`: chain-of-thought sampling with `generation`.
* `cli` / `python -m quietstar_jax.evaluation`: the command line.
"""

from quietstar_jax.evaluation.tasks import (
    evaluate_cot,
    evaluate_csqa,
    evaluate_gsm8k,
    evaluate_perplexity,
)

__all__ = ["evaluate_cot", "evaluate_csqa", "evaluate_gsm8k", "evaluate_perplexity"]
