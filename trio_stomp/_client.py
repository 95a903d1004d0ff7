"""The high-level STOMP client: ``open_client(...)`` → :class:`Client`.

This module owns everything a client application sees: connecting and negotiating (version,
heart-beats, ``host``/login), sending with optional receipts, subscriptions (async context
managers yielding :class:`Message` values with ``ack()``/``nack()``), transactions,
request/reply over ``/temp-queue/``, a graceful DISCONNECT, and opt-in reconnection with
back-off across a list of brokers. It stands on :mod:`trio_stomp._peer`; it never reads bytes
and writes them only through ``_encode``, a fast path for plain frames that defers to
:func:`~trio_stomp.serialize` for anything needing escaping. It never imports the broker.

Three layers, as in trio-websocket:

- :func:`open_client` takes ``stomp://`` / ``stomp+ssl://`` / ``ws://`` / ``wss://`` URLs (a
  list means failover; :data:`TRANSPORTS` maps schemes to stream openers);
- :func:`open_client_over_stream_factory` takes zero-argument async callables that open a
  ``trio.abc.Stream`` (the seam for other transports, e.g. WebSocket, and for tests);
- :func:`open_client_over_stream` takes one existing stream (no reconnection possible).

Tasks and data flow
-------------------
``open_client`` runs one *supervisor* task in its nursery. The supervisor opens a stream,
runs a :class:`~trio_stomp.Peer` over it, negotiates, re-sends SUBSCRIBE for every live
subscription, and then *dispatches*: it takes whole batches from ``peer.receive_batch()`` and,
without awaiting per frame, hands MESSAGE frames to their subscription's buffer (by the
``subscription`` header), resolves receipt and request waiters, and turns an ERROR frame into
:class:`BrokerError`. When the connection is lost it reconnects if a
:class:`ReconnectPolicy` says so, or fails the client.

Slow consumers and heart-beats (the choice we made)
---------------------------------------------------
Each subscription has a bounded buffer (``max_buffer`` messages). When it is full the
dispatcher *waits* for the application, so it stops taking batches from the peer; the peer's
inbound channel fills, its reader stops reading, TCP's window closes, and the broker is pushed
back. Nothing grows without bound. (The dispatcher resumes once the buffer is half empty, so it
hands messages over in runs rather than one per ``receive``.) Because one TCP connection
carries everything, a stalled subscription also delays receipts and other subscriptions on the
same connection (use a second client for independent flows).

The heart-beat watchdog must not mistake that stall for a dead broker. The peer's reader keeps
reading (and counting every byte as liveness) as long as its inbound channel has room; once it
is blocked on a full channel, the watchdog is *suspended* — we know the broker is alive, we hold
unread frames from it — and restarts with a fresh window the moment the application catches up
and the reader resumes. Our outgoing heart-beats are written by the peer's own timer, which does
not depend on the dispatcher, so the broker keeps seeing us alive during our stall. A broker that
died while we were stalled is detected at most one window (``expect * tolerance``) after we
resume reading.

Reconnection
------------
With ``reconnect=ReconnectPolicy(...)``: after a connection is lost (EOF, reset, heart-beat
timeout) the supervisor tries the endpoints in turn, waiting
``min(max_delay, initial_delay * multiplier**n) * (1 - jitter * U[0, 1))`` before attempt
``n`` (0, 1, 2, ... since the last working connection), gives up after ``max_attempts``
consecutive failures, re-sends CONNECT and re-subscribes every live subscription (with the same
ids). Buffered messages of ``client``/``client-individual`` subscriptions that arrived on the
lost connection are dropped: the broker redelivers them. An ERROR frame after CONNECTED (a
broker shutting down says so with one) is retried too, but counts as a failed attempt (no reset
of the back-off), so an ERROR our own frames provoke ends at ``max_attempts``; an ERROR answering
CONNECT (bad credentials) and protocol errors are never retried. Without a policy, a lost
connection or an ERROR fails the client.

What happens to calls while the link is down: ``send``, ``subscribe``, ``request`` and
``transaction`` wait for the next connection (bounded by the caller's cancel scope), or raise
:class:`ConnectionLost` at once with ``ReconnectPolicy(wait_for_connection=False)``. Nothing is
dropped silently, but a frame *queued* just before a loss may or may not have reached the broker:
``receipt=True`` is the way to know. A receipt, request or transaction in flight when the link
drops raises :class:`ConnectionLost`; it is not retried (it may have been processed).
"""

from __future__ import annotations

import copy
import math
import random
import re
import ssl
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, Literal, NoReturn, Union
from urllib.parse import SplitResult, unquote, urlsplit

import attrs
import trio

from ._codec import serialize
from ._errors import (
    BrokerError,
    ConnectionLost,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    StompError,
)
from ._frames import Frame, Headers
from ._negotiation import (
    SUPPORTED_VERSIONS,
    format_heart_beat,
    negotiate_heart_beat,
    parse_heart_beat,
)
from ._peer import Peer, PeerStatistics, open_peer
from ._util import unwrap_lone_exception

__all__ = [
    "AckMode",
    "Client",
    "ClientStatistics",
    "Message",
    "ReconnectPolicy",
    "StreamFactory",
    "Subscription",
    "Transaction",
    "open_client",
    "open_client_over_stream",
    "open_client_over_stream_factory",
]

AckMode = Literal["auto", "client", "client-individual"]
_ACK_MODES: Final = ("auto", "client", "client-individual")

#: A zero-argument async callable that opens a new stream to a broker.
StreamFactory = Callable[[], Awaitable[trio.abc.Stream]]
#: ``(url, ssl_context) -> stream``: how a URL scheme is turned into a stream.
Transport = Callable[[SplitResult, Union[ssl.SSLContext, None]], Awaitable[trio.abc.Stream]]

Body = Union[bytes, bytearray, memoryview, str]
HeadersArg = Union[Mapping[str, str], Iterable[tuple[str, str]], None]

TEXT_CONTENT_TYPE: Final = "text/plain;charset=utf-8"
DEFAULT_PORTS: Final = {"stomp": 61613, "tcp": 61613, "stomp+ssl": 61614, "ssl": 61614}
REPLY_TO: Final = "/temp-queue/trio-stomp-replies"


# ----------------------------------------------------------------------- transports


async def _open_tcp(url: SplitResult, ssl_context: ssl.SSLContext | None) -> trio.abc.Stream:
    return await trio.open_tcp_stream(url.hostname or "localhost", url.port or 61613)


async def _open_ssl(url: SplitResult, ssl_context: ssl.SSLContext | None) -> trio.abc.Stream:
    return await trio.open_ssl_over_tcp_stream(
        url.hostname or "localhost",
        url.port or 61614,
        ssl_context=ssl_context or ssl.create_default_context(),
    )


async def _open_websocket(url: SplitResult, ssl_context: ssl.SSLContext | None) -> trio.abc.Stream:
    # Imported here: STOMP over WebSocket needs the ``websocket`` extra (wsproto).
    from ._websocket import open_websocket_stream

    return await open_websocket_stream(url.geturl(), ssl_context=ssl_context)


#: URL scheme → transport. Other transports register here; each returns a connected
#: ``trio.abc.Stream`` carrying STOMP bytes.
TRANSPORTS: dict[str, Transport] = {
    "stomp": _open_tcp,
    "tcp": _open_tcp,
    "stomp+ssl": _open_ssl,
    "stomp+tls": _open_ssl,
    "ssl": _open_ssl,
    "ws": _open_websocket,
    "wss": _open_websocket,
}


@attrs.frozen
class _Endpoint:
    description: str
    host: str | None  # the default ``host`` header (None: "localhost")
    login: str | None
    passcode: str | None
    open: StreamFactory


def _endpoint_from_url(url: str, ssl_context: ssl.SSLContext | None) -> _Endpoint:
    parts = urlsplit(url)
    transport = TRANSPORTS.get(parts.scheme)
    if transport is None:
        raise ValueError(
            f"unsupported URL scheme {parts.scheme!r} in {url!r}; "
            f"supported: {', '.join(sorted(TRANSPORTS))}"
        )

    async def open_stream() -> trio.abc.Stream:
        return await transport(parts, ssl_context)

    shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    return _Endpoint(
        description=shown,
        host=parts.hostname,
        login=unquote(parts.username) if parts.username else None,
        passcode=unquote(parts.password) if parts.password else None,
        open=open_stream,
    )


# ----------------------------------------------------------------------- values


@attrs.frozen
class ReconnectPolicy:
    """When and how often to reconnect after a connection is lost.

    Attributes:
      max_attempts: consecutive failed attempts before giving up (``None``: never give up;
        bound it with a cancel scope). Counted from the last working connection.
      initial_delay: seconds before the first attempt after a loss.
      max_delay: the longest wait between two attempts, in seconds.
      multiplier: each failed attempt multiplies the delay by this.
      jitter: the fraction of the delay that is random (0: none, 1: "full jitter"), so a
        fleet of clients does not reconnect in lockstep.
      wait_for_connection: while disconnected, ``send``/``subscribe``/``request`` wait for the
        link (``True``) or raise :class:`ConnectionLost` at once (``False``).
    """

    max_attempts: int | None = None
    initial_delay: float = 0.1
    max_delay: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5
    wait_for_connection: bool = True

    def __attrs_post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1 or None")
        if self.initial_delay < 0 or self.max_delay < 0 or self.multiplier < 1:
            raise ValueError("delays must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before attempt ``attempt`` (0, 1, 2... since the last success)."""
        base = min(self.max_delay, self.initial_delay * self.multiplier ** min(attempt, 64))
        if self.jitter:
            base *= 1 - self.jitter * (rng or random).random()
        return base


@attrs.frozen
class ClientStatistics:
    """A snapshot of a client's counters, from :meth:`Client.statistics`.

    Attributes:
      connected: a connection is up right now.
      connections: successful connections so far (1 + reconnections).
      subscriptions: live subscriptions.
      pending_receipts: frames sent with a receipt that has not come back yet.
      pending_requests: :meth:`Client.request` calls waiting for their reply.
      messages_received: MESSAGE frames dispatched to a subscription or a request.
      messages_unroutable: MESSAGE frames for no live subscription (dropped; a broker sends
        these briefly after an UNSUBSCRIBE).
      peer: the current connection's :class:`PeerStatistics` (``None`` when disconnected).
    """

    connected: bool
    connections: int
    subscriptions: int
    pending_receipts: int
    pending_requests: int
    messages_received: int
    messages_unroutable: int
    peer: PeerStatistics | None


def _reraise(error: BaseException) -> NoReturn:
    # Raise a fresh copy, chained to the shared original (see _peer._reraise).
    raise copy.copy(error) from error


@attrs.define(eq=False)
class _Waiter:
    """One pending receipt or request reply."""

    event: trio.Event = attrs.Factory(trio.Event)
    value: Message | None = None
    error: StompError | None = None

    def resolve(self, value: Message | None = None) -> None:
        if not self.event.is_set():
            self.value = value
            self.event.set()

    def fail(self, error: StompError) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()

    async def wait(self) -> Message | None:
        await self.event.wait()
        if self.error is not None:
            _reraise(self.error)
        return self.value


# ----------------------------------------------------------------------- messages


@attrs.define(eq=False)
class Message:
    """A MESSAGE frame received on a subscription (or as the reply to a request).

    Attributes:
      frame: the whole frame.
      subscription: the :class:`Subscription` it arrived on (``None`` for a request's reply).
    """

    frame: Frame
    subscription: Subscription | None
    _generation: int
    _seq: int
    _settled: bool = False

    @property
    def body(self) -> bytes:
        """The body, exactly as sent (NULs included)."""
        return self.frame.body

    @property
    def text(self) -> str:
        """The body decoded with the ``charset`` of ``content-type`` (UTF-8 by default)."""
        charset = "utf-8"
        for param in (self.frame.headers.get("content-type") or "").split(";")[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "charset" and value.strip():
                charset = value.strip().strip('"')
        return self.frame.body.decode(charset)

    @property
    def headers(self) -> Headers:
        """The frame's headers (first value wins; ``headers.raw`` keeps every pair)."""
        return self.frame.headers

    @property
    def destination(self) -> str:
        """The ``destination`` header ("" when the broker left it out)."""
        return self.frame.headers.get("destination") or ""

    @property
    def message_id(self) -> str:
        """The ``message-id`` header ("" when the broker left it out)."""
        return self.frame.headers.get("message-id") or ""

    @property
    def content_type(self) -> str | None:
        """The ``content-type`` header, if any."""
        return self.frame.headers.get("content-type")

    def _client(self) -> Client:
        if self.subscription is None:
            raise LocalProtocolError("a reply to a request cannot be acknowledged (ack:auto)")
        return self.subscription._client

    async def ack(self, *, transaction: Transaction | None = None, receipt: bool = False) -> None:
        """Acknowledge this message (``client`` mode: this and every earlier one).

        Sends ACK keyed as the negotiated version requires (1.2: ``id`` = the MESSAGE's ``ack``
        header; 1.1: ``message-id`` + ``subscription``; 1.0: ``message-id``). Acknowledging a
        message twice, or one already covered by a cumulative ``client`` ACK, sends nothing.
        If the connection this message arrived on was lost (and the client reconnected), the
        broker has already put it back for redelivery, so this does nothing.

        Blocks while the outbound buffer is full, and with ``receipt=True`` until the RECEIPT.

        Raises:
          LocalProtocolError: the subscription is ``ack:auto``.
          ConnectionLost, BrokerError: the client failed (or, with ``receipt=True``, the link
            dropped before the RECEIPT).
        """
        await self._client()._settle(self, "ACK", transaction, receipt)

    async def nack(self, *, transaction: Transaction | None = None, receipt: bool = False) -> None:
        """Refuse this message (STOMP 1.1 and later): the broker redelivers or dead-letters it.

        Same keying, blocking and errors as :meth:`ack`; also raises
        :class:`LocalProtocolError` on a STOMP 1.0 connection (1.0 has no NACK).
        """
        await self._client()._settle(self, "NACK", transaction, receipt)

    def __repr__(self) -> str:
        return f"<Message {self.message_id!r} on {self.destination!r} ({len(self.body)} bytes)>"


@attrs.define(eq=False)
class Subscription:
    """A live subscription, from ``async with client.subscribe(...) as sub``.

    Iterate it (``async for message in sub``) or call :meth:`receive`. Its buffer holds at
    most ``max_buffer`` messages; when full, the client stops reading from the broker (see the
    module notes on back-pressure).

    Attributes:
      id: the subscription id (the ``id`` header of SUBSCRIBE).
      destination: what was subscribed to.
      ack_mode: ``"auto"``, ``"client"`` or ``"client-individual"``.
      headers: the extra SUBSCRIBE headers (e.g. ``prefetch-count``, ``selector``).
    """

    id: str
    destination: str
    ack_mode: AckMode
    headers: Headers
    _client: Client
    _max_buffer: int
    # Messages not yet received. Bounded: the dispatcher appends only below _max_buffer.
    _buffer: deque[Message] = attrs.Factory(deque)
    _readable: trio.Event = attrs.Factory(trio.Event)
    _room: trio.Event | None = None  # set by receivers when the dispatcher waits for room
    _closed: bool = False
    _generation: int = -1
    _seq: int = 0
    _settled_upto: int = 0

    def _pairs(self) -> list[tuple[str, str]]:
        pairs = [("destination", self.destination), ("id", self.id), ("ack", self.ack_mode)]
        pairs.extend(self.headers.raw)
        return pairs

    def _deliver(self, frame: Frame, generation: int) -> Message:
        self._seq += 1
        return Message(frame, self, generation, self._seq)

    def _put_nowait(self, message: Message) -> bool:
        """Buffer ``message``; False when the buffer is full. Messages for a closed
        subscription are dropped (True: nothing to wait for)."""
        if self._closed:
            return True
        if len(self._buffer) >= self._max_buffer:
            return False
        self._buffer.append(message)
        self._readable.set()
        return True

    async def _wait_for_room(self) -> None:
        # Hysteresis: wake the dispatcher when the buffer is half empty, not at every
        # receive, so that it hands over messages in runs instead of one by one.
        while not self._closed and len(self._buffer) >= self._max_buffer:
            self._room = trio.Event()
            await self._room.wait()

    def _close(self) -> None:
        self._closed = True
        self._readable.set()
        if self._room is not None:
            self._room.set()

    def _purge(self) -> None:
        # Drop messages that arrived on a lost connection (client modes: redelivered).
        self._buffer.clear()
        if self._room is not None:
            self._room.set()

    def _pop(self) -> Message:
        message = self._buffer.popleft()
        room = self._room
        if room is not None and len(self._buffer) <= self._max_buffer // 2:
            self._room = None
            room.set()
        return message

    def _raise_ended(self) -> NoReturn:
        error = self._client._error
        _reraise(error if error is not None else ConnectionLost("the subscription has ended"))

    async def receive(self) -> Message:
        """Return the next message. Blocks until one arrives; cancellation-atomic.

        Messages buffered before the client failed are still delivered, then the error.

        Raises:
          ConnectionLost: the client failed, or was closed, or the subscription has ended.
          BrokerError: the broker sent an ERROR frame (the client failed).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._buffer:
            message = self._pop()
            await trio.lowlevel.cancel_shielded_checkpoint()
            return message
        while not self._buffer:
            if self._closed:
                self._raise_ended()
            self._readable = trio.Event()
            await self._readable.wait()
        return self._pop()

    def receive_nowait(self) -> Message:
        """Return a buffered message, or raise ``trio.WouldBlock`` when there is none."""
        if self._buffer:
            return self._pop()
        if self._closed:
            self._raise_ended()
        raise trio.WouldBlock

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        return await self.receive()

    @property
    def buffered(self) -> int:
        """Messages waiting in this subscription's buffer."""
        return len(self._buffer)


@attrs.define(eq=False)
class Transaction:
    """An open transaction, from ``async with client.transaction() as tx``.

    Frames sent through it take effect only, and atomically, when the block ends normally
    (COMMIT); an exception or cancellation aborts it (ABORT). A transaction lives on one
    connection: if that connection is lost, the broker aborts it, and every later call (and
    the commit) raises :class:`ConnectionLost`.
    """

    id: str
    _client: Client
    _generation: int
    _settled: list[tuple[Message, str]] = attrs.Factory(list)

    async def send(
        self,
        destination: str,
        body: Body = b"",
        *,
        headers: HeadersArg = None,
        content_type: str | None = None,
        receipt: bool = False,
    ) -> None:
        """:meth:`Client.send` inside this transaction."""
        await self._client.send(
            destination,
            body,
            headers=headers,
            content_type=content_type,
            receipt=receipt,
            transaction=self,
        )

    async def ack(self, message: Message, *, receipt: bool = False) -> None:
        """:meth:`Message.ack` inside this transaction."""
        await message.ack(transaction=self, receipt=receipt)

    async def nack(self, message: Message, *, receipt: bool = False) -> None:
        """:meth:`Message.nack` inside this transaction."""
        await message.nack(transaction=self, receipt=receipt)


# ----------------------------------------------------------------------- the client


@attrs.define(eq=False, init=False)
class Client:
    """A STOMP client connection (surviving reconnections). Made by :func:`open_client`.

    Safe to use from many tasks at once.

    Attributes (of the current connection, updated on reconnection):
      version: the negotiated STOMP version (``"1.0"``, ``"1.1"`` or ``"1.2"``).
      server: the CONNECTED frame's ``server`` header, if any.
      session: the CONNECTED frame's ``session`` header, if any.
      heart_beat: the negotiated ``(send_every_ms, expect_every_ms)``, 0 = off.
      connected_frame: the whole CONNECTED frame.
    """

    version: str
    server: str | None
    session: str | None
    heart_beat: tuple[int, int]
    connected_frame: Frame | None
    _endpoints: list[_Endpoint]
    _options: _Options
    _reconnect: ReconnectPolicy | None
    _rng: random.Random
    _peer: Peer | None
    _generation: int
    _error: StompError | None
    _closing: bool
    _changed: trio.Event
    _subscriptions: dict[str, Subscription]
    _receipts: dict[str, _Waiter]
    _requests: dict[str, _Waiter]
    _ids: int
    _connections: int
    _messages_received: int
    _messages_unroutable: int
    _reply_subscribed: int

    def __init__(
        self,
        endpoints: list[_Endpoint],
        options: _Options,
        reconnect: ReconnectPolicy | None,
        rng: random.Random,
    ) -> None:
        self.version = "1.0"
        self.server = None
        self.session = None
        self.heart_beat = (0, 0)
        self.connected_frame = None
        self._endpoints = endpoints
        self._options = options
        self._reconnect = reconnect
        self._rng = rng
        self._peer = None
        self._generation = 0
        self._error = None
        self._closing = False
        self._changed = trio.Event()
        self._subscriptions = {}
        self._receipts = {}
        self._requests = {}
        self._ids = 0
        self._connections = 0
        self._messages_received = 0
        self._messages_unroutable = 0
        self._reply_subscribed = -1

    # ------------------------------------------------------------- state

    @property
    def connected(self) -> bool:
        """A connection is up right now."""
        return self._peer is not None

    def statistics(self) -> ClientStatistics:
        """Return a snapshot of this client's counters. Never blocks."""
        return ClientStatistics(
            connected=self._peer is not None,
            connections=self._connections,
            subscriptions=len(self._subscriptions),
            pending_receipts=len(self._receipts),
            pending_requests=len(self._requests),
            messages_received=self._messages_received,
            messages_unroutable=self._messages_unroutable,
            peer=self._peer.statistics() if self._peer is not None else None,
        )

    def _new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-{self._ids}"

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _may_wait(self) -> bool:
        return self._reconnect is not None and self._reconnect.wait_for_connection

    async def _wait_connected(self, avoid: Peer | None = None) -> tuple[Peer, int]:
        """The current peer (not ``avoid``, a peer that just failed us), waiting for a
        reconnection when the policy allows."""
        while True:
            if self._error is not None:
                _reraise(self._error)
            if self._closing:
                raise ConnectionLost("the client is closed")
            peer = self._peer
            if peer is not None and peer is not avoid:
                return peer, self._generation
            if not self._may_wait():
                raise ConnectionLost("not connected to the broker (the connection was lost)")
            await self._changed.wait()

    def _peer_of(self, generation: int, what: str) -> Peer:
        if self._error is not None:
            _reraise(self._error)
        if self._closing:
            raise ConnectionLost("the client is closed")
        if self._peer is None or self._generation != generation:
            raise ConnectionLost(
                f"the connection {what} belonged to was lost (the broker aborted it)"
            )
        return self._peer

    async def _send_frame(
        self,
        command: str,
        pairs: list[tuple[str, str]],
        body: bytes = b"",
        *,
        receipt: bool = False,
        generation: int | None = None,
        what: str = "",
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        """Send ``frame`` on the current connection (or exactly on ``generation``'s).

        A frame the peer refused because its connection broke was never queued, so it is
        safe to retry on the next connection: done when the policy waits for connections
        and the frame is not tied to one generation.
        """
        avoid: Peer | None = None
        while True:
            if generation is None:
                peer, _ = await self._wait_connected(avoid)
            else:
                peer = self._peer_of(generation, what)
            rid = None
            waiter = None
            if receipt:
                rid = self._new_id("receipt")
                data = _encode(command, [*pairs, ("receipt", rid)], body, peer.version)
                waiter = self._receipts[rid] = _Waiter()
            else:
                data = _encode(command, pairs, body, peer.version)
            try:
                await peer.send_bytes(data)
            except ConnectionLost:
                if rid is not None:
                    del self._receipts[rid]
                if generation is None and self._may_wait() and not self._closing:
                    avoid = peer
                    continue
                raise
            except BaseException:
                if rid is not None:
                    del self._receipts[rid]
                raise
            if on_queued is not None:
                on_queued()
            if waiter is not None:
                assert rid is not None
                try:
                    await waiter.wait()
                finally:
                    self._receipts.pop(rid, None)
            return

    # ------------------------------------------------------------- sending

    async def send(
        self,
        destination: str,
        body: Body = b"",
        *,
        headers: HeadersArg = None,
        content_type: str | None = None,
        receipt: bool = False,
        transaction: Transaction | None = None,
    ) -> None:
        """Send a message to ``destination``.

        A ``str`` body is sent as UTF-8 with ``content-type: text/plain;charset=utf-8``
        (unless ``content_type`` or a ``content-type`` header says otherwise); bytes are sent as
        they are (NULs included). ``headers`` adds headers (e.g. ``persistent``, ``reply-to``).

        Blocks while the outbound buffer is full (the broker or the network is slower than
        us), while reconnecting (when the policy waits), and with ``receipt=True`` until the
        broker's RECEIPT. Returning without a receipt means *queued*, not delivered.
        Cancellation never leaves a half-written frame: a cancelled call either queued the
        whole frame or nothing.

        Raises:
          ConnectionLost: not connected (and not waiting), the client failed, or, with
            ``receipt=True``, the link dropped before the RECEIPT (the message may or may not
            have been processed).
          BrokerError: the broker answered with an ERROR frame (the client has failed).
          LocalProtocolError: the frame cannot be encoded (e.g. a CR in a 1.1 header).
        """
        pairs, data = _message_headers(destination, body, headers, content_type)
        if transaction is not None:
            pairs.append(("transaction", transaction.id))
            await self._send_frame(
                "SEND",
                pairs,
                data,
                receipt=receipt,
                generation=transaction._generation,
                what="the transaction",
            )
        else:
            await self._send_frame("SEND", pairs, data, receipt=receipt)

    async def send_frame(self, frame: Frame, *, receipt: bool = False) -> None:
        """Send any frame as it is (an escape hatch for broker-specific frames).

        Blocks and raises like :meth:`send`.
        """
        await self._send_frame(frame.command, list(frame.headers.raw), frame.body, receipt=receipt)

    # ------------------------------------------------------------- subscriptions

    @asynccontextmanager
    async def subscribe(
        self,
        destination: str,
        *,
        ack: AckMode = "auto",
        headers: HeadersArg = None,
        max_buffer: int = 256,
        receipt: bool = False,
        id: str | None = None,
    ) -> AsyncIterator[Subscription]:
        """Subscribe to ``destination`` for the duration of the block.

        ``ack`` is the acknowledgement mode. ``headers`` adds SUBSCRIBE headers (e.g.
        RabbitMQ's ``prefetch-count``, ``durable``). ``max_buffer`` bounds the messages held
        for this subscription: when full, the client stops reading from the broker until the
        application catches up (TCP pushes the broker back). ``receipt=True`` waits until the
        broker confirmed the SUBSCRIBE (useful before publishing to a topic).

        Leaving the block sends UNSUBSCRIBE (bounded by ``disconnect_timeout``, even when
        cancelled). With reconnection, the subscription is re-established on every new
        connection, with the same id.

        Raises (on entry): like :meth:`send`; ``ValueError`` for an unknown ``ack`` mode or a
        duplicate ``id``.
        """
        if ack not in _ACK_MODES:
            raise ValueError(f"ack must be one of {_ACK_MODES}, not {ack!r}")
        if max_buffer < 1:
            raise ValueError("max_buffer must be >= 1")
        sid = id if id is not None else self._new_id("sub")
        if sid in self._subscriptions:
            raise ValueError(f"subscription id {sid!r} is already in use")
        sub = Subscription(sid, destination, ack, Headers(_pairs(headers)), self, max_buffer)
        _, generation = await self._wait_connected()
        self._subscriptions[sid] = sub
        sub._generation = generation
        try:
            try:
                await self._send_frame(
                    "SUBSCRIBE", sub._pairs(), receipt=receipt, generation=generation
                )
            except ConnectionLost:
                # Registered: the next connection re-subscribes it, if there is one.
                if receipt or not self._may_wait() or self._error is not None:
                    raise
            yield sub
        finally:
            self._subscriptions.pop(sid, None)
            sub._close()
            await self._unsubscribe(sub)

    async def _unsubscribe(self, sub: Subscription) -> None:
        peer = self._peer
        if peer is None or self._closing or sub._generation != self._generation:
            return
        with trio.move_on_after(self._options.disconnect_timeout) as scope:
            scope.shield = True  # move_on_after(shield=) needs trio >= 0.26
            try:
                await peer.send(Frame("UNSUBSCRIBE", {"id": sub.id}))
            except ConnectionLost:
                pass

    # ------------------------------------------------------------- acknowledgements

    async def _settle(
        self, message: Message, command: str, transaction: Transaction | None, receipt: bool
    ) -> None:
        sub = message.subscription
        assert sub is not None
        if sub.ack_mode == "auto":
            raise LocalProtocolError(
                f"cannot {command} a message of an ack:auto subscription ({sub.id})"
            )
        if self._error is not None:
            _reraise(self._error)
        generation = message._generation
        if command == "NACK" and self.version == "1.0" and generation == self._generation:
            raise LocalProtocolError("NACK does not exist in STOMP 1.0")
        if (
            message._generation != self._generation
            or self._peer is None
            or message._settled
            or (sub.ack_mode == "client" and message._seq <= sub._settled_upto)
        ):
            # Already settled, or its connection is gone (the broker redelivers it).
            await trio.lowlevel.checkpoint()
            return
        headers = message.frame.headers
        if self.version == "1.2":
            pairs = [("id", headers.get("ack") or headers.get("message-id") or "")]
        elif self.version == "1.1":
            pairs = [
                ("message-id", headers.get("message-id") or ""),
                ("subscription", headers.get("subscription") or sub.id),
            ]
        else:
            pairs = [("message-id", headers.get("message-id") or "")]
        if transaction is not None:
            if transaction._generation != generation:
                raise ConnectionLost("the transaction belongs to a lost connection")
            pairs.append(("transaction", transaction.id))

        def settled() -> None:
            if transaction is not None:
                transaction._settled.append((message, command))
            else:
                _mark_settled(message)

        await self._send_frame(
            command,
            pairs,
            receipt=receipt,
            generation=generation,
            what="the message",
            on_queued=settled,
        )

    # ------------------------------------------------------------- transactions

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """Run a transaction for the duration of the block.

        BEGIN on entry; COMMIT (waiting for its RECEIPT) when the block ends normally;
        ABORT when it ends with an exception or is cancelled (bounded by
        ``disconnect_timeout``, shielded). Acknowledgements made in the transaction count as
        settled only once it committed.

        Blocks on entry like :meth:`send`, and on exit until the COMMIT's RECEIPT.

        Raises:
          ConnectionLost: the connection was lost during the transaction (the broker aborted
            it) or before the COMMIT's RECEIPT came back (outcome unknown).
          BrokerError: the broker refused a frame of the transaction.
        """
        _, generation = await self._wait_connected()
        tx = Transaction(self._new_id("tx"), self, generation)
        await self._send_frame(
            "BEGIN", [("transaction", tx.id)], generation=generation, what="BEGIN"
        )
        try:
            yield tx
        except BaseException:
            with trio.move_on_after(self._options.disconnect_timeout) as scope:
                scope.shield = True  # move_on_after(shield=) needs trio >= 0.26
                try:
                    peer = self._peer_of(generation, "the transaction")
                    await peer.send(Frame("ABORT", {"transaction": tx.id}))
                except StompError:
                    pass  # the connection is gone: the broker aborts open transactions
            raise
        await self._send_frame(
            "COMMIT",
            [("transaction", tx.id)],
            receipt=True,
            generation=generation,
            what="the transaction",
        )
        for message, _command in tx._settled:
            _mark_settled(message)

    # ------------------------------------------------------------- request / reply

    async def request(
        self,
        destination: str,
        body: Body = b"",
        *,
        headers: HeadersArg = None,
        content_type: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the issue's API; fail_after inside
    ) -> Message:
        """Send a request and wait for its reply.

        The request carries ``reply-to: /temp-queue/trio-stomp-replies`` and a unique
        ``correlation-id``; the replier answers to the ``reply-to`` it received (see
        :meth:`reply`) and copies the ``correlation-id``. Works with brokers that create and
        subscribe the temp queue themselves (RabbitMQ: the reply's ``subscription`` is the
        ``/temp-queue/...`` name) and with brokers that need an explicit SUBSCRIBE to the
        temp queue (ours, ActiveMQ): by default the client sends one before the first request
        on a connection unless the broker is RabbitMQ (``subscribe_temp_queue`` overrides).

        Blocks until the reply arrives, or ``timeout`` seconds (``trio.TooSlowError``).

        Raises:
          trio.TooSlowError: no reply within ``timeout``.
          ConnectionLost: the link dropped before the reply (the temp queue is gone with it).
          BrokerError: the broker sent an ERROR frame.
        """
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        with trio.fail_at(deadline):
            _, generation = await self._wait_connected()
            subscribe = self._options.subscribe_temp_queue
            if subscribe is None:  # auto: RabbitMQ subscribes (and forbids SUBSCRIBE)
                subscribe = not (self.server or "").startswith("RabbitMQ/")
            if subscribe and self._reply_subscribed != generation:
                self._reply_subscribed = generation
                await self._send_frame(
                    "SUBSCRIBE",
                    [("destination", REPLY_TO), ("id", REPLY_TO)],
                    generation=generation,
                    what="the request",
                )
            correlation_id = uuid.uuid4().hex
            pairs, data = _message_headers(destination, body, headers, content_type)
            pairs.insert(1, ("reply-to", REPLY_TO))
            pairs.insert(2, ("correlation-id", correlation_id))
            waiter = self._requests[correlation_id] = _Waiter()
            try:
                await self._send_frame(
                    "SEND", pairs, data, generation=generation, what="the request"
                )
                reply = await waiter.wait()
            finally:
                self._requests.pop(correlation_id, None)
            assert reply is not None
            return reply

    async def reply(
        self,
        request: Message,
        body: Body = b"",
        *,
        headers: HeadersArg = None,
        content_type: str | None = None,
    ) -> None:
        """Answer ``request``: send ``body`` to its ``reply-to`` with its ``correlation-id``.

        Blocks and raises like :meth:`send`; raises :class:`LocalProtocolError` when the
        request has no ``reply-to`` header.
        """
        reply_to = request.headers.get("reply-to")
        if not reply_to:
            raise LocalProtocolError(f"{request!r} has no reply-to header")
        extra = _pairs(headers)
        correlation_id = request.headers.get("correlation-id")
        if correlation_id is not None:
            extra.insert(0, ("correlation-id", correlation_id))
        await self.send(reply_to, body, headers=extra, content_type=content_type)

    # ------------------------------------------------------------- the supervisor

    async def _supervise(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        started = False
        connected = False
        attempt = 0  # attempts since the last working connection (0-based)
        index = 0
        endpoints = self._endpoints
        policy = self._reconnect

        def on_connected() -> None:
            nonlocal started, connected
            connected = True
            if not started:
                started = True
                task_status.started()

        while True:
            if policy is not None and (started or attempt > 0):
                # Before attempt n wait delay(n), except before the very first connection.
                await trio.sleep(policy.delay(attempt, self._rng))
            endpoint = endpoints[index % len(endpoints)]
            index += 1
            connected = False
            try:
                await self._run_connection(endpoint, on_connected)
            except (BrokerError, ProtocolError, ConnectionLost) as exc:
                # An ERROR after CONNECTED (e.g. "shutting down") is retried like a lost
                # connection when there is a policy, but counts as a failed attempt, so that
                # an ERROR our own frames provoke backs off and ends at max_attempts. An ERROR
                # answering CONNECT (bad credentials) and protocol errors are final.
                retried_error = isinstance(exc, BrokerError) and connected and policy is not None
                if not isinstance(exc, ConnectionLost) and not retried_error:
                    self._fail(exc)
                    if not started:
                        raise
                    return
                self._lost(exc)
                if self._closing:
                    return
                if policy is None:
                    if not started and index < len(endpoints):
                        continue  # failover: try every endpoint once
                    self._fail(exc)
                    if not started:
                        raise
                    return
                if connected and not retried_error:
                    attempt = 0
                    continue
                attempt += 1
                if policy.max_attempts is not None and attempt >= policy.max_attempts:
                    error = ConnectionLost(
                        f"gave up connecting after {attempt} attempts; last error: {exc}"
                    )
                    error.__cause__ = exc
                    self._fail(error)
                    if not started:
                        raise error from exc
                    return

    async def _run_connection(
        self, endpoint: _Endpoint, on_connected: Callable[[], None]
    ) -> NoReturn:
        options = self._options
        with trio.move_on_after(options.connect_timeout) as scope:
            try:
                stream = await endpoint.open()
            except OSError as exc:
                raise ConnectionLost(f"cannot connect to {endpoint.description}: {exc}") from exc
        if scope.cancelled_caught:
            raise ConnectionLost(
                f"cannot connect to {endpoint.description} within {options.connect_timeout} s"
            )
        async with open_peer(
            stream,
            version=options.versions[-1],
            max_send_buffer=options.max_send_buffer,
            heart_beat_tolerance=options.heart_beat_tolerance,
            **options.parser_limits,
        ) as peer:
            with trio.move_on_after(options.connect_timeout) as scope:
                await self._handshake(peer, endpoint)
            if scope.cancelled_caught:
                raise ConnectionLost(
                    f"no CONNECTED frame from {endpoint.description} "
                    f"within {options.connect_timeout} s"
                )
            self._generation += 1
            generation = self._generation
            for sub in list(self._subscriptions.values()):
                if sub.id not in self._subscriptions:
                    continue
                if sub.ack_mode != "auto":
                    sub._purge()
                sub._generation = generation
                await peer.send(Frame("SUBSCRIBE", sub._pairs()))
            self._peer = peer
            self._connections += 1
            self._notify()
            on_connected()
            await self._dispatch(peer, generation)

    async def _handshake(self, peer: Peer, endpoint: _Endpoint) -> None:
        options = self._options
        host = options.vhost if options.vhost is not None else (endpoint.host or "localhost")
        pairs = [
            ("accept-version", ",".join(options.versions)),
            ("host", host),
            ("heart-beat", format_heart_beat(options.heart_beat)),
        ]
        login = options.login if options.login is not None else endpoint.login
        passcode = options.passcode if options.passcode is not None else endpoint.passcode
        if login is not None:
            pairs.append(("login", login))
        if passcode is not None:
            pairs.append(("passcode", passcode))
        pairs.extend(options.connect_headers)
        await peer.send(Frame(options.connect_command, pairs))
        frame = await peer.receive()
        if frame.command == "ERROR":
            raise _broker_error(frame)
        if frame.command != "CONNECTED":
            raise RemoteProtocolError(f"expected CONNECTED, got {frame.command}")
        version = frame.headers.get("version", "1.0")
        if version not in options.versions:
            raise RemoteProtocolError(
                f"the broker chose STOMP {version!r}, which we did not offer "
                f"({','.join(options.versions)})"
            )
        peer.version = version
        self.version = version
        self.server = frame.headers.get("server")
        self.session = frame.headers.get("session")
        self.connected_frame = frame
        remote = parse_heart_beat(frame.headers.get("heart-beat"))
        self.heart_beat = negotiate_heart_beat(options.heart_beat, remote)
        peer.set_heart_beat(*self.heart_beat)

    async def _dispatch(self, peer: Peer, generation: int) -> NoReturn:
        subscriptions = self._subscriptions
        receipts = self._receipts
        requests = self._requests
        while True:
            batch = await peer.receive_batch()
            for frame in batch:
                command = frame.command
                if command == "MESSAGE":
                    headers = frame.headers
                    sid = headers.get("subscription")
                    if sid is not None:
                        sub = subscriptions.get(sid)
                    else:
                        sub = self._find_subscription(headers.get("destination"))
                    if sub is None:
                        waiter = requests.get(headers.get("correlation-id") or "")
                        if waiter is not None:
                            self._messages_received += 1
                            waiter.resolve(Message(frame, None, generation, 0))
                        else:
                            self._messages_unroutable += 1
                        continue
                    self._messages_received += 1
                    message = sub._deliver(frame, generation)
                    while not sub._put_nowait(message):
                        # The application is behind: wait for it (back-pressure, see the
                        # module docstring on why the watchdog does not fire meanwhile).
                        await sub._wait_for_room()
                elif command == "RECEIPT":
                    waiter = receipts.pop(frame.headers.get("receipt-id") or "", None)
                    if waiter is not None:
                        waiter.resolve()
                elif command == "ERROR":
                    raise _broker_error(frame)
                else:
                    raise RemoteProtocolError(f"unexpected {command} frame from the broker")

    def _find_subscription(self, destination: str | None) -> Subscription | None:
        # STOMP 1.0 brokers may leave out the ``subscription`` header: route by destination
        # when exactly one subscription matches it.
        if destination is None:
            return None
        found = [s for s in self._subscriptions.values() if s.destination == destination]
        return found[0] if len(found) == 1 else None

    def _lost(self, error: StompError) -> None:
        """The current connection is gone (we may reconnect)."""
        self._peer = None
        for waiter in (*self._receipts.values(), *self._requests.values()):
            waiter.fail(error)
        self._receipts.clear()
        self._requests.clear()
        self._notify()

    def _fail(self, error: StompError) -> None:
        """The client is finished: every pending and later call raises ``error``."""
        if self._error is None:
            self._error = error
        self._lost(error)
        for sub in self._subscriptions.values():
            sub._close()

    async def _disconnect(self) -> None:
        """DISCONNECT with a receipt, waiting for it at most ``disconnect_timeout``."""
        self._closing = True
        self._notify()
        peer = self._peer
        if peer is None or self._error is not None:
            return
        rid = self._new_id("disconnect")
        waiter = self._receipts[rid] = _Waiter()
        with trio.move_on_after(self._options.disconnect_timeout):
            try:
                await peer.send(Frame("DISCONNECT", {"receipt": rid}))
                await waiter.wait()
            except StompError:
                pass
        self._receipts.pop(rid, None)

    def _abandon(self) -> None:
        """Leave without waiting: a best-effort DISCONNECT, then the stream is closed."""
        self._closing = True
        peer = self._peer
        if peer is not None and self._error is None:
            try:
                peer.send_nowait(Frame("DISCONNECT"))
            except (StompError, trio.WouldBlock):
                pass

    def __repr__(self) -> str:
        state = "connected" if self._peer is not None else "disconnected"
        return f"<trio_stomp.Client {state} STOMP {self.version} server={self.server!r}>"


def _mark_settled(message: Message) -> None:
    message._settled = True
    sub = message.subscription
    if sub is not None and sub.ack_mode == "client" and message._seq > sub._settled_upto:
        sub._settled_upto = message._seq


def _broker_error(frame: Frame) -> BrokerError:
    message = frame.headers.get("message") or ""
    error = BrokerError(message, frame)
    detail = frame.body.decode("utf-8", "replace").strip()
    if detail and detail != message:
        error.args = (f"{message}: {detail[:500]}" if message else detail[:500],)
    return error


_PLAIN_HEADER_RE: Final = re.compile(r"[\\:\r\n]")


def _encode(command: str, pairs: list[tuple[str, str]], body: bytes, version: str) -> bytes:
    """Encode a frame the client builds (always a valid command).

    The fast path covers the common case (no header needs escaping, no ``content-length``
    given): it writes what :func:`serialize` would, without building a :class:`Frame`. Anything
    else goes through :func:`serialize`, which owns the escaping rules and their errors.
    """
    lines = [command]
    plain = _PLAIN_HEADER_RE.search
    for name, value in pairs:
        if plain(name) or plain(value) or name == "content-length":
            return serialize(Frame(command, pairs, body), version)
        lines.append(f"{name}:{value}")
    if body:
        lines.append(f"content-length:{len(body)}")
    lines.append("\n")
    try:
        return b"".join(("\n".join(lines).encode("utf-8"), body, b"\0"))
    except UnicodeEncodeError:
        return serialize(Frame(command, pairs, body), version)


def _pairs(headers: HeadersArg) -> list[tuple[str, str]]:
    if headers is None:
        return []
    if isinstance(headers, Headers):
        return list(headers.raw)
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)


def _message_headers(
    destination: str, body: Body, headers: HeadersArg, content_type: str | None
) -> tuple[list[tuple[str, str]], bytes]:
    extra = _pairs(headers)
    if isinstance(body, str):
        data = body.encode("utf-8")
        if content_type is None and not any(name == "content-type" for name, _ in extra):
            content_type = TEXT_CONTENT_TYPE
    else:
        data = bytes(body)
    pairs = [("destination", destination)]
    if content_type is not None:
        pairs.append(("content-type", content_type))
    pairs.extend(extra)
    return pairs, data


# ----------------------------------------------------------------------- factories


@attrs.frozen
class _Options:
    login: str | None
    passcode: str | None
    vhost: str | None
    heart_beat: tuple[int, int]
    versions: tuple[str, ...]
    connect_headers: tuple[tuple[str, str], ...]
    connect_command: str
    connect_timeout: float
    disconnect_timeout: float
    heart_beat_tolerance: float
    max_send_buffer: int
    subscribe_temp_queue: bool | None
    parser_limits: Mapping[str, Any]


@asynccontextmanager
async def _run_client(
    endpoints: list[_Endpoint],
    *,
    login: str | None,
    passcode: str | None,
    vhost: str | None,
    heart_beat: tuple[int, int],
    versions: Sequence[str],
    connect_headers: HeadersArg,
    use_stomp_frame: bool,
    connect_timeout: float,
    disconnect_timeout: float,
    heart_beat_tolerance: float,
    max_send_buffer: int,
    reconnect: ReconnectPolicy | None,
    subscribe_temp_queue: bool | None,
    rng: random.Random | None,
    parser_limits: Mapping[str, Any],
) -> AsyncIterator[Client]:
    if not endpoints:
        raise ValueError("at least one broker URL or stream is needed")
    ordered = tuple(v for v in SUPPORTED_VERSIONS if v in set(versions))
    unknown = set(versions) - set(SUPPORTED_VERSIONS)
    if not ordered or unknown:
        raise ValueError(f"versions must be among {SUPPORTED_VERSIONS}, not {tuple(versions)}")
    if heart_beat[0] < 0 or heart_beat[1] < 0:
        raise ValueError("heart_beat intervals must be >= 0")
    options = _Options(
        login=login,
        passcode=passcode,
        vhost=vhost,
        heart_beat=(int(heart_beat[0]), int(heart_beat[1])),
        versions=ordered,
        connect_headers=tuple(_pairs(connect_headers)),
        connect_command="STOMP" if use_stomp_frame else "CONNECT",
        connect_timeout=connect_timeout,
        disconnect_timeout=disconnect_timeout,
        heart_beat_tolerance=heart_beat_tolerance,
        max_send_buffer=max_send_buffer,
        subscribe_temp_queue=subscribe_temp_queue,
        parser_limits=dict(parser_limits),
    )
    client = Client(endpoints, options, reconnect, rng or random.Random())
    with unwrap_lone_exception():
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(client._supervise)
                try:
                    yield client
                except BaseException:
                    client._abandon()
                    raise
                await client._disconnect()
            finally:
                client._closing = True
                client._fail(ConnectionLost("the client is closed"))
                nursery.cancel_scope.cancel()


_COMMON_DOC = """
    Options:
      login, passcode: credentials for CONNECT (default: from the URL, else none).
      vhost: the ``host`` header (default: the URL's host name, or ``"localhost"``). RabbitMQ
        reads it as the virtual host: pass ``vhost="/"`` for its default one.
      heart_beat: ``(cx, cy)`` milliseconds we offer: we can send every ``cx``, we want to
        hear every ``cy``; 0 = never. The broker's answer decides the real intervals.
      versions: the STOMP versions offered in ``accept-version``.
      connect_headers: extra CONNECT headers (e.g. RabbitMQ's ``client-id``).
      use_stomp_frame: send ``STOMP`` instead of ``CONNECT`` (1.1+ brokers only).
      connect_timeout: seconds for opening the stream and receiving CONNECTED.
      disconnect_timeout: seconds to wait for the DISCONNECT receipt on exit (also bounds
        UNSUBSCRIBE and ABORT sent while cancelled).
      heart_beat_tolerance: the broker is declared dead after its interval times this.
      max_send_buffer: bytes queued for sending before ``send`` blocks.
      reconnect: a :class:`ReconnectPolicy`, or ``None`` (a lost connection fails the client).
      subscribe_temp_queue: SUBSCRIBE to the reply temp queue before the first
        :meth:`Client.request` on a connection (``None``, the default: yes, unless the
        CONNECTED ``server`` is RabbitMQ, which subscribes it itself and forbids SUBSCRIBE).
      rng: a ``random.Random`` for the back-off jitter (tests pass a seeded one).
      **parser_limits: ``max_line_length``, ``max_headers``, ``max_body_size``,
        ``max_frame_size`` for incoming frames.

    Resource handling: on normal exit, DISCONNECT with a receipt is sent and awaited (at most
    ``disconnect_timeout``), then the stream is closed; on exit by exception or cancellation a
    best-effort DISCONNECT is queued and the stream is closed at once. No task outlives the
    block.

    Raises (on entry): :class:`ConnectionLost` when no broker could be reached (after the
    reconnect policy's attempts, if any), :class:`BrokerError` when the broker refused the
    CONNECT (its ``message`` header is the error message), :class:`ProtocolError` on a
    broken handshake. An exception raised in the block propagates as itself.
"""


@asynccontextmanager
async def open_client(
    url: str | Sequence[str],
    *,
    login: str | None = None,
    passcode: str | None = None,
    vhost: str | None = None,
    heart_beat: tuple[int, int] = (10000, 10000),
    ssl_context: ssl.SSLContext | None = None,
    versions: Sequence[str] = SUPPORTED_VERSIONS,
    connect_headers: HeadersArg = None,
    use_stomp_frame: bool = False,
    connect_timeout: float = 10.0,
    disconnect_timeout: float = 5.0,
    heart_beat_tolerance: float = 2.0,
    max_send_buffer: int = 1 << 20,
    reconnect: ReconnectPolicy | None = None,
    subscribe_temp_queue: bool | None = None,
    rng: random.Random | None = None,
    **parser_limits: Any,
) -> AsyncIterator[Client]:
    """Connect to a STOMP broker and yield a :class:`Client` for the duration of the block.

    ``url`` is ``stomp://host:port`` (default port 61613) or ``stomp+ssl://host:port``
    (61614; ``ssl_context`` defaults to ``ssl.create_default_context()``), optionally with
    ``user:password@``; or STOMP over WebSocket, ``ws://host:port/path`` / ``wss://...``
    (ports 80 / 443 by default; needs ``trio-stomp[websocket]``). A list of URLs is a
    failover list, tried in order (and in turn when reconnecting).
    """
    urls = [url] if isinstance(url, str) else list(url)
    endpoints = [_endpoint_from_url(u, ssl_context) for u in urls]
    async with _run_client(
        endpoints,
        login=login,
        passcode=passcode,
        vhost=vhost,
        heart_beat=heart_beat,
        versions=versions,
        connect_headers=connect_headers,
        use_stomp_frame=use_stomp_frame,
        connect_timeout=connect_timeout,
        disconnect_timeout=disconnect_timeout,
        heart_beat_tolerance=heart_beat_tolerance,
        max_send_buffer=max_send_buffer,
        reconnect=reconnect,
        subscribe_temp_queue=subscribe_temp_queue,
        rng=rng,
        parser_limits=parser_limits,
    ) as client:
        yield client


@asynccontextmanager
async def open_client_over_stream_factory(
    factories: StreamFactory | Sequence[StreamFactory],
    *,
    login: str | None = None,
    passcode: str | None = None,
    vhost: str | None = None,
    heart_beat: tuple[int, int] = (10000, 10000),
    versions: Sequence[str] = SUPPORTED_VERSIONS,
    connect_headers: HeadersArg = None,
    use_stomp_frame: bool = False,
    connect_timeout: float = 10.0,
    disconnect_timeout: float = 5.0,
    heart_beat_tolerance: float = 2.0,
    max_send_buffer: int = 1 << 20,
    reconnect: ReconnectPolicy | None = None,
    subscribe_temp_queue: bool | None = None,
    rng: random.Random | None = None,
    **parser_limits: Any,
) -> AsyncIterator[Client]:
    """Like :func:`open_client`, but each connection's stream comes from a factory.

    ``factories`` is one zero-argument async callable returning a connected
    ``trio.abc.Stream`` (called again for every reconnection), or a failover list of them.
    An ``OSError`` from a factory counts as a failed connection attempt.
    """
    items = [factories] if callable(factories) else list(factories)
    endpoints = [
        _Endpoint(
            description=getattr(f, "__name__", repr(f)),
            host=None,
            login=None,
            passcode=None,
            open=f,
        )
        for f in items
    ]
    async with _run_client(
        endpoints,
        login=login,
        passcode=passcode,
        vhost=vhost,
        heart_beat=heart_beat,
        versions=versions,
        connect_headers=connect_headers,
        use_stomp_frame=use_stomp_frame,
        connect_timeout=connect_timeout,
        disconnect_timeout=disconnect_timeout,
        heart_beat_tolerance=heart_beat_tolerance,
        max_send_buffer=max_send_buffer,
        reconnect=reconnect,
        subscribe_temp_queue=subscribe_temp_queue,
        rng=rng,
        parser_limits=parser_limits,
    ) as client:
        yield client


@asynccontextmanager
async def open_client_over_stream(
    stream: trio.abc.Stream,
    *,
    login: str | None = None,
    passcode: str | None = None,
    vhost: str | None = None,
    heart_beat: tuple[int, int] = (10000, 10000),
    versions: Sequence[str] = SUPPORTED_VERSIONS,
    connect_headers: HeadersArg = None,
    use_stomp_frame: bool = False,
    connect_timeout: float = 10.0,
    disconnect_timeout: float = 5.0,
    heart_beat_tolerance: float = 2.0,
    max_send_buffer: int = 1 << 20,
    subscribe_temp_queue: bool | None = None,
    **parser_limits: Any,
) -> AsyncIterator[Client]:
    """Like :func:`open_client`, over one already-connected stream (no reconnection).

    The client owns ``stream`` from now on and closes it on exit.
    """
    used = False

    async def once() -> trio.abc.Stream:
        nonlocal used
        if used:
            raise ConnectionLost("the stream was already used")
        used = True
        await trio.lowlevel.checkpoint()
        return stream

    async with _run_client(
        [_Endpoint(description=repr(stream), host=None, login=None, passcode=None, open=once)],
        login=login,
        passcode=passcode,
        vhost=vhost,
        heart_beat=heart_beat,
        versions=versions,
        connect_headers=connect_headers,
        use_stomp_frame=use_stomp_frame,
        connect_timeout=connect_timeout,
        disconnect_timeout=disconnect_timeout,
        heart_beat_tolerance=heart_beat_tolerance,
        max_send_buffer=max_send_buffer,
        reconnect=None,
        subscribe_temp_queue=subscribe_temp_queue,
        rng=None,
        parser_limits=parser_limits,
    ) as client:
        yield client


for _function in (open_client, open_client_over_stream_factory, open_client_over_stream):
    _function.__doc__ = (_function.__doc__ or "") + _COMMON_DOC
