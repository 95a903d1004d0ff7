"""The broker: listeners, sessions and housekeeping under one shutdown tree.

This module owns :func:`open_broker`, :func:`serve_broker`, :class:`Broker` (statistics,
in-memory connections, shutdown) and the shared heart-beat ticker. The task tree, as in
design.md::

    broker root (shielded from the caller's cancellation; bounded by the grace period)
    ├── housekeeping nursery      heart-beat ticker, expiry sweeper, store task
    │   └── connections nursery   one Session.run per connection
    │       └── listeners scope   accept loops
    ...

Shutdown runs in that order: the listeners scope is cancelled (no new connections), each
session is told (it sends ERROR "broker shutting down" and flushes), the connections
nursery gets a deadline of ``shutdown_grace`` after which whatever is left is cancelled,
and housekeeping is cancelled last.

It never parses frames (sessions do), never decides routing (the router does), never
imports the client, and never starts a task outside those nurseries.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final

import attrs
import trio

from .._codec import serialize
from .._frames import Frame
from .._peer import Peer, PeerStatistics
from .._util import unwrap_lone_exception
from ._auth import Security, load_security
from ._config import Config
from ._listeners import Listener, listener_url, open_listeners, remote_address
from ._router import Router
from ._session import Session, frame_handlers
from ._store import MemoryStore, Recovered, Store, open_store_from_url

__all__ = ["Broker", "BrokerStatistics", "open_broker", "serve_broker"]

logger: Final = logging.getLogger("trio_stomp.broker")

#: Extra seconds past the grace period before the broker's own tasks are cancelled.
_HARD_STOP_MARGIN: Final = 1.0


@attrs.frozen
class BrokerStatistics:
    """A snapshot of a broker's counters, from :meth:`Broker.statistics`.

    Attributes:
      connections: connections open now (CONNECTed or not yet).
      connections_total: connections accepted since the broker started.
      queues: queues that exist now (``/queue/...`` and default-type queues).
      topics: topics with at least one subscriber now.
      temp_queues: temporary queues that exist now.
      subscriptions: subscriptions open now.
      messages_enqueued: messages accepted into a destination (committed SENDs).
      messages_delivered: MESSAGE frames handed to connections (redeliveries included).
      messages_acked: messages acknowledged (``auto`` mode counts on delivery).
      messages_queued: messages waiting in queues now.
      messages_unacked: messages delivered and not yet acknowledged now.
      messages_redelivered: messages returned for redelivery (NACK, unsubscribe, loss).
      messages_dropped: messages discarded: a slow topic subscriber under the ``drop``
        policy (or the one that triggered a disconnect), a reply to a temp queue whose
        owner left, a temp queue's messages when its owner left.
      messages_unrouted: messages sent to a topic that had no subscriber.
      slow_consumers: connections closed because they could not keep up with a topic.
      errors_sent: ERROR frames sent.
      bytes_in: bytes received from clients (heart-beats included).
      bytes_out: bytes sent to clients (heart-beats included).
      messages_expired: messages that expired before delivery (dropped or dead-lettered).
      messages_dead_lettered: messages moved to a dead-letter queue.
      messages_stored: persistent messages in the store now.
      authentication_failures: CONNECTs refused (``authentication failed``).
      access_refused: SENDs and SUBSCRIBEs refused by the access-control rules.
      limits_hit: how often each limit was hit, by its config key
        (``{"max_connections_per_address": 3, "max_body_size": 1}``).
    """

    connections: int
    connections_total: int
    queues: int
    topics: int
    temp_queues: int
    subscriptions: int
    messages_enqueued: int
    messages_delivered: int
    messages_acked: int
    messages_queued: int
    messages_unacked: int
    messages_redelivered: int
    messages_dropped: int
    messages_unrouted: int
    slow_consumers: int
    errors_sent: int
    bytes_in: int
    bytes_out: int
    messages_expired: int = 0
    messages_dead_lettered: int = 0
    messages_stored: int = 0
    authentication_failures: int = 0
    access_refused: int = 0
    limits_hit: Mapping[str, int] = attrs.field(factory=dict, hash=False)

    @property
    def destinations(self) -> int:
        """Queues, topics and temp queues that exist now."""
        return self.queues + self.topics + self.temp_queues


class _HeartbeatTicker:
    """Drives every connection's heart-beats from one task (no timer per connection).

    A heap holds ``(due, n, peer)``; the ticker sleeps until the earliest ``due``, calls
    ``peer.check_heart_beat`` for every due peer and pushes it back with the time it
    returns. A closed peer returns ``inf`` and falls out.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Peer]] = []
        self._counter = itertools.count()
        self._sleep: trio.CancelScope | None = None
        self._sleeping_until = math.inf

    def add(self, peer: Peer) -> None:
        now = trio.current_time()
        heapq.heappush(self._heap, (now, next(self._counter), peer))
        if self._sleep is not None and now < self._sleeping_until:
            self._sleep.deadline = now

    async def run(self) -> None:
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, _, peer = heapq.heappop(heap)
                due = peer.check_heart_beat(now)
                if due != math.inf:
                    heapq.heappush(heap, (due, next(self._counter), peer))
            self._sleeping_until = heap[0][0] if heap else math.inf
            with trio.CancelScope(deadline=self._sleeping_until) as self._sleep:
                await trio.sleep_forever()
            self._sleep = None


@attrs.define(eq=False)
class Broker:
    """A running broker. Made by :func:`open_broker` / :func:`serve_broker`.

    Attributes:
      config: the configuration it runs with.
      addresses: the URLs it listens on, with real ports (``tcp://127.0.0.1:54321``).
    """

    config: Config
    router: Router
    addresses: list[str] = attrs.Factory(list)
    _sessions: set[Session] = attrs.Factory(set)
    _ticker: _HeartbeatTicker = attrs.Factory(_HeartbeatTicker)
    _session_counter: itertools.count[int] = attrs.Factory(lambda: itertools.count(1))
    _connections: trio.Nursery | None = None
    _listeners_scope: trio.CancelScope | None = None
    _closing: bool = False
    _connections_total: int = 0
    _closed_bytes_in: int = 0
    _closed_bytes_out: int = 0
    _closed_errors: int = 0
    store: Store = attrs.Factory(lambda self: _store_of(self.router), takes_self=True)
    _expiry_wakeup: trio.Event = attrs.Factory(trio.Event)
    # Shared by every session; made with the first one (after tests may patch the router).
    _handlers: dict[str, Any] | None = None

    def __attrs_post_init__(self) -> None:
        self.router.on_expiring = self._expiring_started

    def _expiring_started(self) -> None:
        self._expiry_wakeup.set()

    async def _sweep_expired(self) -> None:
        """Housekeeping: while messages with an expiry time wait, sweep the expired ones
        out of the queues every ``expiry_sweep_interval`` seconds."""
        interval = self.config.expiry_sweep_interval
        while True:
            if not self.router.expiring:
                self._expiry_wakeup = trio.Event()
                await self._expiry_wakeup.wait()
            await trio.sleep(interval)
            self.router.sweep_expired()

    def _restore(self, recovered: Recovered) -> None:
        router = self.router
        for durable in recovered.durables:
            router.restore_durable(
                durable.client_id, durable.name, durable.destination, durable.queue
            )
        for message in recovered.messages:
            router.restore_message(
                key=message.key,
                queue=message.queue,
                destination=message.destination,
                message_id=message.message_id,
                headers=message.headers,
                body=message.body,
                expires=message.expires,
                redeliveries=message.redeliveries,
                redelivered=message.redelivered,
            )
        if recovered.messages or recovered.durables:
            logger.info(
                "recovered %d message(s) and %d durable subscription(s) from the %s store%s",
                len(recovered.messages),
                len(recovered.durables),
                self.store.kind,
                "" if recovered.clean else " (after an unclean stop)",
            )

    security: Security = attrs.Factory(Security)
    _ssl_context: ssl.SSLContext | None = None

    # -- public --------------------------------------------------------------------------

    def statistics(self) -> BrokerStatistics:
        """A snapshot of the broker's counters. Never blocks."""
        counters = self.router.counters
        queues, topics, temp_queues = self.router.counts
        bytes_in, bytes_out, errors = (
            self._closed_bytes_in,
            self._closed_bytes_out,
            self._closed_errors,
        )
        subscriptions = 0
        for session in self._sessions:
            errors += session.errors_sent
            if session.peer is not None and not session.peer.closed:
                stats = session.peer.statistics()
                bytes_in += stats.bytes_in
                bytes_out += stats.bytes_out
            if session.connection is not None:
                subscriptions += len(session.connection.subscriptions)
        return BrokerStatistics(
            connections=len(self._sessions),
            connections_total=self._connections_total,
            queues=queues,
            topics=topics,
            temp_queues=temp_queues,
            subscriptions=subscriptions,
            messages_enqueued=counters.enqueued,
            messages_delivered=counters.delivered,
            messages_acked=counters.acked,
            messages_queued=counters.queued,
            messages_unacked=counters.unacked,
            messages_redelivered=counters.redelivered,
            messages_dropped=counters.dropped,
            messages_unrouted=counters.unrouted,
            slow_consumers=counters.slow_consumers,
            errors_sent=errors,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            messages_expired=counters.expired,
            messages_dead_lettered=counters.dead_lettered,
            messages_stored=self.store.statistics().stored,
            authentication_failures=self.security.counters.authentication_failures,
            access_refused=self.security.counters.access_refused,
            limits_hit=self.security.limits_hit(slow_consumers=counters.slow_consumers),
        )

    def connect_in_memory(self) -> trio.abc.Stream:
        """Open a connection to this broker over an in-memory stream and return the
        client's end (speak STOMP on it, or wrap it in a client). Like a TCP connection in
        every way (CONNECT timeout included) except that the stream does not push back:
        use TCP to test slow consumers. Never blocks.

        Raises:
          RuntimeError: the broker is shutting down or not running.
        """
        import trio.testing

        if self._closing or self._connections is None:
            raise RuntimeError("the broker is not running")
        client_stream, server_stream = trio.testing.memory_stream_pair()
        self._connections.start_soon(self._handle, server_stream, "memory")
        return client_stream

    def close(self) -> None:
        """Start the graceful shutdown (listeners first). Never blocks; idempotent.
        :func:`open_broker` waits for it to finish when its block exits."""
        self._closing = True
        if self._listeners_scope is not None:
            self._listeners_scope.cancel()

    # -- internals -----------------------------------------------------------------------

    async def _handle(self, stream: trio.abc.Stream, remote: str | None = None) -> None:
        """One connection's task, from accept to close (the session runs in it: one
        coroutine frame per idle connection, not a chain of them)."""
        remote = remote or remote_address(stream)
        refusal = self.security.admit(remote)
        if refusal is not None:
            self._closed_errors += 1
            await _refuse(stream, refusal)
            return
        try:
            number = next(self._session_counter)
            session = Session(
                session_id=f"session-{number}",
                remote=remote,
                config=self.config,
                router=self.router,
                register_heart_beat=self._ticker.add,
                on_closed=self._session_closed,
                store=self.store,
                security=self.security,
            )
            if self._handlers is None:
                self._handlers = frame_handlers(self.router)
            session.handlers = self._handlers
            self._sessions.add(session)
            self._connections_total += 1
            logger.info("connection %s opened from %s", session.session_id, session.remote)
            if self._closing:
                session.shutdown()
            await session.run(stream)
        finally:
            self.security.release(remote)

    def _session_closed(self, session: Session, stats: PeerStatistics | None) -> None:
        self._sessions.discard(session)
        self._closed_errors += session.errors_sent
        if stats is not None:
            self._closed_bytes_in += stats.bytes_in
            self._closed_bytes_out += stats.bytes_out
        logger.info(
            "connection %s from %s closed (%d bytes in, %d bytes out)",
            session.session_id,
            session.remote,
            stats.bytes_in if stats else 0,
            stats.bytes_out if stats else 0,
        )

    async def _serve_listener(self, listener: Listener, connections: trio.Nursery) -> None:
        # trio.serve_listeners handles EMFILE back-off and closes the listener on exit.
        await trio.serve_listeners(self._handle, [listener], handler_nursery=connections)

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        grace = self.config.shutdown_grace
        self.security, self._ssl_context = await load_security(self.config)
        # Shielded: the caller's cancellation starts the graceful shutdown (open_broker's
        # exit calls close()) instead of killing sessions mid-frame. Bounded by the grace.
        with trio.CancelScope(shield=True) as root:
            self._restore(await self.store.open())
            async with trio.open_nursery() as housekeeping:
                housekeeping.start_soon(self._ticker.run)
                await housekeeping.start(self.store.run)
                housekeeping.start_soon(self._sweep_expired)
                async with trio.open_nursery() as connections:
                    self._connections = connections
                    with trio.CancelScope() as self._listeners_scope:
                        if self._closing:
                            self._listeners_scope.cancel()
                        listeners: list[Listener] = []
                        try:
                            for url in self.config.listen:
                                listeners.extend(
                                    await open_listeners(url, ssl_context=self._ssl_context)
                                )
                        except BaseException:
                            for listener in listeners:
                                await trio.aclose_forcefully(listener)
                            raise
                        self.addresses[:] = [listener_url(lst) for lst in listeners]
                        for address in self.addresses:
                            logger.info("listening on %s", address)
                        async with trio.open_nursery() as accepting:
                            for listener in listeners:
                                accepting.start_soon(self._serve_listener, listener, connections)
                            task_status.started()
                            await trio.sleep_forever()  # until close() cancels the scope
                    # 1. listeners are gone. 2. tell every session; bound them by the grace.
                    self._closing = True
                    root.deadline = trio.current_time() + grace + _HARD_STOP_MARGIN
                    connections.cancel_scope.deadline = trio.current_time() + grace
                    sessions = list(self._sessions)
                    if sessions:
                        logger.info("shutting down: closing %d connection(s)", len(sessions))
                    for session in sessions:
                        session.shutdown()
                # 3. sessions are done: commit what they journaled; housekeeping goes last.
                # Shielded from the hard-stop deadline: a flush that was cut short would
                # leave the store marked unclean (safe, but every message "redelivered").
                with trio.CancelScope(shield=True):
                    await self.store.close()
                housekeeping.cancel_scope.cancel()
        self._connections = None
        logger.info("broker stopped")


async def _refuse(stream: trio.abc.Stream, message: str) -> None:
    """Answer a connection the broker will not serve with one ERROR frame (at most one
    second of trying), then close it."""
    frame = Frame("ERROR", (("message", message), ("content-type", "text/plain")), message.encode())
    with trio.move_on_after(1.0):
        try:
            # A WebSocket must answer the client's upgrade before it can carry the ERROR.
            handshake = getattr(stream, "handshake", None)
            if handshake is not None:
                await handshake()
            await stream.send_all(serialize(frame, "1.0"))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await trio.aclose_forcefully(stream)


class _WallClock:
    """Milliseconds since the epoch that advance with Trio's clock (so a test's mock
    clock drives expiry), anchored to the wall clock when made (inside Trio) or else on
    the first call."""

    def __init__(self) -> None:
        self._anchor: tuple[float, float] | None = None
        try:
            self._anchor = (time.time(), trio.current_time())
        except RuntimeError:  # not inside trio.run
            pass

    def __call__(self) -> int:
        now = trio.current_time()
        if self._anchor is None:
            self._anchor = (time.time(), now)
        wall, start = self._anchor
        return int((wall + now - start) * 1000)


def _store_of(router: Router) -> Store:
    journal = router.journal
    return journal if isinstance(journal, Store) else MemoryStore()


def _make_broker(config: Config) -> Broker:
    store = open_store_from_url(config.store, sync=config.store_sync)
    router = Router(
        default_destination_type=config.default_destination_type,
        prefetch=config.prefetch,
        max_prefetch=config.max_prefetch,
        slow_consumer_policy=config.slow_consumer_policy,
        id_prefix=f"{secrets.token_hex(4)}-",
        journal=store if store.persistent else None,
        clock=_WallClock(),
        settings=config.destination_settings if config.destinations else None,
        max_redeliveries=config.max_redeliveries,
        dead_letter_prefix=config.dead_letter_prefix,
        expiry_policy=config.expiry_policy,
        durable_backlog=config.durable_backlog,
        durable_overflow=config.durable_overflow,
    )
    return Broker(config=config, router=router)


@asynccontextmanager
async def open_broker(config: Config | None = None, **settings: Any) -> AsyncIterator[Broker]:
    """Run a broker for the duration of the block.

    ``config`` defaults to ``Config(**settings)``; pass either a :class:`Config` or
    keyword settings (``open_broker(listen=["tcp://127.0.0.1:0"])``), not both.

    Blocks on entry until every listener is bound. On exit (normal, exception or
    cancellation) it shuts down gracefully: listeners stop, each session gets an ERROR
    "broker shutting down" and up to ``shutdown_grace`` seconds to flush, then anything
    left is cancelled; the exit blocks for at most about that long.

    Raises:
      OSError: a listener could not be bound.
      ValueError: invalid settings.
    """
    if config is None:
        config = Config(**settings)
    elif settings:
        raise TypeError("pass either a Config or keyword settings, not both")
    broker = _make_broker(config)
    with unwrap_lone_exception():
        async with trio.open_nursery() as nursery:
            await nursery.start(broker._run)
            try:
                yield broker
            finally:
                broker.close()


async def serve_broker(
    config: Config | None = None,
    *,
    task_status: trio.TaskStatus[Broker] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a broker until cancelled: ``broker = await nursery.start(serve_broker, config)``.

    Reports the running :class:`Broker` through ``task_status`` once every listener is
    bound. Cancelling it runs the graceful shutdown described in :func:`open_broker`.

    Raises: as :func:`open_broker`.
    """
    async with open_broker(config) as broker:
        task_status.started(broker)
        await trio.sleep_forever()
