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

A save that fails (a full disk, an I/O error; found when the background write ends,
i.e. at the next save or wait) is one `CheckpointWriteError` line naming the step and
the newest intact step on disk; the earlier steps stay as they were.

Orbax's own log records and the tracebacks its background threads leave behind (a
failed restore's "Event loop is closed", asyncio's "Task exception was never
retrieved" for the tensorstore reads it abandoned) are not shown unless the `absl` logger is
at INFO or below (`train.py --verbosity=0`): the trainer reports those events in its
own line.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import threading
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


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (one line: the step, the reason, the newest
    intact step)."""


def library_verbose() -> bool:
    """Whether library log records and tracebacks are wanted: the `absl` logger (which
    orbax logs to) at INFO or below, as `train.py --verbosity=0` sets it."""
    return logging.getLogger("absl").getEffectiveLevel() <= logging.INFO


def _is_orbax_record(record: logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" in (record.pathname or "")


def _is_closed_loop_noise(exc: BaseException | None) -> bool:
    """The RuntimeError that tensorstore's late callbacks raise into the event loop
    orbax closed after a failed read (printed as an unraisable exception)."""
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _is_abandoned_read_noise(record: logging.LogRecord) -> bool:
    """asyncio's "Task exception was never retrieved" for a tensorstore read that a
    failed restore left behind (its traceback has only asyncio frames; the error text
    carries the TensorStore spec)."""
    exc = record.exc_info[1] if record.exc_info else None
    return (record.getMessage().startswith("Task exception was never retrieved")
            and exc is not None and "[tensorstore_spec=" in str(exc))


class _LibraryNoise:
    """While any Checkpointer is open: drop orbax's log records and the closed-event-
    loop tracebacks, unless `library_verbose()`. Reference-counted, process-wide.

    The asyncio filter stays once installed: an abandoned task reports its exception
    when it is garbage-collected, which can be after the last Checkpointer closed."""

    _lock = threading.Lock()
    _users = 0
    _previous_hook: Any = None
    _asyncio_filtered = False

    @staticmethod
    def _filter(record: logging.LogRecord) -> bool:
        return library_verbose() or not _is_orbax_record(record)

    @staticmethod
    def _asyncio_filter(record: logging.LogRecord) -> bool:
        return library_verbose() or not _is_abandoned_read_noise(record)

    @classmethod
    def _unraisable(cls, unraisable: Any) -> None:
        if not library_verbose() and _is_closed_loop_noise(unraisable.exc_value):
            return
        (cls._previous_hook or sys.__unraisablehook__)(unraisable)

    @classmethod
    def acquire(cls) -> None:
        with cls._lock:
            cls._users += 1
            if not cls._asyncio_filtered:
                logging.getLogger("asyncio").addFilter(cls._asyncio_filter)
                cls._asyncio_filtered = True
            if cls._users == 1:
                logging.getLogger("absl").addFilter(cls._filter)
                cls._previous_hook = sys.unraisablehook
                sys.unraisablehook = cls._unraisable

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            if cls._users == 0:
                return
            cls._users -= 1
            if cls._users == 0:
                logging.getLogger("absl").removeFilter(cls._filter)
                if sys.unraisablehook is cls._unraisable:
                    sys.unraisablehook = cls._previous_hook or sys.__unraisablehook__
                cls._previous_hook = None


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silence orbax's absl warnings (a damaged step is reported in our own words),
    unless `library_verbose()`."""
    logger = logging.getLogger("absl")
    level = logger.level
    if not library_verbose():
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _errnos(e: BaseException) -> set[int]:
    """The errno of every OSError in `e`'s chain (causes, contexts, groups)."""
    found: set[int] = set()
    todo, seen = [e], set()
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno is not None:
            found.add(x.errno)
        todo += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]
    return found


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` (or an error in its chain) says the disk or quota is full; errors
    from tensorstore carry it in their text only."""
    if _errnos(e) & {errno.ENOSPC, errno.EDQUOT}:
        return True
    text = str(e)
    return "No space left on device" in text or "Disk quota exceeded" in text


def intact_steps(directory: str | os.PathLike) -> list[int]:
    """The finished steps under a checkpoint directory (orbax renames a step into its
    final, all-digit name only once it is complete), oldest first."""
    try:
        names = [p.name for p in epath.Path(directory).iterdir()]
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit())


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...] | None]:
    """`"params.layers.attn.q" -> shape` of every leaf (dict keys, attributes and indices
    alike, so a TrainState and its orbax metadata tree give the same names)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="."):
            (tuple(leaf.shape) if hasattr(leaf, "shape") else None)
            for path, leaf in leaves}


class Checkpointer:
    """Periodic/final checkpoints kept to the last `max_to_keep`."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self._pending: int | None = None  # the step whose background write may still run
        self._failed = False  # a save failed (reported once; later waits stay quiet)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        _LibraryNoise.acquire()  # before the manager, which may warn about what it finds
        self._open = True
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                               DATA_ITEM: ocp.JsonCheckpointHandler()})
        except BaseException:
            self._open = False
            _LibraryNoise.release()
            raise

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every saved step."""
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        """Start saving `state` (a pytree of jax arrays) and `data_state` as `step`;
        returns once the arrays are copied off the devices, the write goes on in the
        background. A step that is already saved is left as it is. Raises
        CheckpointWriteError when this save, or the previous one still being
        written, fails."""
        self.wait()  # the previous save's failure is that step's, not this one's
        if step in self.manager.all_steps():
            return
        self._pending = step
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
                force=True)
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore fail in many types
            raise self._write_error(step, e) from None

    def _write_error(self, step: int | None, e: BaseException) -> CheckpointWriteError:
        """The one-line error of a failed save of `step` (None: not known)."""
        self._failed = True
        self._pending = None
        intact = [s for s in intact_steps(self.directory) if s != step]
        last = (f"the last intact step is {intact[-1]}" if intact
                else "there is no intact step yet")
        what = f"step {step}" if step is not None else "a checkpoint"
        if is_disk_full(e):
            err = CheckpointWriteError(f"no space left on {self.directory} while saving {what}; "
                                       f"{last}")
            err.errno = errno.ENOSPC
            return err
        return CheckpointWriteError(f"could not save {what} to {self.directory} "
                                    f"({_one_line(e)}); {last}")

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
        if any(n.startswith("params.layers.q") for n in saved):
            raise CheckpointError(
                f"{where} has the flat layer layout of checkpoints written before the "
                "decoder layer held its attention and MLP as submodules (params.layers.q; "
                "now params.layers.attn.q): resume it with the quietstar-jax version that "
                "wrote it, or export it to a Hugging Face checkpoint there "
                "(train.py --config.export_hf_dir) and start from that")
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
        there is no checkpoint. Damaged newer steps are moved aside and reported
        through `say`, one line each (step, reason, where it went); no intact step
        at all is a CheckpointError naming the directory. A step that does not match
        the model is a CheckpointError (see `check_matches`)."""
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
                continue
            self._set_aside(damaged, say)
            return step, state, data_state
        if damaged:
            newest, why = damaged[0]
            raise CheckpointError(
                f"no intact checkpoint in {self.directory}: all {len(damaged)} steps "
                f"({', '.join(str(s) for s, _ in damaged)}) are damaged (step {newest}: {why}); "
                "move the directory away to start afresh")
        return None

    def _set_aside(self, damaged: list[tuple[int, str]], say: Callable[[str], None]) -> None:
        """Move damaged step directories to `<directory>.damaged/` (process 0), so
        that new saves of those steps can happen and nothing damaged is deleted; one
        warning line per step."""
        if not damaged:
            return
        if jax.process_index() == 0:
            aside = epath.Path(self.directory + ".damaged")
            aside.mkdir(parents=True, exist_ok=True)
            for step, why in damaged:
                dest = aside / str(step)
                if dest.exists():
                    dest = aside / f"{step}-{uuid.uuid4().hex[:8]}"
                (epath.Path(self.directory) / str(step)).rename(dest)
                say(f"warning: checkpoint step {step} in {self.directory} is damaged and "
                    f"skipped ({why}); moved it to {dest}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("quietstar_damaged_checkpoints")
        self.manager.reload()

    def wait(self) -> None:
        """Block until pending saves are on disk. Raises CheckpointWriteError when one
        failed; after that, quiet (the failure is reported once)."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore fail in many types
            if self._failed:
                return
            raise self._write_error(self._pending, e) from None
        self._pending = None

    def close(self) -> None:
        """Wait for pending saves, then release the manager (a failed save raises
        CheckpointWriteError, once)."""
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - its failure was reported by wait()
                if not self._failed:
                    raise
            finally:
                # After a failed save, orbax's threads go on failing (and logging) after
                # the manager is closed: their noise stays filtered.
                if self._open and not self._failed:
                    self._open = False
                    _LibraryNoise.release()


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
