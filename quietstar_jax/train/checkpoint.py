"""Orbax checkpoints of the train state and the data position.

Layout: `<workdir>/checkpoints/<step>/{state,data}`; `state` is the TrainState
pytree (sharded arrays are written by every process, each its own shards), `data`
the data iterator's JSON position. Saves are asynchronous; orbax writes each step
under a temporary name and renames it when complete, so a step directory that
exists is whole, and `latest_step` never returns a half-written one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Periodic/final checkpoints kept to the last `max_to_keep`."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        """Start saving `state` (a pytree of jax arrays) and `data_state` as `step`;
        returns once the arrays are copied off the devices, the write goes on in the
        background. A step that is already saved is left as it is."""
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """(state, data_state) of `step`; `abstract_state` is a pytree of
        `jax.ShapeDtypeStruct` with shardings, which the arrays are restored into."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out["state"], dict(out["data"])

    def wait(self) -> None:
        """Block until pending saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)
