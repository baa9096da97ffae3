"""Start-up checks on the files l4lb trusts: the config file and the admin token file.

The rules follow sshd's ``StrictModes``: a file that others may change, or a secret that
others may read, is refused before anything starts, with a message naming the file and the
fix. The token itself never appears in a message.

- The config file must not be world-writable: whoever can change it chooses the backends.
- The token file must be a regular file owned by root or by the user l4lb runs as, with no
  permission bits for group or others (``chmod 600``), like an sshd host key. Its content
  is one token of RFC 6750 ``b64token`` characters, at least :data:`MIN_TOKEN_LENGTH` long;
  one trailing newline is ignored.
- An admin API listening beyond loopback must have a token file: anyone who can reach the
  port could otherwise change weights and drain backends.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat

from l4lb.config import AdminConfig, ConfigError

__all__ = [
    "MIN_TOKEN_LENGTH",
    "admin_token",
    "check_config_file",
    "is_loopback",
    "read_token_file",
]

MIN_TOKEN_LENGTH = 16
#: The largest token file read; a token is a line, not a document.
MAX_TOKEN_FILE = 4096
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def check_config_file(path: str) -> None:
    """Raise ConfigError if the config file at ``path`` is world-writable.

    A file that cannot be examined is left to the loader, which reports why it cannot read it.
    """
    try:
        st = os.stat(path)
    except OSError:
        return
    if st.st_mode & stat.S_IWOTH:
        raise ConfigError(
            f"{path}: refusing a world-writable config file (mode {_mode(st)}): "
            f"run chmod o-w {path}"
        )


def read_token_file(path: str) -> str:
    """Return the bearer token stored in ``path``; raise ConfigError naming what is wrong."""
    where = f"admin.token_file {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise ConfigError(f"{where}: cannot open: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{where}: not a regular file")
        if st.st_uid not in (0, os.geteuid()):
            raise ConfigError(
                f"{where}: owned by uid {st.st_uid}; it must belong to root or to uid "
                f"{os.geteuid()}, which l4lb runs as"
            )
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{where}: group or others have access (mode {_mode(st)}): run chmod 600 {path}"
            )
        raw = os.read(fd, MAX_TOKEN_FILE + 1)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_TOKEN_FILE:
        raise ConfigError(f"{where}: larger than {MAX_TOKEN_FILE} bytes; it must hold one token")
    text = raw.removesuffix(b"\n").removesuffix(b"\r")
    # The message says what is wrong with the content and never repeats any of it.
    try:
        token = text.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: the token must be ASCII") from None
    if not token:
        raise ConfigError(f"{where}: the file is empty; it must hold the token")
    if not _B64TOKEN.fullmatch(token):
        raise ConfigError(
            f"{where}: the token must be one line of letters, digits and -._~+/ "
            "(optionally ending in =), with no spaces"
        )
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"{where}: the token is shorter than {MIN_TOKEN_LENGTH} characters; "
            "generate one with: openssl rand -hex 32"
        )
    return token


def is_loopback(host: str) -> bool:
    """True when ``host`` (an admin listen host) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_token(admin: AdminConfig) -> str | None:
    """The token the admin API must require, or None; raise ConfigError if one is missing."""
    if admin.token_file is not None:
        return read_token_file(admin.token_file)
    if not is_loopback(admin.listen.host):
        raise ConfigError(
            f"admin.listen = {admin.listen} is not a loopback address: set admin.token_file "
            "to a file holding the bearer token that state-changing requests must carry"
        )
    return None


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"
