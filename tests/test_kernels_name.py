"""The repository's top-level `kernels/` folder must not break the Hugging Face package of the same name.

transformers (>= 5.25 requires it) imports the PyPI package `kernels`; run from the repository root (`python -c`,
a script, `panel serve explorer.py`) the folder `kernels/` comes first on sys.path. It then hands the name over
to the installed package, or stays empty when there is none; our kernels are only `prunepath.kernels`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = "import kernels, sys; print(kernels.__file__); print(getattr(kernels, 'CUDAProperties', None)); " \
        "print(sorted(m for m in sys.modules if m.startswith('prunepath')))"


def _probe(extra_path: Path | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)  # after '' (the root, cwd) on sys.path: the root shadows it
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return out


def test_an_installed_kernels_package_gets_its_name_back(tmp_path):
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("from .props import CUDAProperties\n")  # a submodule import, too
    (fake / "props.py").write_text("CUDAProperties = 'the other package'\n")
    file, value, ours = _probe(tmp_path / "site")
    assert Path(file) == fake / "__init__.py"
    assert value == "the other package"
    assert ours == "[]"  # nothing of ours was imported on the way


def test_without_that_package_the_folder_stays_empty():
    file, value, ours = _probe(None)
    if Path(file).parent != ROOT / "kernels":  # the environment has the real Hugging Face package installed
        assert value != "None"
        return
    assert value == "None" and ours == "[]"
