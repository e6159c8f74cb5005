"""Train a Quiet-STaR model: `python train.py [--config configs/X.py] [--workdir DIR]
[--config.FIELD=VALUE ...]`.

The same command as the installed `quietstar-train` (`quietstar_jax/train/cli.py`):
with no `--config`, the self-contained demo (`configs/default.py`); with no
`--workdir`, `./workdir/<config file name>`; a workdir that holds checkpoints is
resumed. Exit status: 0 done (or stopped by SIGTERM, with a checkpoint), 1 a run that
failed, 2 bad input (one `train.py: error: ...` line), 130 Ctrl-C. See docs/TRAINING.md.
"""

from quietstar_jax.train.cli import run_cli

if __name__ == "__main__":
    run_cli()
