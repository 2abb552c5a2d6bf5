"""The distribution as a user gets it: the built wheel, installed into a fresh virtual environment."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Source folder -> the package it is installed as (pyproject.toml / setup.py say the same).
PACKAGE_ROOTS = {
    "lightning_privacy": "lightning_privacy",
    "callbacks": "lightning_privacy.callbacks",
    "mlflow_plugins": "lightning_privacy.mlflow_plugins",
}
#: What the wheel is built from; everything else in the checkout (a venv, caches) stays behind.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "mlruns", "*.db"
)


def source_modules(source: Path) -> set[str]:
    """Every module of the source tree ``source``, named as it is imported once installed."""
    modules = set()
    for folder, package in PACKAGE_ROOTS.items():
        for file in (source / folder).rglob("*.py"):
            parts = file.relative_to(source / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules.add(".".join((package, *parts)))
    return modules


def build_wheel(tmp_path: Path) -> Path:
    """``pip wheel`` without network or build isolation, from a copy (setuptools writes build/ into the tree)."""
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCE)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(dist), str(source)],
        check=True, timeout=300,
    )  # fmt: skip
    (wheel,) = dist.glob("lightning_privacy-*.whl")
    return wheel


def fresh_venv(tmp_path: Path) -> Path:
    """A new virtual environment whose dependencies (not lightning_privacy) come from this one's.

    A ``.pth`` line appends this environment's site-packages to ``sys.path`` after the new one's, so
    the wheel is what ``import lightning_privacy`` finds; ``.pth`` files in an appended folder are
    not run, so the editable install's import hook stays off. Nothing is downloaded (no torch build).
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    Path(purelib, "dev_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.slow
def test_built_wheel_installs_and_imports_every_module(tmp_path):
    wheel = build_wheel(tmp_path)
    python = fresh_venv(tmp_path)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index",
         str(wheel)],
        check=True, timeout=300,
    )  # fmt: skip
    script = textwrap.dedent(
        """
        import importlib, json, os, sys, traceback
        import lightning_privacy

        root = os.path.dirname(lightning_privacy.__file__)
        modules, failures = [], {}
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            relative = os.path.relpath(folder, root)
            package = ".".join(["lightning_privacy", *([] if relative == "." else relative.split(os.sep))])
            for file in sorted(f for f in files if f.endswith(".py")):
                name = package if file == "__init__.py" else f"{package}.{file[:-3]}"
                modules.append(name)
                try:
                    importlib.import_module(name)
                except Exception:
                    failures[name] = traceback.format_exc(limit=3)
        print(json.dumps({"file": lightning_privacy.__file__, "prefix": sys.prefix, "modules": modules,
                          "failures": failures}))
        """
    )
    result = subprocess.run(
        [str(python), "-I", "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).is_relative_to(Path(report["prefix"])), report["file"]
    assert set(report["modules"]) == source_modules(tmp_path / "src")
    assert report["failures"] == {}


def test_he_exports_that_need_torch_or_onnx_load_on_first_use():
    script = textwrap.dedent(
        """
        import sys
        from lightning_privacy import he
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "onnxruntime"))
        assert not heavy, heavy
        assert callable(he.compile) and callable(he.export) and isinstance(he.nn.Square, type)
        assert "Gemm" in he.SUPPORTED_OPS and callable(he.import_onnx)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def test_dependency_ranges_are_the_tested_versions():
    """Every range admits the installed (tested) release and no older minor release."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    untested = []
    for line in importlib.metadata.requires("lightning-privacy"):
        requirement = Requirement(line)
        installed = Version(importlib.metadata.version(requirement.name))
        older = Version(f"{installed.major}.{installed.minor - 1}" if installed.minor else f"{installed.major - 1}.999")
        if not requirement.specifier.contains(installed, prereleases=True) or requirement.specifier.contains(older):
            untested.append(f"{line} (tested: {installed})")
    assert untested == [], "ranges in pyproject.toml vs the installed releases (after editing it, reinstall: make)"
