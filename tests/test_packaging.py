"""A plain (non-editable) `pip install .` into a fresh virtual environment can simulate.

The fresh environment borrows this one's third-party packages rather than installing its own copies
(torch alone is several GB, more than a CI machine may have spare); it installs pneumofed and flwr
(whose console scripts `flwr run` launches by name) itself, and `pip check` holds it to the
package's declared requirements."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _borrow_installed_dependencies(venv: Path) -> None:
    """Make this environment's packages importable in `venv` with a path file, which adds their folder
    without reading the path files in it: the editable pneumofed of this checkout stays invisible."""
    paths = sysconfig.get_paths()
    borrowed = dict.fromkeys([paths["purelib"], paths["platlib"]])  # the same folder on most systems
    (_site_packages(venv) / "borrowed-dependencies.pth").write_text("".join(f"{path}\n" for path in borrowed))


def _site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python*/site-packages"))


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv_gives_a_working_simulate(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    _borrow_installed_dependencies(venv)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(REPO), f"flwr=={version('flwr')}",
                          "--no-deps", "--force-reinstall"], capture_output=True, text=True, check=False)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    check = subprocess.run([str(venv / "bin" / "pip"), "check"], capture_output=True, text=True, check=False)
    unmet = [line for line in check.stdout.splitlines() if line.startswith("pneumofed ")]
    assert not unmet, "the installed package's requirements are not met:\n" + "\n".join(unmet)

    work = tmp_path / "work"  # not the source tree: only the installed package is importable here
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run_dir = work / "run"
    simulate = subprocess.run(
        [str(venv / "bin" / "pneumofed"), "simulate", "--rounds", "1", "--hospitals", "2", "--rois", "60",
         "--roi-size", "32", "--local-epochs", "1", "--set", "model-width=0.5", "--run-dir", str(run_dir)],
        cwd=work, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert simulate.returncode == 0, simulate.stdout[-4000:] + simulate.stderr[-4000:]
    located = subprocess.run([str(venv / "bin" / "python"), "-c", "import pneumofed.server.app as a; print(a.__file__)"],
                             cwd=work, env=env, capture_output=True, text=True, check=True)
    assert str(venv) in located.stdout, "the fresh venv imported pneumofed from outside itself"
    assert [record["round"] for record in json.loads((run_dir / "metrics.json").read_text())] == [1]
