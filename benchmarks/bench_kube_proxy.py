"""``l4lb kube-proxy`` at scale: 10,000 Services with 100,000 endpoints.

Runs as a script, as root (it creates a private network namespace and re-runs itself in it,
so the portal rules and listeners never touch the host)::

    python3 -m benchmarks.bench_kube_proxy [--services N] [--endpoints-per-service M]
        [--changes K] [--json out.json]

Inside the namespace the API-server double (tests/k8s/k8s_apiserver.py, real HTTP on
loopback) holds the objects, and the real ``l4lb kube-proxy`` process (``--workers 1``: one
listener per service, and the machine's hard open-file limit is 20,000) watches it. It
reports:

* initial sync: process start until the ClusterIP of the last Service (by name, so the one
  programmed last) answers through the proxy; and the first sync's own duration from the
  ``kubeproxy_sync_proxy_rules_duration_seconds`` histogram;
* resident memory of the proxy process once serving;
* EndpointSlice change latency: K times, the probe Service's slice switches its endpoint
  between two local backends; the time from writing the watch event until a fresh
  connection through the ClusterIP reaches the new backend (p50/p99/max), alongside the
  proxy's own ``kubeproxy_network_programming_duration_seconds`` (event decoded to
  programmed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "k8s"))

PROBE_IP = "10.96.255.254"
NODE_ADDRESS = "10.250.0.1/24"
_ENV = "L4LB_BENCH_KUBE_PROXY_NETNS"


def _objects(n: int, per: int, probe_port: int) -> tuple[list[Any], list[Any]]:
    from k8s_objects import endpoint_slice, service

    services, slices = [], []
    for i in range(n - 1):
        ip = f"10.96.{i // 250}.{i % 250 + 1}"
        services.append(service(f"svc-{i:05d}", ip, [{"name": "http", "port": 80}]))
        eps = []
        for j in range(per):
            k = i * per + j
            eps.append({"ip": f"10.{100 + k // 62500}.{(k // 250) % 250}.{k % 250 + 1}"})
        slices.append(endpoint_slice(f"svc-{i:05d}", eps, [{"name": "http", "port": 8080}]))
    services.append(service("zz-probe", PROBE_IP, [{"name": "http", "port": 80}]))
    slices.append(
        endpoint_slice("zz-probe", [{"ip": "127.0.0.1"}], [{"name": "http", "port": probe_port}])
    )
    return services, slices


async def _backend(name: bytes) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(name)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _probe(timeout: float = 0.5) -> bytes | None:
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(PROBE_IP, 80)
            data = await reader.read(16)
            writer.close()
            return data
    except (OSError, TimeoutError):
        return None


async def _http(url: str) -> str:
    host, _, rest = url.removeprefix("http://").partition("/")
    h, _, p = host.partition(":")
    reader, writer = await asyncio.open_connection(h, int(p))
    writer.write(f"GET /{rest} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data.split(b"\r\n\r\n", 1)[1].decode()


def _histogram(text: str, name: str) -> dict[str, Any]:
    buckets = [
        (float(m[1]), float(m[2]))
        for m in re.finditer(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', text, re.M)
        if m[1] != "+Inf"
    ]
    count = float(re.search(rf"^{name}_count (\S+)$", text, re.M)[1])  # type: ignore[index]
    total = float(re.search(rf"^{name}_sum (\S+)$", text, re.M)[1])  # type: ignore[index]
    p99 = next((le for le, c in buckets if c >= 0.99 * count), float("inf"))
    return {"count": count, "mean": total / count if count else 0.0, "p99_bucket": p99}


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    from k8s_apiserver import FakeApiServer
    from k8s_objects import node

    a_srv, a_port = await _backend(b"A")
    b_srv, b_port = await _backend(b"B")
    services, slices = _objects(args.services, args.endpoints_per_service, a_port)
    api = FakeApiServer()
    for s in services:
        api.add("Service", s, silent=True)
    for sl in slices:
        api.add("EndpointSlice", sl, silent=True)
    api.nodes["bench-node"] = node("bench-node", [NODE_ADDRESS.split("/")[0]])
    await api.start()
    tmp = Path(tempfile.mkdtemp(prefix="l4lb-kp-bench-"))
    kubeconfig = api.write_kubeconfig(tmp / "kubeconfig")
    log = (tmp / "kube-proxy.log").open("w")
    profile = ["-m", "cProfile", "-o", args.profile] if args.profile else []
    argv = [
        sys.executable,
        *profile,
        "-m",
        "l4lb",
        "kube-proxy",
        f"--kubeconfig={kubeconfig}",
        "--hostname-override=bench-node",
        "--workers=1",
        "--log-level=warning",
    ]
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=ROOT)
    try:
        for _ in range(30000):  # bounded: 300 s
            if await _probe(0.2) == b"A":
                break
            if proc.poll() is not None:
                raise RuntimeError(f"kube-proxy exited: {(tmp / 'kube-proxy.log').read_text()}")
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError("the probe service never answered")
        initial = time.monotonic() - start
        await asyncio.sleep(1.0)
        rss = _rss(proc.pid)
        first_sync = _histogram(
            await _http("http://127.0.0.1:10249/metrics"),
            "kubeproxy_sync_proxy_rules_duration_seconds",
        )
        latencies = []
        probe_slice = slices[-1]
        for i in range(args.changes):
            want, port = (b"B", b_port) if i % 2 == 0 else (b"A", a_port)
            probe_slice["ports"][0]["port"] = port
            sent = time.monotonic()
            api.add("EndpointSlice", probe_slice)
            for _ in range(100000):  # bounded by the deadline below
                if await _probe() == want:
                    break
                if time.monotonic() - sent > 30:
                    raise RuntimeError(f"change {i} never took effect")
            latencies.append(time.monotonic() - sent)
            await asyncio.sleep(args.gap)
        metrics = await _http("http://127.0.0.1:10249/metrics")
        rss_after = _rss(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        await api.stop()
        a_srv.close()
        b_srv.close()
    latencies.sort()
    return {
        "services": args.services,
        "endpoints": (args.services - 1) * args.endpoints_per_service + 1,
        "initial_sync_to_serving_s": round(initial, 3),
        "first_sync_duration_s": round(first_sync["mean"], 3),
        "rss_bytes": rss,
        "rss_after_changes_bytes": rss_after,
        "change_latency_ms": {
            "count": len(latencies),
            "p50": round(statistics.median(latencies) * 1000, 2),
            "p99": round(latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000, 2),
            "max": round(latencies[-1] * 1000, 2),
        },
        "programming_duration": _histogram(
            metrics, "kubeproxy_network_programming_duration_seconds"
        ),
        "sync_duration": _histogram(metrics, "kubeproxy_sync_proxy_rules_duration_seconds"),
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--endpoints-per-service", type=int, default=10)
    p.add_argument("--changes", type=int, default=100)
    p.add_argument("--gap", type=float, default=0.05, help="seconds between changes")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--profile", help="run the proxy under cProfile, writing stats here")
    args = p.parse_args()
    if os.environ.get(_ENV) != "1":
        from l4lb._netns import Netns, add_address, unavailable_reason, veth_pair

        reason = unavailable_reason()
        if reason is not None:
            print(f"skipped: {reason}", file=sys.stderr)
            return 0
        ns = Netns.create("kpbench")
        try:
            # A node address and a route for the service range, as on a real node (a
            # veth pair inside the namespace: no dummy interfaces needed).
            veth_pair(ns, "node0", ns, "peer0")
            add_address(ns, "node0", NODE_ADDRESS)
            ns.ip("route", "add", "10.96.0.0/12", "dev", "node0")
            cmd = [*ns.exec_prefix, sys.executable, "-m", "benchmarks.bench_kube_proxy"]
            env = {**os.environ, _ENV: "1"}
            return subprocess.run([*cmd, *sys.argv[1:]], env=env, cwd=ROOT, check=False).returncode
        finally:
            ns.delete()
    result = asyncio.run(_bench(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
