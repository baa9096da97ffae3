"""Real-kernel IPVS tests: one VM boot per test session runs every guest case.

The machines that run the suite have no IPVS in their own kernel, so a stock Debian
kernel boots under qemu (``vng``, software emulation) with the host root shared in;
``scripts/kernel-vm`` installs it. The guest runs ``guest/run_all.py``, which writes
each case's observations as JSON into a ``--rwdir`` folder; the tests here assert on
them. Without qemu, vng or the kernel the tests skip, saying what is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUEST = Path(__file__).resolve().parent / "guest"
VNG_VENV = Path(os.environ.get("L4LB_VNG_VENV", "/opt/vng"))
KERNEL_DIR = Path(os.environ.get("L4LB_KERNEL_DIR", "/opt/l4lb-kernel"))
BOOT_TIMEOUT = 3600


def _vng() -> str | None:
    local = VNG_VENV / "bin" / "vng"
    return str(local) if local.exists() else shutil.which("vng")


def _kernel() -> Path | None:
    images = sorted((KERNEL_DIR / "boot").glob("vmlinuz-*"))
    if not images:
        return None
    image = images[-1]
    ver = image.name.removeprefix("vmlinuz-")
    return image if Path("/lib/modules", ver).is_dir() else None


def _missing() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (run scripts/kernel-vm)"
    if _vng() is None:
        return "vng (virtme-ng) is not installed (run scripts/kernel-vm)"
    if _kernel() is None:
        return f"no unpacked kernel with modules under {KERNEL_DIR} (run scripts/kernel-vm)"
    if shutil.which("ipvsadm") is None:
        return "ipvsadm is not installed (run scripts/kernel-vm)"
    if os.geteuid() != 0:
        return "booting the test VM with the host root shared needs root"
    return None


class VmRun:
    """The results of one boot: per-case JSON, log and exit status."""

    def __init__(self, outdir: Path, console: str) -> None:
        self.outdir = outdir
        self.console = console

    def case(self, name: str) -> dict[str, Any]:
        """The observations of guest case ``name``; fails with its log if there are none."""
        path = self.outdir / f"{name}.json"
        log = self.outdir / f"{name}.log"
        text = log.read_text() if log.exists() else "(no log)"
        if not path.exists():
            pytest.fail(f"guest case {name} wrote no results:\n{text}\n{self.console[-3000:]}")
        data: dict[str, Any] = json.loads(path.read_text())
        if "error" in data:
            pytest.fail(f"guest case {name} failed:\n{data['error']}\n{text[-3000:]}")
        return data


@pytest.fixture(scope="session")
def vm() -> Iterator[VmRun]:
    """Boot the VM once, run every guest case, and hand back the results."""
    missing = _missing()
    if missing:
        pytest.skip(missing)
    # Not under pytest's basetemp: concurrent sessions prune each other's old numbered dirs.
    # L4LB_KERNEL_OUT keeps the guest's results and logs there for reading afterwards.
    keep = os.environ.get("L4LB_KERNEL_OUT")
    outdir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="l4lb-kernel-vm-"))
    outdir.mkdir(parents=True, exist_ok=True)
    for old in outdir.glob("*"):
        old.unlink()  # a stale "done" must not pass for this boot's
    try:
        yield _boot(outdir)
    finally:
        if not keep:
            shutil.rmtree(outdir, ignore_errors=True)


def _boot(outdir: Path) -> VmRun:
    kernel = _kernel()
    inner = f"cd {ROOT} && {sys.executable} {GUEST / 'run_all.py'} {outdir}"
    cmd = [
        str(_vng()),
        "--run",
        str(kernel),
        "--disable-microvm",
        "--disable-kvm",
        "--cpus",
        "2",
        "--memory",
        "1G",
        "--rwdir",
        str(outdir),
        "--exec",
        inner,
    ]
    env = {**os.environ, "PATH": f"{VNG_VENV / 'bin'}:{os.environ.get('PATH', '')}"}
    # vng may exit 255 even when the guest succeeded: the done marker decides.
    r = subprocess.run(
        cmd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=BOOT_TIMEOUT,
        env=env,
        cwd=ROOT,
    )
    console = r.stdout + r.stderr
    if not (outdir / "done").exists():
        pytest.fail(f"the test VM did not finish its batch (vng rc={r.returncode}):\n{console}")
    return VmRun(outdir, console)
