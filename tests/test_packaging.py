"""Packaging as a newcomer meets it: the demo's command line, a quiet import without
numpy, the license, and an sdist that holds what its own tests need."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_python(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """This checkout's jacfd in a fresh interpreter, whatever is installed."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_demo_help_prints_usage_and_exits_0() -> None:
    result = run_python("-m", "jacfd", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m jacfd")
    assert "Exit status" in result.stdout and "jacfd demo" not in result.stdout
    assert result.stderr == ""


def test_demo_refuses_unknown_arguments() -> None:
    result = run_python("-m", "jacfd", "--bogus")
    assert result.returncode == 2  # argparse's usage error, before any work
    assert "unrecognized arguments: --bogus" in result.stderr
    assert result.stdout == ""


def test_import_without_numpy_is_quiet() -> None:
    """The demo command installs torch alone; torch warns at import without numpy."""
    code = "import sys; sys.modules['numpy'] = None; import jacfd; print(jacfd.jacfd)"
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr
    assert "NumPy" not in result.stderr, result.stderr


def test_license() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert "Copyright (c) 2026, the jacfd developers" in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = "BSD-3-Clause"' in pyproject and 'license-files = ["LICENSE"]' in pyproject


def test_sdist_holds_what_its_tests_need(tmp_path: Path) -> None:
    """Builds the sdist from a copy of the tree (setuptools' own backend, no network)."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("the license fields need setuptools >= 77")
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", "*.egg-info", "__pycache__", "build", "dist", "site"
        ),
    )
    code = "import setuptools.build_meta as b, sys; print(b.build_sdist(sys.argv[1]))"
    result = run_python("-c", code, str(tmp_path / "dist"), cwd=source)
    assert result.returncode == 0, result.stderr
    archive = tmp_path / "dist" / result.stdout.strip().splitlines()[-1]
    with tarfile.open(archive) as tar:
        prefix = tar.getnames()[0].split("/")[0]
        names = {name.removeprefix(prefix + "/") for name in tar.getnames()}
        pkg_info = tar.extractfile(f"{prefix}/PKG-INFO").read().decode()  # type: ignore[union-attr]
    needed = {"LICENSE", "README.md", "mkdocs.yml", "pyproject.toml", "jacfd/py.typed"}
    needed |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("*.py")}
    needed |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    assert "tests/conftest.py" in needed
    assert not needed - names, f"missing from the sdist: {sorted(needed - names)}"
    assert "License-Expression: BSD-3-Clause" in pkg_info
