"""10,000+ concurrent proxied connections: assertions on guest/case_concurrency.py.

Runs in the test VM because the machines that run the suite cap the open-file limit at
20,000, below what l4lb needs for 10,000 proxied connections (two sockets each).
"""

from __future__ import annotations

from typing import Any

import pytest

# The first test also waits for the one VM boot that the whole batch shares.
pytestmark = pytest.mark.timeout(3600)


@pytest.fixture(scope="module")
def obs(vm: Any) -> dict[str, Any]:
    data: dict[str, Any] = vm.case("case_concurrency")
    assert data.get("done"), data["steps"]
    return data


def test_l4lb_raised_its_open_file_limit(obs):
    assert obs["l4lb_fd_limit"] >= 2 * obs["attempted"]


def test_every_connection_was_open_at_the_same_time(obs):
    assert obs["attempted"] >= 10_000
    assert obs["failed_connect"] == 0
    assert obs["connected"] == obs["attempted"]
    assert obs["active_held"] >= obs["attempted"]
    # Two sockets per proxied connection, all held at once.
    assert obs["l4lb_fds_held"] >= 2 * obs["attempted"]


def test_every_exchange_came_back_byte_exact(obs):
    assert obs["corrupt"] == 0
    assert obs["unanswered"] == 0
    assert obs["verified"] == obs["attempted"]


def test_nothing_leaked_and_clean_exit(obs):
    # What is left is l4lb's own: listeners, epoll sets, pipes in the pools, the admin API.
    assert obs["l4lb_fds_after"] < 200
    assert obs["l4lb_exit"] == 0
