"""`python train.py` as a process, as a user runs it: two trainers on one workdir,
Ctrl-C while compiling and while training, unusable workdirs and config files, a
full disk while checkpointing, a damaged newest checkpoint, which stream the lines go
to, the `done:` line, and a second run of a finished workdir. Each runs the real
command line on the tiny config (`tests/_tiny_train.py`, seconds per run)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "_tiny_train.py")
UNTIMED = ("step_time_s", "tokens_per_s")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """A compilation cache shared by the runs of this file (same programs)."""
    return str(tmp_path_factory.mktemp("xla_cache"))


def _env() -> dict[str, str]:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def train(workdir: Path | str, *args: str, cache: str | None = None, timeout: int = 300,
          prefix: tuple[str, ...] = (), script: tuple[str, ...] = ()
          ) -> subprocess.CompletedProcess:
    """`python train.py --config tests/_tiny_train.py[:cache] --workdir W args...`
    (`prefix` before python; `script`: another script and its first arguments in place
    of train.py)."""
    config = TINY + (f":{cache}" if cache else "")
    cmd = [*prefix, sys.executable, *(script or (str(REPO / "train.py"),)), "--config", config,
           "--workdir", str(workdir), *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


class Trainer:
    """train.py in the background; `wait_for(text)` blocks until a stdout line has it."""

    def __init__(self, workdir: Path, *args: str, cache: str | None = None) -> None:
        config = TINY + (f":{cache}" if cache else "")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), "--config", config, "--workdir",
             str(workdir), *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._seen = threading.Condition()
        self._threads = [threading.Thread(target=self._pump, args=(s, a), daemon=True)
                         for s, a in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    def _pump(self, stream, lines: list[str]) -> None:
        for line in stream:
            with self._seen:
                lines.append(line.rstrip("\n"))
                self._seen.notify_all()

    def wait_for(self, text: str, timeout: float = 300) -> None:
        end = time.time() + timeout
        while True:
            with self._seen:
                if any(text in line for line in self.out):
                    return
                self._seen.wait(0.2)
            if self.proc.poll() is not None:
                for t in self._threads:
                    t.join(10)
                if any(text in line for line in self.out):
                    return
                raise AssertionError(f"exited {self.proc.returncode} before {text!r}:\n"
                                     + "\n".join(self.out + self.err)[-3000:])
            if time.time() > end:
                raise AssertionError(f"no {text!r} in {timeout} s")

    def finish(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout)
        for t in self._threads:
            t.join(10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish()


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def _one_error(out: subprocess.CompletedProcess, rc: int, *needles: str) -> str:
    lines = _lines(out.stderr)
    assert out.returncode == rc, (out.returncode, out.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), out.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _metrics(workdir: Path) -> list[dict]:
    with open(workdir / "metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in UNTIMED} for line in f]


def _can_mount() -> bool:
    """Whether this user can mount a tmpfs in a user namespace (`unshare -rm`)."""
    if not shutil.which("unshare"):
        return False
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs none /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _in_tmpfs(mount: Path, size: str, then: str = "") -> tuple[str, ...]:
    """A command prefix: run in a new mount namespace with a `size` tmpfs at `mount`
    (then the shell command `then`, e.g. a remount read-only)."""
    mount.mkdir(parents=True, exist_ok=True)
    script = f'mount -t tmpfs -o size={size} none "{mount}" {then}&& exec "$@"'
    return ("unshare", "-rm", "sh", "-c", script, "sh")


# ------------------------------------------------------------------ finished run


@pytest.fixture(scope="module")
def finished(cache, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The tiny config's 6 steps with the progress bar on and a line every 2 steps."""
    work = tmp_path_factory.mktemp("finished") / "run"
    out = train(work, "--config.progress_bar=True", "--config.log_every=2", cache=cache)
    assert out.returncode == 0, out.stderr[-3000:]
    return work, out


@pytest.mark.slow
def test_step_lines_go_to_stdout_and_say_what_they_average(finished):
    """`python train.py > log` keeps every progress line (the bar stays on stderr)."""
    _, out = finished
    assert [ln.split(":")[0] for ln in out.stdout.splitlines() if ln.startswith("step ")] == [
        "step 2 (mean of steps 1-2)", "step 4 (mean of steps 3-4)",
        "step 6 (mean of steps 5-6)"]
    assert "compiling the train step" in out.stdout
    assert not re.search(r"^step \d", out.stderr, re.M), out.stderr[-2000:]


@pytest.mark.slow
def test_done_line_labels_its_single_update_values(finished):
    work, out = finished
    done = [ln for ln in out.stdout.splitlines() if ln.startswith("done: ")]
    assert len(done) == 1, out.stdout
    assert "single updates, step 1 -> step 6: loss " in done[0]
    assert "; at step 6: policy_term " in done[0]
    last = json.loads((work / "summary.json").read_text())
    assert last["final_step"] == 6


def test_finished_workdir_says_so_and_writes_nothing(finished, cache, tmp_path):
    work, _ = finished
    wd = tmp_path / "run"
    shutil.copytree(work, wd)
    before = {p: p.stat().st_mtime_ns for p in wd.rglob("*")}
    out = train(wd, cache=cache)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _lines(out.stdout) == [f"already at step 6; nothing to do (config.num_steps=6, "
                                  f"workdir {wd})"], out.stdout
    assert not _lines(out.stderr), out.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in wd.rglob("*")} == before  # no new tb file


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_one_warning_line(finished, cache, tmp_path):
    """Every array file of step 6 cut short: tensorstore's late callbacks used to print
    dozens of "Event loop is closed" tracebacks around the warning."""
    work, _ = finished
    wd = tmp_path / "run"
    shutil.copytree(work, wd)
    for f in (wd / "checkpoints" / "6" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            os.truncate(f, 10)
    out = train(wd, "--config.num_steps=8", cache=cache)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = _lines(out.stderr)
    assert len(lines) == 1, out.stderr[-5000:]
    assert lines[0].startswith(f"warning: checkpoint step 6 in {wd / 'checkpoints'} is damaged "
                               "and skipped (")
    assert lines[0].endswith(f"; moved it to {wd / 'checkpoints.damaged' / '6'}")
    assert "resuming from step 4" in out.stdout
    assert (wd / "checkpoints.damaged" / "6").is_dir()


# ------------------------------------------------------------------ the workdir lock


@pytest.mark.slow
def test_second_trainer_refuses_and_a_stale_lock_is_taken_over(cache, tmp_path):
    wd = tmp_path / "run"
    first = Trainer(wd, "--config.num_steps=100000", "--config.checkpoint_every=50",
                    cache=cache)
    try:
        first.wait_for("step 1:")
        second = train(wd, "--config.num_steps=2", cache=cache)
        line = _one_error(second, 2, f"workdir {wd} is in use by another trainer (pid "
                                     f"{first.proc.pid} on host ", f"{wd / 'train.lock'}")
        assert "compiling" not in second.stdout
        assert first.proc.poll() is None  # the first goes on
    finally:
        first.kill()  # SIGKILL: no clean-up, its lock file stays behind
    assert json.loads((wd / "train.lock").read_text())["pid"] == first.proc.pid
    third = train(wd, "--config.num_steps=1", cache=cache)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"note: took over the stale lock {wd / 'train.lock'} (pid {first.proc.pid} " \
        in third.stdout, third.stdout
    assert not (wd / "train.lock").exists()  # released at the end
    assert line.count("\n") == 0


# ------------------------------------------------------------------ Ctrl-C


@pytest.mark.slow
def test_ctrl_c_while_compiling_stops_at_once(tmp_path):
    """No compilation cache: the compile is real (seconds, even for the tiny model)."""
    wd = tmp_path / "run"
    run = Trainer(wd)
    run.wait_for("compiling the train step")
    time.sleep(0.3)
    t0 = time.time()
    run.proc.send_signal(signal.SIGINT)
    try:
        rc = run.finish(timeout=60)
    finally:
        run.kill()
    assert rc == 130, "\n".join(run.out + run.err)[-3000:]
    assert time.time() - t0 < 8
    assert run.err == ["train.py: interrupted while compiling the train step: stopped without "
                       "saving; no checkpoint was written"], run.err
    assert not any(ln.startswith(("compiled", "step ")) for ln in run.out), run.out


@pytest.mark.slow
def test_ctrl_c_mid_run_saves_and_resumes_exactly(cache, tmp_path):
    args = ("--config.num_steps=40", "--config.checkpoint_every=1000")
    straight = train(tmp_path / "straight", *args, cache=cache)
    assert straight.returncode == 0, straight.stderr[-3000:]
    wd = tmp_path / "run"
    run = Trainer(wd, *args, cache=cache)
    try:
        run.wait_for("step 2:")
        run.proc.send_signal(signal.SIGINT)
        rc = run.finish(timeout=120)
    finally:
        run.kill()
    assert rc == 130, "\n".join(run.out + run.err)[-3000:]
    assert not run.err, "\n".join(run.err)[-3000:]  # no traceback
    m = re.fullmatch(rf"stopped by SIGINT after step (\d+): checkpoint saved; run again with "
                     rf"workdir {re.escape(str(wd))} to resume", run.out[-1])
    assert m, run.out[-3:]
    stopped = int(m.group(1))
    assert 2 <= stopped < 40
    assert sorted(os.listdir(wd / "checkpoints")) == [str(stopped)]  # saved as SIGTERM does
    resumed = train(wd, *args, cache=cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {stopped}" in resumed.stdout
    assert _metrics(wd) == _metrics(tmp_path / "straight")  # bit for bit


# ------------------------------------------------------------------ bad workdir / config


def test_workdir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    out = train(tmp_path / "f")
    _one_error(out, 2, f"workdir {tmp_path / 'f'} is a file, not a directory")
    out = train(tmp_path / "f" / "sub")
    _one_error(out, 2, f"workdir {tmp_path / 'f' / 'sub'} cannot be created: "
                       f"{tmp_path / 'f'} is a file")
    assert (tmp_path / "f").read_text() == "x"


def test_config_file_with_a_syntax_error_is_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n    pass\n")
    out = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(bad),
                          "--workdir", str(tmp_path / "w")], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=120)
    _one_error(out, 2, f"config file {bad}:1: ", "not valid Python")
    assert not (tmp_path / "w").exists()


def test_read_only_workdir_is_one_line(tmp_path):
    wd = tmp_path / "ro"
    if os.geteuid() != 0:
        wd.mkdir()
        wd.chmod(stat.S_IRUSR | stat.S_IXUSR)
        prefix: tuple[str, ...] = ()
    elif _can_mount():  # root writes through permissions: a read-only mount instead
        prefix = _in_tmpfs(wd, "1m", f'&& mount -o remount,ro "{wd}" ')
    else:
        pytest.skip("running as root without user namespaces: no read-only directory")
    try:
        out = train(wd, prefix=prefix)
    finally:
        wd.chmod(stat.S_IRWXU)
    _one_error(out, 2, f"workdir {wd} is not writable (")
    assert "compiling" not in out.stdout


# ------------------------------------------------------------------ disk full


@pytest.mark.slow
def test_disk_full_while_checkpointing_is_one_line(cache, tmp_path):
    """Orbax's write of step 4 fails with ENOSPC (tests/_disk_full.py): one line naming
    the directory, the step and the last intact step, exit 1; step 2 resumes."""
    wd = tmp_path / "run"
    out = train(wd, cache=cache, script=(str(REPO / "tests" / "_disk_full.py"), "4"))
    assert out.returncode == 1, out.stderr[-3000:]
    assert _lines(out.stderr) == [f"train.py: error: no space left on {wd / 'checkpoints'} "
                                  "while saving step 4; the last intact step is 2"], \
        out.stderr[-5000:]
    resumed = train(wd, "--config.num_steps=3", cache=cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 2" in resumed.stdout


@pytest.mark.slow
def test_disk_full_on_a_real_small_tmpfs(cache, tmp_path):
    if not _can_mount():
        pytest.skip("cannot mount a tmpfs here (needs user namespaces)")
    mnt = tmp_path / "small"
    out = train(mnt / "run", "--config.keep_checkpoints=10", cache=cache,
                prefix=_in_tmpfs(mnt, "400k"))
    assert out.returncode == 1, out.stderr[-3000:]
    lines = _lines(out.stderr)
    assert len(lines) == 1, out.stderr[-5000:]
    m = re.fullmatch(rf"train\.py: error: no space left on {re.escape(str(mnt / 'run'))}"
                     r"(/checkpoints)? while (saving step (\d+)|writing .*); the last intact "
                     r"step is \d+", lines[0])
    assert m, lines[0]


# ------------------------------------------------------------------ the pieces


def test_workdir_lock_in_one_process(tmp_path):
    """flock is per open file: a second lock in the same process is refused too; the
    record of a holder that is gone (no flock held) is stale and taken over."""
    from quietstar_jax.train.workdir import LOCK_NAME, WorkdirBusy, WorkdirLock

    wd = tmp_path / "w"
    first = WorkdirLock(str(wd))
    assert first.acquire() is None
    assert json.loads((wd / LOCK_NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(WorkdirBusy, match=f"workdir {wd} is in use by another trainer "
                                          f"\\(pid {os.getpid()} on host "):
        WorkdirLock(str(wd)).check_free()
    with pytest.raises(WorkdirBusy):
        WorkdirLock(str(wd)).acquire()
    first.release()
    assert not (wd / LOCK_NAME).exists()
    (wd / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "elsewhere"}))
    again = WorkdirLock(str(wd))
    again.check_free()  # nobody holds it
    note = again.acquire()
    assert note and "took over the stale lock" in note and "pid 999999 on host elsewhere" in note
    again.release()


def test_disk_full_is_recognised_in_tensorstore_text_and_errno_chains():
    import errno

    from quietstar_jax.train.checkpoint import is_disk_full

    ts = ValueError('RESOURCE_EXHAUSTED: Error writing local file "x": Failed to write 12876 '
                    "bytes to file 4: No space left on device [os_error_code='28']")
    assert is_disk_full(ts)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("commit failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(OSError(errno.EIO, "Input/output error"))


@pytest.mark.slow
def test_stop_while_a_later_curriculum_step_compiles_saves_at_once(tmp_path, monkeypatch):
    """Ctrl-C while the n_ahead 5 step of a curriculum compiles (mid-run): the compile
    is not waited for; the state after step 3 is saved and the run stops there."""
    import _tiny_train

    from quietstar_jax.train import loop

    calls = []
    original = loop.compile_in_background

    def interrupt_second(lowered, abandon=None):
        calls.append(abandon)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the loop's handler: a flag
        return original(lowered, abandon)

    monkeypatch.setattr(loop, "compile_in_background", interrupt_second)
    config = _tiny_train.tiny_config(None, thought_schedule="0:4,3:5", checkpoint_every=100)
    summary = loop.run(config, str(tmp_path / "run"))
    assert len(calls) == 2 and calls[1] is not None
    assert summary["preempted"] and summary["stop_signal"] == "SIGINT"
    assert summary["final_step"] == 3 and summary["checkpoints"] == [3]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    for t in threading.enumerate():  # the abandoned compile: let it end before pytest does
        if t.name == "quietstar-compile":
            t.join()
