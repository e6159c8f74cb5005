"""Train a Quiet-STaR model: `python train.py [--config configs/X.py] [--workdir DIR]
[--config.FIELD=VALUE ...]`.

With no `--config`, runs `configs/default.py` (a self-contained demo). With no
`--workdir`, writes to `./workdir/<config file name>`; a workdir that holds
checkpoints is resumed. See docs/TRAINING.md.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))


def _fail(message: str) -> None:
    sys.stderr.write(f"train.py: error: {message}\n")
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
        "config", os.path.join(_HERE, "configs", "default.py"),
        "Config file (a Python file with get_config()); override fields with "
        "--config.FIELD=VALUE, e.g. --config.thought.n_ahead=16.", lock_config=True)
except (AttributeError, KeyError, TypeError, ValueError) as e:
    _fail(_config_error(e, sys.argv))
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and reward pages go here "
                    "(default ./workdir/<config name>); an existing one is resumed.")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config errors reported in one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(" ".join(str(e).split()))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        _fail(_config_error(e, argv))
    return []


def main(argv: list[str]) -> None:
    from quietstar_jax import distributed

    # Several processes (a TPU pod, several GPU hosts) form one job; a no-op otherwise.
    distributed.maybe_initialize()
    if not any(a.startswith(("--verbosity", "-v=")) for a in sys.argv):
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
    workdir = flags.FLAGS.workdir or os.path.join(
        "workdir", os.path.splitext(os.path.basename(config_file))[0])

    from quietstar_jax.console import show_logs
    from quietstar_jax.train import ExportError, SetupError, run

    try:
        with show_logs():  # the loop's progress lines (stdout) and warnings (stderr)
            summary = run(config, workdir)
    except (SetupError, ExportError) as e:
        _fail(str(e))
    except FloatingPointError as e:
        _fail(f"{e}; stopped without checkpointing it (the last good checkpoint is kept)")
    history = summary["history"]
    if history and not summary["preempted"]:
        first, last = history[0], history[-1]
        print(f"done: steps {first['step']}-{last['step']} in {summary['wall_time_s']:.0f} s; "
              f"loss {first['loss']:.4g} -> {last['loss']:.4g} (nll_loss {first['nll_loss']:.4g}"
              f" -> {last['nll_loss']:.4g}, policy_term {last['policy_term']:.4g}), nll_base "
              f"{first['nll_base']:.4g} -> {last['nll_base']:.4g}, reward_mean "
              f"{last['reward_mean']:.4g}, mixing_weight_mean {last['mixing_weight_mean']:.4g}; "
              f"workdir {summary['workdir']}")
    if summary["preempted"]:
        print(f"preempted at step {summary['final_step']}: checkpoint saved, run again with "
              f"--workdir {summary['workdir']} to resume")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
