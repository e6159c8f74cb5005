"""The command lines show the library's log records as plain lines; the library prints
nothing itself."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

from quietstar_jax.console import show_logs

PACKAGE = Path(__file__).resolve().parents[1] / "quietstar_jax"
# the command lines, which decide what the console shows
CLI_MODULES = {"cli_common.py", "command_line.py", "generation/cli.py", "evaluation/cli.py",
               "train/cli.py"}


def test_show_logs_info_to_stdout_warnings_to_stderr(capsys):
    log = logging.getLogger("quietstar_jax.some.module")
    before = logging.getLogger("quietstar_jax").handlers[:]
    with show_logs():
        log.info("step 1: loss 2.0")
        log.warning("warning: checkpoint step 4 is damaged")
        log.debug("not shown")
    log.info("outside: not shown")
    out, err = capsys.readouterr()
    assert out == "step 1: loss 2.0\n"
    assert err == "warning: checkpoint step 4 is damaged\n"
    assert logging.getLogger("quietstar_jax").handlers == before
    assert logging.getLogger("quietstar_jax").propagate


def test_no_print_in_library_code():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in CLI_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "print"):
                found.append(f"{rel}:{node.lineno}")
    assert not found, f"print in library code (use logging): {found}"
