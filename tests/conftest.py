"""Shared pytest fixtures for the whole test suite.

This module owns only fixtures that several test modules need and that are
expensive to build: today, one private RabbitMQ node per test session. It must
never define autouse fixtures, hooks, or anything else that changes tests
which do not ask for it by name.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from _rabbitmq import RabbitMQ, find_rabbitmq_server, run_rabbitmq
from _requirements import require


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQ]:
    """A private RabbitMQ node with STOMP and Web-STOMP on loopback ports.

    Started on first use (about 10 s) and shared by every test of the session;
    tests must use their own destination names and leave nothing connected.
    Skips the test when RabbitMQ is not installed, fails it under ``CI=true``.
    """
    require(
        find_rabbitmq_server() is not None,
        "RabbitMQ is not installed: apt-get install rabbitmq-server "
        "(or run .ci/install-system-deps.sh as root)",
    )
    started = time.monotonic()
    with run_rabbitmq(tmp_path_factory.mktemp("rabbitmq")) as node:
        print(f"\n[rabbitmq fixture] {node.node_name} up in {time.monotonic() - started:.1f} s")
        yield node
