"""iptables "portal" rules that send VIP traffic to the splicer.

A service may answer for virtual addresses (VIPs) that no socket listens on. Like the legacy
kube-proxy userspace mode, l4lb captures that traffic in the ``nat`` table and hands it to the
splicer's listening port, which then reads the dialled VIP back with ``SO_ORIGINAL_DST`` /
``IP6T_SO_ORIGINAL_DST``. Two chains per family (iptables and ip6tables) hold the rules::

    PREROUTING -> L4LB-PORTALS-CONTAINER   traffic from other hosts and containers
    OUTPUT     -> L4LB-PORTALS-HOST        traffic the node itself originates

Rule shapes (exactly as ``iptables-save`` prints them, so output can be compared verbatim)::

    -A L4LB-PORTALS-CONTAINER -d VIP/32 -p tcp -m tcp --dport 80 -m comment --comment "l4lb web"
       -j REDIRECT --to-ports P
    -A L4LB-PORTALS-HOST -d VIP/32 -p tcp -m tcp --dport 80 -m comment --comment "l4lb web"
       -j DNAT --to-destination NODE:P

Why DNAT from OUTPUT: REDIRECT rewrites the destination of a locally generated packet to the
loopback address, but the source was already chosen as the node's address. A UDP server bound to
the wildcard answers from the node's address, which does not match the conntrack reply tuple
(loopback), so the reply is not un-NATed and the client, expecting the VIP, drops it (the DNS
breakage the legacy mode fixed this way). DNAT to a non-loopback local address NODE keeps source
and destination consistent. NODE is chosen by the caller:

* the splicer's bind address, when it binds one specific address;
* otherwise any non-loopback local address (:func:`node_address` picks the first global one).

Loopback targets are refused (sysctl note): from OUTPUT they break UDP replies just as
REDIRECT does, and packets from elsewhere reach 127.0.0.1 only with
``net.ipv4.conf.<if>.route_localnet=1``, which exposes every loopback-only service to the
network; IPv6 has no such switch at all. l4lb therefore never needs or sets route_localnet.
A TCP portal without a NODE for its family falls back to REDIRECT in the HOST chain, which is
safe for TCP (the accepted socket's local address is the loopback the reply tuple expects);
UDP portals require a NODE.

REDIRECT in the CONTAINER chain sends packets to the primary address of the interface they came
in on, so the splicer must listen on the wildcard address of the portal's family.

Lifecycle (what the caller does): :meth:`PortalManager.check_available` before starting a
service with VIPs; :meth:`PortalManager.sync` at start (it replaces whatever a crashed earlier
run left in l4lb's chains), after every configuration change and periodically (it re-adds
deleted hook rules and rewrites the chains); :meth:`PortalManager.cleanup` on clean shutdown and
for ``l4lb cleanup``. Chain names never change, so one l4lb instance owns them per network
namespace. Every method blocks on subprocesses; call them from a thread in async code.

Rules are applied with ``iptables-restore --noflush``: only l4lb's two chains are declared
(which creates or flushes them) and refilled in one transaction; everything else in the table is
left alone. The hooks are added with ``iptables -t nat -I <chain> 1`` only when
``iptables -t nat -C`` says they are missing.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from l4lb.config import Address

__all__ = [
    "CONTAINER_CHAIN",
    "HOOKS",
    "HOOK_COMMENT",
    "HOST_CHAIN",
    "OWNED_CHAINS",
    "CleanupResult",
    "CommandResult",
    "Portal",
    "PortalError",
    "PortalManager",
    "PortalUnavailable",
    "Runner",
    "SubprocessRunner",
    "container_rule",
    "hook_rule",
    "host_rule",
    "main_cleanup",
    "node_address",
    "render_restore",
]

CONTAINER_CHAIN = "L4LB-PORTALS-CONTAINER"
HOST_CHAIN = "L4LB-PORTALS-HOST"
# Every nat chain l4lb creates; cleanup removes exactly these (and the rules jumping to them).
OWNED_CHAINS: tuple[str, ...] = (CONTAINER_CHAIN, HOST_CHAIN)
HOOK_COMMENT = "l4lb portals"
# (built-in chain, l4lb chain it jumps to)
HOOKS: tuple[tuple[str, str], ...] = (("PREROUTING", CONTAINER_CHAIN), ("OUTPUT", HOST_CHAIN))

_TOOLS: dict[int, tuple[str, str]] = {
    4: ("iptables", "iptables-restore"),
    6: ("ip6tables", "ip6tables-restore"),
}
_FAMILY_NAME = {4: "IPv4", 6: "IPv6"}
_PROTOCOLS = ("tcp", "udp")
# xt_comment holds 255 bytes; "l4lb " takes 5 of them. The character set needs no escaping
# inside double quotes, so iptables-save prints the comment exactly as rendered here.
_COMMENT_RE = re.compile(r"[A-Za-z0-9_.:/@,=+\[\] -]{1,200}")
_SEARCH_PATH = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class PortalError(Exception):
    """Portal rules could not be checked, applied or removed; ``str(e)`` says why."""


class PortalUnavailable(PortalError):
    """The tools or the nat table for a family are missing (as opposed to a failure)."""


# --------------------------------------------------------------------------- rules (pure)


@dataclass(frozen=True, slots=True)
class Portal:
    """One VIP:port/protocol captured and sent to the splicer's ``proxy_port``.

    ``proxy_host_v4`` / ``proxy_host_v6`` are the node addresses host-originated traffic is
    DNATed to (only the one of the VIP's family is used); ``comment`` names the portal in the
    rules (``-m comment --comment "l4lb <comment>"``), usually the service name. Invalid
    values raise ValueError; hosts are normalised.
    """

    vip: Address
    protocol: str
    proxy_port: int
    proxy_host_v4: str | None
    proxy_host_v6: str | None
    comment: str

    def __post_init__(self) -> None:
        if not isinstance(self.vip, Address):
            raise TypeError(f"vip must be an Address, got {type(self.vip).__name__}")
        _check_vip(self.vip)
        if self.protocol not in _PROTOCOLS:
            raise ValueError(f"protocol must be 'tcp' or 'udp', got {self.protocol!r}")
        port = self.proxy_port
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"proxy_port must be an integer from 1 to 65535, got {port!r}")
        for attr, version in (("proxy_host_v4", 4), ("proxy_host_v6", 6)):
            host = getattr(self, attr)
            if host is not None:
                object.__setattr__(self, attr, _check_proxy_host(attr, host, version))
        if self.protocol == "udp" and self.proxy_host is None:
            raise ValueError(
                f"udp portal {self.vip} needs proxy_host_v{self.family}: REDIRECT of "
                "host-originated UDP breaks replies, so it must be DNATed to a node address"
            )
        if not isinstance(self.comment, str) or _COMMENT_RE.fullmatch(self.comment) is None:
            raise ValueError(
                "comment must be 1 to 200 characters of letters, digits, spaces and "
                f"_.:/@,=+[]-, got {self.comment!r}"
            )

    @property
    def family(self) -> int:
        """4 or 6: the IP version of the VIP."""
        return 6 if self.vip.family == socket.AF_INET6 else 4

    @property
    def proxy_host(self) -> str | None:
        """The DNAT target address for host-originated traffic, or None (REDIRECT)."""
        return self.proxy_host_v6 if self.family == 6 else self.proxy_host_v4


def _check_vip(vip: Address) -> None:
    ip = ipaddress.ip_address(vip.host)
    if ip.is_unspecified or ip.is_loopback or ip.is_multicast:
        raise ValueError(f"VIP {vip} must be a unicast, non-loopback address")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        raise ValueError(f"VIP {vip} is IPv4-mapped; write it as {ip.ipv4_mapped}:{vip.port}")


def _check_proxy_host(attr: str, host: object, version: int) -> str:
    if not isinstance(host, str):
        raise TypeError(f"{attr} must be a string or None, got {type(host).__name__}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{attr} must be an IPv{version} address, got {host!r}") from None
    if ip.version != version:
        raise ValueError(f"{attr} must be an IPv{version} address, got {host!r}")
    if ip.is_unspecified or ip.is_multicast:
        raise ValueError(f"{attr} must be a concrete local address, got {host!r}")
    if ip.is_loopback:
        raise ValueError(
            f"{attr} must not be loopback ({host!r}): DNAT to loopback needs route_localnet "
            "for IPv4 and is impossible for IPv6; use the bind address or a node address"
        )
    return str(ip)


def _match(p: Portal) -> str:
    prefix = 128 if p.family == 6 else 32
    return (
        f"-d {p.vip.host}/{prefix} -p {p.protocol} -m {p.protocol} --dport {p.vip.port} "
        f'-m comment --comment "l4lb {p.comment}"'
    )


def container_rule(p: Portal) -> str:
    """The CONTAINER chain rule for ``p`` (an ``-A`` line of iptables-restore input)."""
    return f"-A {CONTAINER_CHAIN} {_match(p)} -j REDIRECT --to-ports {p.proxy_port}"


def host_rule(p: Portal) -> str:
    """The HOST chain rule for ``p``: DNAT to the node address, REDIRECT without one."""
    host = p.proxy_host
    if host is None:
        return f"-A {HOST_CHAIN} {_match(p)} -j REDIRECT --to-ports {p.proxy_port}"
    target = f"[{host}]" if p.family == 6 else host
    return f"-A {HOST_CHAIN} {_match(p)} -j DNAT --to-destination {target}:{p.proxy_port}"


def hook_rule(chain: str) -> list[str]:
    """The rule spec (after ``-A PREROUTING`` / ``-A OUTPUT``) that jumps to ``chain``."""
    return ["-m", "comment", "--comment", HOOK_COMMENT, "-j", chain]


def _sort_key(p: Portal) -> tuple[int, int, str]:
    return int(ipaddress.ip_address(p.vip.host)), p.vip.port, p.protocol


def render_restore(portals: Iterable[Portal], family: int) -> str:
    """The complete ``*nat`` iptables-restore input for l4lb's chains of one family.

    Portals of the other family are ignored. Fed to ``iptables-restore --noflush`` it creates
    or flushes the two chains and refills them, touching nothing else. Rules are ordered by
    VIP, port and protocol, all CONTAINER rules first. Two portals claiming the same
    VIP:port/protocol raise ValueError, since only the first could ever match.
    """
    if family not in _TOOLS:
        raise ValueError(f"family must be 4 or 6, got {family!r}")
    chosen = sorted((p for p in portals if p.family == family), key=_sort_key)
    for a, b in itertools.pairwise(chosen):
        if _sort_key(a) == _sort_key(b):
            raise ValueError(
                f"{a.vip}/{a.protocol} is claimed by both 'l4lb {a.comment}' and 'l4lb {b.comment}'"
            )
    lines = ["*nat", f":{CONTAINER_CHAIN} - [0:0]", f":{HOST_CHAIN} - [0:0]"]
    lines += [container_rule(p) for p in chosen]
    lines += [host_rule(p) for p in chosen]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a finished command returned."""

    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    """Runs one command to completion.

    Raises FileNotFoundError if the program does not exist and
    :class:`subprocess.TimeoutExpired` if it outlives ``timeout``.
    """

    def __call__(
        self, argv: Sequence[str], *, stdin: str | None, timeout: float
    ) -> CommandResult: ...


@dataclass(frozen=True, slots=True)
class SubprocessRunner:
    """The default :class:`Runner`: :func:`subprocess.run`, optionally behind a ``prefix``.

    A prefix such as ``("ip", "netns", "exec", "ns1")`` runs every command in a network
    namespace. The sbin directories are searched too, since iptables lives there and a
    non-root PATH often lacks them. Output is read in the C locale so messages are stable.
    """

    prefix: tuple[str, ...] = ()

    def __call__(
        self, argv: Sequence[str], *, stdin: str | None = None, timeout: float
    ) -> CommandResult:
        """Run ``prefix + argv``; see :class:`Runner`."""
        full = [*self.prefix, *argv]
        path = os.pathsep.join([os.environ.get("PATH", os.defpath), *_SEARCH_PATH])
        exe = shutil.which(full[0], path=path)
        if exe is None:
            raise FileNotFoundError(2, "not found", full[0])
        env = {**os.environ, "LC_ALL": "C", "PATH": path}
        proc = subprocess.run(
            [exe, *full[1:]],
            input=stdin,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=timeout,
            env=env,
            check=False,
        )
        return CommandResult(proc.returncode, proc.stdout, proc.stderr)


_PERMISSION_RE = re.compile(r"permission denied|you must be root|operation not permitted", re.I)
_UNAVAILABLE_RE = re.compile(
    r"table does not exist|table '?nat'? does not exist|can't initiali[sz]e|"
    r"protocol not supported|address family not supported|exec of .* failed",
    re.I,
)
_LINE_RE = re.compile(r"line:? (\d+)")


@dataclass(frozen=True, slots=True)
class CleanupResult:
    """What :meth:`PortalManager.cleanup` did: lines removed, families it could not look at."""

    removed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class PortalManager:
    """Installs, repairs and removes l4lb's portal rules for the given IP ``families``.

    ``runner`` executes the iptables binaries (default: :class:`SubprocessRunner`);
    ``wait`` is the xtables lock wait in seconds and ``timeout`` bounds every command.
    Failures raise :class:`PortalError` carrying the command's stderr.
    """

    def __init__(
        self,
        *,
        runner: Runner | None = None,
        families: Iterable[int] = (4, 6),
        wait: int = 5,
        timeout: float = 15.0,
    ) -> None:
        self.families = tuple(families)
        for fam in self.families:
            if fam not in _TOOLS:
                raise ValueError(f"families must be 4 and/or 6, got {fam!r}")
        if not 0 < wait < timeout:
            raise ValueError("need 0 < wait < timeout, so a held lock fails before the timeout")
        self._runner: Runner = runner if runner is not None else SubprocessRunner()
        self._wait = wait
        self._timeout = timeout

    # ---- public

    def check_available(self, families: Iterable[int] | None = None) -> None:
        """Raise PortalError unless portal rules can be managed for ``families``.

        The message says what is missing: root (CAP_NET_ADMIN), the iptables binaries, or
        the nat table. Nothing is changed (``iptables-restore --test``).
        """
        for fam in self.families if families is None else tuple(families):
            if fam not in _TOOLS:
                raise ValueError(f"family must be 4 or 6, got {fam!r}")
            self._iptables(fam, ["-t", "nat", "-S", "OUTPUT"])
            self._restore(fam, "*nat\nCOMMIT\n", test=True)

    def sync(self, portals: Iterable[Portal]) -> None:
        """Make the rules match ``portals`` exactly; idempotent.

        Per family: rewrite both chains atomically, then re-add any missing hook at the top
        of PREROUTING / OUTPUT. A family without portals whose tools or nat table are
        missing is skipped, since nothing can be installed there either.
        """
        portals = tuple(portals)
        for p in portals:
            if p.family not in self.families:
                raise PortalError(
                    f"portal {p.vip}/{p.protocol} is {_FAMILY_NAME[p.family]}, "
                    f"which is not managed (families={self.families})"
                )
        # Render everything first so a conflict changes nothing.
        try:
            texts = {fam: render_restore(portals, fam) for fam in self.families}
        except ValueError as e:
            raise PortalError(str(e)) from None
        for fam, text in texts.items():
            try:
                self._restore(fam, text)
                self._ensure_hooks(fam)
            except PortalUnavailable:
                if any(p.family == fam for p in portals):
                    raise

    def cleanup(self) -> CleanupResult:
        """Remove the hooks (every copy) and l4lb's chains; absent ones are no error.

        Each family is changed in one iptables-restore transaction. Rules in other chains
        that do not jump to l4lb's chains are never touched.
        """
        result = CleanupResult()
        for fam in self.families:
            name = _FAMILY_NAME[fam]
            try:
                listing = self._iptables(fam, ["-t", "nat", "-S"]).stdout
            except PortalUnavailable as e:
                result.skipped.append(str(e))
                continue
            lines = listing.splitlines()
            chains = [c for c in OWNED_CHAINS if f"-N {c}" in lines]
            jumps = [ln for ln in lines if _jumps_into_owned(ln)]
            if not chains and not jumps:
                continue
            payload = ["*nat"]
            payload += ["-D " + ln[len("-A ") :] for ln in jumps]
            payload += [f"-F {c}" for c in chains]
            payload += [f"-X {c}" for c in chains]
            payload.append("COMMIT")
            self._restore(fam, "\n".join(payload) + "\n")
            result.removed.extend(f"{name}: removed rule {ln}" for ln in jumps)
            for c in chains:
                n = sum(1 for ln in lines if ln.startswith(f"-A {c} "))
                result.removed.append(f"{name}: removed chain {c} ({n} rule(s))")
        return result

    # ---- internals

    def _ensure_hooks(self, fam: int) -> None:
        for builtin, chain in HOOKS:
            spec = hook_rule(chain)
            check = self._iptables(fam, ["-t", "nat", "-C", builtin, *spec], ok=(0, 1))
            if check.returncode == 1:
                self._iptables(fam, ["-t", "nat", "-I", builtin, "1", *spec])

    def _iptables(self, fam: int, args: list[str], ok: tuple[int, ...] = (0,)) -> CommandResult:
        argv = [_TOOLS[fam][0], f"--wait={self._wait}", *args]
        return self._exec(fam, argv, None, ok)

    def _restore(self, fam: int, text: str, *, test: bool = False) -> CommandResult:
        argv = [_TOOLS[fam][1], f"--wait={self._wait}", "--noflush"]
        if test:
            argv.append("--test")
        return self._exec(fam, argv, text, (0,))

    def _exec(
        self, fam: int, argv: list[str], stdin: str | None, ok: tuple[int, ...]
    ) -> CommandResult:
        name = _FAMILY_NAME[fam]
        cmd = shlex.join(argv)
        try:
            r = self._runner(argv, stdin=stdin, timeout=self._timeout)
        except FileNotFoundError:
            raise PortalUnavailable(
                f"{name} VIPs need {argv[0]}, which was not found (install iptables)"
            ) from None
        except subprocess.TimeoutExpired:
            raise PortalError(f"{cmd} timed out after {self._timeout:g}s") from None
        except OSError as e:
            raise PortalError(f"{cmd}: cannot run: {e}") from None
        # "iptables -C" exits 1 both for "no such rule" and for some real failures.
        if r.returncode in ok and not (r.returncode and _PERMISSION_RE.search(r.stderr)):
            return r
        err = " ".join(r.stderr.split()) or f"exit status {r.returncode}"
        if _PERMISSION_RE.search(r.stderr):
            raise PortalError(f"{name} VIPs need root (CAP_NET_ADMIN): {cmd}: {err}")
        if _UNAVAILABLE_RE.search(r.stderr):
            raise PortalUnavailable(f"{name} VIPs need the nat table, unavailable: {cmd}: {err}")
        raise PortalError(f"{cmd} failed (exit {r.returncode}): {err}{_input_line(stdin, err)}")


def _input_line(stdin: str | None, err: str) -> str:
    """The restore input line an error message points at, to make it actionable."""
    m = _LINE_RE.search(err)
    if stdin is None or m is None:
        return ""
    lines = stdin.splitlines()
    n = int(m.group(1))
    return f" [input line {n}: {lines[n - 1]}]" if 0 < n <= len(lines) else ""


def _jumps_into_owned(line: str) -> bool:
    """Whether an ``iptables -S`` line is a rule outside l4lb's chains jumping into one."""
    if not line.startswith("-A "):
        return False
    try:
        tokens = shlex.split(line)
    except ValueError:
        return False
    if len(tokens) < 2 or tokens[1] in OWNED_CHAINS:
        return False
    return any(
        tok in ("-j", "-g", "--jump", "--goto") and nxt in OWNED_CHAINS
        for tok, nxt in itertools.pairwise(tokens)
    )


# --------------------------------------------------------------------------- node address and CLI


def node_address(family: int, *, runner: Runner | None = None, timeout: float = 5.0) -> str | None:
    """The first usable global address of this node for ``family`` (4 or 6), or None.

    "Usable" means on an interface that is up and not tentative, deprecated or failed
    duplicate-address detection, in interface order. Any such local address works as the
    DNAT target of host-originated VIP traffic, because it is delivered locally either way;
    the splicer must listen on the wildcard address (or on this address) of the portal's port.
    """
    if family not in _TOOLS:
        raise ValueError(f"family must be 4 or 6, got {family!r}")
    run = runner if runner is not None else SubprocessRunner()
    argv = ["ip", "-j", f"-{family}", "addr", "show", "scope", "global", "up"]
    try:
        r = run(argv, stdin=None, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PortalError(f"{shlex.join(argv)}: {e}") from None
    if r.returncode != 0:
        raise PortalError(f"{shlex.join(argv)} failed: {' '.join(r.stderr.split())}")
    want = "inet6" if family == 6 else "inet"
    try:
        links = json.loads(r.stdout or "[]")
    except ValueError:
        raise PortalError(f"{shlex.join(argv)}: output is not JSON (iproute2 too old?)") from None
    for link in links:
        if link.get("ifname") == "lo":
            continue
        for a in link.get("addr_info", []):
            if a.get("family") != want or a.get("scope") != "global":
                continue
            if a.get("tentative") or a.get("deprecated") or a.get("dadfailed"):
                continue
            return str(ipaddress.ip_address(a["local"]))
    return None


def main_cleanup() -> int:
    """``l4lb cleanup``: remove every rule and chain l4lb installs; print what was removed."""
    try:
        result = PortalManager().cleanup()
    except PortalError as e:
        print(f"l4lb cleanup: {e}", file=sys.stderr)
        return 1
    for line in result.skipped:
        print(f"skipped: {line}")
    for line in result.removed:
        print(line)
    if not result.removed:
        print("nothing to remove")
    return 0
