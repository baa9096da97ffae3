"""``l4lb status``: show services and backends from a running instance's admin API.

A one-shot command, so it uses blocking urllib rather than an event loop.
"""

from __future__ import annotations

import http.client
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

__all__ = ["StatusError", "fetch_services", "main", "render_table"]

_SERVICES_PATH = "/api/v1/services"


class StatusError(Exception):
    """The admin API could not be reached or gave an unusable answer."""


def fetch_services(admin: str, *, timeout: float = 5.0) -> dict[str, Any]:
    """Return the ``{"services": [...]}`` document from the admin API at ``admin``.

    ``admin`` is ``host:port`` or ``[v6]:port``. Raises :class:`StatusError` when the
    address is malformed, the API is unreachable, or the reply is not the expected JSON.
    """
    url = f"http://{_check_address(admin)}{_SERVICES_PATH}"
    # An empty ProxyHandler: an http_proxy setting must not divert a local admin request.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as reply:
            body = reply.read()
    except urllib.error.HTTPError as exc:
        raise StatusError(
            f"admin API at {admin} answered {exc.code} {exc.reason}{_error_detail(exc)}"
        ) from None
    except urllib.error.URLError as exc:
        raise StatusError(f"cannot reach admin API at {admin}: {_reason(exc.reason)}") from None
    except TimeoutError:
        raise StatusError(f"admin API at {admin} did not answer within {timeout:g}s") from None
    except http.client.HTTPException as exc:
        raise StatusError(f"bad HTTP reply from {admin}: {type(exc).__name__}") from None
    except OSError as exc:
        raise StatusError(f"cannot reach admin API at {admin}: {_reason(exc)}") from None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise StatusError(f"admin API at {admin} did not answer with JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("services"), list):
        raise StatusError(f"admin API at {admin} answered without a 'services' list")
    return doc


def _check_address(admin: str) -> str:
    try:
        parts = urllib.parse.urlsplit(f"//{admin}")
        # netloc == admin rules out paths, queries and fragments; "@" rules out credentials.
        valid = parts.port is not None and bool(parts.hostname) and parts.netloc == admin
    except ValueError:  # bad port number or unbalanced brackets
        valid = False
    if not valid or "@" in admin:
        raise StatusError(f"invalid admin address {admin!r}: expected host:port or [v6]:port")
    return admin


def _reason(reason: object) -> str:
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason)


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """Return ``": message"`` from a JSON error body, or nothing."""
    try:
        doc = orjson.loads(exc.read())
    except (orjson.JSONDecodeError, OSError, http.client.HTTPException):
        return ""
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return f": {doc['error']}"
    return ""


# Backend columns as in ``ipvsadm -Ln --stats``: (header, backend key), numbers right-aligned.
_COLUMNS = (("Weight", "weight"), ("ActiveConn", "active"), ("InActConn", "inactive"))
_STATS_COLUMNS = (("Conns", "total"), ("InBytes", "bytes_in"), ("OutBytes", "bytes_out"))


def render_table(doc: Mapping[str, Any], *, stats: bool = True) -> str:
    """Render a services document as a plain-text table in the style of ``ipvsadm -Ln``.

    One line per service (protocol, listen address, scheduler, persistence; for an
    offloaded service one per VIP with the kernel's totals), then one line per backend
    in the order given, with ``DRAIN``/``DOWN`` after the columns.
    ``stats`` adds connection and byte totals. When any backend is health checked, a
    ``LastCheck`` column shows what its last check found ("-" before the first one or
    for an unchecked backend). The result ends with a newline.
    """
    columns = _COLUMNS + _STATS_COLUMNS if stats else _COLUMNS
    checked = any(b.get("health") for s in doc["services"] for b in s["backends"])
    header = ["  -> RemoteAddress:Port", *(title for title, _ in columns)]
    # Service lines stay free text; backend rows share one set of column widths.
    entries: list[str | tuple[list[str], str, str]] = []
    for service in doc["services"]:
        entries.extend(_service_lines(service))
        for backend in service["backends"]:
            cells = [f"  -> {backend['address']}", *(str(backend[key]) for _, key in columns)]
            entries.append((cells, _last_check(backend), _markers(backend)))
    rows = [header, *(entry[0] for entry in entries if not isinstance(entry, str))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    checks = [entry[1] for entry in entries if not isinstance(entry, str)]
    check_width = max(map(len, ["LastCheck", *checks])) if checked else 0

    head = _format_row(header, widths, "", "LastCheck" if checked else "", check_width)
    lines = ["Prot LocalAddress:Port Scheduler Flags", head]
    for entry in entries:
        if isinstance(entry, str):
            lines.append(entry)
        else:
            cells, check, markers = entry
            lines.append(_format_row(cells, widths, markers, check if checked else "", check_width))
    return "\n".join(lines) + "\n"


def _markers(backend: Mapping[str, Any]) -> str:
    markers = []
    if backend["drain"]:
        markers.append("DRAIN")
    if not backend["up"]:
        markers.append("DOWN")
    return " ".join(markers)


def _last_check(backend: Mapping[str, Any]) -> str:
    health = backend.get("health")
    last = health.get("last_check") if health else None
    return str(last["detail"]) if last else "-"


def _service_lines(service: Mapping[str, Any]) -> list[str]:
    """One line per virtual service: an offloaded service has one per VIP, each marked
    ``offload`` and followed by the kernel's totals for that VIP."""
    offload = service.get("mode") == "offload"
    vips = list(service.get("vips") or []) if offload else []
    lines = []
    for where in vips or [service["listen"]]:
        line = f"{str(service['protocol']).upper()}  {where} {service['scheduler']}"
        timeout = float(service["affinity_timeout"])
        if timeout > 0:
            shown = str(int(timeout)) if timeout.is_integer() else str(timeout)
            line += f" persistent {shown}"
        if offload:
            line += " offload"
            totals = (service.get("kernel_vips") or {}).get(where)
            if totals:
                line += (
                    f"  Conns {totals['total']} InBytes {totals['bytes_in']}"
                    f" OutBytes {totals['bytes_out']}"
                )
        lines.append(line)
    return lines


def _format_row(
    cells: Sequence[str], widths: Sequence[int], markers: str, check: str = "", check_width: int = 0
) -> str:
    first = cells[0].ljust(widths[0])
    rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
    parts = [first, *rest]
    if check_width:
        parts.append(check.ljust(check_width))
    return " ".join([*parts, markers]).rstrip()


def main(admin: str, *, as_json: bool = False) -> int:
    """Print the services at ``admin`` as a table (or JSON) and return the exit code."""
    try:
        out = _report(admin, as_json=as_json)
    except StatusError as exc:
        print(f"l4lb status: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(out)
    return 0


def _report(admin: str, *, as_json: bool) -> str:
    doc = fetch_services(admin)
    if as_json:
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n"
    try:
        return render_table(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StatusError(f"admin API at {admin} sent an unexpected document: {exc!r}") from None
