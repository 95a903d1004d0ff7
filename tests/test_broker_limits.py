"""Broker limits over the wire: each limit gives the client an ERROR naming it, closes only
that connection, and is counted in ``statistics().limits_hit`` and logged."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from test_broker import RawClient

from trio_stomp.broker import Broker, open_broker

_open: list[RawClient] = []


async def close_clients() -> None:
    # Called explicitly: pytest-trio 0.8 under pytest 9 never runs autouse async fixtures.
    while _open:
        await trio.aclose_forcefully(_open.pop().stream)


@pytest.fixture
async def limited() -> AsyncIterator[Broker]:
    async with open_broker(
        listen=[],
        shutdown_grace=0.5,
        max_subscriptions=2,
        max_transactions=1,
        max_transaction_frames=2,
        max_queue_depth=3,
        max_destinations=10,
        max_body_size=1024,
        max_frame_size=4096,
        max_headers=8,
        max_line_length=256,
        max_prefetch=10,
        prefetch=5,
    ) as broker:
        yield broker


async def connected(broker: Broker, version: str = "1.2") -> RawClient:
    raw = RawClient(broker.connect_in_memory(), version)
    await raw.connect()
    return raw


async def still_serves(broker: Broker) -> None:
    """Another client is unaffected by whatever happened."""
    raw = await connected(broker)
    await raw.send("SUBSCRIBE", {"destination": "/topic/ok", "id": "x", "receipt": "ok"})
    await raw.expect("RECEIPT")
    await raw.send("DISCONNECT", {"receipt": "bye"})
    await raw.expect("RECEIPT")


async def expect_limit(raw: RawClient, name: str, receipt: str | None = None) -> None:
    error = await raw.expect_error_and_close()
    assert name in error.headers["message"], error
    if receipt is not None:
        assert error.headers["receipt-id"] == receipt


async def test_max_subscriptions(limited: Broker, caplog: pytest.LogCaptureFixture) -> None:
    raw = await connected(limited)
    for n in range(2):
        await raw.send("SUBSCRIBE", {"destination": f"/queue/s{n}", "id": str(n)})
    await raw.send("SUBSCRIBE", {"destination": "/queue/s9", "id": "9", "receipt": "r"})
    await expect_limit(raw, "limit exceeded: max_subscriptions", "r")
    stats = limited.statistics()
    assert stats.limits_hit == {"max_subscriptions": 1}
    assert stats.subscriptions == 0  # the closed connection's subscriptions are gone
    assert "max_subscriptions" in caplog.text
    await still_serves(limited)


async def test_max_transactions_and_frames_per_transaction(limited: Broker) -> None:
    raw = await connected(limited)
    await raw.send("BEGIN", {"transaction": "a"})
    await raw.send("BEGIN", {"transaction": "b", "receipt": "r"})
    await expect_limit(raw, "max_transactions", "r")
    raw = await connected(limited)
    await raw.send("BEGIN", {"transaction": "a"})
    for _ in range(2):
        await raw.send("SEND", {"destination": "/queue/t", "transaction": "a"}, b"x")
    await raw.send("SEND", {"destination": "/queue/t", "transaction": "a", "receipt": "s"}, b"x")
    await expect_limit(raw, "max_transaction_frames", "s")
    stats = limited.statistics()
    assert stats.limits_hit == {"max_transactions": 1, "max_transaction_frames": 1}
    assert stats.messages_enqueued == 0  # the open transaction was aborted
    await still_serves(limited)


async def test_max_queue_depth_error(limited: Broker) -> None:
    raw = await connected(limited)
    for n in range(3):
        await raw.send("SEND", {"destination": "/queue/deep"}, str(n).encode())
    await raw.send("SEND", {"destination": "/queue/deep", "receipt": "r"}, b"3")
    await expect_limit(raw, "max_queue_depth", "r")
    consumer = await connected(limited)
    await consumer.send("SUBSCRIBE", {"destination": "/queue/deep", "id": "1"})
    bodies = [(await consumer.expect("MESSAGE")).body for _ in range(3)]
    assert bodies == [b"0", b"1", b"2"]
    assert limited.statistics().limits_hit == {"max_queue_depth": 1}


async def test_max_queue_depth_drop_oldest() -> None:
    async with open_broker(
        listen=[], max_queue_depth=2, queue_full_policy="drop-oldest", shutdown_grace=0.2
    ) as broker:
        raw = await connected(broker)
        for n in range(5):
            await raw.send("SEND", {"destination": "/queue/d"}, str(n).encode())
        await raw.send("SUBSCRIBE", {"destination": "/queue/d", "id": "1"})
        assert [(await raw.expect("MESSAGE")).body for _ in range(2)] == [b"3", b"4"]
        stats = broker.statistics()
        assert stats.messages_dropped == 3
        assert stats.limits_hit == {"max_queue_depth": 3}


async def test_max_destinations(limited: Broker) -> None:
    raw = await connected(limited)
    for n in range(10):
        await raw.send("SEND", {"destination": f"/queue/many{n}"}, b"x")
    await raw.send("SEND", {"destination": "/queue/one-too-many", "receipt": "r"}, b"x")
    await expect_limit(raw, "max_destinations", "r")
    # Existing destinations stay usable.
    raw = await connected(limited)
    await raw.send("SEND", {"destination": "/queue/many0", "receipt": "ok"}, b"x")
    await raw.expect("RECEIPT")


async def test_max_unacked_per_subscription(limited: Broker) -> None:
    raw = await connected(limited)
    await raw.send(
        "SUBSCRIBE",
        {"destination": "/queue/p", "id": "1", "ack": "client", "prefetch": "11", "receipt": "r"},
    )
    error = await raw.expect_error_and_close()
    assert "prefetch" in error.headers["message"] and "10" in error.headers["message"]
    # Within the limit, at most `prefetch` messages are out unacknowledged.
    producer = await connected(limited)
    consumer = await connected(limited)
    await consumer.send(
        "SUBSCRIBE",
        {"destination": "/queue/p", "id": "1", "ack": "client-individual", "prefetch": "2"},
    )
    for n in range(3):
        await producer.send("SEND", {"destination": "/queue/p"}, str(n).encode())
    await producer.send("DISCONNECT", {"receipt": "d"})
    await producer.expect("RECEIPT")
    first = await consumer.expect("MESSAGE")
    await consumer.expect("MESSAGE")
    with trio.move_on_after(0.2):
        await consumer.receive()
        raise AssertionError("a third message arrived beyond the prefetch")
    await consumer.send("ACK", {"id": first.headers["ack"]})
    assert (await consumer.expect("MESSAGE")).body == b"2"


@pytest.mark.parametrize(
    ("data", "limit"),
    [
        (b"SEND\ndestination:/queue/b\ncontent-length:2000\n\n" + b"x" * 2000 + b"\x00", "body"),
        (b"SEND\ndestination:/queue/b\n\n" + b"x" * 5000 + b"\x00", "body"),
        (b"SEND\n" + b"".join(b"h%d:v\n" % n for n in range(20)) + b"\n\x00", "headers"),
        (b"SEND\nh:" + b"v" * 1000 + b"\n\n\x00", "length"),
    ],
)
async def test_parser_limits(limited: Broker, data: bytes, limit: str) -> None:
    raw = await connected(limited)
    await raw.send_raw(data)
    error = await raw.expect_error_and_close()
    assert "maximum" in error.headers["message"] and limit in error.headers["message"]
    (name,) = limited.statistics().limits_hit
    assert name in ("max_body_size", "max_headers", "max_line_length", "max_frame_size")
    assert limited.statistics().messages_enqueued == 0
    await still_serves(limited)


async def test_connect_timeout_is_counted(autojump_clock: trio.testing.MockClock) -> None:
    async with open_broker(listen=[], connect_timeout=3, shutdown_grace=0.2) as broker:
        raw = RawClient(broker.connect_in_memory())
        error = await raw.expect_error_and_close()
        assert "no CONNECT frame within 3 s" in error.headers["message"]
        assert broker.statistics().limits_hit == {"connect_timeout": 1}


# -- over TCP ------------------------------------------------------------------------------


async def tcp(broker: Broker) -> RawClient:
    host, _, port = broker.addresses[0].removeprefix("tcp://").rpartition(":")
    raw = RawClient(await trio.open_tcp_stream(host, int(port)))
    _open.append(raw)
    return raw


async def test_max_connections_total_and_per_address(caplog: pytest.LogCaptureFixture) -> None:
    async with open_broker(
        listen=["tcp://127.0.0.1:0"],
        max_connections=3,
        max_connections_per_address=2,
        shutdown_grace=0.2,
    ) as broker:
        try:
            first, second = await tcp(broker), await tcp(broker)
            for raw in (first, second):
                await raw.connect()
            third = await tcp(broker)
            await expect_limit(third, "limit exceeded: max_connections_per_address")
            # In-memory connections count towards the total only.
            await connected(broker)
            fourth = RawClient(broker.connect_in_memory())
            await expect_limit(fourth, "limit exceeded: max_connections (")
            assert broker.statistics().limits_hit == {
                "max_connections_per_address": 1,
                "max_connections": 1,
            }
            assert "refused: max_connections_per_address" in caplog.text
            # A closed connection frees its place.
            await first.send("DISCONNECT", {"receipt": "bye"})
            await first.expect("RECEIPT")
            with trio.fail_after(5):
                # The broker offers no event for "a connection closed": poll its counter.
                while broker.statistics().connections > 2:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            again = await tcp(broker)
            await again.connect()
        finally:
            await close_clients()


async def test_send_buffer_limit_counts_slow_consumers() -> None:
    async with open_broker(
        listen=["tcp://127.0.0.1:0"], max_send_buffer=16 * 1024, shutdown_grace=0.2
    ) as broker:
        try:
            slow, producer = await tcp(broker), await tcp(broker)
            for raw in (slow, producer):
                await raw.connect()
            await slow.send("SUBSCRIBE", {"destination": "/topic/f", "id": "1", "receipt": "r"})
            await slow.expect("RECEIPT")
            with trio.fail_after(20):
                n = 0
                while broker.statistics().slow_consumers == 0:
                    await producer.send("SEND", {"destination": "/topic/f"}, b"y" * 8192)
                    n += 1
                    if n % 50 == 0:
                        await trio.sleep(0.01)
            assert broker.statistics().limits_hit.get("max_send_buffer") == 1
        finally:
            await close_clients()
