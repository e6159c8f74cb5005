"""`run(config, workdir)`: the training loop.

Order of things: check the workdir (writable, not a file, not in use by another
trainer), check the config, build the mesh, load or build the model, make the data
pipeline, build the optimiser and the jitted step, take the workdir lock, restore
the latest checkpoint of the workdir if there is one (params, optimiser, step and
data position), then train. Everything that can be wrong with the input fails
before anything is compiled.

The train step is compiled ahead of the first step (a "compiling" line, with the
time it took), on a helper thread so that Ctrl-C stops the wait (`signals`). Each
update's metrics are fetched once its outputs are ready and checked for NaN/inf
before any checkpoint that contains that update is written: a non-finite loss stops
the run with the step and the component, and leaves the last good checkpoint as the
latest. A step's logged time runs from the end of the previous step to the end of
its own (update, checkpoint, reward page), so the step times add up to the loop's
wall time.

Workdir layout: `train.lock` (while a trainer runs), `checkpoints/<step>/`,
`metrics.jsonl`, `tb/`, `reward_pages/`, `config.json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from quietstar_jax import distributed, sharding
from quietstar_jax.model import ModelConfig, Params
from quietstar_jax.thought import ThoughtConfig
from quietstar_jax.thought.loss import quietstar_details
from quietstar_jax.train import reward_page
from quietstar_jax.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointWriteError,
    checkpoints_dir,
    intact_steps,
    is_disk_full,
)
from quietstar_jax.train.config import (
    ConfigError,
    n_ahead_at,
    parse_thought_schedule,
    thought_config,
    validate_config,
)
from quietstar_jax.train.data import DataError, TokenBatches, make_source, window
from quietstar_jax.train.host_memory import release_freed_heap
from quietstar_jax.train.metrics import (
    MetricsWriter,
    ProgressBar,
    check_finite,
    format_metrics,
    to_python,
)
from quietstar_jax.train.model_setup import LoadedModel, count_params, model_for_training
from quietstar_jax.train.signals import (
    CompileAbandoned,
    Interrupted,
    StopRequest,
    compile_in_background,
    compile_running,
    signal_name,
)
from quietstar_jax.train.step import (
    TrainState,
    abstract_state,
    init_state,
    make_train_step,
    optimizer_from_config,
    state_shardings,
)
from quietstar_jax.train.tokenizer import TextTokenizer, token_pieces
from quietstar_jax.train.workdir import WorkdirBusy, WorkdirLock, check_workdir

logger = logging.getLogger(__name__)

_EVAL_KEY_OFFSET = 1 << 30  # eval thoughts use a key stream apart from training's


class SetupError(ValueError):
    """Input the trainer cannot run with, found before compiling (one line)."""


class ExportError(OSError):
    """The Hugging Face export at the end of training was refused (one line); the
    trained checkpoint is saved."""


@dataclass
class _Stage:
    """What the run is doing, for the line a Ctrl-C leaves."""

    now: str = "setting up"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().strip("'\"")
    return " ".join(text.split()) or type(e).__name__


def _batch_hash(batch: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(batch):
        h.update(np.ascontiguousarray(batch[k]).tobytes())
    return h.hexdigest()[:16]


class _Setup:
    """Everything built before training: model, data, step, checkpoints."""

    def __init__(self, config: ConfigDict, workdir: str):
        self.config, self.workdir = config, workdir
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        try:
            validate_config(config)
            if config.batch_size % self.process_count:
                raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by "
                                  f"the {self.process_count} processes")
            # Data first: a missing or empty file should not wait for a model to load.
            self.source = make_source(config.data)
            self.mesh = sharding.make_mesh(tuple(config.mesh))
            self.model: LoadedModel = model_for_training(config, self.mesh)
            cfg = self.model.cfg
            tok = self.model.tokenizer
            self.tc: ThoughtConfig = thought_config(config, tok.thought_token_ids(),
                                                    tok.special_token_ids())
            self.tc.check_token_ids(cfg.vocab_size)
            sharding.check_parallelism(self.mesh, cfg, config.batch_size // config.grad_accum)
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise SetupError(_one_line(e)) from e
        self.data = TokenBatches(
            self.source, self._encode, seq_len=config.data.seq_len,
            local_batch=config.batch_size // self.process_count, pad_id=self.tc.pad_token_id,
            seed=config.data.seed, shuffle=config.data.shuffle,
            process_index=self.process_index, process_count=self.process_count)
        self.optimizer, self.schedule = optimizer_from_config(config.optim, config.num_steps)
        params = self.model.params
        self.param_sharding = sharding.param_shardings(
            self.mesh, params, sharding.params_logical_axes(cfg, with_gate="think_gate" in params))
        self.state_sharding = state_shardings(self.mesh, self.optimizer, params,
                                              self.param_sharding)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.thought_schedule = parse_thought_schedule(config.thought_schedule)
        self._steps: dict[int, Callable[..., Any]] = {}  # compiled step per n_ahead

    def n_ahead_at(self, step: int) -> int:
        """n_ahead of the update that starts with `step` updates done (the curriculum)."""
        return n_ahead_at(self.thought_schedule, step, self.tc.n_ahead)

    def train_step(self, step: int) -> Callable[..., Any]:
        """The jitted update for the update starting at `step`; one per n_ahead, cached."""
        n = self.n_ahead_at(step)
        if n not in self._steps:
            self._steps[n] = make_train_step(
                self.model.cfg, self.tc.replace(n_ahead=n), self.optimizer,
                schedule=self.schedule, grad_accum=self.config.grad_accum,
                grad_accum_dtype=self.config.grad_accum_dtype, seed=self.config.seed,
                mesh=self.mesh, state_sharding=self.state_sharding,
                batch_sharding=self.batch_sharding)
        return self._steps[n]

    def _encode(self, text: str) -> list[int]:
        return self.model.tokenizer.encode(text, add_bos=self.config.data.add_bos)

    def initial_state(self) -> TrainState:
        init = jax.jit(lambda p: init_state(p, self.optimizer),
                       out_shardings=self.state_sharding)
        state = init(self.model.params)
        self.model.params = None  # the state holds the (copied) params now
        return state

    def abstract_state(self) -> TrainState:
        return abstract_state(self.optimizer, self.model.params, self.state_sharding)

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: distributed.global_batch(v, self.batch_sharding, self.config.batch_size)
                for k, v in local.items()}


# ------------------------------------------------------------------ reward page


def _make_eval_fn(cfg: ModelConfig, tc: ThoughtConfig, mesh: Any) -> Callable[..., Any]:
    rep = sharding.replicated(mesh)
    # the page shows every position's thought and reward (of n_ahead's length)
    tc = tc.replace(think_k=None, think_lengths=None)

    def fn(params: Params, ids: jax.Array, mask: jax.Array, key: jax.Array) -> tuple:
        d = quietstar_details(params, cfg, tc, ids, mask, key)
        first = slice(None, None, tc.n_passes)  # pass 0 of each sequence
        return d["reward"][first], d["rollout"].thought_tokens[:, first]

    return jax.jit(fn, out_shardings=(rep, rep))


def _reward_page(setup: _Setup, eval_fn: Callable[..., Any], params: Params, step: int,
                 eval_rows: dict[str, np.ndarray]) -> str | None:
    """Write `reward_pages/step_<step>.html` (process 0); returns its path."""
    rep = sharding.replicated(setup.mesh)
    ids = jax.make_array_from_process_local_data(rep, eval_rows["input_ids"])
    mask = jax.make_array_from_process_local_data(rep, eval_rows["attention_mask"])
    key = jax.random.fold_in(jax.random.key(setup.config.seed), _EVAL_KEY_OFFSET + step)
    reward, thoughts = eval_fn(params, ids, mask, key)
    if setup.process_index != 0:
        return None
    reward, thoughts = np.asarray(reward), np.asarray(thoughts)
    tok: TextTokenizer = setup.model.tokenizer
    examples = []
    for r in range(reward.shape[0]):
        n = int(eval_rows["attention_mask"][r].sum())
        row_ids = [int(t) for t in eval_rows["input_ids"][r, :n]]
        pieces = token_pieces(tok, row_ids)
        rewards = np.full((n,), np.nan)
        k = min(n, reward.shape[1])
        rewards[:k] = reward[r, :k]
        texts = [tok.decode(thoughts[:, r, i].tolist()) if i < k else None for i in range(n)]
        examples.append((pieces, rewards, texts))
    tc = setup.tc
    note = (f"step {step}; thoughts of {tc.num_sampled} sampled tokens (n_ahead={tc.n_ahead}), "
            f"scored on the next {tc.n_ahead_talk} tokens; rewards before the baseline.")
    page = reward_page.render_page(f"Quiet-STaR thought rewards, step {step}", examples, note)
    out_dir = os.path.join(setup.workdir, "reward_pages")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"step_{step:07d}.html")
    reward_page.write_page(path, page)
    return path


# ------------------------------------------------------------------ the loop


def run(
    config: ConfigDict,
    workdir: str,
    *,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train (or resume training) as `config` says, writing to `workdir`.

    on_step: called with the step number after each update's outputs are ready (tests
      use it to send SIGTERM at a chosen step).
    Holds `<workdir>/train.lock` while it runs (a second trainer on the workdir is a
    SetupError naming the first). SIGTERM or SIGINT during the loop: the update in
    flight finishes, a checkpoint is saved and the summary says `preempted` and
    `stop_signal` ("SIGTERM"/"SIGINT"); a workdir already at `num_steps` is said in one
    line and nothing is written.
    Returns a summary: `start_step`, `final_step`, `preempted`, `stop_signal`,
    `history` (one dict per update: every metric as Python numbers, `step`,
    `batch_hash`), `checkpoints` (steps on disk), `reward_pages`, `wall_time_s`,
    `compile_time_s`, `num_params`, `workdir`, `final_state` (the TrainState after
    the last update).
    Raises SetupError for bad input (before compiling), FloatingPointError when a
    loss component is not finite (naming step and component), CheckpointWriteError
    when a checkpoint cannot be written (e.g. a full disk), ExportError when
    `export_hf_dir`, new or empty when checked before training, is not empty when the
    export comes (the trained state is checkpointed first), and `signals.Interrupted`
    (a KeyboardInterrupt) for a Ctrl-C while setting up or compiling, or a second one.
    """
    t_start = time.time()
    workdir = os.path.abspath(workdir)
    lead = jax.process_index() == 0
    try:
        check_workdir(workdir)
    except ValueError as e:
        raise SetupError(str(e)) from None
    lock = WorkdirLock(workdir)
    stage = _Stage()
    try:
        if lead and jax.process_count() == 1:
            try:  # a busy workdir is said before the model is loaded
                lock.check_free()
            except WorkdirBusy as e:
                raise SetupError(str(e)) from None
        if config.get("compilation_cache_dir"):
            _enable_compilation_cache(config.compilation_cache_dir)
        setup = _Setup(config, workdir)
        note = _take_lock(lock, lead, workdir)
        try:
            ckpt = Checkpointer(checkpoints_dir(workdir),
                                max_to_keep=config.keep_checkpoints,
                                async_save=config.async_checkpointing)
        except OSError as e:
            raise SetupError(f"cannot create the checkpoint directory "
                             f"{checkpoints_dir(workdir)} ({e.strerror or _one_line(e)})") from None
        try:
            # The mesh is active while steps are traced, so the activation constraints
            # (sharding.constrain) keep large intermediates split instead of replicated.
            with sharding.use_mesh(setup.mesh):
                summary = _train(config, workdir, setup, ckpt, on_step, t_start, note, stage)
        except BaseException:
            with contextlib.suppress(Exception):  # the error in flight is the one to report
                ckpt.close()
            raise
        ckpt.close()
        return summary
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise _interrupted(stage.now, workdir) from None
    except CheckpointWriteError:
        raise
    except OSError as e:
        if not is_disk_full(e):
            raise
        raise CheckpointWriteError(
            f"no space left on {workdir} while writing {e.filename or 'the run'}; "
            f"{_last_intact(workdir)}") from None
    finally:
        lock.release()


def _last_intact(workdir: str) -> str:
    steps = intact_steps(checkpoints_dir(workdir))
    return f"the last intact step is {steps[-1]}" if steps else "there is no intact step yet"


def _interrupted(stage: str, workdir: str) -> Interrupted:
    """The one line of a run stopped by Ctrl-C without saving."""
    steps = intact_steps(checkpoints_dir(workdir))
    last = (f"the last checkpoint is step {steps[-1]} in {checkpoints_dir(workdir)}"
            if steps else "no checkpoint was written")
    return Interrupted(f"interrupted while {stage}: stopped without saving; {last}",
                       compile_abandoned=compile_running())


def _take_lock(lock: WorkdirLock, lead: bool, workdir: str) -> str | None:
    """Process 0 takes the workdir lock (creating the workdir); every process stops
    with one line when it could not. Returns the stale-lock note, if any."""
    error, note = None, None
    if lead:
        try:
            note = lock.acquire()
        except WorkdirBusy as e:
            error = str(e)
        except OSError as e:
            error = (f"workdir {workdir} cannot be written ({e.strerror or _one_line(e)}: "
                     f"{e.filename or lock.path})")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ok = multihost_utils.process_allgather(np.int32(error is None))
        if error is None and not np.all(ok):
            error = f"process 0 could not take the lock of workdir {workdir} (see its error)"
    if error:
        raise SetupError(error)
    return note


def _train(config: ConfigDict, workdir: str, setup: _Setup, ckpt: Checkpointer,
           on_step: Callable[[int], None] | None, t_start: float, note: str | None,
           stage: _Stage) -> dict[str, Any]:
    lead = setup.process_index == 0
    num_params = count_params(setup.model.params)
    start_step, state = _resume(setup, ckpt)
    summary: dict[str, Any] = {
        "start_step": start_step, "final_step": start_step, "preempted": False,
        "stop_signal": None, "history": [], "checkpoints": ckpt.all_steps(),
        "reward_pages": [], "wall_time_s": 0.0, "compile_time_s": None,
        "num_params": num_params, "workdir": workdir}
    if start_step >= config.num_steps:  # finished: say so, write nothing
        if lead:
            if note:
                logger.info(note)
            logger.info(f"already at step {start_step}; nothing to do (config.num_steps="
                        f"{config.num_steps}, workdir {workdir})")
        summary["wall_time_s"] = time.time() - t_start
        summary["final_state"] = state
        return summary
    if lead:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2) + "\n")
    eval_rows = _eval_rows(setup) if config.eval_examples else None
    eval_fn = _make_eval_fn(setup.model.cfg, setup.tc, setup.mesh)
    writer = MetricsWriter(workdir, enabled=lead, resume_step=start_step)
    bar = ProgressBar(config.num_steps, start_step, enabled=lead and config.progress_bar)

    def say(line: str) -> None:
        if lead:
            (bar.write if config.progress_bar else logger.info)(line)

    if note:
        say(note)
    say(f"quietstar: {num_params:,} params, {jax.device_count()} devices, mesh "
        f"{dict(setup.mesh.shape)}, {len(setup.source):,} documents, "
        + (f"resuming from step {start_step}" if start_step else "starting at step 0")
        + f", workdir {workdir}")
    eos = getattr(setup.model.tokenizer, "eos_token_id", None)
    if eos is not None and eos == setup.tc.pad_token_id:
        say(f"note: the pad id {eos} is the tokenizer's eos id, so eos targets are ignored in "
            "the loss like padding (as in the authors' code; see docs/TRAINING.md)")

    compiled: dict[int, Callable[..., Any]] = {}
    compile_time = None
    stop = StopRequest()
    # A stop asked for while a later step of the curriculum compiles does not wait for
    # it (one process: the others could not agree without a collective).
    abandon = (lambda: stop.requested) if setup.process_count == 1 else None

    def step_fn(s: int) -> Callable[..., Any]:
        """The compiled update starting at `s` updates done: compiled ahead of its first
        use, once per n_ahead of the curriculum (a later one's compile is part of the
        time of the step that first needs it)."""
        nonlocal compile_time
        n = setup.n_ahead_at(s)
        if n not in compiled:
            before, stage.now = stage.now, "compiling the train step"
            compiled[n], seconds = _compile_step(setup, state, say, s, abandon)
            stage.now = before
            compile_time = seconds if compile_time is None else compile_time
        return compiled[n]

    step_fn(start_step)
    stage.now = "training"
    stop.install()
    history: list[dict[str, Any]] = []
    window: list[dict[str, Any]] = []
    pages: list[str] = []
    step = start_step
    stopped_by: int | None = None

    def check(s: int, metrics: dict[str, jax.Array]) -> dict[str, Any]:
        """Fetch one update's metrics and check them (before anything is saved)."""
        host = {k: to_python(v) for k, v in jax.device_get(metrics).items()}
        check_finite(host, s)
        if not np.isfinite(host["grad_norm"]):  # finite loss, broken update: stop too
            raise FloatingPointError(f"non-finite gradient at step {s}: grad_norm = "
                                     f"{host['grad_norm']}")
        host["policy_term"] = setup.tc.policy_loss_beta * host["policy_loss"]
        return host

    def log(s: int, host: dict[str, Any], dt: float, bhash: str) -> None:
        host["step_time_s"] = dt
        host["tokens_per_s"] = host["tokens"] / dt if dt > 0 else 0.0
        history.append({"step": s, **host, "batch_hash": bhash,
                        "n_ahead": setup.n_ahead_at(s - 1)})
        window.append(host)
        bar.update(1, host)
        if s % config.log_every == 0 or s == config.num_steps:
            logged = _window_mean(window)
            writer.write(s, logged)
            # A line of several updates shows their mean, and says so.
            span = f" (mean of steps {s - len(window) + 1}-{s})" if len(window) > 1 else ""
            say(f"step {s}{span}: {format_metrics(logged)} lr={logged['lr']:.3g} "
                f"grad_norm={logged['grad_norm']:.3g} tok/s={logged['tokens_per_s']:.0f}")
            window.clear()

    # A step's time runs from the end of the previous step to the end of this one: its
    # batch, the update (timed once its outputs are ready) and the checkpoint or reward
    # page it writes, so the step times add up to the loop's wall time.
    step_start = time.time()
    failed = True
    try:
        while step < config.num_steps:
            try:
                fn = step_fn(step)
            except CompileAbandoned:  # stopped while a later n_ahead compiled
                stopped_by = stop.signum
                ckpt.save(step, state, setup.data.get_state())
                break
            local = next(setup.data)
            bhash = _batch_hash(local)
            state, metrics = fn(state, setup.global_batch(local))
            jax.block_until_ready((state, metrics))
            step += 1
            host = check(step, metrics)
            if on_step is not None:
                on_step(step)
            stopped_by = stop.agreed()
            periodic = config.checkpoint_every and step % config.checkpoint_every == 0
            if periodic or stopped_by or step == config.num_steps:
                ckpt.save(step, state, setup.data.get_state())
            if eval_rows is not None and (
                    (config.eval_every and step % config.eval_every == 0)
                    or step == config.num_steps):
                page = _reward_page(setup, eval_fn, state.params, step, eval_rows)
                if page:
                    pages.append(page)
            now = time.time()
            log(step, host, now - step_start, bhash)
            step_start = now
            if stopped_by:
                break
        if stopped_by:
            ckpt.wait()  # saved before it is said
            say(f"stopped by {signal_name(stopped_by)} after step {step}: checkpoint saved; "
                f"run again with workdir {workdir} to resume")
        elif step == config.num_steps and config.export_hf_dir:
            from quietstar_jax import hf

            stage.now = "exporting"
            ckpt.wait()
            try:
                # the think gate of sparse thoughts has no checkpoint name: it stays in
                # the training checkpoint
                export = {k: v for k, v in state.params.items() if k != "think_gate"}
                hf.save_pretrained(config.export_hf_dir, export, setup.model.cfg,
                                   tokenizer=setup.model.hf_tokenizer,
                                   overwrite=config.export_hf_overwrite)
            except FileExistsError as e:  # the directory was filled while training
                raise ExportError(f"{_one_line(e)}; nothing exported (the trained step "
                                  f"{step} is saved in {checkpoints_dir(workdir)})") from None
            say(f"exported a Hugging Face checkpoint to {config.export_hf_dir}")
        failed = False
    finally:
        stop.uninstall()
        bar.close()
        # With an error in flight, closing must not replace it with another.
        with contextlib.suppress(Exception) if failed else contextlib.nullcontext():
            writer.close()
            ckpt.wait()
    summary.update({
        "final_step": step,
        "preempted": stopped_by is not None,
        "stop_signal": signal_name(stopped_by),
        "history": history,
        "checkpoints": ckpt.all_steps(),
        "reward_pages": pages,
        "wall_time_s": time.time() - t_start,
        "compile_time_s": compile_time,
    })
    if lead:
        summary = _keep_earlier(os.path.join(workdir, "summary.json"), summary)
        with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in summary.items() if k != "history"}, f, indent=2)
    summary["final_state"] = state
    return summary


def _keep_earlier(path: str, summary: dict[str, Any]) -> dict[str, Any]:
    """`summary` with what an earlier run's summary.json recorded and this run did not:
    its reward pages (still on disk) before this run's, its compile time when this
    run compiled nothing (e.g. it found the workdir finished)."""
    try:
        with open(path, encoding="utf-8") as f:
            earlier = json.load(f)
    except (OSError, ValueError):
        return summary
    if not isinstance(earlier, dict):
        return summary
    out = dict(summary)
    pages = [p for p in earlier.get("reward_pages") or [] if isinstance(p, str)
             and os.path.exists(p) and p not in summary["reward_pages"]]
    out["reward_pages"] = pages + list(summary["reward_pages"])
    if out["compile_time_s"] is None:
        out["compile_time_s"] = earlier.get("compile_time_s")
    return out


def _compile_step(setup: _Setup, state: TrainState, say: Callable[[str], None],
                  step: int, abandon: Callable[[], bool] | None = None,
                  ) -> tuple[Callable[..., Any], float | None]:
    """(the compiled update starting at `step`, seconds it took) — compiled ahead of
    its first use, saying so, so that no step's time holds the first compile. Traced
    and lowered here (under the caller's mesh), compiled on a helper thread so that a
    Ctrl-C stops the wait at once (`signals.compile_in_background`; `abandon` raises
    CompileAbandoned)."""
    fn = setup.train_step(step)
    lower = getattr(fn, "lower", None)
    if lower is None:  # not a jitted function (a test's stand-in)
        return fn, None
    shape = (setup.config.batch_size, setup.config.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=setup.batch_sharding)
             for k in ("input_ids", "attention_mask")}
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    n = setup.n_ahead_at(step)
    say("compiling the train step ..." if n == setup.tc.n_ahead and not setup.thought_schedule
        else f"compiling the train step (n_ahead {n}) ...")
    t0 = time.time()
    compiled = compile_in_background(lower(abstract, batch), abandon)
    seconds = time.time() - t0
    release_freed_heap()
    say(f"compiled the train step in {seconds:.1f} s")
    return compiled, seconds


def _resume(setup: _Setup, ckpt: Checkpointer) -> tuple[int, TrainState]:
    """(start step, state): the newest intact checkpoint (damaged newer ones skipped,
    reported and moved aside), else the initial state."""
    def warn(line: str) -> None:
        if setup.process_index == 0:
            logger.warning(line)

    try:
        restored = ckpt.restore_latest(setup.abstract_state(), warn)
    except CheckpointError as e:
        raise SetupError(str(e)) from e
    if restored is None:
        return 0, setup.initial_state()
    step, state, data_state = restored
    setup.model.params = None
    try:
        setup.data.set_state(data_state)
    except DataError as e:
        raise SetupError(f"checkpoint of step {step}: {e}") from e
    return step, state


def _enable_compilation_cache(path: str) -> None:
    """Persist compiled programs under `path` (every program, however fast it compiled)."""
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _eval_rows(setup: _Setup) -> dict[str, np.ndarray]:
    """The beginnings of the first `eval_examples` documents (same on every process)."""
    n = min(setup.config.eval_examples, len(setup.source))
    seq_len, pad = setup.config.data.seq_len, setup.tc.pad_token_id
    rows = [window(setup._encode(setup.source[i])[:seq_len], seq_len, pad, None)
            for i in range(n)]
    ids, mask = zip(*rows, strict=True)
    return {"input_ids": np.stack(ids), "attention_mask": np.stack(mask)}


def _window_mean(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each metric over the log window (`lr` the latest, `tokens_per_s` the
    window's total tokens over its total time)."""
    out: dict[str, Any] = {}
    for key in records[-1]:
        values = [r[key] for r in records if key in r]
        if key == "lr":
            out[key] = values[-1]
        else:
            out[key] = np.mean(np.asarray(values, np.float64), axis=0).tolist()
    total_t = sum(r["step_time_s"] for r in records)
    out["tokens_per_s"] = sum(r["tokens"] for r in records) / total_t if total_t > 0 else 0.0
    return out



