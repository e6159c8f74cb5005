"""The training command line: `quietstar-train` (installed) and `python train.py`.

    quietstar-train [--config configs/X.py] [--workdir DIR] [--config.FIELD=VALUE ...]

With no `--config`, runs the self-contained demo (`demo_config.py`, which
`configs/default.py` names). With no `--workdir`, writes to `./workdir/<config file
name>` (`./workdir/default` for the demo); a workdir that holds checkpoints is resumed.
See docs/TRAINING.md. Errors name the command as it was called (`train.py: error: ...`).

Output: the progress lines (`step N: ...`, `done: ...`) on stdout, the progress bar,
warnings and errors on stderr. Exit status: 0 done (or stopped by SIGTERM, with a
checkpoint), 1 a run that failed (non-finite loss, a checkpoint that could not be
written), 2 bad input (one `train.py: error: ...` line, before compiling), 130
Ctrl-C. Library log records and tracebacks (orbax's) only with `--verbosity=0`.
"""

from __future__ import annotations

import gc
import os
import re
import sys
import warnings

from absl import app, flags, logging
from ml_collections import config_flags

# A failed checkpoint save (e.g. a full disk) abandons orbax's write coroutines; when
# they are collected Python reports each as "never awaited", after the one-line error.
warnings.filterwarnings("ignore", message=r"coroutine 'async_serialize_from_host",
                        category=RuntimeWarning)

_DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_config.py")
# `train.py` or `quietstar-train`: the name errors are reported under.
PROG = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "quietstar-train"
if PROG in ("-c", "__main__.py", ""):
    PROG = "quietstar-train"


def _fail(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.exit(2)


def _config_error(e: Exception, argv: list[str]) -> str:
    """One line for an error ml_collections raised while applying overrides."""
    if isinstance(e, AttributeError | KeyError):  # an override of a key that does not exist
        text = " ".join(str(e).replace("\\n", " ").replace("\\'", "").split()).strip("'\"")
        key = text.split()[0].strip("'\"") if text else "?"
        given = [a.split("=")[0] for a in argv if a.startswith("--config.")
                 and re.search(rf"\b{re.escape(key)}\b", a.split("=")[0])]
        hint = text[len(key):].strip()
        return f"unknown config key {given[0] if given else key}" + (f" ({hint})" if hint else "")
    return f"bad config override: {' '.join(str(e).split())}"


try:  # the default config file is loaded (with the overrides) right here
    config_flags.DEFINE_config_file(
        "config", _DEMO_CONFIG,
        "Config file (a Python file with get_config()); override fields with "
        "--config.FIELD=VALUE, e.g. --config.thought.n_ahead=16.", lock_config=True)
except (AttributeError, KeyError, TypeError, ValueError) as e:
    _fail(_config_error(e, sys.argv))
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and reward pages go here "
                    "(default ./workdir/<config name>); an existing one is resumed.")


def _config_file_arg(argv: list[str]) -> str:
    """The --config file named in `argv` (without its `:arg`), or '?'."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1].split(":")[0]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":")[0]
    return "?"


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config errors reported in one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(" ".join(str(e).split()))
    except SyntaxError as e:  # the config file does not parse
        _fail(f"config file {e.filename or _config_file_arg(argv)}:{e.lineno}: "
              f"{e.msg} (not valid Python)")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        _fail(_config_error(e, argv))
    except Exception as e:  # noqa: BLE001 - the config file's own code failed
        _fail(f"config file {_config_file_arg(argv)!r} could not be loaded "
              f"({type(e).__name__}: {' '.join(str(e).split())})")
    return []


def _verbose(argv: list[str]) -> bool:
    """Whether absl's --verbosity (-v) was given: library records are then shown."""
    return any(a.startswith(("--verbosity", "-v=")) or a in ("-v", "--v") for a in argv)


def main(argv: list[str]) -> None:
    try:
        _main(argv)
    except KeyboardInterrupt as e:  # Ctrl-C before the loop (or twice): nothing saved
        from quietstar_jax.train.signals import Interrupted

        message = str(e) if isinstance(e, Interrupted) else "interrupted"
        sys.stdout.flush()
        sys.stderr.write(f"{PROG}: {message}\n")
        _exit(130)


def _exit(code: int) -> None:
    """sys.exit, or os._exit when a compile left behind by a stop still runs on its
    thread (Python cannot stop it, and XLA aborts if the interpreter ends under it)."""
    from quietstar_jax.train.signals import compile_running

    if compile_running():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _main(argv: list[str]) -> None:
    from quietstar_jax import distributed

    # Several processes (a TPU pod, several GPU hosts) form one job; a no-op otherwise.
    distributed.maybe_initialize()
    if not _verbose(sys.argv):
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}")
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    try:
        config = flags.FLAGS.config
        config.keys()
    except OSError:
        _fail(f"config file {config_file!r} could not be loaded (does it exist and define "
              "get_config()?)")
    name = ("default" if os.path.abspath(config_file) == _DEMO_CONFIG
            else os.path.splitext(os.path.basename(config_file))[0])
    workdir = flags.FLAGS.workdir or os.path.join("workdir", name)

    from quietstar_jax.console import show_logs
    from quietstar_jax.train import ExportError, SetupError, run
    from quietstar_jax.train.checkpoint import CheckpointWriteError

    try:
        with show_logs():  # the loop's progress lines (stdout) and warnings (stderr)
            summary = run(config, workdir)
    except (SetupError, ExportError) as e:
        _fail(str(e))
    except FloatingPointError as e:
        _fail(f"{e}; stopped without checkpointing it (the last good checkpoint is kept)")
    except CheckpointWriteError as e:
        gc.collect()  # orbax's abandoned writes, while the filter below still holds
        sys.stderr.write(f"{PROG}: error: {e}\n")
        sys.exit(1)
    history = summary["history"]
    if summary["preempted"]:  # the loop said it, in one line
        _exit(130 if summary["stop_signal"] == "SIGINT" else 0)
    if history:
        # Single updates (the step lines average their log_every window).
        first, last = history[0], history[-1]
        a, b = f"step {first['step']}", f"step {last['step']}"
        print(f"done: steps {first['step']}-{last['step']} in {summary['wall_time_s']:.0f} s; "
              f"single updates, {a} -> {b}: loss {first['loss']:.4g} -> {last['loss']:.4g} "
              f"(nll_loss {first['nll_loss']:.4g} -> {last['nll_loss']:.4g}), nll_base "
              f"{first['nll_base']:.4g} -> {last['nll_base']:.4g}; at {b}: policy_term "
              f"{last['policy_term']:.4g}, reward_mean {last['reward_mean']:.4g}, "
              f"mixing_weight_mean {last['mixing_weight_mean']:.4g}; "
              f"workdir {summary['workdir']}")


def run_cli() -> None:
    """The `quietstar-train` entry point (and `python train.py`)."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run_cli()
