"""One client connection to the broker: the session.

This module owns the protocol conversation with one client, on top of a
:class:`~trio_stomp._peer.Peer`: the CONNECT timeout, version and heart-beat negotiation,
CONNECTED, the dispatch of every later frame to the routing core, receipts, DISCONNECT,
and the ERROR-then-close answer to any protocol violation. It is also the routing core's
:class:`~._destinations.Sink` for this connection (``write`` queues MESSAGE bytes on the
peer without waiting; ``close`` ends a slow consumer).

The hot path: the session awaits once per received *batch* (``peer.receive_batch()``) and
applies every frame of it synchronously before awaiting again; messages it publishes are
written to the subscribers' peers with ``send_bytes_nowait`` (never an await per frame).
Only receipts that find this connection's own outbound buffer full are deferred to the
end of the batch and awaited there, which pushes back on this client: its frames are not
read while it does not read ours.

With a persistent store, a RECEIPT is only sent once everything the store had journaled
when the receipted frame was applied is committed (a persistent SEND is on disk before its
RECEIPT). Such receipts wait, in order, in a bounded queue that one receipt task of the
session sends as commits complete, so the session keeps reading and routing while the
disk works (many batches share one commit). While the store holds too much uncommitted
data, or too many receipts wait, the session stops reading.

It must never raise out of :meth:`Session.run` (one bad connection never takes the broker
down: unexpected errors are logged and close only this connection), never outlive the
broker's connections nursery, and never touch another connection except through the
routing core.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Final

import attrs
import trio

from .._errors import ConnectionLost, HeartbeatTimeout, RemoteProtocolError
from .._frames import Frame
from .._negotiation import (
    SUPPORTED_VERSIONS,
    choose_version,
    format_heart_beat,
    negotiate_heart_beat,
    parse_heart_beat,
)
from .._peer import Peer, PeerStatistics, start_inline_peer
from ._auth import AUTHENTICATION_FAILED, Principal, Security
from ._config import Config
from ._destinations import Connection
from ._listeners import peer_certificate
from ._router import Router
from ._store import Store

__all__ = ["Session"]

logger: Final = logging.getLogger("trio_stomp.broker")

#: Commands that may carry a body (STOMP 1.2 "Frames and headers").
_BODY_COMMANDS: Final = frozenset({"SEND"})
_LOST: Final = "connection lost"
#: RECEIPTs that may wait for the store per connection before it stops reading frames.
_MAX_STORE_RECEIPTS: Final = 10_000


@attrs.define(eq=False)
class Session:
    """One client connection. Made by the broker; :meth:`run` serves it to the end.

    Attributes:
      session_id: the ``session`` header of CONNECTED; unique in the broker.
      remote: a printable peer address (``"127.0.0.1:53422"``, ``"memory"``).
      version: the negotiated version, once CONNECTED was sent.
      principal: who the client is, once authenticated.
    """

    session_id: str
    remote: str
    config: Config
    router: Router
    register_heart_beat: Callable[[Peer], None]
    on_closed: Callable[[Session, PeerStatistics | None], None]
    store: Store | None = None
    #: command -> router method; the broker shares one dict between its sessions (a dict
    #: of eight bound methods per connection is ~0.6 KiB of an idle connection's memory).
    handlers: dict[str, Callable[[Connection, Frame], object]] | None = None
    version: str | None = None
    peer: Peer | None = None
    connection: Connection | None = None
    security: Security | None = None
    principal: Principal | None = None
    errors_sent: int = 0
    _stop_reason: str | None = None
    _shutting_down: bool = False
    _wake: trio.CancelScope | None = None
    _nursery: trio.Nursery | None = None
    _draining: bool = False
    _deferred: list[Frame] = attrs.Factory(list)
    _life: trio.CancelScope | None = None
    # (store position, RECEIPT) waiting for the store's commit, in order; sent by
    # _send_receipts. Bounded: the session stops reading at _MAX_STORE_RECEIPTS.
    # The queue and its events are made when the first receipt has to wait (most
    # connections never need them: memory per idle connection).
    _store_receipts: deque[tuple[int, Frame]] | None = None
    _store_receipts_wake: trio.Event | None = None
    _store_receipts_idle: trio.Event | None = None
    _store_receipts_task: bool = False

    # -- control from outside (broker, routing core) -----------------------------------

    def shutdown(self) -> None:
        """The broker is shutting down: send ERROR "broker shutting down" and close.
        Never blocks."""
        self._shutting_down = True
        self._stop("broker shutting down")

    def _stop(self, reason: str) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
        if self._wake is not None:
            self._wake.cancel()

    # Sink: called by the routing core, possibly from another session's task.
    def write(self, data: bytes) -> bool:
        """Queue MESSAGE bytes for this client; False (nothing queued) when its buffer is
        full (a drain watcher then resumes deliveries) or the connection is broken."""
        peer = self.peer
        assert peer is not None
        try:
            peer.send_bytes_nowait(data)
        except trio.WouldBlock:
            if not self._draining and self._nursery is not None:
                self._draining = True
                self._nursery.start_soon(self._wait_drained, peer)
            return False
        except ConnectionLost:
            if self.connection is not None:
                self.connection.alive = False
            self._stop(_LOST)
            return False
        return True

    def close(self, message: str) -> None:
        """The routing core gave up on this connection (a slow consumer)."""
        self._stop(message)

    async def _wait_drained(self, peer: Peer) -> None:
        try:
            await peer.flush()
        except ConnectionLost:
            return
        finally:
            self._draining = False
        if self.connection is not None:
            self.router.resume(self.connection)

    # -- the conversation --------------------------------------------------------------

    async def run(self, stream: trio.abc.Stream) -> None:
        """Serve the connection until it ends; closes ``stream``. Never raises except
        ``trio.Cancelled`` (the broker's hard shutdown deadline)."""
        config = self.config
        stats: PeerStatistics | None = None
        try:
            # The whole life of the connection, and the only nursery and cancel scope it
            # keeps while idle besides _loop's: the peer's writer (while the socket is full)
            # and the session's helper tasks run here. When it is time to close, a deadline
            # is set on its scope so flushing the last frames is bounded.
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._life = nursery.cancel_scope
                # Inline reading: this task is the only reader and routes each batch
                # synchronously, so a reader task and channel would only cost memory.
                self.peer = peer = start_inline_peer(
                    nursery,
                    stream,
                    version="1.2",
                    max_send_buffer=config.max_send_buffer,
                    heart_beat_tolerance=config.heart_beat_tolerance,
                    **config.parser_limits(),
                )
                try:
                    # The conversation is here rather than in a method of its own: a
                    # coroutine frame fewer per idle connection.
                    if await self._handshake(peer):
                        try:
                            await self._loop(peer)
                        except RemoteProtocolError as exc:
                            await self._error(str(exc))
                        except HeartbeatTimeout as exc:
                            logger.info(
                                "session %s (%s) closed: %s", self.session_id, self.remote, exc
                            )
                        except ConnectionLost as exc:
                            if self._stop_reason is not None and self._stop_reason != _LOST:
                                await self._error(self._stop_reason)
                            else:
                                logger.info(
                                    "session %s (%s) closed: %s", self.session_id, self.remote, exc
                                )
                except BaseException:
                    self._nursery = None
                    stats = peer.statistics()
                    await trio.aclose_forcefully(peer)
                    raise
                self._nursery = None
                stats = peer.statistics()
                self._closing_deadline()
                await peer.aclose()
                nursery.cancel_scope.cancel()  # the helper tasks
        except Exception:
            logger.exception("session %s (%s) failed", self.session_id, self.remote)
        finally:
            self._life = None
            if self.connection is not None:
                self.router.disconnect(self.connection)
            self.on_closed(self, stats)

    async def _handshake(self, peer: Peer) -> bool:
        """The CONNECT frame: True once CONNECTED is queued, False if the connection must
        close (ERROR sent, or the client left)."""
        config = self.config
        with trio.CancelScope() as self._wake:
            if self._stop_reason is not None:
                self._wake.cancel()
            with trio.move_on_after(config.connect_timeout) as timeout:
                try:
                    frame = await peer.receive()
                    frame.headers.raw  # noqa: B018 - decode now: a bad header line raises here
                except RemoteProtocolError as exc:
                    await self._error(str(exc))
                    return False
                except ConnectionLost as exc:
                    logger.info(
                        "connection %s (%s) ended before CONNECT: %s",
                        self.session_id,
                        self.remote,
                        exc,
                    )
                    return False
        if self._wake.cancelled_caught:
            await self._error(self._stop_reason or "closing")
            return False
        if timeout.cancelled_caught:
            await self._error(f"no CONNECT frame within {config.connect_timeout:g} s")
            return False
        if not await self._authenticate(peer, frame):
            return False
        if not self._connect(peer, frame):
            return False
        assert self.connection is not None
        logger.info(
            "session %s (%s) connected with STOMP %s", self.session_id, self.remote, self.version
        )
        return True

    async def _authenticate(self, peer: Peer, frame: Frame) -> bool:
        """Ask the security policy who the client is; False (ERROR sent) if refused.
        A refusal says ``authentication failed`` and nothing else, whatever the reason."""
        security = self.security
        if security is None or frame.command not in ("CONNECT", "STOMP"):
            return True
        principal = None
        with trio.CancelScope() as self._wake:
            if self._stop_reason is not None:
                self._wake.cancel()
            principal = await security.authenticate(
                frame, self.remote, peer_certificate(peer.stream)
            )
        if self._wake.cancelled_caught:
            await self._error(self._stop_reason or "closing")
            return False
        if principal is None:
            await self._error(AUTHENTICATION_FAILED)
            return False
        self.principal = principal
        return True

    def _connect(self, peer: Peer, frame: Frame) -> bool:
        """Handle the first frame; False if the connection must close (ERROR queued)."""
        if frame.command not in ("CONNECT", "STOMP"):
            self._queue_error(f"expected a CONNECT or STOMP frame, got {frame.command}", frame)
            return False
        headers = frame.headers
        version = choose_version(headers.get("accept-version"))
        if version is None:
            self._queue_error(
                "no protocol version in common: this broker supports "
                + ", ".join(SUPPORTED_VERSIONS),
                frame,
                extra=(("version", ",".join(SUPPORTED_VERSIONS)),),
            )
            return False
        client_heart_beat = (0, 0)
        if version != "1.0":
            try:
                client_heart_beat = parse_heart_beat(headers.get("heart-beat"))
            except RemoteProtocolError as exc:
                self._queue_error(str(exc), frame)
                return False
        # Seam (issue 5): authenticate login/passcode here, before CONNECTED.
        self.version = version
        peer.version = version
        connected: list[tuple[str, str]] = [
            ("version", version),
            ("session", self.session_id),
            ("server", self.config.server_name),
        ]
        if version != "1.0":
            connected.insert(1, ("heart-beat", format_heart_beat(self.config.heart_beat)))
        peer.send_nowait(Frame("CONNECTED", connected))
        self.connection = self.router.connect(self.session_id, version, self)
        self.connection.client_id = headers.get("client-id") or None
        if self.principal is not None and not self.principal.anonymous:
            self.connection.user_id = self.principal.name
        send_every, expect_every = negotiate_heart_beat(self.config.heart_beat, client_heart_beat)
        if send_every or expect_every:
            peer.set_heart_beat(send_every, expect_every)
            self.register_heart_beat(peer)
        return True

    async def _loop(self, peer: Peer) -> None:
        connection = self.connection
        assert connection is not None
        router = self.router
        handlers = self.handlers or frame_handlers(router)
        deferred = self._deferred
        security = self.security
        principal = self.principal
        checks = security.checks if security is not None and principal is not None else {}
        with trio.CancelScope() as self._wake:
            if self._stop_reason is not None:
                self._wake.cancel()
            while True:
                batch = await peer.receive_batch()
                for frame in batch:
                    command = frame.command
                    handler = handlers.get(command)
                    try:
                        if handler is None:
                            self._check_other(frame)
                            # DISCONNECT: nothing after it is processed.
                            await self._disconnect(peer, frame)
                            return
                        if frame.body and command not in _BODY_COMMANDS:
                            raise RemoteProtocolError(f"a {command} frame must not have a body")
                        check = checks.get(command)
                        if check is None:
                            handler(connection, frame)
                        else:
                            assert principal is not None
                            if not check(router, connection, principal, frame):
                                handler(connection, frame)  # (True: the check applied it)
                    except RemoteProtocolError as exc:
                        await self._error(str(exc), frame)
                        return
                    headers = frame.headers
                    first = headers._first  # decoded (SEND, ACK): a dict lookup, no call
                    receipt = headers.get("receipt") if first is None else first.get("receipt")
                    if receipt is not None:
                        self._control(peer, Frame("RECEIPT", (("receipt-id", receipt),)))
                    if self._stop_reason is not None:
                        break
                if deferred:
                    while deferred:
                        await peer.send(deferred[0])
                        del deferred[0]
                store = self.store
                if store is not None and (
                    store.backlogged or len(self._store_receipts or ()) > _MAX_STORE_RECEIPTS
                ):
                    await store.wait_committed(store.barrier())
                if self._stop_reason is not None:
                    break
        if self._stop_reason == _LOST:
            return
        await self._error(self._stop_reason or "closing")

    def _check_other(self, frame: Frame) -> None:
        command = frame.command
        if command == "DISCONNECT":
            if frame.body:
                raise RemoteProtocolError("a DISCONNECT frame must not have a body")
            return
        if command in ("CONNECT", "STOMP"):
            raise RemoteProtocolError(f"already connected: unexpected {command} frame")
        raise RemoteProtocolError(f"unknown command {command!r}")

    def _control(self, peer: Peer, frame: Frame) -> None:
        """Queue a RECEIPT without waiting; defer it (in order) if the buffer is full or
        the store has not yet committed what was journaled before it."""
        store = self.store
        if store is not None:
            position = store.barrier()
            if self._store_receipts or not store.is_committed(position):
                if self._store_receipts is None:
                    self._store_receipts = deque()
                self._store_receipts.append((position, frame))
                if not self._store_receipts_task and self._nursery is not None:
                    self._store_receipts_task = True
                    self._nursery.start_soon(self._send_receipts, peer, store)
                if self._store_receipts_wake is not None:
                    self._store_receipts_wake.set()
                return
        if not self._deferred:
            try:
                peer.send_nowait(frame)
                return
            except trio.WouldBlock:
                pass
        self._deferred.append(frame)

    async def _send_receipts(self, peer: Peer, store: Store) -> None:
        """The receipt task: send each waiting RECEIPT, in order, once the store has
        committed its position. Sends nothing once the conversation is over (``_nursery``
        is None: the last frames, an ERROR, are being flushed), and ends with the session
        (its nursery is cancelled after the flush), or when the store failed: then the
        session closes and those receipts are never sent (the store task's error takes the
        broker down; raising it here too would only add it to the session's exception
        group beside the broker's cancellation)."""
        pending = self._store_receipts
        assert pending is not None
        while True:
            if not pending:
                if self._store_receipts_idle is not None:
                    self._store_receipts_idle.set()
                self._store_receipts_wake = trio.Event()
                await self._store_receipts_wake.wait()
                continue
            try:
                await store.wait_committed(pending[-1][0])
            except RuntimeError:
                pending.clear()
                if self._store_receipts_idle is not None:
                    self._store_receipts_idle.set()
                self._stop("the message store failed")
                return
            if self._nursery is None:
                return  # the conversation is over: nothing goes out after its last frame
            try:
                # Everything committed goes out without an await per frame; only a full
                # outbound buffer makes this task wait (in order).
                while pending and self._nursery is not None and store.is_committed(pending[0][0]):
                    frame = pending.popleft()[1]
                    try:
                        peer.send_nowait(frame)
                    except trio.WouldBlock:
                        await peer.send(frame)
            except ConnectionLost:
                pending.clear()
                if self._store_receipts_idle is not None:
                    self._store_receipts_idle.set()
                return

    async def _disconnect(self, peer: Peer, frame: Frame) -> None:
        self._leave()
        store = self.store
        if store is not None:
            # Everything applied so far is committed, and its receipts are out, first.
            await store.wait_committed(store.barrier())
            while self._store_receipts:
                self._store_receipts_idle = trio.Event()
                await self._store_receipts_idle.wait()
        for pending in self._deferred:
            await peer.send(pending)
        self._deferred.clear()
        receipt = frame.headers.get("receipt")
        if receipt is not None:
            await peer.send(Frame("RECEIPT", (("receipt-id", receipt),)))
        logger.info("session %s (%s) disconnected", self.session_id, self.remote)

    # -- errors ------------------------------------------------------------------------

    def _error_frame(
        self,
        message: str,
        offending: Frame | None,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> Frame:
        headers: list[tuple[str, str]] = [("message", _one_line(message))]
        body = message
        if offending is not None:
            try:
                raw = offending.headers.raw
            except RemoteProtocolError:  # the headers themselves were the offence (fuzzing)
                raw = ()
            receipt = next((value for name, value in raw if name == "receipt"), None)
            if receipt is not None and offending.command not in ("CONNECT", "STOMP"):
                headers.append(("receipt-id", receipt))
            shown = "\n".join(
                f"{name}:{'***' if name == 'passcode' else value}" for name, value in raw
            )
            body = (
                f"{message}\n\nThe offending frame:\n-----\n{offending.command}\n{shown}\n-----\n"
            )
        headers.extend(extra)
        headers.append(("content-type", "text/plain"))
        self.errors_sent += 1
        if self.security is not None:
            self.security.observe_error(message)
        logger.warning("session %s (%s): ERROR %s", self.session_id, self.remote, message)
        return Frame("ERROR", headers, body.encode("utf-8", "replace"))

    def _queue_error(
        self,
        message: str,
        offending: Frame | None = None,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> None:
        assert self.peer is not None
        frame = self._error_frame(message, offending, extra)
        try:
            self.peer.send_nowait(frame)
        except (trio.WouldBlock, ConnectionLost):
            pass

    async def _error(self, message: str, offending: Frame | None = None) -> None:
        """Send ERROR (waiting at most the shutdown grace for room), then return: the
        caller closes the connection."""
        assert self.peer is not None
        self._leave()
        frame = self._error_frame(message, offending)
        # Sending the ERROR and flushing it on close share one grace period, after which
        # the connection is closed forcefully (a client that does not read gets no more).
        self._closing_deadline()
        try:
            await self.peer.send(frame)
        except ConnectionLost:
            pass

    def _leave(self) -> None:
        """The connection is ending: no more deliveries to it, its transactions are aborted
        and its unacknowledged messages go back now, not after the last flush."""
        if self.connection is not None:
            self.router.disconnect(self.connection)

    def _closing_deadline(self) -> None:
        life = self._life
        if life is not None:
            life.deadline = min(life.deadline, trio.current_time() + self.config.shutdown_grace)


def frame_handlers(router: Router) -> dict[str, Callable[[Connection, Frame], object]]:
    """The router method that applies each command after CONNECT (DISCONNECT aside)."""
    return {
        "SEND": router.send,
        "SUBSCRIBE": router.subscribe,
        "UNSUBSCRIBE": router.unsubscribe,
        "ACK": router.ack,
        "NACK": router.nack,
        "BEGIN": router.begin,
        "COMMIT": router.commit,
        "ABORT": router.abort,
    }


def _one_line(text: str) -> str:
    line = text.replace("\r", " ").replace("\n", " ")
    return line if len(line) <= 1000 else line[:997] + "..."
