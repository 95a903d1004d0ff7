"""The broker on SQLite is killed with SIGKILL and restarted on the same file: every
persistent message whose RECEIPT was sent and that was not acknowledged is delivered
again, in queue order, marked redelivered; nothing acknowledged with a receipt comes back.

The broker runs as a real subprocess (``python -m trio_stomp.broker``), the clients are
raw STOMP over loopback TCP. Set ``KILL9_RUNS=20`` to repeat each scenario."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from test_broker import RawClient

RUNS = int(os.environ.get("KILL9_RUNS", "1"))
N = 2000
BODY = b"m" * 94  # 100-byte bodies with the 6-digit index


@asynccontextmanager
async def broker_process(db: Path) -> AsyncIterator[tuple[trio.Process, str]]:
    """A broker subprocess on ``db``; yields (process, host:port). Killed on exit."""
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "trio_stomp.broker",
            "--listen",
            "tcp://127.0.0.1:0",
            "--store",
            f"sqlite:{db}",
            "--store-sync",
            "normal",
            "--log-level",
            "WARNING",
            "--heart-beat",
            "0,0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = b""
        with trio.fail_after(20):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(1)
                assert chunk, "the broker exited before listening"
                line += chunk
        text = line.decode().strip()
        assert text.startswith("listening on tcp://"), text
        yield process, text.removeprefix("listening on tcp://")
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(10):
            await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


async def connect(address: str) -> RawClient:
    host, _, port = address.rpartition(":")
    raw = RawClient(await trio.open_tcp_stream(host, int(port)))
    await raw.connect()
    return raw


async def produce(raw: RawClient, count: int, confirmed: list[int], stop_after: int) -> None:
    """Send ``count`` persistent messages, a receipt on each (pipelined); record the
    receipted indexes; return once ``stop_after`` receipts are in (sending goes on)."""
    enough = trio.Event()

    async def sender() -> None:
        for i in range(count):
            await raw.send(
                "SEND",
                {"destination": "/queue/k9", "persistent": "true", "receipt": str(i)},
                b"%06d" % i + BODY,
            )

    async def receiver() -> None:
        while len(confirmed) < count:
            frame = await raw.expect("RECEIPT")
            confirmed.append(int(frame.headers["receipt-id"]))
            if len(confirmed) >= stop_after:
                enough.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        nursery.start_soon(receiver)
        await enough.wait()
        nursery.cancel_scope.cancel()


async def take_all(address: str) -> list[tuple[int, str | None, str]]:
    """Subscribe (auto ack) after the restart and take every waiting message: the queue
    hands them all out while the SUBSCRIBE is applied, so they all come before the
    RECEIPT of the frame after it. Returns (index, redelivered, message-id) in order."""
    raw = await connect(address)
    await raw.send("SUBSCRIBE", {"destination": "/queue/k9", "id": "s"})
    await raw.send("BEGIN", {"transaction": "t", "receipt": "end"})
    got = []
    with trio.fail_after(30):
        while True:
            frame = await raw.receive()
            if frame.command == "RECEIPT":
                break
            assert frame.command == "MESSAGE", frame
            got.append(
                (
                    int(frame.body[:6]),
                    frame.headers.get("redelivered"),
                    frame.headers["message-id"],
                )
            )
    await raw.aclose()
    return got


@pytest.mark.slow
@pytest.mark.parametrize("run", range(RUNS))
async def test_sigkill_mid_consumption_loses_nothing(tmp_path: Path, run: int) -> None:
    db = tmp_path / "broker.db"
    acked_confirmed: set[int] = set()
    acked_sent: set[int] = set()
    delivered: dict[int, str] = {}
    async with broker_process(db) as (process, address):
        producer = await connect(address)
        confirmed: list[int] = []
        await produce(producer, N, confirmed, N)
        assert sorted(confirmed) == list(range(N))

        consumer = await connect(address)
        await consumer.send(
            "SUBSCRIBE",
            {"destination": "/queue/k9", "id": "s", "ack": "client-individual", "prefetch": "50"},
        )
        with trio.fail_after(30):
            while len(delivered) < N // 3:
                frame = await consumer.receive()
                if frame.command == "RECEIPT":
                    acked_confirmed.add(int(frame.headers["receipt-id"]))
                    continue
                assert frame.command == "MESSAGE", frame
                index = int(frame.body[:6])
                delivered[index] = frame.headers["message-id"]
                await consumer.send("ACK", {"id": frame.headers["ack"], "receipt": str(index)})
                acked_sent.add(index)
        # SIGKILL mid-consumption: ACKs and their receipts are in flight.
        process.send_signal(signal.SIGKILL)
        with trio.fail_after(10):
            await process.wait()
        assert process.returncode == -signal.SIGKILL
        # Receipts that made it out before the kill.
        with trio.move_on_after(5):
            try:
                while True:
                    frame = await consumer.receive()
                    if frame.command == "RECEIPT":
                        acked_confirmed.add(int(frame.headers["receipt-id"]))
            except (EOFError, OSError, trio.BrokenResourceError):
                pass
        await producer.aclose()
        await consumer.aclose()
    assert acked_confirmed, "no ACK receipt before the kill: the test proves little"

    must_come_back = set(range(N)) - acked_sent
    may_come_back = set(range(N)) - acked_confirmed
    async with broker_process(db) as (_, address):
        got = await take_all(address)
    indexes = [g[0] for g in got]
    assert indexes == sorted(indexes), "queue order was not kept"
    assert len(indexes) == len(set(indexes))
    assert must_come_back <= set(indexes), sorted(must_come_back - set(indexes))[:10]
    assert set(indexes) <= may_come_back, "a message acknowledged with a receipt came back"
    for index, redelivered, message_id in got:
        assert redelivered == "true"  # after a crash, anything may have been seen
        if index in delivered:
            assert message_id == delivered[index]


@pytest.mark.slow
@pytest.mark.parametrize("run", range(RUNS))
async def test_sigkill_mid_production_keeps_every_receipted_message(
    tmp_path: Path, run: int
) -> None:
    db = tmp_path / "broker.db"
    confirmed: list[int] = []
    async with broker_process(db) as (process, address):
        producer = await connect(address)
        await produce(producer, N, confirmed, N // 2)
        process.send_signal(signal.SIGKILL)  # the producer was still sending
        with trio.fail_after(10):
            await process.wait()
        await producer.aclose()
    assert len(confirmed) >= N // 2
    async with broker_process(db) as (_, address):
        got = [index for index, _, _ in await take_all(address)]
    # Every receipted message is back; others may be too (committed, receipt not sent);
    # the order is the send order.
    assert set(confirmed) <= set(got)
    assert got == sorted(got)
    assert len(got) == len(set(got))


@pytest.mark.slow
async def test_sigterm_closes_the_store_cleanly(tmp_path: Path) -> None:
    """A graceful stop flushes the store and marks it clean: after the restart only the
    messages that had been delivered are marked redelivered."""
    db = tmp_path / "broker.db"
    async with broker_process(db) as (process, address):
        producer = await connect(address)
        confirmed: list[int] = []
        await produce(producer, 10, confirmed, 10)
        consumer = await connect(address)
        await consumer.send(
            "SUBSCRIBE",
            {"destination": "/queue/k9", "id": "s", "ack": "client-individual", "prefetch": "3"},
        )
        with trio.fail_after(10):
            for _ in range(3):
                await consumer.expect("MESSAGE")  # delivered, never acknowledged
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            await process.wait()
        assert process.returncode == 0
        await producer.aclose()
        await consumer.aclose()
    async with broker_process(db) as (_, address):
        got = await take_all(address)
    assert [index for index, _, _ in got] == list(range(10))
    assert [redelivered for _, redelivered, _ in got] == ["true"] * 3 + [None] * 7
