"""IPv6 and UDP services, scheduler flags and pass-through schedulers, IPv6 traffic.

Usage (inside the test VM): case_v6_udp.py RESULT.json.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import netlab

from l4lb import ipvs
from l4lb.config import Address
from l4lb.state import FLAG_PERSISTENT, FLAG_SH_FALLBACK, FLAG_SH_PORT, DestSpec, ServiceSpec


def make_spec(name: str, listen: str, backends: list[str], **kw: Any) -> ServiceSpec:
    dests = (DestSpec(Address.parse(b), 1, 0, 0) for b in backends)
    spec: ServiceSpec = netlab.service_spec(name, listen, dests, **kw)
    return spec


def main(out: str) -> None:
    note = netlab.Observations(out)

    netlab.sh("modprobe", "-a", "ip_vs", "ip_vs_rr", "ip_vs_sh", "ip_vs_mh")
    lab = netlab.Lab(2, v6=True)
    try:
        lab.start_backends(8080)
        note("backends", lab.backends)
        v6 = [f"[{a}]:8080" for a in lab.backends.values()]
        specs = {
            "v6": make_spec("v6", "[fd00::1]:80", v6),
            "v6sticky": make_spec(
                "v6sticky",
                "[fd00::1]:81",
                v6,
                flags=FLAG_PERSISTENT,
                persist_timeout=30.0,
                persist_netmask6=64,
            ),
            "dns": make_spec(
                "dns",
                "10.0.0.2:53",
                ["10.20.0.1:53", "10.20.0.2:53"],
                protocol="udp",
                scheduler="sh",
                flags=FLAG_SH_FALLBACK | FLAG_SH_PORT,
            ),
            "maglev": make_spec("maglev", "10.0.0.2:80", ["10.20.0.1:80"], scheduler="mh"),
        }
        sink = ipvs.IpvsSink()
        note("apply_errors", sink.apply(specs))
        note("save", netlab.ipvsadm_save())
        note("list", netlab.ipvsadm_list())
        note("link_addrs", netlab.sh("ip", "-o", "addr", "show", "dev", ipvs.LINK))
        note("masq6", netlab.sh("ip6tables", "-t", "nat", "-S", ipvs.CHAIN, check=False))
        note("traffic_v6", lab.connect("fd00::1", 80, 4))
        note("reapply_errors", sink.apply(specs))
        note("save_after_reapply", netlab.ipvsadm_save())
        bad = make_spec("bad", "10.0.0.3:80", ["10.20.0.1:80"], scheduler="nosuch")
        note("bad_errors", sink.apply({**specs, "bad": bad}))
        sink.cleanup()
        note("cleanup_save", netlab.ipvsadm_save())
        note("cleanup_nat6", netlab.sh("ip6tables", "-t", "nat", "-S"))
        sink.close()
    except Exception:
        note("error", traceback.format_exc())
    finally:
        lab.close()
    note("done", True)


if __name__ == "__main__":
    main(sys.argv[1])
    os._exit(0)
