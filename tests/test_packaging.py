"""The package as pip installs it (not editable): what the wheel holds and the command it
declares. The built wheel is inspected, not installed (no network, no new environment);
README.md's fresh-venv check runs the installed command."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    import importlib.util

    # The environment's setuptools when it has one (no download), else pip's isolated build.
    isolation = [] if importlib.util.find_spec("setuptools") is None else [
        "--no-build-isolation"]
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation,
                        "-w", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0 and "No module named pip" in p.stderr:
        pytest.skip("pip is not available in this interpreter")
    assert p.returncode == 0, p.stderr[-3000:]
    (w,) = out.glob("quietstar_jax-*.whl")
    return w


def test_wheel_holds_the_training_command_and_its_default_config(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("quietstar_jax/train/cli.py", "quietstar_jax/train/demo_config.py",
                   "quietstar_jax/train/loop.py", "quietstar_jax/hf/pretrained.py"):
        assert module in names, module
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "quietstar-train = quietstar_jax.train.cli:run_cli" in text, text


@pytest.mark.parametrize("command, module", [("quietstar-generate", "generation"),
                                             ("quietstar-evaluate", "evaluation")])
def test_wheel_declares_the_generation_and_evaluation_commands(
        wheel: Path, command: str, module: str, capsys: pytest.CaptureFixture) -> None:
    """Each declared command names a function that runs its command line (`--help`
    exits 0 and describes the command's own flags)."""
    import importlib

    names = zipfile.ZipFile(wheel).namelist()
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    lines = zipfile.ZipFile(wheel).read(entry_points).decode().splitlines()
    (target,) = [ln.split("=", 1)[1].strip() for ln in lines
                 if ln.split("=", 1)[0].strip() == command]
    assert target == f"quietstar_jax.{module}.cli:main"
    mod_name, fn_name = target.split(":")
    main = getattr(importlib.import_module(mod_name), fn_name)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--" in capsys.readouterr().out


def test_configs_default_is_the_packaged_demo_config() -> None:
    """`python train.py` (configs/default.py) and the installed command (no --config: the
    packaged demo) train the same config: one copy of it."""
    import importlib.util

    from quietstar_jax.train import demo_config

    spec = importlib.util.spec_from_file_location("configs_default", ROOT / "configs" /
                                                  "default.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.get_config is demo_config.get_config
    assert mod.get_config().to_dict() == demo_config.get_config().to_dict()
