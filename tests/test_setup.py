"""The project's set-up files agree with each other (pyproject.toml is the single source)."""

from pathlib import Path

import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
ENV = yaml.safe_load((ROOT / "environment.yml").read_text())


def _pip_lines() -> list[str]:
    for dep in ENV["dependencies"]:
        if isinstance(dep, dict) and "pip" in dep:
            return dep["pip"]
    raise AssertionError("environment.yml has no pip section")


def test_environment_installs_the_package_with_dev_extras():
    assert "-e .[dev]" in _pip_lines()


def test_environment_python_satisfies_requires_python():
    python = next(d for d in ENV["dependencies"] if isinstance(d, str) and d.startswith("python="))
    version = python.split("=", 1)[1]
    assert version in SpecifierSet(PYPROJECT["project"]["requires-python"])


def test_environment_pins_agree_with_pyproject():
    """Any requirement environment.yml repeats must carry exactly pyproject's specifier."""
    declared = {Requirement(r).name: Requirement(r).specifier for r in PYPROJECT["project"]["dependencies"]}
    for extra in PYPROJECT["project"]["optional-dependencies"].values():
        for r in extra:
            declared.setdefault(Requirement(r).name, Requirement(r).specifier)
    repeated = [Requirement(line) for line in _pip_lines() if not line.startswith("-")]
    assert repeated, "expected the torch range to be repeated (conda must not pick a CUDA build first)"
    for req in repeated:
        assert req.name in declared, f"{req.name} is in environment.yml but not in pyproject.toml"
        assert req.specifier == declared[req.name], f"{req.name}: {req.specifier} != pyproject's {declared[req.name]}"


def test_torch_range_admits_the_local_cpu_build():
    torch_spec = next(Requirement(r).specifier for r in PYPROJECT["project"]["dependencies"] if r.startswith("torch"))
    assert "2.13.0" in torch_spec


def test_dev_extra_covers_every_other_extra():
    extras = PYPROJECT["project"]["optional-dependencies"]
    dev = " ".join(extras["dev"])
    for name in extras:
        if name != "dev":
            assert name in dev, f"the dev extra does not pull in [{name}]"


def test_kernels_install_under_the_prunepath_namespace():
    """A different PyPI project owns the top-level name `kernels`: ours must be prunepath.kernels."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    assert "kernels" not in setuptools["packages"]
    assert setuptools["package-dir"]["prunepath.kernels"] == "kernels"


def test_top_level_is_as_designed():
    allowed = {
        "book",
        "prunepath",
        "kernels",
        "notebooks",
        "tests",
        "results",
        "environment.yml",
        "README.md",
        "explorer.py",
        "pyproject.toml",
        "Makefile",
        ".ci",
        ".gitignore",
        "LICENSE",
    }
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout (e.g. an sdist): nothing to check
        return
    top = {p.split("/", 1)[0] for p in tracked}
    assert top <= allowed, f"unexpected top-level entries: {sorted(top - allowed)}"
