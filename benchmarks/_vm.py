"""Boot the kernel VM (../shared/docs/kernel-vm.md) once and run a command inside it.

The host kernel has no IPVS, so peers and measurements that need it run in a stock Debian
kernel under qemu (``vng``, software emulation, the host root shared read-only). A boot
takes minutes here, so the benchmarks do it only when asked (``L4LB_BENCH_VM=1``), and
run everything that needs the VM in that one boot. Results come back through a folder the
guest may write (``--rwdir``), never through the console, which only serves for errors.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BOOT_TIMEOUT", "VmBoot", "boot", "unavailable_reason"]

ROOT = Path(__file__).resolve().parent.parent
VNG_VENV = Path(os.environ.get("L4LB_VNG_VENV", "/opt/vng"))
KERNEL_DIR = Path(os.environ.get("L4LB_KERNEL_DIR", "/opt/l4lb-kernel"))
BOOT_TIMEOUT = 1200.0


def _vng() -> str | None:
    local = VNG_VENV / "bin" / "vng"
    return str(local) if local.exists() else shutil.which("vng")


def kernel_image() -> Path | None:
    """The newest unpacked kernel whose modules are installed, or None."""
    images = sorted((KERNEL_DIR / "boot").glob("vmlinuz-*"))
    if not images:
        return None
    image = images[-1]
    return image if Path("/lib/modules", image.name.removeprefix("vmlinuz-")).is_dir() else None


def unavailable_reason() -> str | None:
    """Why the VM cannot boot here (for a skip), or None if it can."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (run scripts/kernel-vm)"
    if _vng() is None:
        return "vng (virtme-ng) is not installed (run scripts/kernel-vm)"
    if kernel_image() is None:
        return f"no unpacked kernel with modules under {KERNEL_DIR} (run scripts/kernel-vm)"
    if shutil.which("ipvsadm") is None:
        return "ipvsadm is not installed (run scripts/kernel-vm)"
    if os.geteuid() != 0:
        return "booting the VM with the host root shared needs root"
    return None


@dataclass(frozen=True)
class VmBoot:
    """How one boot ended: vng's exit code and the console output."""

    returncode: int
    console: str
    seconds: float


def boot(
    command: Sequence[str],
    rwdir: Path,
    *,
    cpus: int = 2,
    memory: str = "1G",
    timeout: float = BOOT_TIMEOUT,
) -> VmBoot:
    """Boot, run ``command`` (from the repository root) in the guest, power off.

    vng may exit 255 even when the guest command succeeded: callers decide by what the
    guest wrote into ``rwdir``.
    """
    kernel = kernel_image()
    vng = _vng()
    if kernel is None or vng is None:
        raise RuntimeError(unavailable_reason() or "the VM cannot boot")
    inner = f"cd {shlex.quote(str(ROOT))} && " + " ".join(shlex.quote(c) for c in command)
    argv = [vng, "--run", str(kernel), "--disable-microvm", "--disable-kvm"]
    argv += ["--cpus", str(cpus), "--memory", memory, "--rwdir", str(rwdir), "--exec", inner]
    env = {**os.environ, "PATH": f"{VNG_VENV / 'bin'}:{os.environ.get('PATH', '')}"}
    started = time.monotonic()
    proc = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
        check=False,
    )
    return VmBoot(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started)
