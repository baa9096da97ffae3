"""IPv4 TCP offload end to end: program, route real traffic, reconcile, repair, drain, clean.

Usage (inside the test VM): case_offload.py RESULT.json. Every observation goes into the
JSON file as soon as it is made; the host-side tests assert on it.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import netlab

from l4lb import ipvs
from l4lb.config import Address
from l4lb.state import FLAG_PERSISTENT, DestSpec, ServiceSpec

VIP = "10.0.0.1"
PORT = 80
BPORT = 8080


class CountingKernel(ipvs._NetlinkKernel):
    """The real kernel access, counting the netlink commands issued."""

    commands: list[str] = []

    def execute_many(self, cmds: list[ipvs.Command]) -> list[int]:
        for cmd in cmds:
            CountingKernel.commands.append(f"{cmd.verb} {cmd.key} {cmd.dest or cmd.settings}")
        return super().execute_many(cmds)


def make_spec(lab: netlab.Lab, sched: str, weights: dict[str, int], **kw: Any) -> ServiceSpec:
    dests = (
        DestSpec(Address.parse(f"{lab.backends[n]}:{BPORT}"), w, 0, 0) for n, w in weights.items()
    )
    spec: ServiceSpec = netlab.service_spec("web", f"{VIP}:{PORT}", dests, scheduler=sched, **kw)
    return spec


def main(out: str) -> None:
    note = netlab.Observations(out)

    netlab.sh("modprobe", "-a", "ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "ip_vs_mh")
    lab = netlab.Lab(3)
    try:
        lab.start_backends(BPORT)
        note("backends", lab.backends)
        # A service l4lb does not own: it must survive everything below.
        netlab.sh("ipvsadm", "-A", "-t", "192.0.2.1:80", "-s", "rr")

        sink = ipvs.IpvsSink(kernel_factory=CountingKernel)
        sink.check_available()
        note("check_available", "ok")

        rr = make_spec(lab, "rr", {"b1": 1, "b2": 1, "b3": 1})
        note("apply_rr_errors", sink.apply({"web": rr}))
        note("apply_rr_commands", list(CountingKernel.commands))
        note("list_rr", netlab.ipvsadm_list())
        note("save_rr", netlab.ipvsadm_save())
        note("link_addrs", netlab.sh("ip", "-o", "addr", "show", "dev", ipvs.LINK))
        note("masq_chain", netlab.sh("iptables", "-t", "nat", "-S", ipvs.CHAIN))
        note("postrouting", netlab.sh("iptables", "-t", "nat", "-S", "POSTROUTING"))
        note(
            "sysctls",
            {
                n: Path(f"/proc/sys/net/ipv4/vs/{n}").read_text().strip()
                for n in ("conntrack", "expire_nodest_conn", "expire_quiescent_template")
            },
        )
        note("traffic_rr", lab.connect(VIP, PORT, 6))

        CountingKernel.commands.clear()
        note("reapply_errors", sink.apply({"web": rr}))
        note("reapply_commands", list(CountingKernel.commands))
        note("save_after_reapply", netlab.ipvsadm_save())

        # Restart: a fresh sink with the same specs issues nothing; a held connection lives.
        held = lab.hold(VIP, PORT)
        note("held_backend", held.backend)
        sink.close()
        CountingKernel.commands.clear()
        sink = ipvs.IpvsSink(kernel_factory=CountingKernel)
        note("restart_errors", sink.apply({"web": rr}))
        note("restart_commands", list(CountingKernel.commands))
        note("held_ping_after_restart", held.ping())

        # Drift: deleted by hand comes back; a weight edited by hand is put back.
        netlab.sh("ipvsadm", "-D", "-t", f"{VIP}:{PORT}")
        note("save_after_manual_delete", netlab.ipvsadm_save())
        note("repair_errors", sink.apply({"web": rr}))
        note("save_after_repair", netlab.ipvsadm_save())
        b1 = f"{lab.backends['b1']}:{BPORT}"
        netlab.sh("ipvsadm", "-e", "-t", f"{VIP}:{PORT}", "-r", b1, "-m", "-w", "9")
        sink.apply({"web": rr})
        note("save_after_weight_repair", netlab.ipvsadm_save())
        held.close()

        # wrr with weights 1:2:3 over two full cycles.
        wrr = make_spec(lab, "wrr", {"b1": 1, "b2": 2, "b3": 3})
        note("apply_wrr_errors", sink.apply({"web": wrr}))
        note("list_wrr", netlab.ipvsadm_list())
        note("traffic_wrr", lab.connect(VIP, PORT, 12))

        # Persistence: one client sticks to one backend.
        sticky = replace(rr, flags=FLAG_PERSISTENT, persist_timeout=60.0, persist_netmask=24)
        note("apply_persist_errors", sink.apply({"web": sticky}))
        note("list_persist", netlab.ipvsadm_list())
        note("save_persist", netlab.ipvsadm_save())
        note("traffic_persist", lab.connect(VIP, PORT, 6))

        # Graceful removal: the held connection's backend is quiesced, then deleted.
        sink.apply({"web": rr})
        held = lab.hold(VIP, PORT)
        gone = held.backend
        note("drain_backend", gone)
        keep = {n: 1 for n in lab.backends if n != gone}
        smaller = make_spec(lab, "rr", keep)
        note("drain_apply_errors", sink.apply({"web": smaller}))
        note("drain_list_during", netlab.ipvsadm_list())
        note("drain_pending", sink.draining)
        note("drain_counters", sink.counters())
        note("drain_ping", held.ping())
        held.close()
        gone_addr = f"{lab.backends[gone]}:{BPORT}"
        note("drain_active_zero", netlab.wait_for(lambda: netlab.dest_active(gone_addr) == 0))
        sink.apply({"web": smaller})
        note("drain_list_after", netlab.ipvsadm_list())
        note("drain_pending_after", sink.draining)

        # Cleanup removes what l4lb made and nothing else.
        sink.cleanup()
        note("cleanup_save", netlab.ipvsadm_save())
        note(
            "cleanup_link",
            netlab.sh("ip", "link", "show", ipvs.LINK, check=False),
        )
        note("cleanup_nat", netlab.sh("iptables", "-t", "nat", "-S"))
        sink.close()
        netlab.sh("ipvsadm", "-D", "-t", "192.0.2.1:80")
    except Exception:
        note("error", traceback.format_exc())
    finally:
        lab.close()
    note("done", True)


if __name__ == "__main__":
    main(sys.argv[1])
    os._exit(0)
