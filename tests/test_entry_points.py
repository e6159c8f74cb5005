"""The `python -m` entry points of the inference packages."""

from __future__ import annotations

import runpy
import subprocess
import sys

import pytest

PACKAGES = ("quietstar_jax.generation", "quietstar_jax.evaluation")


@pytest.mark.parametrize("package", PACKAGES)
def test_python_m_runs_its_main_once(package):
    """`python -m PACKAGE --help` exits 0 with the package's usage line, and Python does
    not warn that the module it runs was already imported (a body run twice)."""
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", package,
                          "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(f"usage: python -m {package}"), out.stdout
    assert "RuntimeWarning" not in out.stderr, out.stderr


@pytest.mark.parametrize("package", PACKAGES)
def test_the_module_run_by_python_m_is_not_imported_again(package, monkeypatch, capsys):
    """The body `python -m PACKAGE` runs as `__main__` is not also imported under its own
    name (which would run it a second time)."""
    name = f"{package}.__main__"
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "argv", ["prog", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(package, run_name="__main__")
    assert exit_.value.code == 0
    assert name not in sys.modules
    assert f"usage: python -m {package}" in capsys.readouterr().out
