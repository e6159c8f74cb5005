"""Quiet-STaR's thoughts, one concern a module:

- `config`: `ThoughtConfig`, every setting and default of the method;
- `schedule`: `ThoughtSchedule`, which step feeds what, at which position id;
- `params`: the thought params (start/end embeddings, mixing head, think gate) as NNX
  modules, `QuietStarLM` / `GatedQuietStarLM` (the decoder with them) and `merge_lm`
  (the module of a params pytree, merged once per public entry point);
- `parallel`: one position's thought, vmapped over positions and rows, the rollout;
- `replay`: the replayed backward pass of a rollout (`remat="full"`);
- `loss`: the Quiet-STaR objective (NLL, rewards, REINFORCE); `sparse`: thoughts at a
  few chosen positions and the think gate's loss.

This package re-exports the names of config, params, parallel and replay (what callers
write as `thought.rollout`, `from quietstar_jax.thought import ThoughtConfig`); loss,
sparse and schedule are imported as modules.
"""

from quietstar_jax.thought.config import (
    SAMPLING_MODES,
    SamplingMode,
    ThoughtConfig,
    check_think_lengths,
    pad_id,
)
from quietstar_jax.thought.parallel import (
    THOUGHT_LOGIT_MASK,
    MappedThoughts,
    PositionInputs,
    PositionThought,
    Rollout,
    RowContext,
    draw_thought,
    given_token_logp,
    map_thoughts,
    mask_thought_logits,
    mix_step,
    mixed_hidden,
    position_key,
    reinforce_logps,
    replayed_hidden,
    rollout,
    run_rollout,
    shift_left,
    step_embedding,
    thought_of_position,
)
from quietstar_jax.thought.params import (
    GATE_HIDDEN,
    GATE_STATS,
    GatedQuietStarLM,
    MixingHead,
    QuietStarLM,
    ThinkGate,
    ThoughtParams,
    gate_logical_axes,
    gate_logit,
    gate_outputs,
    gate_param_decay,
    gate_param_shapes,
    init_gate_params,
    init_thought_params,
    merge_lm,
    mixing_weight,
    thought_embedding,
    thought_logical_axes,
    thought_module,
    thought_param_decay,
    thought_param_shapes,
    uniform_init,
)
from quietstar_jax.thought.replay import JointGeometry, joint_layer, replay_layers

__all__ = [
    "GATE_HIDDEN", "GATE_STATS", "SAMPLING_MODES", "THOUGHT_LOGIT_MASK", "GatedQuietStarLM",
    "JointGeometry", "MappedThoughts", "MixingHead", "PositionInputs", "PositionThought",
    "QuietStarLM", "Rollout", "RowContext", "SamplingMode", "ThinkGate", "ThoughtConfig",
    "ThoughtParams", "check_think_lengths", "draw_thought", "gate_logical_axes", "gate_logit",
    "gate_outputs", "gate_param_decay", "gate_param_shapes", "given_token_logp",
    "init_gate_params", "init_thought_params", "joint_layer", "map_thoughts",
    "mask_thought_logits", "merge_lm", "mix_step", "mixed_hidden", "mixing_weight", "pad_id",
    "position_key", "reinforce_logps", "replay_layers", "replayed_hidden", "rollout",
    "run_rollout", "shift_left", "step_embedding", "thought_embedding", "thought_logical_axes",
    "thought_module", "thought_of_position", "thought_param_decay", "thought_param_shapes",
    "uniform_init",
]
