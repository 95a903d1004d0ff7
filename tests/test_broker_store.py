"""The message stores on their own: journal, group commit, recovery order and flags."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio

from trio_stomp.broker._store import (
    DurableRecord,
    MemoryStore,
    SqliteStore,
    Store,
    open_store_from_url,
)


async def _reopen(path: Path) -> tuple[SqliteStore, list[tuple[int, str, str, bool]]]:
    store = SqliteStore(str(path))
    recovered = await store.open()
    return store, [(m.key, m.queue, m.body.decode(), m.redelivered) for m in recovered.messages]


async def test_memory_store_commits_at_once_and_keeps_nothing() -> None:
    store = MemoryStore()
    recovered = await store.open()
    assert recovered.messages == () and recovered.durables == ()
    key = store.put("/queue/a", "/queue/a", "m1", [("x", "1")], b"body")
    assert key == 1
    assert store.barrier() == 0
    assert store.is_committed(store.barrier())
    with trio.fail_after(1):
        await store.wait_committed(store.barrier())
    assert store.statistics().pending == 0
    assert store.statistics().stored == 1
    store.delete(key)
    assert store.statistics().stored == 0


async def test_sqlite_recovers_in_journal_order_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(str(path))
    await store.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        keys = [
            store.put(f"/queue/{'ab'[i % 2]}", "/queue/x", f"m{i}", [("n", str(i))], b"%d" % i)
            for i in range(10)
        ]
        store.delete(keys[3])
        position = store.barrier()
        assert not store.is_committed(position)
        with trio.fail_after(5):
            await store.wait_committed(position)
        assert store.is_committed(position)
        nursery.cancel_scope.cancel()
    # No close(): as after SIGKILL (the process' death releases the file's lock, as
    # closing the handle does here). Everything may have been delivered -> redelivered.
    assert store._db is not None
    store._db.close()
    again, rows = await _reopen(path)
    assert [r[2] for r in rows] == ["0", "1", "2", "4", "5", "6", "7", "8", "9"]
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    assert all(r[3] for r in rows)
    # Keys continue after the recovered ones.
    assert again.put("/queue/a", "/queue/a", "n", [], b"") == keys[-1] + 1
    await again.close()


async def test_sqlite_headers_and_fields_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(str(path))
    await store.open()
    headers = [("a", "1"), ("a", "2"), ("weird:", "line\nbreak"), ("b\\s", "c\r:\\n"), ("", "")]
    store.put("/queue/q", "/topic/t", "id-1", headers, b"\x00\xffbin", 1234, 2)
    await store.close()
    again = SqliteStore(str(path))
    recovered = await again.open()
    (message,) = recovered.messages
    assert message.queue == "/queue/q"
    assert message.destination == "/topic/t"
    assert message.message_id == "id-1"
    assert message.headers == tuple(headers)
    assert message.body == b"\x00\xffbin"
    assert message.expires == 1234
    assert message.redeliveries == 2
    assert message.redelivered  # it came back twice before
    assert recovered.clean
    await again.close()


async def test_clean_close_uses_delivery_watermarks(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(str(path))
    await store.open()
    keys = [store.put("/queue/a", "/queue/a", f"m{i}", [], b"%d" % i) for i in range(4)]
    store.delivered("/queue/a", keys[1])
    store.delivered("/queue/a", keys[0])  # lower: ignored
    await store.close()
    _, rows = await _reopen(path)
    assert [(r[2], r[3]) for r in rows] == [("0", True), ("1", True), ("2", False), ("3", False)]


async def test_one_batch_per_commit_and_cancelled_puts(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.open()
    # Journaled before the store task runs: all of it is one transaction.
    keys = [store.put("/queue/a", "/queue/a", f"m{i}", [], b"x" * 100) for i in range(1000)]
    for key in keys[:500]:
        store.delete(key)  # acknowledged before the commit: never written
    store.set_redeliveries(keys[0], 1)  # for a cancelled put: skipped too
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        with trio.fail_after(5):
            await store.wait_committed(store.barrier())
        stats = store.statistics()
        assert stats.batches == 1
        assert stats.cancelled == 500
        assert stats.operations == 500
        assert stats.stored == 500
        nursery.cancel_scope.cancel()
    await store.close()
    db = sqlite3.connect(tmp_path / "s.db")
    try:
        assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 500
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


async def test_batches_group_while_a_commit_runs(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"), sync="normal")
    await store.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)

        async def producer(n: int) -> None:
            for i in range(200):
                store.put("/queue/a", "/queue/a", f"{n}-{i}", [], b"x")
                if i % 20 == 0:
                    await store.wait_committed(store.barrier())

        with trio.fail_after(10):
            async with trio.open_nursery() as producers:
                for n in range(5):
                    producers.start_soon(producer, n)
            await store.wait_committed(store.barrier())
        stats = store.statistics()
        assert stats.operations == 1000
        # 5 producers x 10 receipt barriers each: commits are shared, not one per barrier.
        assert stats.batches < 50
        nursery.cancel_scope.cancel()
    await store.close()


async def test_durable_subscriptions_and_their_messages(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SqliteStore(str(path))
    await store.open()
    one = DurableRecord("client", "one", "/topic/t", "durable:client:one")
    two = DurableRecord("client", "two", "/topic/t", "durable:client:two")
    store.add_durable(one.client_id, one.name, one.destination, one.queue)
    store.add_durable(two.client_id, two.name, two.destination, two.queue)
    store.put(one.queue, "/topic/t", "m1", [], b"1")
    store.put(two.queue, "/topic/t", "m1", [], b"1")
    store.remove_durable("client", "two", two.queue)
    await store.close()
    again = SqliteStore(str(path))
    recovered = await again.open()
    assert recovered.durables == (one,)
    assert [m.queue for m in recovered.messages] == [one.queue]
    await again.close()


async def test_a_failed_write_fails_the_waiters(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.open()
    assert store._db is not None
    store._db.close()  # the disk "fails"
    store.put("/queue/a", "/queue/a", "m", [], b"")
    position = store.barrier()
    waited: list[BaseException] = []

    async def waiter() -> None:
        try:
            await store.wait_committed(position)
        except RuntimeError as exc:
            waited.append(exc)

    with pytest.RaisesGroup(sqlite3.ProgrammingError):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await nursery.start(store.run)
    assert len(waited) == 1
    assert not store.is_committed(position)


async def test_backlogged_pushes_back(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"), max_pending_bytes=10_000)
    await store.open()

    def backlogged() -> bool:  # a call, so mypy does not narrow the property
        return store.backlogged

    while not backlogged():
        store.put("/queue/a", "/queue/a", "m", [], b"x" * 1000)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.wait_committed(store.barrier())
        assert not backlogged()
        nursery.cancel_scope.cancel()
    await store.close()


def test_store_urls(tmp_path: Path) -> None:
    assert isinstance(open_store_from_url("memory"), MemoryStore)
    store = open_store_from_url(f"sqlite:{tmp_path}/x.db", sync="normal")
    assert isinstance(store, SqliteStore)
    assert store.path == f"{tmp_path}/x.db"
    assert store.sync == "normal"
    for bad in ("sqlite:", "postgres://x", "nonsense"):
        with pytest.raises(ValueError):
            open_store_from_url(bad)
    with pytest.raises(ValueError):
        SqliteStore("x.db", sync="sometimes")  # type: ignore[arg-type]


async def test_missing_directory_is_an_oserror(tmp_path: Path) -> None:
    store: Store = SqliteStore(str(tmp_path / "nope" / "s.db"))
    with pytest.raises(OSError):
        await store.open()


async def test_one_broker_per_store(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    first = SqliteStore(str(path))
    await first.open()
    second = SqliteStore(str(path))
    with pytest.raises(OSError, match="in use"):
        await second.open()
    await first.close()
    third = SqliteStore(str(path))
    await third.open()  # free again
    await third.close()
