"""The real ``l4lb run`` with offload services, end to end, against the VM's kernel.

Usage (inside the test VM): case_app.py RESULT.json. l4lb runs in the guest's root
namespace; clients and backends live in namespaces of their own (see netlab.Lab). Each
step records what it saw; a step that raises records its traceback under "errors" and
the next step still runs, so one boot shows every problem at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import netlab

from l4lb import ipvs
from l4lb._testbase import L4lbProcess

BPORT, UPORT = 8080, 5353
L4LB = str(Path(sys.executable).parent / "l4lb")
#: Concrete addresses of the splice twins: the same IPs as the offloaded VIPs (dh hashes
#: the destination address, which must be equal on both paths), another port.
DH_HOSTS = [f"10.0.0.{x}" for x in range(4, 12)]
TWIN_HOSTS = ["10.0.0.20", "10.0.0.21", "10.0.0.22"]
#: Client source addresses for sh (it hashes the client's address).
SOURCES = [f"10.10.1.{x}" for x in range(100, 108)]

UDP_BACKEND = r"""
import socket, sys
name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((host, port))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(name.encode(), peer)
"""

# One long-lived client (a Python start costs seconds under emulation). Per request line
# "proto host port n sources": sequential connections (tcp) or one-datagram exchanges
# from fresh sockets (udp), each from the next source address when given; answers with
# the backend names on one line ("!" and the error when one failed).
CLIENT = r"""
import socket, sys
def run(proto, host, port, n, sources):
    names = []
    for i in range(n):
        src = (sources[i % len(sources)], 0) if sources else None
        if proto == "tcp":
            c = socket.create_connection((host, port), timeout=10, source_address=src)
            names.append(c.makefile("rb").readline().decode().strip())
        else:
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            c.settimeout(5)
            if src:
                c.bind(src)
            c.sendto(b"x", (host, port))
            names.append(c.recv(2048).decode().strip())
        c.close()
    return names
print("ready", flush=True)
for line in sys.stdin:
    proto, host, port, n, *rest = line.split()
    try:
        names = run(proto, host, int(port), int(n), rest[0].split(",") if rest else [])
        print(" ".join(names), flush=True)
    except Exception as e:
        print("! " + repr(e), flush=True)
"""


class Case:
    """Observations plus per-step error capture."""

    def __init__(self, out: str) -> None:
        self.note = netlab.Observations(out)
        self.note.data["errors"] = {}

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        try:
            value = fn()
        except Exception:
            self.note.data["errors"][name] = traceback.format_exc()
            self.note("failed_" + name, True)
            return None
        self.note(name, value)
        return value


def backend(lab: netlab.Lab, name: str, port: int = BPORT, weight: int = 1) -> dict[str, Any]:
    return {"address": f"{lab.backends[name]}:{port}", "weight": weight}


def config(
    lab: netlab.Lab, *, web: dict[str, int] | None = None, drain_timeout: float = 60.0
) -> dict[str, Any]:
    """The l4lb config: ``web`` maps backend names to weights (default b1..b3 at 1)."""
    web = web if web is not None else {"b1": 1, "b2": 1, "b3": 1}
    three = [backend(lab, n) for n in ("b1", "b2", "b3")]
    weighted = [backend(lab, n, weight=w) for n, w in (("b1", 1), ("b2", 2), ("b3", 3))]
    # Slow checks: every one costs the emulated guest a backend thread.
    health = {"kind": "tcp", "interval": 1.0, "timeout": 0.9, "rise": 1, "fall": 1}
    services: list[dict[str, Any]] = [
        {
            "name": "web",
            "mode": "offload",
            "vips": ["10.0.0.1:80", "[fd00::1]:80"],
            "scheduler": "rr",
            "drain_timeout": drain_timeout,
            "backends": [backend(lab, n, weight=w) for n, w in web.items()],
            "health": health,
        },
        {
            "name": "dns",
            "mode": "offload",
            "protocol": "udp",
            "vips": ["10.0.0.2:53"],
            "scheduler": "rr",
            "backends": [backend(lab, n, UPORT) for n in ("b1", "b2")],
        },
        {
            "name": "sticky",
            "mode": "offload",
            "listen": "10.0.0.3:80",
            "scheduler": "rr",
            "affinity_timeout": 60,
            "affinity_netmask": 24,
            "backends": three,
            "health": {**health, "inhibit_on_failure": False},
        },
        {
            "name": "maglev",
            "mode": "offload",
            "listen": "10.0.0.30:80",
            "scheduler": "mh",
            "sh_fallback": True,
            "sh_port": True,
            "backends": three,
        },
    ]
    for sched, host, dests in (
        ("sh", TWIN_HOSTS[0], three),
        ("rr", TWIN_HOSTS[1], three),
        ("wrr", TWIN_HOSTS[2], weighted),
    ):
        services.append(
            {
                "name": f"o-{sched}",
                "mode": "offload",
                "listen": f"{host}:80",
                "scheduler": sched,
                "backends": dests,
            }
        )
        services.append(
            {"name": f"s-{sched}", "listen": f"{host}:81", "scheduler": sched, "backends": dests}
        )
    services.append(
        {
            "name": "o-dh",
            "mode": "offload",
            "vips": [f"{h}:80" for h in DH_HOSTS],
            "scheduler": "dh",
            "backends": three,
        }
    )
    for i, h in enumerate(DH_HOSTS):
        services.append(
            {"name": f"s-dh{i}", "listen": f"{h}:81", "scheduler": "dh", "backends": three}
        )
    return {
        "admin": {"listen": "127.0.0.1:0"},
        "dataplane": {"workers": 1},
        "services": services,
    }


class Client:
    """The long-lived client in the client namespace."""

    proc: subprocess.Popen[str] | None = None

    @classmethod
    def start(cls) -> None:
        cls.proc = subprocess.Popen(
            ["ip", "netns", "exec", "cli", sys.executable, "-c", CLIENT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert cls.proc.stdout is not None and cls.proc.stdout.readline().strip() == "ready"

    @classmethod
    def stop(cls) -> None:
        if cls.proc is not None:
            cls.proc.kill()
            cls.proc.wait()


def client(proto: str, host: str, port: int, n: int, sources: list[str] | None = None) -> list[str]:
    p = Client.proc
    assert p is not None and p.stdin is not None and p.stdout is not None
    p.stdin.write(f"{proto} {host} {port} {n} {','.join(sources or [])}\n")
    p.stdin.flush()
    line = p.stdout.readline().strip()
    if line.startswith("!"):
        raise RuntimeError(f"client {proto} {host}:{port}: {line[1:].strip()}")
    return line.split()


def start_udp_backends(lab: netlab.Lab) -> list[subprocess.Popen[str]]:
    procs = []
    for name in ("b1", "b2"):
        addr = lab.backends[name]
        p = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                name,
                sys.executable,
                "-c",
                UDP_BACKEND,
                name,
                addr,
                str(UPORT),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        procs.append(p)
    return procs


def start_tcp_backend(lab: netlab.Lab, name: str) -> subprocess.Popen[str]:
    addr = lab.backends[name]
    p = subprocess.Popen(
        ["ip", "netns", "exec", name, sys.executable, "-c", netlab.BACKEND, name, addr, str(BPORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def dests_of(vip: str, proto: str = "TCP") -> dict[str, int]:
    """{real server: weight} of one virtual service in ``ipvsadm -Ln``."""
    for svc in netlab.ipvsadm_list():
        if svc["vip"] == vip and svc["proto"] == proto:
            return {d["addr"]: d["weight"] for d in svc["dests"]}
    return {}


def stats() -> dict[str, dict[str, int]]:
    """``ipvsadm -Ln --stats --exact``: {"PROTO vip": {"conns", "inbytes", "outbytes"}} per
    service and {"PROTO vip -> rs": ...} per real server."""
    out: dict[str, dict[str, int]] = {}
    current = ""
    for line in netlab.sh("ipvsadm", "-Ln", "--stats", "--exact").splitlines()[3:]:
        parts = line.split()
        if not parts:
            continue
        if line.startswith("  ->"):
            key = f"{current} -> {parts[1]}"
            vals = parts[2:]
        else:
            current = f"{parts[0]} {parts[1]}"
            key = current
            vals = parts[2:]
        out[key] = {"conns": int(vals[0]), "inbytes": int(vals[3]), "outbytes": int(vals[4])}
    return out


def post(admin: str, service: str, address: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        f"http://{admin}/api/v1/services/{service}/backends/{address}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def api_service(lb: L4lbProcess, name: str) -> dict[str, Any] | None:
    for svc in lb.services_json()["services"]:
        if svc["name"] == name:
            return dict(svc)
    return None


def main(out: str) -> None:
    case = Case(out)
    step, note = case.step, case.note
    netlab.sh(
        "modprobe", "-a", "ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "ip_vs_dh", "ip_vs_mh"
    )
    lab = netlab.Lab(3)
    procs: list[subprocess.Popen[str]] = []
    lbs: list[L4lbProcess] = []

    def cur() -> L4lbProcess:
        return lbs[-1]

    try:
        lab.start_backends(BPORT)
        procs += start_udp_backends(lab)
        note("backends", lab.backends)
        for src in SOURCES:
            netlab.sh("ip", "-n", "cli", "addr", "add", f"{src}/24", "dev", "eth0")
        Client.start()
        # The splice twins listen on the offloaded VIPs' own addresses (other port).
        netlab.sh("ip", "link", "add", "cmp0", "type", "dummy")
        netlab.sh("ip", "link", "set", "cmp0", "up")
        for h in DH_HOSTS + TWIN_HOSTS:
            netlab.sh("ip", "addr", "add", f"{h}/32", "dev", "cmp0")
        # A virtual service l4lb does not own: it must survive everything below.
        netlab.sh("ipvsadm", "-A", "-t", "192.0.2.1:80", "-s", "rr")

        cfg = config(lab)
        lbs.append(L4lbProcess(cfg, command=[L4LB], log_level="debug", ready_timeout=600))
        cur().start()
        note("started", True)
        step("list", netlab.ipvsadm_list)
        step("save", netlab.ipvsadm_save)
        step("link_addrs", lambda: netlab.sh("ip", "-o", "addr", "show", "dev", ipvs.LINK))
        step("masq4", lambda: netlab.sh("iptables", "-t", "nat", "-S", ipvs.CHAIN))
        step("masq6", lambda: netlab.sh("ip6tables", "-t", "nat", "-S", ipvs.CHAIN))

        # Traffic: rr over TCP, rr over UDP, persistence, mh with port hashing.
        step("traffic_web", lambda: client("tcp", "10.0.0.1", 80, 6))
        step("traffic_dns", lambda: client("udp", "10.0.0.2", 53, 4))
        step("traffic_sticky", lambda: client("tcp", "10.0.0.3", 80, 6))
        step("traffic_maglev", lambda: client("tcp", "10.0.0.30", 80, 12))

        # The same script through the kernel and through the splicer.
        def twins() -> dict[str, Any]:
            return {
                "rr": [client("tcp", TWIN_HOSTS[1], p, 6) for p in (80, 81)],
                "wrr": [client("tcp", TWIN_HOSTS[2], p, 12) for p in (80, 81)],
                "sh": [client("tcp", TWIN_HOSTS[0], p, 16, SOURCES) for p in (80, 81)],
                "dh": [[client("tcp", h, p, 1)[0] for h in DH_HOSTS] for p in (80, 81)],
            }

        step("same_choice", twins)

        def settled_stats() -> Any:
            # ipvsadm's totals come from the kernel's estimator, updated every 2 s.
            netlab.wait_for(lambda: stats().get("TCP 10.0.0.1:80", {}).get("conns") == 6)
            return stats()

        step("stats", settled_stats)

        def api_counters() -> Any:
            # The kernel counters reach the API with the next pass (at most a few seconds).
            netlab.wait_for(
                lambda: (
                    sum(
                        b["total"]
                        for b in (api_service(cur(), "web") or {"backends": []})["backends"]
                    )
                    >= 6
                ),
                timeout=60,
            )
            return api_service(cur(), "web")

        step("api_web", api_counters)
        step("api_names", lambda: [s["name"] for s in cur().services_json()["services"]])
        step(
            "status_text",
            lambda: netlab.sh(L4LB, "status", "--admin", cur().admin),
        )

        b = {n: f"{a}:{BPORT}" for n, a in lab.backends.items()}
        web_vip = "10.0.0.1:80"

        # Weight change by SIGHUP.
        def sighup_weight() -> Any:
            cur().reload(config(lab, web={"b1": 5, "b2": 1, "b3": 1}), wait=False)
            netlab.wait_for(lambda: dests_of(web_vip).get(b["b1"]) == 5)
            return dests_of(web_vip)

        step("sighup_weight", sighup_weight)

        # Weight and drain by the admin API.
        def api_weight() -> Any:
            reply = post(cur().admin, "web", b["b2"], {"weight": 4})
            netlab.wait_for(lambda: dests_of(web_vip).get(b["b2"]) == 4)
            return {"reply": reply, "kernel": dests_of(web_vip)}

        step("api_weight", api_weight)

        def api_drain() -> Any:
            post(cur().admin, "web", b["b3"], {"drain": True})
            netlab.wait_for(lambda: dests_of(web_vip).get(b["b3"]) == 0)
            return dests_of(web_vip)

        step("api_drain", api_drain)
        # A reload applies the file as written: overrides are gone.
        cur().reload(cfg, wait=False)
        step(
            "after_reload",
            lambda: (
                netlab.wait_for(lambda: set(dests_of(web_vip).values()) == {1})
                and dests_of(web_vip)
            ),
        )

        # Backend removal: quiesced while a connection is open, deleted once it closes.
        def removal() -> Any:
            held = lab.hold("10.0.0.1", 80)
            gone = held.backend
            keep = {n: 1 for n in ("b1", "b2", "b3") if n != gone}
            cur().reload(config(lab, web=keep), wait=False)
            quiesced = netlab.wait_for(lambda: dests_of(web_vip).get(b[gone]) == 0)
            during = dests_of(web_vip)
            ping = held.ping()
            held.close()
            deleted = netlab.wait_for(lambda: b[gone] not in dests_of(web_vip), timeout=30)
            after = dests_of(web_vip)
            cur().reload(cfg, wait=False)
            back = netlab.wait_for(lambda: len(dests_of(web_vip)) == 3)
            return {
                "gone": gone,
                "quiesced": quiesced,
                "during": during,
                "ping": ping,
                "deleted": deleted,
                "after": after,
                "back": back,
            }

        step("removal", removal)

        # A health failure: kill b3's server; web keeps it at weight 0, sticky drops it.
        def health_failure() -> Any:
            procs_b3 = lab.procs[2]
            procs_b3.kill()
            procs_b3.wait()
            down = netlab.wait_for(lambda: dests_of(web_vip).get(b["b3"]) == 0)
            gone = netlab.wait_for(lambda: b["b3"] not in dests_of("10.0.0.3:80"))
            seen = {"web": dests_of(web_vip), "sticky": dests_of("10.0.0.3:80")}
            api = api_service(cur(), "web")
            lab.procs[2] = start_tcp_backend(lab, "b3")
            up = netlab.wait_for(lambda: dests_of(web_vip).get(b["b3"]) == 1)
            return {
                "down": down,
                "removed_from_sticky": gone,
                "seen": seen,
                "api_b3": [
                    x for x in (api or {"backends": []})["backends"] if x["address"] == b["b3"]
                ],
                "up_again": up,
            }

        step("health_failure", health_failure)

        # Drift: a virtual service deleted by hand comes back with the next full pass.
        def drift() -> Any:
            netlab.sh("ipvsadm", "-D", "-t", web_vip)
            gone = web_vip not in {s["vip"] for s in netlab.ipvsadm_list()}
            back = netlab.wait_for(lambda: len(dests_of(web_vip)) == 3, timeout=150)
            return {"gone": gone, "back": back}

        step("drift", drift)

        # Restart: rules and an open connection outlive l4lb.
        def restart() -> Any:
            held = lab.hold("10.0.0.1", 80)
            before = netlab.ipvsadm_save()
            conns_before = stats()[f"TCP {web_vip}"]["conns"]
            first = cur()
            rc = first.stop()
            note("stderr_first", first.stderr_text()[-6000:])
            after_stop = netlab.ipvsadm_save()
            ping_stopped = held.ping()
            lbs.append(L4lbProcess(cfg, command=[L4LB], log_level="debug", ready_timeout=600))
            cur().start()
            first.close()
            after_start = netlab.ipvsadm_save()
            ping_restarted = held.ping()
            time.sleep(6)  # past one full pass of the new process
            after_pass = netlab.ipvsadm_save()
            conns_after = stats()[f"TCP {web_vip}"]["conns"]
            held.close()
            return {
                "rc": rc,
                "same_after_stop": sorted(after_stop) == sorted(before),
                "same_after_start": sorted(after_start) == sorted(before),
                "same_after_pass": sorted(after_pass) == sorted(before),
                "ping_stopped": ping_stopped,
                "ping_restarted": ping_restarted,
                "conns_before": conns_before,
                "conns_after": conns_after,
            }

        step("restart", restart)
        step("stderr_has_traceback", lambda: "Traceback" in cur().stderr_text())
        step("stop_rc", cur().stop)

        # l4lb cleanup leaves only what is not l4lb's.
        def cleanup() -> Any:
            r = subprocess.run([L4LB, "cleanup"], capture_output=True, text=True, timeout=120)
            return {
                "rc": r.returncode,
                "stdout": r.stdout,
                "stderr": r.stderr,
                "save": netlab.ipvsadm_save(),
                "link": netlab.sh("ip", "link", "show", ipvs.LINK, check=False),
                "nat4": netlab.sh("iptables", "-t", "nat", "-S"),
                "nat6": netlab.sh("ip6tables", "-t", "nat", "-S"),
            }

        step("cleanup", cleanup)
    except Exception:
        note.data["errors"]["main"] = traceback.format_exc()
        note("failed_main", True)
    finally:
        if lbs:
            note("stderr_tail", cur().stderr_text()[-6000:])
            for lb in lbs:
                lb.close()
        for p in procs:
            p.kill()
        Client.stop()
        lab.close()
        netlab.sh("ip", "link", "del", "cmp0", check=False)
        netlab.sh("ipvsadm", "-D", "-t", "192.0.2.1:80", check=False)
    note("done", True)


if __name__ == "__main__":
    main(sys.argv[1])
    os._exit(0)
