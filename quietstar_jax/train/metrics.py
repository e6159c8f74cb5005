"""Training metrics: a JSONL file and TensorBoard event files in the workdir, and a
console progress bar. Only process 0 writes (construct with `enabled=False` on the
others)."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from quietstar_jax.thought.loss import LOSS_COMPONENTS

# loss = nll_loss + policy_term (policy_loss_beta x policy_loss): the policy term is
# shown beside the total, whose scale (beta = 1e6) it dominates.
SCALARS_SHOWN = ("loss", "nll_loss", "policy_term", "nll_base", "nll_thought", "reward_mean",
                 "mixing_weight_mean", "think_rate", "gate_loss")  # the last two: think_k set


def check_finite(metrics: dict[str, Any], step: int) -> None:
    """Raise FloatingPointError naming the step and the first non-finite loss component
    of a step's host metrics (the loop stops before checkpointing it)."""
    for name in (*LOSS_COMPONENTS, "nll_talk", "loss"):
        if name not in metrics:
            continue
        vals = np.atleast_1d(np.asarray(metrics[name]))
        bad = [i for i, v in enumerate(vals.tolist()) if not math.isfinite(v)]
        if bad:
            where = f"{name}[{bad[0]}]" if vals.size > 1 else name
            raise FloatingPointError(
                f"non-finite loss at step {step}: component {where} = {vals[bad[0]]}"
            )


def to_python(value: Any) -> Any:
    """A metric as JSON-able Python: floats for scalars, lists for arrays."""
    arr = np.asarray(value)
    if arr.ndim == 0:
        v = arr.item()
        return float(v) if isinstance(v, float | np.floating) else v
    return arr.tolist()


class MetricsWriter:
    """Appends `{"step": ..., name: value, ...}` lines to `<workdir>/metrics.jsonl` and
    the same scalars (array metrics as `name/i`) to TensorBoard in `<workdir>/tb`."""

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._truncate(resume_step or 0)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def _truncate(self, step: int) -> None:
        """Drop lines past `step` (logged by a run that stopped before checkpointing),
        so a resumed run does not write two values for one step."""
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            lines = f.readlines()
        keep = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(keep)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)} | {k: to_python(v) for k, v in metrics.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        for name, value in record.items():
            if name == "step":
                continue
            if isinstance(value, list):
                for i, v in enumerate(np.ravel(value)):
                    self._tb.add_scalar(f"{name}/{i}", float(v), step)
            elif isinstance(value, int | float):
                self._tb.add_scalar(name, float(value), step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def format_metrics(metrics: Mapping[str, Any], names: tuple[str, ...] = SCALARS_SHOWN) -> str:
    parts = []
    for name in names:
        if name in metrics:
            v = float(np.asarray(metrics[name]))
            parts.append(f"{name}={v:.4g}" if math.isfinite(v) else f"{name}={v}")
    return " ".join(parts)


class ProgressBar:
    """A tqdm bar over the steps (with ETA) showing the latest metrics, on stderr;
    `write` puts a line on stdout above it (so `train.py > log` keeps the lines).
    Silent when disabled."""

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                             file=sys.stderr, mininterval=1.0)

    def update(self, n: int = 1, metrics: Mapping[str, Any] | None = None) -> None:
        if self._bar is None:
            return
        if metrics:
            self._bar.set_postfix_str(format_metrics(
                metrics, ("loss", "nll_base", "reward_mean")), refresh=False)
        self._bar.update(n)

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)  # the bar itself stays on stderr

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
