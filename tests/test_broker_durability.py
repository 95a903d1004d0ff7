"""Durability in the running broker: persistent queues on SQLite across restarts,
receipts only after the commit, expiry (autojump clock), dead letters, durable topic
subscriptions across disconnects and restarts."""

from __future__ import annotations

import itertools
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from test_broker import RawClient

from trio_stomp import Frame
from trio_stomp.broker import Broker, Config, open_broker
from trio_stomp.broker._config import DestinationSettings
from trio_stomp.broker._store import SqliteStore

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup


async def client(broker: Broker, **headers: str) -> RawClient:
    raw = RawClient(broker.connect_in_memory())
    await raw.connect(**headers)
    return raw


def sqlite(path: Path, **settings: Any) -> Config:
    return Config(listen=[], shutdown_grace=0.5, store=f"sqlite:{path}", **settings)


async def send(raw: RawClient, destination: str, body: bytes, **headers: str) -> None:
    await raw.send("SEND", {"destination": destination, **headers}, body)


async def receive_bodies(raw: RawClient, count: int) -> list[Frame]:
    frames = []
    with trio.fail_after(5):
        for _ in range(count):
            frames.append(await raw.expect("MESSAGE"))
    return frames


_probes = itertools.count()


async def nothing_more(raw: RawClient) -> None:
    """No further frame arrives (within a round trip: a receipt comes back first)."""
    probe = f"probe-{next(_probes)}"
    await raw.send("BEGIN", {"transaction": probe, "receipt": probe})
    with trio.fail_after(5):
        frame = await raw.receive()
    assert frame.command == "RECEIPT", frame


async def expect_receipt(raw: RawClient) -> None:
    """Wait for the next RECEIPT; MESSAGEs that arrive first stay pending, in order."""
    held = []
    with trio.fail_after(5):
        while True:
            frame = await raw.receive()
            if frame.command == "RECEIPT":
                break
            held.append(frame)
    raw.pending.extendleft(reversed(held))


# -- persistence -------------------------------------------------------------------------


async def test_persistent_messages_survive_a_restart_in_order(tmp_path: Path) -> None:
    db = tmp_path / "broker.db"
    async with open_broker(sqlite(db)) as broker:
        producer = await client(broker)
        for i in range(20):
            await send(producer, "/queue/work", b"%d" % i, persistent="true", receipt=f"r{i}")
        await send(producer, "/queue/work", b"transient", receipt="t")  # not persistent
        for i in range(20):
            assert (await producer.expect("RECEIPT")).headers["receipt-id"] == f"r{i}"
        await producer.expect("RECEIPT")
        consumer = await client(broker)
        await consumer.send(
            "SUBSCRIBE",
            {
                "destination": "/queue/work",
                "id": "s",
                "ack": "client-individual",
                "prefetch": "5",
            },
        )
        frames = await receive_bodies(consumer, 5)
        for frame in frames[:3]:  # acknowledge 0, 1, 2; 3..7 are delivered, not acked
            await consumer.send("ACK", {"id": frame.headers["ack"]})
        await receive_bodies(consumer, 3)
        await nothing_more(consumer)
        assert broker.statistics().messages_stored == 17
    async with open_broker(sqlite(db)) as broker:
        assert broker.statistics().messages_queued == 17
        consumer = await client(broker)
        await consumer.send("SUBSCRIBE", {"destination": "/queue/work", "id": "s"})
        frames = await receive_bodies(consumer, 17)
        assert [f.body for f in frames] == [b"%d" % i for i in range(3, 20)]
        # After a clean stop only what was delivered before is marked redelivered.
        assert [f.headers.get("redelivered") for f in frames[:6]] == ["true"] * 5 + [None]
        # The same message-id as before the restart: consumers can de-duplicate.
        await nothing_more(consumer)
        assert broker.statistics().messages_stored == 0  # auto ack removed them
    async with open_broker(sqlite(db)) as broker:
        assert broker.statistics().messages_queued == 0


async def test_message_ids_survive_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "broker.db"
    async with open_broker(sqlite(db)) as broker:
        raw = await client(broker)
        await send(raw, "/queue/ids", b"x", persistent="true")
        await raw.send(
            "SUBSCRIBE", {"destination": "/queue/ids", "id": "s", "ack": "client-individual"}
        )
        first = (await receive_bodies(raw, 1))[0]
    async with open_broker(sqlite(db)) as broker:
        raw = await client(broker)
        await raw.send("SUBSCRIBE", {"destination": "/queue/ids", "id": "s"})
        again = (await receive_bodies(raw, 1))[0]
    assert again.headers["message-id"] == first.headers["message-id"]
    assert again.headers.get("redelivered") == "true"


async def test_receipt_waits_for_the_commit(tmp_path: Path) -> None:
    db = tmp_path / "broker.db"
    async with open_broker(sqlite(db)) as broker:
        raw = await client(broker)
        store = broker.store
        await send(raw, "/queue/q", b"x", persistent="true", receipt="r")
        await raw.expect("RECEIPT")
        # By the time the RECEIPT is here, the store has committed the message.
        assert store.is_committed(store.barrier())
        assert store.statistics().batches >= 1


async def test_a_failing_store_never_sends_the_receipt(tmp_path: Path) -> None:
    received: list[str] = []

    async def read(raw: RawClient) -> None:
        try:
            while True:
                received.append((await raw.receive()).command)
        except EOFError:
            pass

    with pytest.raises((sqlite3.ProgrammingError, BaseExceptionGroup)) as info:
        async with open_broker(sqlite(tmp_path / "broker.db")) as broker:
            raw = await client(broker)
            assert isinstance(broker.store, SqliteStore) and broker.store._db is not None
            broker.store._db.close()  # the disk "fails"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, raw)
                await send(raw, "/queue/q", b"x", persistent="true", receipt="r")
                with trio.fail_after(5):
                    await trio.sleep_forever()  # until the failing store stops the broker
    error: BaseException = info.value
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    assert isinstance(error, sqlite3.ProgrammingError), info.value
    assert "RECEIPT" not in received


async def test_destination_configured_persistent(tmp_path: Path) -> None:
    db = tmp_path / "broker.db"
    config = sqlite(db, destinations={"/queue/orders.*": {"persistent": True}})
    async with open_broker(config) as broker:
        raw = await client(broker)
        await send(raw, "/queue/orders.eu", b"kept")
        await send(raw, "/queue/other", b"lost", receipt="r")
        await raw.expect("RECEIPT")
    async with open_broker(config) as broker:
        assert broker.statistics().messages_queued == 1
        raw = await client(broker)
        await raw.send("SUBSCRIBE", {"destination": "/queue/orders.eu", "id": "s"})
        assert (await receive_bodies(raw, 1))[0].body == b"kept"


async def test_memory_store_keeps_nothing() -> None:
    async with open_broker(listen=[], shutdown_grace=0.5) as broker:
        raw = await client(broker)
        await send(raw, "/queue/q", b"x", persistent="true", receipt="r")
        await raw.expect("RECEIPT")
        assert broker.store.kind == "memory"
        assert broker.statistics().messages_stored == 0
    async with open_broker(listen=[], shutdown_grace=0.5) as broker:
        assert broker.statistics().messages_queued == 0


# -- expiry ------------------------------------------------------------------------------


@pytest.fixture
def autojump() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_expired_messages_are_never_delivered(autojump: trio.testing.MockClock) -> None:
    config = Config(
        listen=[],
        shutdown_grace=0.5,
        destinations={"/queue/short": {"ttl": 10}},
        expiry_sweep_interval=1.0,
    )
    async with open_broker(config) as broker:
        producer = await client(broker)
        now_ms = int(time.time() * 1000)
        await send(producer, "/queue/short", b"ttl")  # default ttl: 10 s
        await send(producer, "/queue/long", b"header", expires=str(now_ms + 60_000))
        await send(producer, "/queue/long", b"never", expires="0")
        await send(producer, "/queue/long", b"past", expires=str(now_ms - 1000), receipt="r")
        await producer.expect("RECEIPT")
        stats = broker.statistics()
        assert stats.messages_expired == 1  # "past" never entered a queue
        assert stats.messages_queued == 3
        await trio.sleep(30)  # the ttl passed; the sweeper dropped "ttl"
        stats = broker.statistics()
        assert stats.messages_expired == 2
        assert stats.messages_queued == 2
        consumer = await client(broker)
        await consumer.send("SUBSCRIBE", {"destination": "/queue/short", "id": "a"})
        await nothing_more(consumer)
        await trio.sleep(60)  # "header" expired too, but is only found on delivery
        await consumer.send("SUBSCRIBE", {"destination": "/queue/long", "id": "b"})
        frames = await receive_bodies(consumer, 1)
        assert frames[0].body == b"never"
        await nothing_more(consumer)
        assert broker.statistics().messages_expired == 3
        assert broker.statistics().messages_dead_lettered == 0


@pytest.fixture
def still_clock() -> trio.testing.MockClock:
    # Stands still until the test jumps it: SQLite commits run in threads, and an
    # autojump clock would race ahead while they do.
    return trio.testing.MockClock(rate=0)


async def test_recovered_messages_still_expire(
    tmp_path: Path, still_clock: trio.testing.MockClock
) -> None:
    config = sqlite(tmp_path / "broker.db", expiry_sweep_interval=1.0)
    expires = str(int(time.time() * 1000) + 10_000)
    async with open_broker(config) as broker:
        raw = await client(broker)
        await send(raw, "/queue/e", b"x", persistent="true", expires=expires, receipt="r")
        await raw.expect("RECEIPT")
    async with open_broker(config) as broker:
        assert broker.statistics().messages_queued == 1
        await trio.testing.wait_all_tasks_blocked()  # the sweeper is asleep
        still_clock.jump(30)
        await trio.testing.wait_all_tasks_blocked()
        stats = broker.statistics()
        assert (stats.messages_expired, stats.messages_queued, stats.messages_stored) == (1, 0, 0)
    async with open_broker(config) as broker:
        assert broker.statistics().messages_queued == 0


async def test_ttl_sets_an_expires_header(autojump: trio.testing.MockClock) -> None:
    config = Config(listen=[], shutdown_grace=0.5, destinations={"/queue/t": {"ttl": 5}})
    async with open_broker(config) as broker:
        raw = await client(broker)
        await raw.send("SUBSCRIBE", {"destination": "/queue/t", "id": "s"})
        await send(raw, "/queue/t", b"x")
        (frame,) = await receive_bodies(raw, 1)
        expires = int(frame.headers["expires"])
        assert abs(expires - (time.time() * 1000 + 5000)) < 2000


async def test_expired_messages_dead_lettered_by_policy(
    autojump: trio.testing.MockClock,
) -> None:
    config = Config(
        listen=[], shutdown_grace=0.5, expiry_policy="dead-letter", expiry_sweep_interval=0.5
    )
    async with open_broker(config) as broker:
        raw = await client(broker)
        expires = str(int(time.time() * 1000) + 2000)
        await send(raw, "/queue/x", b"late", expires=expires, receipt="r", custom="kept")
        await raw.expect("RECEIPT")
        await trio.sleep(5)
        assert broker.statistics().messages_expired == 1
        assert broker.statistics().messages_dead_lettered == 1
        await raw.send("SUBSCRIBE", {"destination": "/queue/DLQ.x", "id": "d"})
        (frame,) = await receive_bodies(raw, 1)
        assert frame.body == b"late"
        assert frame.headers["original-destination"] == "/queue/x"
        assert frame.headers["dead-letter-reason"] == "expired"
        assert frame.headers["custom"] == "kept"
        assert "expires" not in frame.headers


async def test_bad_expires_is_an_error() -> None:
    async with open_broker(listen=[], shutdown_grace=0.5) as broker:
        raw = await client(broker)
        await send(raw, "/queue/x", b"", expires="soon")
        error = await raw.expect_error_and_close()
        assert "expires" in error.headers["message"]
        # In a transaction it is refused at the SEND, not half-way through the COMMIT.
        raw = await client(broker)
        await raw.send("BEGIN", {"transaction": "t"})
        await send(raw, "/queue/x", b"", transaction="t", expires="-1")
        error = await raw.expect_error_and_close()
        assert "expires" in error.headers["message"]


# -- dead letters ------------------------------------------------------------------------


async def test_dead_letter_after_max_redeliveries(tmp_path: Path) -> None:
    db = tmp_path / "broker.db"
    async with open_broker(sqlite(db, max_redeliveries=2)) as broker:
        raw = await client(broker)
        await send(raw, "/queue/jobs", b"poison", persistent="true", receipt="r")
        await raw.expect("RECEIPT")
        await raw.send(
            "SUBSCRIBE", {"destination": "/queue/jobs", "id": "s", "ack": "client-individual"}
        )
        seen = []
        for _ in range(3):  # the first delivery and two redeliveries
            (frame,) = await receive_bodies(raw, 1)
            seen.append(frame.headers.get("redelivered"))
            await raw.send("NACK", {"id": frame.headers["ack"]})
        assert seen == [None, "true", "true"]
        await nothing_more(raw)
        stats = broker.statistics()
        assert stats.messages_dead_lettered == 1
        assert stats.messages_stored == 1  # the dead letter, persistent like its original
    async with open_broker(sqlite(db)) as broker:
        raw = await client(broker)
        await raw.send("SUBSCRIBE", {"destination": "/queue/DLQ.jobs", "id": "d"})
        (frame,) = await receive_bodies(raw, 1)
        assert frame.body == b"poison"
        assert frame.headers["original-destination"] == "/queue/jobs"
        assert frame.headers["dead-letter-reason"] == "max-redeliveries"
        assert frame.headers["dead-letter-count"] == "3"
        assert frame.headers["original-message-id"]
        await raw.send("SUBSCRIBE", {"destination": "/queue/jobs", "id": "j"})
        await nothing_more(raw)


async def test_consumer_loss_counts_as_a_redelivery() -> None:
    config = Config(
        listen=[],
        shutdown_grace=0.5,
        destinations=[
            DestinationSettings(
                pattern="/queue/fragile", max_redeliveries=1, dead_letter_queue="/queue/graveyard"
            )
        ],
    )
    async with open_broker(config) as broker:
        producer = await client(broker)
        await send(producer, "/queue/fragile", b"m", receipt="r")
        await producer.expect("RECEIPT")
        for _ in range(2):
            consumer = await client(broker)
            await consumer.send(
                "SUBSCRIBE", {"destination": "/queue/fragile", "id": "s", "ack": "client"}
            )
            await receive_bodies(consumer, 1)
            await consumer.aclose()  # lost without acknowledging
            await trio.testing.wait_all_tasks_blocked()
        await producer.send("SUBSCRIBE", {"destination": "/queue/graveyard", "id": "g"})
        (frame,) = await receive_bodies(producer, 1)
        assert frame.headers["dead-letter-count"] == "2"
        assert broker.statistics().messages_dead_lettered == 1


async def test_dead_letters_of_dead_letters_are_dropped() -> None:
    config = Config(listen=[], shutdown_grace=0.5, max_redeliveries=1)
    async with open_broker(config) as broker:
        raw = await client(broker)
        await send(raw, "/queue/a", b"m")
        await raw.send("SUBSCRIBE", {"destination": "/queue/a", "id": "s", "ack": "client"})
        for _ in range(2):
            (frame,) = await receive_bodies(raw, 1)
            await raw.send("NACK", {"id": frame.headers["ack"]})
        await raw.send("SUBSCRIBE", {"destination": "/queue/DLQ.a", "id": "d", "ack": "client"})
        for _ in range(2):
            (frame,) = await receive_bodies(raw, 1)
            await raw.send("NACK", {"id": frame.headers["ack"]})
        await nothing_more(raw)
        stats = broker.statistics()
        assert stats.messages_dead_lettered == 1
        assert stats.messages_dropped == 1
        assert stats.messages_queued == 0


# -- durable subscriptions ---------------------------------------------------------------


async def durable(broker: Broker, client_id: str = "app", **headers: str) -> RawClient:
    raw = await client(broker, **{"client-id": client_id})
    await raw.send(
        "SUBSCRIBE",
        {
            "destination": "/topic/news",
            "id": "n",
            "durable-subscription-name": "feed",
            "receipt": "sub",
            **headers,
        },
    )
    await expect_receipt(raw)
    return raw


async def test_durable_subscription_keeps_messages_while_away() -> None:
    async with open_broker(listen=[], shutdown_grace=0.5) as broker:
        sub = await durable(broker)
        producer = await client(broker)
        await send(producer, "/topic/news", b"1")
        await receive_bodies(sub, 1)
        await sub.aclose()
        await trio.testing.wait_all_tasks_blocked()
        for body in (b"2", b"3"):
            await send(producer, "/topic/news", body)
        other = await client(broker)  # a plain subscriber sees only what comes now
        await other.send("SUBSCRIBE", {"destination": "/topic/news", "id": "p"})
        await send(producer, "/topic/news", b"4", receipt="r")
        await producer.expect("RECEIPT")
        sub = await durable(broker)
        frames = await receive_bodies(sub, 3)
        assert [f.body for f in frames] == [b"2", b"3", b"4"]
        assert [f.body for f in await receive_bodies(other, 1)] == [b"4"]
        # A newer connection with the same client-id takes the subscription over (a
        # client resuming before the broker noticed its old link died).
        twin = await client(broker, **{"client-id": "app"})
        await twin.send(
            "SUBSCRIBE",
            {"destination": "/topic/news", "id": "n", "durable-subscription-name": "feed"},
        )
        error = await sub.expect_error_and_close()
        assert "taken over" in error.headers["message"]
        await send(producer, "/topic/news", b"5")
        assert [f.body for f in await receive_bodies(twin, 1)] == [b"5"]


async def test_durable_needs_a_client_id_and_a_topic() -> None:
    async with open_broker(listen=[], shutdown_grace=0.5) as broker:
        raw = await client(broker)
        await raw.send(
            "SUBSCRIBE", {"destination": "/topic/t", "id": "1", "durable-subscription-name": "x"}
        )
        assert "client-id" in (await raw.expect_error_and_close()).headers["message"]
        raw = await client(broker, **{"client-id": "c"})
        await raw.send(
            "SUBSCRIBE", {"destination": "/queue/q", "id": "1", "durable-subscription-name": "x"}
        )
        assert "topic" in (await raw.expect_error_and_close()).headers["message"]


async def test_unsubscribe_with_the_name_removes_the_durable() -> None:
    async with open_broker(listen=[], shutdown_grace=0.5) as broker:
        sub = await durable(broker)
        await sub.send(
            "UNSUBSCRIBE", {"id": "n", "durable-subscription-name": "feed", "receipt": "u"}
        )
        await sub.expect("RECEIPT")
        producer = await client(broker)
        await send(producer, "/topic/news", b"gone", receipt="r")
        await producer.expect("RECEIPT")
        assert broker.statistics().messages_unrouted == 1
        sub = await durable(broker)
        await nothing_more(sub)


async def test_unsubscribe_with_only_the_name() -> None:
    async with open_broker(listen=[], shutdown_grace=0.5) as broker:
        sub = await durable(broker)
        await sub.send("UNSUBSCRIBE", {"durable-subscription-name": "feed", "receipt": "u"})
        await sub.expect("RECEIPT")
        assert not broker.router.durables
        assert broker.statistics().subscriptions == 0
        await sub.send("UNSUBSCRIBE", {"durable-subscription-name": "feed"})
        assert "no durable subscription" in (await sub.expect_error_and_close()).headers["message"]


async def test_plain_unsubscribe_keeps_the_durable() -> None:
    async with open_broker(listen=[], shutdown_grace=0.5) as broker:
        sub = await durable(broker)
        await sub.send("UNSUBSCRIBE", {"id": "n", "receipt": "u"})
        await sub.expect("RECEIPT")
        producer = await client(broker)
        await send(producer, "/topic/news", b"kept", receipt="r")
        await producer.expect("RECEIPT")
        await sub.send(
            "SUBSCRIBE",
            {"destination": "/topic/news", "id": "n2", "durable-subscription-name": "feed"},
        )
        assert (await receive_bodies(sub, 1))[0].body == b"kept"


async def test_durable_backlog_overflow_drops_oldest() -> None:
    async with open_broker(listen=[], shutdown_grace=0.5, durable_backlog=3) as broker:
        sub = await durable(broker)
        await sub.aclose()
        await trio.testing.wait_all_tasks_blocked()
        producer = await client(broker)
        for i in range(5):
            await send(producer, "/topic/news", b"%d" % i)
        await nothing_more(producer)
        assert broker.statistics().messages_dropped == 2
        sub = await durable(broker)
        assert [f.body for f in await receive_bodies(sub, 3)] == [b"2", b"3", b"4"]
        await nothing_more(sub)


async def test_durable_backlog_overflow_drops_newest() -> None:
    async with open_broker(
        listen=[], shutdown_grace=0.5, durable_backlog=2, durable_overflow="drop-newest"
    ) as broker:
        sub = await durable(broker)
        await sub.aclose()
        await trio.testing.wait_all_tasks_blocked()
        producer = await client(broker)
        for i in range(4):
            await send(producer, "/topic/news", b"%d" % i)
        await nothing_more(producer)
        sub = await durable(broker)
        assert [f.body for f in await receive_bodies(sub, 2)] == [b"0", b"1"]


async def test_durable_subscription_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "broker.db"
    async with open_broker(sqlite(db)) as broker:
        sub = await durable(broker, ack="client-individual")
        producer = await client(broker)
        await send(producer, "/topic/news", b"seen-not-acked", persistent="true")
        (frame,) = await receive_bodies(sub, 1)
        await sub.aclose()
        await trio.testing.wait_all_tasks_blocked()
        await send(producer, "/topic/news", b"while-away", persistent="true", receipt="r")
        await send(producer, "/topic/news", b"not-persistent", receipt="r2")
        await producer.expect("RECEIPT")
        await producer.expect("RECEIPT")
    async with open_broker(sqlite(db)) as broker:
        producer = await client(broker)
        await send(producer, "/topic/news", b"after-restart", persistent="true", receipt="r")
        await producer.expect("RECEIPT")
        sub = await durable(broker)
        frames = await receive_bodies(sub, 3)
        assert [f.body for f in frames] == [b"seen-not-acked", b"while-away", b"after-restart"]
        assert frames[0].headers["message-id"] == frame.headers["message-id"]
        assert frames[0].headers.get("redelivered") == "true"
        assert frames[0].headers["destination"] == "/topic/news"
        await sub.send("UNSUBSCRIBE", {"id": "n", "durable-subscription-name": "feed"})
        await nothing_more(sub)
    async with open_broker(sqlite(db)) as broker:
        assert broker.statistics().messages_queued == 0
        producer = await client(broker)
        await send(producer, "/topic/news", b"nobody", receipt="r")
        await producer.expect("RECEIPT")
        assert broker.statistics().messages_unrouted == 1


async def test_drop_oldest_removes_the_stored_copy(tmp_path: Path) -> None:
    db = tmp_path / "broker.db"
    async with open_broker(sqlite(db)) as broker:
        raw = await client(broker)
        for body in (b"old", b"new"):
            await send(raw, "/queue/full", body, persistent="true", receipt=body.decode())
            await raw.expect("RECEIPT")
        queue = broker.router.queues["/queue/full"]
        for _ in range(3):  # the third finds the queue empty: nothing happens
            broker.router.drop_oldest(queue)
        assert broker.statistics().messages_dropped == 2
        assert broker.statistics().messages_queued == 0
        await send(raw, "/queue/full", b"last", persistent="true", receipt="r")
        await raw.expect("RECEIPT")
    async with open_broker(sqlite(db)) as broker:
        raw = await client(broker)
        await raw.send("SUBSCRIBE", {"destination": "/queue/full", "id": "s"})
        assert [f.body for f in await receive_bodies(raw, 1)] == [b"last"]
        await nothing_more(raw)
