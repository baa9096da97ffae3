"""``l4lb cleanup``: remove everything l4lb ever installs in the kernel, like
``kube-proxy --cleanup``.

That is the portal rules of VIPs (:mod:`l4lb.portals`: the two nat chains and the hooks
jumping to them, for IPv4 and IPv6) and the IPVS state of offload mode
(:func:`l4lb.ipvs.cleanup_kernel`). Meant for a node where l4lb is not running, e.g. after a
crash or before switching to another proxy; foreign rules and services are left alone.
"""

from __future__ import annotations

import sys

from l4lb.ipvs import IpvsUnavailable, cleanup_kernel
from l4lb.portals import PortalError, PortalManager

__all__ = ["main"]


def main() -> int:
    """Remove portal rules and IPVS state; print one line per thing removed or skipped.

    Exit status 1 if something could not be removed (the message says what), else 0.
    """
    code = 0
    removed: list[str] = []
    try:
        result = PortalManager().cleanup()
    except PortalError as e:
        print(f"l4lb cleanup: portal rules: {e}", file=sys.stderr)
        code = 1
    else:
        for line in result.skipped:
            print(f"skipped: {line}")
        removed += result.removed
    try:
        removed += cleanup_kernel()
    except IpvsUnavailable as e:
        print(f"skipped: IPVS: {e}")
    except (OSError, RuntimeError) as e:
        print(f"l4lb cleanup: IPVS: {e}", file=sys.stderr)
        code = 1
    for line in removed:
        print(line)
    if not removed and code == 0:
        print("nothing to remove")
    return code
