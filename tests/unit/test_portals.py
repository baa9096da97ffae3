"""Portal rules: exact restore text, Portal validation, and PortalManager over a fake iptables."""

from __future__ import annotations

import copy
import json
import shlex
import subprocess
from collections.abc import Sequence

import pytest

from l4lb import portals
from l4lb.config import Address
from l4lb.portals import (
    CommandResult,
    Portal,
    PortalError,
    PortalManager,
    PortalUnavailable,
    SubprocessRunner,
    node_address,
    render_restore,
)

HOOK4 = '-A PREROUTING -m comment --comment "l4lb portals" -j L4LB-PORTALS-CONTAINER'
HOOK_OUT = '-A OUTPUT -m comment --comment "l4lb portals" -j L4LB-PORTALS-HOST'


def portal(
    vip: str,
    port: int,
    *,
    protocol: str = "tcp",
    v4: str | None = "192.0.2.5",
    v6: str | None = "2001:db8::5",
    comment: str = "web",
) -> Portal:
    return Portal(Address.parse(vip), protocol, port, v4, v6, comment)


# --------------------------------------------------------------------------- render_restore


def test_render_ipv4_several_portals_sorted_tcp_and_udp():
    ps = [
        portal("10.96.0.10:80", 30001),
        portal("10.96.0.2:53", 30003, protocol="udp", comment="dns"),
        portal("10.96.0.2:53", 30002, comment="dns"),
        portal("[fd00::10]:80", 30009),  # other family: ignored
    ]
    assert render_restore(ps, 4) == (
        "*nat\n"
        ":L4LB-PORTALS-CONTAINER - [0:0]\n"
        ":L4LB-PORTALS-HOST - [0:0]\n"
        '-A L4LB-PORTALS-CONTAINER -d 10.96.0.2/32 -p tcp -m tcp --dport 53 -m comment --comment "l4lb dns" -j REDIRECT --to-ports 30002\n'  # noqa: E501
        '-A L4LB-PORTALS-CONTAINER -d 10.96.0.2/32 -p udp -m udp --dport 53 -m comment --comment "l4lb dns" -j REDIRECT --to-ports 30003\n'  # noqa: E501
        '-A L4LB-PORTALS-CONTAINER -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "l4lb web" -j REDIRECT --to-ports 30001\n'  # noqa: E501
        '-A L4LB-PORTALS-HOST -d 10.96.0.2/32 -p tcp -m tcp --dport 53 -m comment --comment "l4lb dns" -j DNAT --to-destination 192.0.2.5:30002\n'  # noqa: E501
        '-A L4LB-PORTALS-HOST -d 10.96.0.2/32 -p udp -m udp --dport 53 -m comment --comment "l4lb dns" -j DNAT --to-destination 192.0.2.5:30003\n'  # noqa: E501
        '-A L4LB-PORTALS-HOST -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "l4lb web" -j DNAT --to-destination 192.0.2.5:30001\n'  # noqa: E501
        "COMMIT\n"
    )


def test_render_ipv6_tcp_and_udp():
    ps = [
        portal("[fd00::10]:80", 30001, v6="2001:0db8:0::5"),
        portal("[fd00::a]:53", 30002, protocol="udp", v6="2001:db8::5", comment="dns"),
        portal("10.96.0.10:80", 30009),
    ]
    assert render_restore(ps, 6) == (
        "*nat\n"
        ":L4LB-PORTALS-CONTAINER - [0:0]\n"
        ":L4LB-PORTALS-HOST - [0:0]\n"
        '-A L4LB-PORTALS-CONTAINER -d fd00::a/128 -p udp -m udp --dport 53 -m comment --comment "l4lb dns" -j REDIRECT --to-ports 30002\n'  # noqa: E501
        '-A L4LB-PORTALS-CONTAINER -d fd00::10/128 -p tcp -m tcp --dport 80 -m comment --comment "l4lb web" -j REDIRECT --to-ports 30001\n'  # noqa: E501
        '-A L4LB-PORTALS-HOST -d fd00::a/128 -p udp -m udp --dport 53 -m comment --comment "l4lb dns" -j DNAT --to-destination [2001:db8::5]:30002\n'  # noqa: E501
        '-A L4LB-PORTALS-HOST -d fd00::10/128 -p tcp -m tcp --dport 80 -m comment --comment "l4lb web" -j DNAT --to-destination [2001:db8::5]:30001\n'  # noqa: E501
        "COMMIT\n"
    )


@pytest.mark.parametrize("family", [4, 6])
def test_render_no_portals_declares_and_flushes_both_chains(family: int):
    expected = "*nat\n:L4LB-PORTALS-CONTAINER - [0:0]\n:L4LB-PORTALS-HOST - [0:0]\nCOMMIT\n"
    assert render_restore([], family) == expected
    other = portal("[fd00::1]:80", 1) if family == 4 else portal("10.0.0.1:80", 1)
    assert render_restore([other], family) == expected


def test_render_is_independent_of_input_order():
    ps = [portal(f"10.96.{i % 3}.{i}:{80 + i % 2}", 30000 + i) for i in range(1, 12)]
    assert render_restore(ps, 4) == render_restore(list(reversed(ps)), 4)


def test_render_tcp_without_node_address_redirects_in_host_chain():
    text = render_restore([portal("10.96.0.10:80", 30001, v4=None)], 4)
    assert (
        '-A L4LB-PORTALS-HOST -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "l4lb web" -j REDIRECT --to-ports 30001\n'  # noqa: E501
        in text
    )
    assert "DNAT" not in text


def test_render_rejects_two_portals_for_one_vip():
    a = portal("10.96.0.10:80", 30001, comment="a")
    b = portal("10.96.0.10:80", 30002, comment="b")
    with pytest.raises(ValueError, match=r"10\.96\.0\.10:80/tcp is claimed by both"):
        render_restore([a, b], 4)
    render_restore([a, portal("10.96.0.10:80", 30002, protocol="udp")], 4)


def test_render_rejects_unknown_family():
    with pytest.raises(ValueError, match="family"):
        render_restore([], 5)


# --------------------------------------------------------------------------- Portal


def test_portal_normalises_hosts_and_reports_family():
    p = portal("[fd00::10]:80", 1, v4="192.0.2.5", v6="2001:0DB8:0:0::5")
    assert p.proxy_host_v6 == "2001:db8::5"
    assert p.family == 6
    assert p.proxy_host == "2001:db8::5"
    assert portal("10.0.0.1:80", 1).proxy_host == "192.0.2.5"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"protocol": "sctp"}, "protocol must be"),
        ({"proxy_port": 0}, "proxy_port"),
        ({"proxy_port": 65536}, "proxy_port"),
        ({"proxy_port": True}, "proxy_port"),
        ({"proxy_host_v4": "127.0.0.1"}, "must not be loopback"),
        ({"proxy_host_v6": "::1"}, "must not be loopback"),
        ({"proxy_host_v4": "0.0.0.0"}, "concrete local address"),
        ({"proxy_host_v4": "2001:db8::5"}, "IPv4 address"),
        ({"proxy_host_v6": "192.0.2.5"}, "IPv6 address"),
        ({"proxy_host_v4": "node1"}, "IPv4 address"),
        ({"protocol": "udp", "proxy_host_v4": None}, "needs proxy_host_v4"),
        ({"comment": ""}, "comment"),
        ({"comment": 'we"b'}, "comment"),
        ({"comment": "x" * 201}, "comment"),
        ({"vip": Address.parse("127.0.0.1:80")}, "non-loopback"),
        ({"vip": Address.parse("0.0.0.0:80")}, "non-loopback"),
        ({"vip": Address.parse("224.0.0.1:80")}, "non-loopback"),
        ({"vip": Address.parse("[::ffff:10.0.0.1]:80")}, "IPv4-mapped"),
    ],
)
def test_portal_rejects(kwargs: dict[str, object], message: str):
    args: dict[str, object] = {
        "vip": Address.parse("10.96.0.10:80"),
        "protocol": "tcp",
        "proxy_port": 30001,
        "proxy_host_v4": "192.0.2.5",
        "proxy_host_v6": None,
        "comment": "web",
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        Portal(**args)  # type: ignore[arg-type]


def test_portal_rejects_wrong_types():
    with pytest.raises(TypeError):
        Portal("10.0.0.1:80", "tcp", 1, None, None, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Portal(Address.parse("10.0.0.1:80"), "tcp", 1, 3232235521, None, "x")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- fake iptables

_BUILTINS = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")
_TARGETS = {"ACCEPT", "DROP", "RETURN", "REDIRECT", "DNAT", "SNAT", "MASQUERADE"}


def _text(tokens: Sequence[str]) -> str:
    return " ".join(f'"{t}"' if " " in t else t for t in tokens)


class _Fail(Exception):
    def __init__(self, rc: int, msg: str) -> None:
        super().__init__(msg)
        self.rc = rc
        self.msg = msg


class FakeIptables:
    """The nat tables of iptables and ip6tables, modelled closely enough to test against.

    Rules are stored as their canonical text (what ``iptables -S`` prints after the chain).
    """

    def __init__(self) -> None:
        self.tables: dict[int, dict[str, list[str]]] = {
            fam: {b: [] for b in _BUILTINS} for fam in (4, 6)
        }
        self.calls: list[tuple[tuple[str, ...], str | None]] = []
        self.missing: set[str] = set()
        self.stderr_for: dict[str, tuple[int, str]] = {}  # tool -> forced (rc, stderr)

    # inspection
    def rules(self, fam: int, chain: str) -> list[str]:
        return [f"-A {chain} {r}" for r in self.tables[fam][chain]]

    def user_chains(self, fam: int) -> list[str]:
        return [c for c in self.tables[fam] if c not in _BUILTINS]

    def argvs(self) -> list[tuple[str, ...]]:
        return [argv for argv, _ in self.calls]

    # the Runner interface
    def __call__(self, argv: Sequence[str], *, stdin: str | None, timeout: float) -> CommandResult:
        assert timeout > 0
        self.calls.append((tuple(argv), stdin))
        tool = argv[0]
        if tool in self.missing:
            raise FileNotFoundError(2, "not found", tool)
        if tool in self.stderr_for:
            rc, err = self.stderr_for[tool]
            return CommandResult(rc, "", err)
        fam = 6 if tool.startswith("ip6") else 4
        args = list(argv[1:])
        assert args[0].startswith("--wait="), argv
        try:
            if tool.endswith("-restore"):
                return self._restore(fam, args[1:], stdin or "")
            assert args[1:3] == ["-t", "nat"], argv
            return self._command(fam, args[3:])
        except _Fail as e:
            return CommandResult(e.rc, "", e.msg + "\n")

    def _command(self, fam: int, args: list[str]) -> CommandResult:
        t = self.tables[fam]
        op, rest = args[0], args[1:]
        if op == "-S":
            names = rest or list(t)
            out = [f"-P {c} ACCEPT" for c in names if c in _BUILTINS]
            out += [f"-N {c}" for c in names if c not in _BUILTINS]
            out += [f"-A {c} {r}" for c in names for r in t[c]]
            return CommandResult(0, "".join(x + "\n" for x in out), "")
        chain, spec = rest[0], rest[1:]
        if chain not in t:
            raise _Fail(1, "iptables: No chain/target/match by that name.")
        if op == "-I":
            assert spec[0] == "1"
            spec = spec[1:]
        self._check_target(t, spec)
        text = _text(spec)
        if op == "-C":
            if text not in t[chain]:
                raise _Fail(1, "iptables: Bad rule (does a matching rule exist in that chain?).")
        elif op == "-I":
            t[chain].insert(0, text)
        elif op == "-D":
            if text not in t[chain]:
                raise _Fail(1, "iptables: Bad rule (does a matching rule exist in that chain?).")
            t[chain].remove(text)
        else:
            raise AssertionError(f"unexpected {op}")
        return CommandResult(0, "", "")

    @staticmethod
    def _check_target(t: dict[str, list[str]], spec: list[str]) -> None:
        target = spec[spec.index("-j") + 1]
        if target not in _TARGETS and target not in t:
            raise _Fail(2, f"iptables v1.8.9 (nf_tables): Chain '{target}' does not exist")

    def _restore(self, fam: int, args: list[str], stdin: str) -> CommandResult:
        noflush = "--noflush" in args
        test = "--test" in args
        assert set(args) <= {"--noflush", "--test"}, args
        t = copy.deepcopy(self.tables[fam])
        for n, line in enumerate(stdin.splitlines(), 1):
            try:
                tokens = shlex.split(line)
                if not tokens or line.startswith("#"):
                    continue
                if line == "*nat":
                    if not noflush:  # a real restore without --noflush wipes the table
                        t = {b: [] for b in _BUILTINS}
                elif line.startswith(":"):
                    name = tokens[0][1:]
                    if name not in _BUILTINS:
                        t[name] = []  # creates, or flushes an existing chain
                elif line == "COMMIT":
                    if not test:
                        self.tables[fam] = t
                elif tokens[0] in ("-A", "-D"):
                    chain = tokens[1]
                    if chain not in t:
                        raise _Fail(1, "No chain/target/match by that name.")
                    self._check_target(t, tokens[2:])
                    text = line.split(" ", 2)[2]
                    if tokens[0] == "-A":
                        t[chain].append(text)
                    elif text in t[chain]:
                        t[chain].remove(text)
                    else:
                        raise _Fail(1, "Bad rule (does a matching rule exist in that chain?).")
                elif tokens[0] == "-F":
                    t[tokens[1]] = []
                elif tokens[0] == "-X":
                    name = tokens[1]
                    used = any(f"-j {name}" in r for rs in t.values() for r in rs)
                    if t[name] or used:
                        raise _Fail(1, "Directory not empty.")
                    del t[name]
                else:
                    raise AssertionError(f"unexpected restore line {line!r}")
            except _Fail as e:
                return CommandResult(e.rc, "", f"iptables-restore: line {n} failed: {e.msg}\n")
        return CommandResult(0, "", "")


@pytest.fixture
def fake() -> FakeIptables:
    return FakeIptables()


def manager(fake: FakeIptables, **kw: object) -> PortalManager:
    return PortalManager(runner=fake, **kw)  # type: ignore[arg-type]


PORTALS = [
    portal("10.96.0.10:80", 30001),
    portal("[fd00::10]:80", 30002),
]

# --------------------------------------------------------------------------- sync


def test_first_sync_runs_restore_then_checks_and_inserts_hooks(fake: FakeIptables):
    manager(fake).sync(PORTALS)
    spec = ("-m", "comment", "--comment", "l4lb portals", "-j")
    expected: list[tuple[str, ...]] = []
    for ipt in ("iptables", "ip6tables"):
        nat = (ipt, "--wait=5", "-t", "nat")
        expected += [
            (f"{ipt}-restore", "--wait=5", "--noflush"),
            (*nat, "-C", "PREROUTING", *spec, "L4LB-PORTALS-CONTAINER"),
            (*nat, "-I", "PREROUTING", "1", *spec, "L4LB-PORTALS-CONTAINER"),
            (*nat, "-C", "OUTPUT", *spec, "L4LB-PORTALS-HOST"),
            (*nat, "-I", "OUTPUT", "1", *spec, "L4LB-PORTALS-HOST"),
        ]
    assert fake.argvs() == expected
    assert fake.calls[0][1] == render_restore(PORTALS, 4)
    assert fake.calls[5][1] == render_restore(PORTALS, 6)
    assert fake.rules(4, "PREROUTING") == [HOOK4]
    assert fake.rules(4, "OUTPUT") == [HOOK_OUT]
    assert fake.rules(6, "PREROUTING") == [HOOK4]
    assert fake.rules(4, "L4LB-PORTALS-HOST") == [
        '-A L4LB-PORTALS-HOST -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "l4lb web" -j DNAT --to-destination 192.0.2.5:30001'  # noqa: E501
    ]
    assert len(fake.rules(6, "L4LB-PORTALS-CONTAINER")) == 1


def test_sync_is_idempotent(fake: FakeIptables):
    m = manager(fake)
    m.sync(PORTALS)
    state = copy.deepcopy(fake.tables)
    fake.calls.clear()
    m.sync(PORTALS)
    assert fake.tables == state
    assert not [a for a in fake.argvs() if "-I" in a]
    v4, v6 = ["iptables-restore", "iptables", "iptables"], ["ip6tables-restore", "ip6tables"]
    assert [a[0] for a in fake.argvs()] == [*v4, *v6, "ip6tables"]


def test_sync_repairs_a_deleted_hook_once_and_at_the_top(fake: FakeIptables):
    fake.tables[4]["PREROUTING"].append("-p tcp -m tcp --dport 9 -j ACCEPT")  # foreign
    m = manager(fake)
    m.sync(PORTALS)
    fake.tables[4]["PREROUTING"].remove(HOOK4.split(" ", 2)[2])
    m.sync(PORTALS)
    m.sync(PORTALS)
    assert fake.rules(4, "PREROUTING") == [HOOK4, "-A PREROUTING -p tcp -m tcp --dport 9 -j ACCEPT"]
    assert fake.rules(4, "OUTPUT") == [HOOK_OUT]


def test_sync_repairs_deleted_portal_rules_and_replaces_stale_ones(fake: FakeIptables):
    # What a crashed earlier run may leave: a hook and a chain with a rule for an old port.
    fake.tables[4]["L4LB-PORTALS-CONTAINER"] = ["-d 10.96.0.99/32 -j REDIRECT --to-ports 1"]
    fake.tables[4]["PREROUTING"] = [HOOK4.split(" ", 2)[2]]
    m = manager(fake)
    m.sync(PORTALS)
    assert fake.rules(4, "L4LB-PORTALS-CONTAINER") == [
        '-A L4LB-PORTALS-CONTAINER -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "l4lb web" -j REDIRECT --to-ports 30001'  # noqa: E501
    ]
    assert fake.rules(4, "PREROUTING") == [HOOK4]
    fake.tables[4]["L4LB-PORTALS-HOST"].clear()
    m.sync(PORTALS)
    assert len(fake.rules(4, "L4LB-PORTALS-HOST")) == 1


def test_sync_with_changed_portals_replaces_rules(fake: FakeIptables):
    m = manager(fake, families=(4,))
    m.sync(PORTALS[:1])
    m.sync([portal("10.96.0.11:443", 30005, comment="tls")])
    [rule] = fake.rules(4, "L4LB-PORTALS-CONTAINER")
    assert "10.96.0.11/32" in rule
    assert "30005" in rule
    m.sync([])
    assert fake.rules(4, "L4LB-PORTALS-CONTAINER") == []
    assert fake.rules(4, "L4LB-PORTALS-HOST") == []
    assert fake.rules(4, "PREROUTING") == [HOOK4]


def test_sync_rejects_unmanaged_family_and_conflicts_without_changing_anything(
    fake: FakeIptables,
):
    with pytest.raises(PortalError, match="IPv6, which is not managed"):
        manager(fake, families=(4,)).sync(PORTALS)
    dup = [portal("10.96.0.10:80", 1, comment="a"), portal("10.96.0.10:80", 2, comment="b")]
    with pytest.raises(PortalError, match="claimed by both"):
        manager(fake).sync(dup)
    assert fake.calls == []


def test_sync_skips_a_family_without_tools_when_it_has_no_portals(fake: FakeIptables):
    fake.missing = {"ip6tables", "ip6tables-restore"}
    m = manager(fake)
    m.sync(PORTALS[:1])
    assert fake.rules(4, "PREROUTING") == [HOOK4]
    with pytest.raises(PortalUnavailable, match="IPv6 VIPs need ip6tables-restore, which was not"):
        m.sync(PORTALS)


def test_sync_failure_carries_stderr_and_the_offending_input_line(fake: FakeIptables):
    fake.stderr_for["iptables-restore"] = (1, "iptables-restore: line 4 failed: Invalid argument")
    with pytest.raises(PortalError) as info:
        manager(fake, families=(4,)).sync(PORTALS[:1])
    msg = str(info.value)
    assert "iptables-restore --wait=5 --noflush failed (exit 1)" in msg
    assert "line 4 failed: Invalid argument" in msg
    assert "[input line 4: -A L4LB-PORTALS-CONTAINER -d 10.96.0.10/32" in msg


def test_check_rule_exit_1_with_permission_error_is_not_taken_as_absent(fake: FakeIptables):
    m = manager(fake, families=(4,))
    m.sync([])
    fake.stderr_for["iptables"] = (1, "iptables: Permission denied (you must be root).")
    with pytest.raises(PortalError, match="need root"):
        m.sync([])


def test_timeouts_become_portal_errors():
    def slow(argv: Sequence[str], *, stdin: str | None, timeout: float) -> CommandResult:
        raise subprocess.TimeoutExpired(list(argv), timeout)

    m = PortalManager(runner=slow, families=(4,), wait=2, timeout=3)
    with pytest.raises(
        PortalError, match=r"iptables-restore --wait=2 --noflush timed out after 3s"
    ):
        m.sync([])


# --------------------------------------------------------------------------- cleanup


def test_cleanup_removes_hooks_chains_and_duplicates_but_not_foreign_rules(fake: FakeIptables):
    m = manager(fake)
    m.sync(PORTALS)
    foreign = "-p tcp -m tcp --dport 9 -j ACCEPT"
    fake.tables[4]["PREROUTING"] += [foreign, HOOK4.split(" ", 2)[2]]  # second copy of the hook
    fake.tables[4]["FOREIGN"] = [foreign]
    result = m.cleanup()
    for fam in (4, 6):
        assert fake.user_chains(fam) == (["FOREIGN"] if fam == 4 else [])
        assert fake.rules(fam, "OUTPUT") == []
    assert fake.rules(4, "PREROUTING") == [f"-A PREROUTING {foreign}"]
    assert fake.rules(4, "FOREIGN") == [f"-A FOREIGN {foreign}"]
    assert result.skipped == []
    assert result.removed == [
        f"IPv4: removed rule {HOOK4}",
        f"IPv4: removed rule {HOOK4}",
        f"IPv4: removed rule {HOOK_OUT}",
        "IPv4: removed chain L4LB-PORTALS-CONTAINER (1 rule(s))",
        "IPv4: removed chain L4LB-PORTALS-HOST (1 rule(s))",
        f"IPv6: removed rule {HOOK4}",
        f"IPv6: removed rule {HOOK_OUT}",
        "IPv6: removed chain L4LB-PORTALS-CONTAINER (1 rule(s))",
        "IPv6: removed chain L4LB-PORTALS-HOST (1 rule(s))",
    ]
    restores = [(a, s) for a, s in fake.calls if a[0].endswith("-restore")]
    assert restores[-1][0] == ("ip6tables-restore", "--wait=5", "--noflush")


def test_cleanup_when_nothing_is_installed_changes_nothing(fake: FakeIptables):
    fake.tables[4]["PREROUTING"].append("-p tcp -m tcp --dport 9 -j ACCEPT")
    before = copy.deepcopy(fake.tables)
    result = manager(fake).cleanup()
    assert result.removed == []
    assert fake.tables == before
    assert all(not a[0].endswith("-restore") for a in fake.argvs())


def test_cleanup_twice_and_after_partial_removal(fake: FakeIptables):
    m = manager(fake, families=(4,))
    m.sync(PORTALS[:1])
    fake.tables[4]["OUTPUT"].clear()  # someone removed one hook already
    assert len(m.cleanup().removed) == 3
    assert m.cleanup().removed == []
    assert fake.user_chains(4) == []


def test_cleanup_skips_families_without_tools(fake: FakeIptables):
    fake.missing = {"ip6tables"}
    manager(fake).sync(PORTALS[:1])
    result = manager(fake).cleanup()
    assert fake.user_chains(4) == []
    assert result.skipped == ["IPv6 VIPs need ip6tables, which was not found (install iptables)"]


def test_main_cleanup_prints_what_it_removed(
    fake: FakeIptables, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    manager(fake).sync(PORTALS)
    monkeypatch.setattr(portals, "SubprocessRunner", lambda: fake)
    assert portals.main_cleanup() == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"IPv4: removed rule {HOOK4}"
    assert len(out) == 8
    assert portals.main_cleanup() == 0
    assert capsys.readouterr().out == "nothing to remove\n"
    fake.stderr_for["iptables"] = (4, "iptables: Permission denied (you must be root).")
    assert portals.main_cleanup() == 1
    err = capsys.readouterr().err
    assert err.startswith("l4lb cleanup: IPv4 VIPs need root (CAP_NET_ADMIN): iptables --wait=5")


# --------------------------------------------------------------------------- check_available


def test_check_available_passes_and_changes_nothing(fake: FakeIptables):
    manager(fake).check_available()
    assert fake.tables == FakeIptables().tables
    restores = [a for a in fake.argvs() if a[0].endswith("-restore")]
    assert restores == [
        ("iptables-restore", "--wait=5", "--noflush", "--test"),
        ("ip6tables-restore", "--wait=5", "--noflush", "--test"),
    ]


@pytest.mark.parametrize(
    ("tool", "rc", "stderr", "error", "message"),
    [
        ("iptables", None, "", PortalUnavailable, "IPv4 VIPs need iptables, which was not found"),
        ("ip6tables-restore", None, "", PortalUnavailable, "need ip6tables-restore, which was"),
        (
            "iptables",
            4,
            "iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: "
            "Permission denied (you must be root)",
            PortalError,
            "IPv4 VIPs need root",
        ),
        (
            "ip6tables",
            3,
            "ip6tables v1.8.9 (legacy): can't initialize ip6tables table `nat': "
            "Table does not exist (do you need to insmod?)",
            PortalUnavailable,
            "IPv6 VIPs need the nat table, unavailable",
        ),
    ],
)
def test_check_available_explains_what_is_missing(
    fake: FakeIptables,
    tool: str,
    rc: int | None,
    stderr: str,
    error: type[PortalError],
    message: str,
):
    if rc is None:
        fake.missing = {tool}
    else:
        fake.stderr_for[tool] = (rc, stderr)
    with pytest.raises(error, match=message) as info:
        manager(fake).check_available()
    assert stderr in str(info.value)
    manager(fake).check_available([4] if tool.startswith("ip6") else [6])


def test_manager_validates_arguments():
    with pytest.raises(ValueError, match="families"):
        PortalManager(families=(4, 5))
    with pytest.raises(ValueError, match="wait"):
        PortalManager(wait=20, timeout=10)


# --------------------------------------------------------------------------- runner, node_address


def test_subprocess_runner_runs_commands_with_a_prefix():
    run = SubprocessRunner()
    assert run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10) == CommandResult(
        3, "out\n", "err\n"
    )
    assert run(["cat"], stdin="in\n", timeout=10).stdout == "in\n"
    assert SubprocessRunner(prefix=("env", "X=1"))(["sh", "-c", "echo $X"], timeout=10).stdout == (
        "1\n"
    )
    with pytest.raises(FileNotFoundError):
        run(["l4lb-no-such-program"], timeout=10)
    with pytest.raises(subprocess.TimeoutExpired):
        run(["sleep", "30"], timeout=0.2)


def _ip_json(links: list[dict[str, object]]) -> FakeIptables:
    class IpRunner(FakeIptables):
        def __call__(
            self, argv: Sequence[str], *, stdin: str | None, timeout: float
        ) -> CommandResult:
            self.calls.append((tuple(argv), stdin))
            return CommandResult(0, json.dumps(links), "")

    return IpRunner()


def test_node_address_picks_the_first_usable_global_address():
    links: list[dict[str, object]] = [
        {"ifname": "lo", "addr_info": [{"family": "inet", "local": "10.9.9.9", "scope": "global"}]},
        {
            "ifname": "eth0",
            "addr_info": [
                {"family": "inet6", "local": "2001:db8::1", "scope": "global", "tentative": True},
                {"family": "inet6", "local": "fe80::1", "scope": "link"},
                {
                    "family": "inet6",
                    "local": "2001:db8::1:2",
                    "scope": "global",
                    "deprecated": True,
                },
                {"family": "inet6", "local": "2001:db8:0::3", "scope": "global"},
                {"family": "inet", "local": "192.0.2.7", "scope": "global"},
            ],
        },
    ]
    run = _ip_json(links)
    assert node_address(6, runner=run) == "2001:db8::3"
    assert node_address(4, runner=run) == "192.0.2.7"
    assert run.argvs()[0] == ("ip", "-j", "-6", "addr", "show", "scope", "global", "up")
    assert node_address(4, runner=_ip_json([])) is None
