"""Orbax checkpoints of the train state and the data position.

Layout: `<workdir>/checkpoints/<step>/{state,data}`; `state` is the TrainState
pytree (sharded arrays are written by every process, each its own shards), `data`
the data iterator's JSON position. Saves are asynchronous; orbax writes each step
under a temporary name and renames it when complete, so a step directory that
exists is whole, and `latest_step` never returns a half-written one.

A step that is on disk but cannot be read (a truncated array file, a lost metadata
file or item directory: damage from outside, e.g. a full disk or a partial copy) is
skipped by `restore_latest`, which falls back to the newest intact step and moves
the damaged one aside to `<checkpoints>.damaged/<step>` (never deleting it). A step
whose arrays do not match the model (another architecture) is an error naming the
parameter and both shapes, not damage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINTS_DIR = "checkpoints"  # under the workdir
STATE_ITEM = "state"  # the TrainState item of a step directory
DATA_ITEM = "data"  # the data position item of a step directory

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint directory the trainer cannot resume from (one line)."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()).strip("'\"").split(" See full TensorStore details")[0]
    if len(text) > 200:
        text = text[:200] + " ..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silence orbax's absl warnings (a damaged step is reported in our own words)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...] | None]:
    """`"params.layers.q" -> shape` of every leaf (dict keys, attributes and indices
    alike, so a TrainState and its orbax metadata tree give the same names)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="."):
            (tuple(leaf.shape) if hasattr(leaf, "shape") else None)
            for path, leaf in leaves}


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
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                           DATA_ITEM: ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every saved step."""
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

    def check_matches(self, step: int, abstract_state: Any) -> None:
        """Raise CheckpointError when `step`'s arrays do not fit `abstract_state`
        (naming the first parameter that differs and both shapes); any other error
        (unreadable metadata) propagates: the step is damaged."""
        with _quiet_absl():
            saved = _shapes_by_path(self.manager.item_metadata(step)["state"])
        if not saved:
            raise ValueError("its state metadata (_METADATA) is missing or empty")
        where = f"checkpoint step {step} in {self.directory}"
        for name, shape in _shapes_by_path(abstract_state).items():
            if name not in saved:
                raise CheckpointError(f"{where} does not match the model: it has no {name} "
                                      "(a different architecture or config?)")
            if saved[name] is not None and shape is not None and saved[name] != shape:
                raise CheckpointError(f"{where} does not match the model: {name} has shape "
                                      f"{saved[name]} in the checkpoint but {shape} in the "
                                      "model (a different architecture or config?)")

    def restore_latest(
        self, abstract_state: Any, say: Callable[[str], None] = logger.warning
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, data_state) of the newest step that restores, or None when
        there is no checkpoint. Damaged newer steps are reported through `say` (step
        and reason) and moved aside; no intact step at all is a CheckpointError
        naming the directory. A step that does not match the model is a
        CheckpointError (see `check_matches`)."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        damaged: list[tuple[int, str]] = []
        for step in steps:
            try:
                self.check_matches(step, abstract_state)
                state, data_state = self.restore(step, abstract_state)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - damage shows up as many error types
                damaged.append((step, _one_line(e)))
                say(f"warning: checkpoint step {step} in {self.directory} is damaged and "
                    f"skipped ({_one_line(e)})")
                continue
            self._set_aside([s for s, _ in damaged], say)
            return step, state, data_state
        if damaged:
            newest, why = damaged[0]
            raise CheckpointError(
                f"no intact checkpoint in {self.directory}: all {len(damaged)} steps "
                f"({', '.join(str(s) for s, _ in damaged)}) are damaged (step {newest}: {why}); "
                "move the directory away to start afresh")
        return None

    def _set_aside(self, steps: list[int], say: Callable[[str], None]) -> None:
        """Move damaged step directories to `<directory>.damaged/` (process 0), so
        that new saves of those steps can happen and nothing damaged is deleted."""
        if not steps:
            return
        if jax.process_index() == 0:
            aside = epath.Path(self.directory + ".damaged")
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                dest = aside / str(step)
                if dest.exists():
                    dest = aside / f"{step}-{uuid.uuid4().hex[:8]}"
                (epath.Path(self.directory) / str(step)).rename(dest)
                say(f"moved the damaged checkpoint step {step} to {dest}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("quietstar_damaged_checkpoints")
        self.manager.reload()

    def wait(self) -> None:
        """Block until pending saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)


def checkpoints_dir(workdir: str | os.PathLike) -> str:
    """The checkpoint directory of a training workdir (`<workdir>/checkpoints`)."""
    return os.path.join(workdir, CHECKPOINTS_DIR)


def training_step_dir(path: str | os.PathLike) -> tuple[Path, Path]:
    """(workdir, `checkpoints/<step>` directory) of a training workdir (its newest
    finished step) or of one of its step directories. A path that is neither is a
    FileNotFoundError; the workdir is the one holding the run's `config.json`."""
    path = Path(path)
    ckpts = path / CHECKPOINTS_DIR
    if ckpts.is_dir():
        steps = sorted((int(p.name) for p in ckpts.iterdir()
                        if p.name.isdigit() and (p / STATE_ITEM).is_dir()), reverse=True)
        if not steps:
            raise FileNotFoundError(f"{ckpts} holds no finished checkpoint")
        return path, ckpts / str(steps[0])
    if (path / STATE_ITEM).is_dir() and (path.parent.parent / "config.json").is_file():
        return path.parent.parent, path
    raise FileNotFoundError(
        f"{path} is neither a Hugging Face directory (config.json) nor a training workdir "
        "(config.json + checkpoints/) nor a checkpoints/<step> directory")


def load_checkpoint_params(path: str | os.PathLike) -> dict[str, Any]:
    """The params of a training checkpoint: of `path`'s newest finished step when it
    is a workdir, else of the step directory `path` (see `training_step_dir`),
    restored by orbax without a target (host-local arrays, the saved dtypes). An
    unreadable step is one ValueError line naming it."""
    _, step_dir = training_step_dir(path)
    try:
        with _quiet_absl():
            state = ocp.StandardCheckpointer().restore(str((step_dir / STATE_ITEM).resolve()))
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint fails in many ways
        reason = " ".join(str(e).split())[:200]
        raise ValueError(f"{step_dir}: the checkpoint cannot be read ({type(e).__name__}: "
                         f"{reason}); pass an intact checkpoints/<step> directory") from None
    if not isinstance(state, dict) or "params" not in state:
        raise ValueError(f"{step_dir}: the checkpoint holds no params")
    return state["params"]
