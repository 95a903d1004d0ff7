"""Tests of the test infrastructure itself: the RabbitMQ fixture and ``require``.

This module proves that the ``rabbitmq`` fixture serves real STOMP (with a
raw socket, independent of trio_stomp) and that ``require`` skips locally but
fails under CI. It must never import trio_stomp: a bug there must not make the
infrastructure look broken.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest
from _rabbitmq import RabbitMQ
from _requirements import in_ci, require, require_module

TIMEOUT = 10.0


class _RawStomp:
    """Just enough STOMP 1.2 over a blocking socket for a smoke test."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buffer = b""

    def send(self, command: str, headers: dict[str, str], body: bytes = b"") -> None:
        head = "".join(f"{key}:{value}\n" for key, value in headers.items())
        self.sock.sendall(f"{command}\n{head}\n".encode() + body + b"\0")

    def receive(self) -> tuple[str, dict[str, str], bytes]:
        # Bodies in this test never contain NUL, so NUL ends every frame.
        while b"\0" not in self.buffer:
            chunk = self.sock.recv(4096)
            assert chunk, f"broker closed the connection; buffered {self.buffer!r}"
            self.buffer += chunk
        raw, _, self.buffer = self.buffer.partition(b"\0")
        head, _, body = raw.lstrip(b"\r\n").partition(b"\n\n")
        command, *lines = head.decode().split("\n")
        headers: dict[str, str] = {}
        for line in lines:
            key, _, value = line.partition(":")
            headers.setdefault(key, value)
        return command, headers, body

    def close(self) -> None:
        self.sock.close()


@pytest.mark.rabbitmq
def test_rabbitmq_fixture_serves_stomp_round_trip(rabbitmq: RabbitMQ) -> None:
    destination = f"/queue/infra-{uuid.uuid4().hex}"
    client = _RawStomp(rabbitmq.stomp_port)
    try:
        client.send(
            "CONNECT",
            {
                "accept-version": "1.2",
                "host": "/",
                "login": rabbitmq.login,
                "passcode": rabbitmq.passcode,
                "heart-beat": "0,0",
            },
        )
        command, headers, _ = client.receive()
        assert command == "CONNECTED", headers
        assert headers["version"] == "1.2"

        client.send("SUBSCRIBE", {"id": "sub-0", "destination": destination, "receipt": "r-sub"})
        assert client.receive()[:2] == ("RECEIPT", {"receipt-id": "r-sub"})

        client.send("SEND", {"destination": destination, "content-type": "text/plain"}, b"hi\n")
        command, headers, body = client.receive()
        assert command == "MESSAGE", (headers, body)
        assert headers["subscription"] == "sub-0"
        assert headers["destination"] == destination
        assert headers["message-id"]
        assert body == b"hi\n"

        client.send("DISCONNECT", {"receipt": "r-bye"})
        assert client.receive()[:2] == ("RECEIPT", {"receipt-id": "r-bye"})
    finally:
        client.close()


@pytest.mark.rabbitmq
def test_rabbitmq_fixture_serves_web_stomp_upgrade(rabbitmq: RabbitMQ) -> None:
    request = (
        "GET /ws HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{rabbitmq.web_stomp_port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: v12.stomp\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", rabbitmq.web_stomp_port), timeout=TIMEOUT) as sock:
        sock.sendall(request.encode())
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = sock.recv(4096)
            assert chunk, response
            response += chunk
    assert response.startswith(b"HTTP/1.1 101"), response
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in response  # RFC 6455's worked example


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("TRUE", True), ("1", True), ("false", False), ("", False), ("0", False)],
)
def test_in_ci_reads_ci_variable(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool
) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci() is expected


def test_in_ci_false_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    assert in_ci() is False


def test_require_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    require(True, "never shown")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="no peer"):
        require(False, "no peer")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no peer"):
        require(False, "no peer")


def test_require_module_imports_or_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require_module("os") is os
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="no_such_module_xyz"):
        require_module("no_such_module_xyz")
