"""Run a block of test code with the calling thread inside a network namespace.

``setns(2)`` with ``CLONE_NEWNET`` moves only the calling thread. Sockets it creates, threads
it starts and processes it forks inside the block belong to the namespace and stay there after
the block ends, so a backend started inside ``with in_netns(ns):`` keeps serving from ``ns``
while the rest of the test talks to it from wherever it likes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

from l4lb._netns import Netns

__all__ = ["in_netns"]

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(ns: Netns) -> Iterator[None]:
    """Move this thread into ``ns`` for the block, then back to where it was."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/run/netns/{ns.name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)
