"""Tests for l4lb.permissions: the sshd-like checks on the config and token files."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from l4lb.config import Address, AdminConfig, ConfigError
from l4lb.permissions import (
    MAX_TOKEN_FILE,
    admin_token,
    check_config_file,
    is_loopback,
    read_token_file,
)

TOKEN = "0123456789abcdef-token"


def _token_file(tmp_path: Path, content: bytes = TOKEN.encode(), mode: int = 0o600) -> Path:
    path = tmp_path / "token"
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_config_file_world_writable_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l4lb.toml"
    path.write_text("")
    path.chmod(0o666)
    with pytest.raises(ConfigError, match=r"l4lb.toml: refusing a world-writable .*mode 0666"):
        check_config_file(str(path))


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644, 0o664])
def test_config_file_not_world_writable_is_accepted(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "l4lb.toml"
    path.write_text("")
    path.chmod(mode)
    check_config_file(str(path))


def test_config_file_missing_is_left_to_the_loader(tmp_path: Path) -> None:
    check_config_file(str(tmp_path / "absent.toml"))


def test_token_is_read_without_its_newline(tmp_path: Path) -> None:
    assert read_token_file(str(_token_file(tmp_path, TOKEN.encode() + b"\n"))) == TOKEN
    assert read_token_file(str(_token_file(tmp_path, TOKEN.encode() + b"\r\n"))) == TOKEN


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o602, 0o610])
def test_token_file_open_to_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = _token_file(tmp_path, mode=mode)
    with pytest.raises(ConfigError, match=rf"mode {mode:04o}\): run chmod 600 ") as exc:
        read_token_file(str(path))
    assert TOKEN not in str(exc.value)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "the file is empty"),
        (b"QX7short", "shorter than 16"),
        (b"QX7 two words in a token file", "no spaces"),
        (b"QX7-line-one-is-long-enough\nline-two", "one line"),
        ("QX7-t\u00f6ken-with-umlaut".encode(), "must be ASCII"),
        (b"QX7" + b"\xff\xfe" * 10, "must be ASCII"),
        (b"QX7" * MAX_TOKEN_FILE, "larger than"),
    ],
)
def test_bad_token_content_is_refused_without_echo(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = _token_file(tmp_path, content)
    with pytest.raises(ConfigError, match=reason) as exc:
        read_token_file(str(path))
    assert str(exc.value).startswith(f"admin.token_file {path}: ")
    assert "QX7" not in str(exc.value)


def test_token_file_missing_directory_and_symlink(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open: No such file"):
        read_token_file(str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="not a regular file"):
        read_token_file(str(tmp_path))
    link = tmp_path / "link"
    link.symlink_to(_token_file(tmp_path))
    with pytest.raises(ConfigError, match="cannot open"):
        read_token_file(str(link))


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_token_file_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    path = _token_file(tmp_path)
    os.chown(path, 65534, 65534)
    # Root reads any file; the check is about who else can rewrite it.
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        read_token_file(str(path))


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.4.5", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_admin_beyond_loopback_needs_a_token_file(tmp_path: Path) -> None:
    open_admin = AdminConfig(listen=Address("0.0.0.0", 9901, socket.AF_INET))
    with pytest.raises(ConfigError, match=r"admin.listen = 0.0.0.0:9901 is not a loopback"):
        admin_token(open_admin)
    path = _token_file(tmp_path)
    with_token = AdminConfig(listen=open_admin.listen, token_file=str(path))
    assert admin_token(with_token) == TOKEN
    assert admin_token(AdminConfig()) is None
    assert admin_token(AdminConfig(token_file=str(path))) == TOKEN
