"""The source tree stays clean: ruff for Python, strict warnings for the C data plane."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_check():
    r = _run(sys.executable, "-m", "ruff", "check", "l4lb", "tests", "benchmarks", "setup.py")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format():
    r = _run(sys.executable, "-m", "ruff", "format", "--check", "l4lb", "tests", "benchmarks")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_c_sources_compile_without_warnings(tmp_path: Path):
    sources = sorted(str(p) for p in (ROOT / "src").glob("*.c"))
    flags = ["-std=gnu11", "-Wall", "-Wextra", "-Wconversion", "-Wshadow", "-Werror"]
    for src in sources:
        r = _run("gcc", *flags, "-Isrc", "-c", src, "-o", str(tmp_path / "x.o"))
        assert r.returncode == 0, f"{src}:\n{r.stderr}"


@pytest.mark.skipif(not _has_module("mypy"), reason="mypy is not installed")
def test_mypy_strict():
    r = _run(sys.executable, "-m", "mypy", "--strict", "l4lb")
    assert r.returncode == 0, r.stdout + r.stderr
