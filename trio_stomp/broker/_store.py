"""Message stores: what a broker keeps across a restart.

This module owns durability. A :class:`Store` is two halves:

* a synchronous **journal** the routing core calls as it applies frames (``put`` a
  persistent message, ``delete`` it when acknowledged, expired or dead-lettered,
  ``set_redeliveries``, ``delivered`` watermarks, durable subscriptions). Journal calls
  never block and never touch the disk: they append to an in-memory batch and return.
* one **store task** (:meth:`Store.run`, started in the broker's housekeeping nursery)
  that takes everything journaled since its last write and commits it in one transaction
  (group commit), through ``trio.to_thread.run_sync`` so the event loop never waits on
  the disk. While one batch is being written the next one collects, so the cost of a
  commit (an fsync) is shared by every message that arrived meanwhile.

A session that owes a client the RECEIPT of a persistent SEND asks :meth:`Store.barrier`
for the journal position and awaits :meth:`Store.wait_committed` before sending it, so a
RECEIPT is only ever sent for a message that is on disk. A message journaled and then
deleted within one batch (a fast consumer acknowledged it before the commit) never
reaches the disk at all.

:class:`MemoryStore` (the default) keeps nothing: every position is committed at once and
nothing survives the process. :class:`SqliteStore` (``--store sqlite:PATH``) uses the
standard library's ``sqlite3`` in WAL mode; its one connection is only ever used by one
thread at a time (the store task's, or the opener's before the task starts).

Recovery (:meth:`Store.open`) returns every stored message in journal order (the order
the messages entered their queue) and every durable subscription. A message is marked
``redelivered`` when it may have been delivered before: always after an unclean stop
(a crash or SIGKILL: a delivery may have happened after the last commit), and after a
clean stop only when it was at or below its queue's committed delivery watermark.

This module never routes, never parses frames, never starts a task of its own (the
broker runs :meth:`Store.run` in its nursery) and never hides a thread outside
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from typing import Final, Literal

import attrs
import trio

__all__ = [
    "DurableRecord",
    "MemoryStore",
    "Recovered",
    "SqliteStore",
    "Store",
    "StoreStatistics",
    "StoredMessage",
    "open_store_from_url",
]

#: Journaled bytes not yet committed above which :attr:`Store.backlogged` is True and
#: sessions stop reading until the store catches up (the store's push back).
DEFAULT_MAX_PENDING_BYTES: Final = 8 << 20

SyncMode = Literal["full", "normal"]


@attrs.frozen
class StoredMessage:
    """One message as recovered from a store.

    Attributes:
      key: the store's key for it (journal order: a larger key entered later).
      queue: the queue it waits in (a ``/queue/...`` name, or a durable subscription's
        internal queue name).
      destination: the ``destination`` header its MESSAGE frames carry.
      message_id: the ``message-id`` it was first delivered with.
      headers: the sender's headers (what passes through to MESSAGE).
      body: the body.
      expires: absolute expiry time in ms since the epoch; 0 = never.
      redeliveries: how many times it came back to its queue, as last journaled.
      redelivered: it may have been delivered before (see the module docstring).
    """

    key: int
    queue: str
    destination: str
    message_id: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    expires: int
    redeliveries: int
    redelivered: bool


@attrs.frozen
class DurableRecord:
    """A durable topic subscription as stored.

    Attributes:
      client_id: the CONNECT ``client-id`` that owns it.
      name: its ``durable-subscription-name``.
      destination: the topic it subscribes to.
      queue: the internal queue holding its messages while its client is away.
    """

    client_id: str
    name: str
    destination: str
    queue: str


@attrs.frozen
class Recovered:
    """What :meth:`Store.open` found.

    Attributes:
      messages: every stored message, in journal order.
      durables: every durable subscription.
      clean: the previous run closed the store cleanly (False after a crash, and for a
        store that never ran before: nothing to recover then anyway).
    """

    messages: tuple[StoredMessage, ...] = ()
    durables: tuple[DurableRecord, ...] = ()
    clean: bool = True


@attrs.frozen
class StoreStatistics:
    """A snapshot of a store's counters, from :meth:`Store.statistics`.

    Attributes:
      kind: ``"memory"`` or ``"sqlite"``.
      batches: transactions committed.
      operations: journal entries written to disk (puts, deletes, updates).
      cancelled: puts that never reached the disk because their delete was journaled
        in the same batch.
      pending: journal entries waiting for the next commit.
      stored: persistent messages in the store now (as far as the journal knows).
    """

    kind: str
    batches: int
    operations: int
    cancelled: int
    pending: int
    stored: int


# One journal entry. Kept as plain tuples: they are made on the hot path.
_Put = tuple[Literal["put"], int, str, str, str, str, bytes, int, int]
_Op = tuple[object, ...]


class Store:
    """The journal and the store task; the base class is the memory store's behaviour
    for everything but what must reach the disk.

    Journal methods are synchronous, never block and never raise on I/O; the disk is
    only touched by :meth:`open`, :meth:`run` and :meth:`close`.
    """

    kind: str = "memory"

    def __init__(self, *, max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES) -> None:
        self._ops: list[_Op] = []
        self._pending_bytes = 0
        self._max_pending_bytes = max_pending_bytes
        self._next_key = 1
        self._recorded = 0  # journal position: entries journaled so far
        self._committed = 0  # entries known to be on disk
        self._committed_event = trio.Event()
        self._has_work = trio.Event()
        self._watermarks: dict[str, int] = {}
        self._stored = 0
        self._batches = 0
        self._operations = 0
        self._cancelled = 0
        self._closed = False
        self._failed: BaseException | None = None
        self._flush_lock = trio.Lock()  # the store task and close() never write at once

    # -- journal (sync, called by the routing core) --------------------------------------

    @property
    def persistent(self) -> bool:
        """True when journaled messages survive a restart (False for memory)."""
        return False

    def put(
        self,
        queue: str,
        destination: str,
        message_id: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        expires: int = 0,
        redeliveries: int = 0,
    ) -> int:
        """Journal a persistent message entering ``queue``; returns its key."""
        key = self._next_key
        self._next_key = key + 1
        self._stored += 1
        if self.persistent:
            self._append(
                (
                    "put",
                    key,
                    queue,
                    destination,
                    message_id,
                    _encode_headers(headers),
                    body,
                    expires,
                    redeliveries,
                ),
                len(body) + 64,
            )
        return key

    def delete(self, key: int) -> None:
        """Journal that message ``key`` left the store (acknowledged, expired, moved)."""
        self._stored -= 1
        if self.persistent:
            self._append(("delete", key), 16)

    def set_redeliveries(self, key: int, count: int) -> None:
        """Journal message ``key``'s redelivery count (for dead-lettering after a restart)."""
        if self.persistent:
            self._append(("redeliveries", key, count), 16)

    def delivered(self, queue: str, key: int) -> None:
        """Note that message ``key`` of ``queue`` was handed to a consumer. Only the largest
        key per queue is kept and written with the next batch."""
        if self.persistent and key > self._watermarks.get(queue, 0):
            self._watermarks[queue] = key
            self._wake()

    def add_durable(self, client_id: str, name: str, destination: str, queue: str) -> None:
        """Journal a new durable subscription (see :class:`DurableRecord`)."""
        if self.persistent:
            self._append(("durable+", DurableRecord(client_id, name, destination, queue)), 64)

    def remove_durable(self, client_id: str, name: str, queue: str) -> None:
        """Journal the removal of a durable subscription and every message it held."""
        if self.persistent:
            self._append(("durable-", client_id, name, queue), 64)

    def _append(self, op: _Op, size: int) -> None:
        self._ops.append(op)
        self._recorded += 1
        self._pending_bytes += size
        self._wake()

    def _wake(self) -> None:
        if not self._has_work.is_set():
            self._has_work.set()

    # -- positions and waiting -----------------------------------------------------------

    def barrier(self) -> int:
        """The journal position a RECEIPT sent now must wait for (see
        :meth:`wait_committed`). Never blocks."""
        return self._recorded

    def is_committed(self, position: int) -> bool:
        """True when every journal entry up to ``position`` is on disk."""
        return self._committed >= position

    @property
    def backlogged(self) -> bool:
        """True when more journaled bytes wait than the store wants buffered: sessions
        should ``await wait_committed(barrier())`` before reading more frames."""
        return self._pending_bytes > self._max_pending_bytes

    async def wait_committed(self, position: int) -> None:
        """Block until every journal entry up to ``position`` is on disk (returns at once,
        after a checkpoint, for the memory store).

        Raises:
          RuntimeError: the store task failed (the disk write raised); the broker is
            going down.
        """
        await trio.lowlevel.checkpoint()
        while self._committed < position:
            if self._failed is not None:
                raise RuntimeError("the message store failed") from self._failed
            await self._committed_event.wait()
        if self._failed is not None and self._committed < position:  # pragma: no cover
            raise RuntimeError("the message store failed") from self._failed

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> Recovered:
        """Open the store and read what it holds. Call once, before :meth:`run`.

        Raises:
          OSError: the store cannot be opened (a missing directory; another broker holds
            it).
          sqlite3.Error: the file cannot be read (not a database, corrupt).
        """
        await trio.lowlevel.checkpoint()
        return Recovered()

    def adopt(self, recovered: Recovered) -> None:
        """Continue the key sequence after what was recovered (called by :meth:`open`)."""
        if recovered.messages:
            self._next_key = max(m.key for m in recovered.messages) + 1
        self._stored = len(recovered.messages)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The store task: commit journaled entries in batches until cancelled.

        Raises:
          sqlite3.Error, OSError: a write failed; waiters see RuntimeError.
        """
        task_status.started()
        try:
            while not self._closed:
                await self._has_work.wait()
                if not self._closed:
                    await self.flush()
        except BaseException as exc:
            if not isinstance(exc, trio.Cancelled):
                self._failed = exc
                self._wake_waiters()
            raise

    async def flush(self) -> None:
        """Commit everything journaled so far (one transaction); waits for a commit that
        is already running first.

        Raises:
          sqlite3.Error, OSError: the write failed.
        """
        async with self._flush_lock:
            await self._flush()

    async def _flush(self) -> None:
        self._has_work = trio.Event()
        ops = self._ops
        watermarks = self._watermarks
        position = self._recorded
        self._ops = []
        self._watermarks = {}
        self._pending_bytes = 0
        if ops or watermarks:
            written, cancelled = await self._write(ops, watermarks)
            self._batches += 1
            self._operations += written
            self._cancelled += cancelled
        else:
            await trio.lowlevel.checkpoint()
        self._committed = position
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        self._committed_event.set()
        self._committed_event = trio.Event()

    async def _write(self, ops: list[_Op], watermarks: dict[str, int]) -> tuple[int, int]:
        """Write one batch; returns (entries written, puts cancelled by their delete)."""
        await trio.lowlevel.checkpoint()
        return 0, 0

    async def close(self) -> None:
        """Flush what is journaled and mark the store cleanly closed. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._wake()  # the store task ends after its current batch
        if self._failed is None:
            await self.flush()

    def statistics(self) -> StoreStatistics:
        """A snapshot of the store's counters. Never blocks."""
        return StoreStatistics(
            kind=self.kind,
            batches=self._batches,
            operations=self._operations,
            cancelled=self._cancelled,
            pending=len(self._ops),
            stored=self._stored,
        )


class MemoryStore(Store):
    """Keeps nothing across a restart; every journal position is committed at once."""

    kind = "memory"

    def barrier(self) -> int:
        return 0


class SqliteStore(Store):
    """A SQLite file in WAL mode.

    Args:
      path: the database file (created if missing).
      sync: ``"full"`` (the default: each commit is fsynced, a commit survives a power
        loss) or ``"normal"`` (WAL is fsynced at checkpoints only: a commit survives a
        process crash or SIGKILL, not a power loss).
    """

    kind = "sqlite"

    def __init__(
        self,
        path: str,
        *,
        sync: SyncMode = "full",
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
    ) -> None:
        super().__init__(max_pending_bytes=max_pending_bytes)
        if sync not in ("full", "normal"):
            raise ValueError(f"sync must be 'full' or 'normal', not {sync!r}")
        self.path = path
        self.sync = sync
        self._db: sqlite3.Connection | None = None

    @property
    def persistent(self) -> bool:
        return True

    async def open(self) -> Recovered:
        recovered = await trio.to_thread.run_sync(self._open_sync)
        self.adopt(recovered)
        return recovered

    def _open_sync(self) -> Recovered:
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise OSError(f"store directory {directory!r} does not exist")
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=0.5)
        try:
            # One broker per store: a second one would recover the same messages and
            # deliver them twice. The exclusive lock is taken by the first write below
            # and held until the connection closes (or the process dies).
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.sync.upper()}")
            db.executescript(
                """
                CREATE TABLE IF NOT EXISTS messages (
                    key INTEGER PRIMARY KEY,
                    queue TEXT NOT NULL,
                    destination TEXT NOT NULL,
                    message_id TEXT NOT NULL,
                    headers TEXT NOT NULL,
                    body BLOB NOT NULL,
                    expires INTEGER NOT NULL,
                    redeliveries INTEGER NOT NULL
                );
                CREATE TABLE IF NOT EXISTS watermarks (
                    queue TEXT PRIMARY KEY, key INTEGER NOT NULL
                );
                CREATE TABLE IF NOT EXISTS durables (
                    client_id TEXT NOT NULL,
                    name TEXT NOT NULL,
                    destination TEXT NOT NULL,
                    queue TEXT NOT NULL,
                    PRIMARY KEY (client_id, name)
                );
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                """
            )
            row = db.execute("SELECT value FROM meta WHERE key = 'clean'").fetchone()
            clean = row is None or row[0] == "1"
            marks = dict(db.execute("SELECT queue, key FROM watermarks").fetchall())
            messages = []
            for key, queue, destination, message_id, headers, body, expires, count in db.execute(
                "SELECT key, queue, destination, message_id, headers, body, expires, "
                "redeliveries FROM messages ORDER BY key"
            ):
                messages.append(
                    StoredMessage(
                        key=key,
                        queue=queue,
                        destination=destination,
                        message_id=message_id,
                        headers=_decode_headers(headers),
                        body=bytes(body),
                        expires=expires,
                        redeliveries=count,
                        redelivered=(not clean) or key <= marks.get(queue, 0) or count > 0,
                    )
                )
            durables = tuple(
                DurableRecord(client_id=c, name=n, destination=d, queue=q)
                for c, n, d, q in db.execute(
                    "SELECT client_id, name, destination, queue FROM durables ORDER BY rowid"
                )
            )
            # From now on, until close() says otherwise, a stop is a crash.
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('clean', '0')")
        except sqlite3.OperationalError as exc:
            db.close()
            if "locked" in str(exc):
                raise OSError(f"store {self.path!r} is in use by another broker") from exc
            raise
        except BaseException:
            db.close()
            raise
        self._db = db
        return Recovered(messages=tuple(messages), durables=durables, clean=clean)

    async def _write(self, ops: list[_Op], watermarks: dict[str, int]) -> tuple[int, int]:
        return await trio.to_thread.run_sync(self._write_sync, ops, watermarks)

    def _write_sync(self, ops: list[_Op], watermarks: dict[str, int]) -> tuple[int, int]:
        db = self._db
        if db is None:
            raise RuntimeError("the store is not open")
        # A put whose delete is in the same batch never needs to reach the disk.
        deleted = {op[1] for op in ops if op[0] == "delete"}
        put_here = {op[1] for op in ops if op[0] == "put" and op[1] in deleted}
        written = 0
        db.execute("BEGIN")
        try:
            run_kind: object = None
            run: list[tuple[object, ...]] = []

            def flush_run() -> None:
                nonlocal written
                if not run:
                    return
                if run_kind == "put":
                    db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?)", run)
                elif run_kind == "delete":
                    db.executemany("DELETE FROM messages WHERE key = ?", run)
                elif run_kind == "redeliveries":
                    db.executemany("UPDATE messages SET redeliveries = ? WHERE key = ?", run)
                written += len(run)
                run.clear()

            for op in ops:
                kind = op[0]
                if kind in ("put", "delete", "redeliveries") and op[1] in put_here:
                    continue
                if kind != run_kind:
                    flush_run()
                    run_kind = kind
                if kind == "put" or kind == "delete":
                    run.append(op[1:])
                elif kind == "redeliveries":
                    run.append((op[2], op[1]))
                elif kind == "durable+":
                    record = op[1]
                    assert isinstance(record, DurableRecord)
                    db.execute(
                        "INSERT OR REPLACE INTO durables VALUES (?, ?, ?, ?)",
                        (record.client_id, record.name, record.destination, record.queue),
                    )
                    written += 1
                elif kind == "durable-":
                    db.execute(
                        "DELETE FROM durables WHERE client_id = ? AND name = ?", (op[1], op[2])
                    )
                    db.execute("DELETE FROM messages WHERE queue = ?", (op[3],))
                    db.execute("DELETE FROM watermarks WHERE queue = ?", (op[3],))
                    written += 1
            flush_run()
            if watermarks:
                db.executemany(
                    "INSERT INTO watermarks (queue, key) VALUES (?, ?) "
                    "ON CONFLICT (queue) DO UPDATE SET key = max(key, excluded.key)",
                    list(watermarks.items()),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return written, len(put_here)

    async def close(self) -> None:
        if self._closed:
            return
        await super().close()
        db = self._db
        self._db = None
        if db is not None:
            try:
                await trio.to_thread.run_sync(self._close_sync, db, self._failed is None)
            except BaseException:
                db.close()  # cancelled: release the file's lock at least (left unclean)
                raise

    @staticmethod
    def _close_sync(db: sqlite3.Connection, clean: bool) -> None:
        try:
            if clean:
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('clean', '1')")
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.close()


_ESCAPES: Final = str.maketrans({"\\": "\\\\", "\n": "\\n", ":": "\\c", "\r": "\\r"})
_UNESCAPES: Final = {"\\": "\\", "n": "\n", "c": ":", "r": "\r"}


def _escape(text: str) -> str:
    if "\\" in text or "\n" in text or ":" in text or "\r" in text:
        return text.translate(_ESCAPES)
    return text


def _unescape(text: str) -> str:
    if "\\" not in text:
        return text
    out = []
    chars = iter(text)
    for char in chars:
        out.append(_UNESCAPES.get(next(chars, ""), "") if char == "\\" else char)
    return "".join(out)


def _encode_headers(headers: Iterable[tuple[str, str]]) -> str:
    """Headers as ``name:value`` lines, escaped as in STOMP 1.2 (cheaper than JSON on
    the hot path, and any str round-trips)."""
    return "\n".join([_escape(name) + ":" + _escape(value) for name, value in headers])


def _decode_headers(text: str) -> tuple[tuple[str, str], ...]:
    if not text:
        return ()
    pairs = []
    for line in text.split("\n"):
        name, _, value = line.partition(":")
        pairs.append((_unescape(name), _unescape(value)))
    return tuple(pairs)


def open_store_from_url(url: str, *, sync: SyncMode = "full") -> Store:
    """Make the store a ``--store`` URL names: ``memory`` or ``sqlite:PATH``.

    Never blocks (the file is opened by :meth:`Store.open`).

    Raises:
      ValueError: an unknown scheme or an empty path.
    """
    if url in ("memory", "memory:", ""):
        return MemoryStore()
    scheme, sep, path = url.partition(":")
    if scheme == "sqlite" and sep:
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError(f"store {url!r}: sqlite needs a path (sqlite:PATH)")
        return SqliteStore(path, sync=sync)
    raise ValueError(f"unknown store {url!r}: expected 'memory' or 'sqlite:PATH'")
