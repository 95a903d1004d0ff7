"""Interop: the independent stomp.py client against our broker, over real TCP.

stomp.py (``pip install stomp-py``) is a threaded client written by other people; it is
never mocked here. For each protocol version (1.0, 1.1, 1.2) one scenario runs in a worker
thread while the broker runs in the Trio loop: CONNECT, SUBSCRIBE with a receipt, SEND
with custom headers, ACK, NACK (1.1+) and redelivery, a committed and an aborted
transaction, heart-beats both ways (1.1+), and DISCONNECT with a receipt.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import pytest
import trio
from _requirements import require_module

from trio_stomp.broker import open_broker

pytestmark = pytest.mark.stomppy

TIMEOUT = 10.0


class Collector:
    """A stomp.py listener that hands every frame to the test thread through a queue."""

    def __init__(self) -> None:
        self.frames: queue.Queue[tuple[str, dict[str, str], Any]] = queue.Queue()
        self.heart_beats = 0
        self.enough_heart_beats = threading.Event()
        self.disconnected = threading.Event()

    def on_connected(self, frame: Any) -> None:
        self.frames.put(("CONNECTED", dict(frame.headers), frame.body))

    def on_message(self, frame: Any) -> None:
        self.frames.put(("MESSAGE", dict(frame.headers), frame.body))

    def on_receipt(self, frame: Any) -> None:
        self.frames.put(("RECEIPT", dict(frame.headers), frame.body))

    def on_error(self, frame: Any) -> None:
        self.frames.put(("ERROR", dict(frame.headers), frame.body))

    def on_heartbeat(self) -> None:
        self.heart_beats += 1
        if self.heart_beats >= 4:
            self.enough_heart_beats.set()

    def on_disconnected(self) -> None:
        self.disconnected.set()

    def expect(self, command: str) -> tuple[dict[str, str], Any]:
        got, headers, body = self.frames.get(timeout=TIMEOUT)
        assert got == command, (got, headers, body)
        return headers, body

    def expect_nothing(self, seconds: float) -> None:
        with pytest.raises(queue.Empty):
            item = self.frames.get(timeout=seconds)
            raise AssertionError(f"unexpected frame {item}")


def scenario(stomp: Any, port: int, version: str) -> None:
    """Everything one stomp.py connection does. Runs in a worker thread."""
    classes = {"1.0": stomp.Connection10, "1.1": stomp.Connection11, "1.2": stomp.Connection12}
    options: dict[str, Any] = {"reconnect_attempts_max": 1}
    if version != "1.0":
        options["heartbeats"] = (200, 200)
    conn = classes[version]([("127.0.0.1", port)], **options)
    listener = Collector()
    conn.set_listener("collector", listener)
    conn.connect(wait=True)
    connected, _ = listener.expect("CONNECTED")
    assert connected.get("version", "1.0") == version
    queue_name = f"/queue/interop-{version}"
    ack_mode = "client" if version == "1.0" else "client-individual"

    def ack(headers: dict[str, str], *, nack: bool = False, **extra: Any) -> None:
        method = conn.nack if nack else conn.ack
        if version == "1.2":
            method(headers["ack"], **extra)
        elif version == "1.1":
            method(headers["message-id"], headers["subscription"], **extra)
        else:
            method(headers["message-id"], **extra)

    conn.subscribe(queue_name, id="s1", ack=ack_mode, headers={"receipt": "subscribed"})
    assert listener.expect("RECEIPT")[0]["receipt-id"] == "subscribed"

    # SEND with custom headers, then ACK.
    conn.send(queue_name, "one", content_type="text/plain", headers={"x-trace": "abc:1"})
    headers, body = listener.expect("MESSAGE")
    assert body == "one"
    assert headers["x-trace"] == "abc:1" and headers["content-type"] == "text/plain"
    assert headers["destination"] == queue_name and headers["subscription"] == "s1"
    ack(headers, receipt="acked")
    assert listener.expect("RECEIPT")[0]["receipt-id"] == "acked"

    # NACK: redelivered, marked, then ACKed (NACK is 1.1+).
    if version != "1.0":
        conn.send(queue_name, "two")
        headers, body = listener.expect("MESSAGE")
        assert body == "two"
        ack(headers, nack=True)
        again, body = listener.expect("MESSAGE")
        assert body == "two" and again["redelivered"] == "true"
        ack(again)

    # Transactions: nothing is delivered before COMMIT; an ABORTed SEND never is.
    tx = conn.begin()
    conn.send(queue_name, "in-tx", transaction=tx)
    listener.expect_nothing(0.2)
    conn.commit(tx)
    headers, body = listener.expect("MESSAGE")
    assert body == "in-tx"
    ack(headers)
    tx = conn.begin()
    conn.send(queue_name, "aborted", transaction=tx)
    conn.abort(tx)
    conn.send(queue_name, "after-abort")
    headers, body = listener.expect("MESSAGE")
    assert body == "after-abort"
    ack(headers)

    # Heart-beats both ways: the broker beats every 200 ms, and keeps us connected for
    # longer than its 400 ms watchdog window because stomp.py beats too.
    if version != "1.0":
        assert listener.enough_heart_beats.wait(TIMEOUT), listener.heart_beats
        conn.send(queue_name, "still-alive", headers={"receipt": "alive"})
        headers, body = listener.expect("MESSAGE")
        assert body == "still-alive"
        assert listener.expect("RECEIPT")[0]["receipt-id"] == "alive"
        ack(headers)

    conn.disconnect(receipt="bye")
    assert listener.disconnected.wait(TIMEOUT)


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
async def test_stomppy_against_our_broker(version: str) -> None:
    stomp = require_module("stomp")
    async with open_broker(listen=["tcp://127.0.0.1:0"], heart_beat=(100, 100)) as broker:
        port = int(broker.addresses[0].rpartition(":")[2])
        with trio.fail_after(3 * TIMEOUT):
            await trio.to_thread.run_sync(scenario, stomp, port, version)
        stats = broker.statistics()
        assert stats.errors_sent == 0
        assert stats.messages_unacked == 0 and stats.messages_queued == 0
        assert stats.connections_total == 1
