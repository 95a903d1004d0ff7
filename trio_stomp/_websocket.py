"""STOMP over WebSocket: a ``trio.abc.Stream`` whose bytes travel in WebSocket messages.

This module owns the WebSocket transport for both sides: :class:`WebSocketStream` (the
adapter the :class:`~trio_stomp._peer.Peer` runs on, exactly as it runs on TCP),
:func:`open_websocket_stream` / :func:`wrap_client_stream` (the client's ``ws://`` and
``wss://`` URLs), :func:`wrap_server_stream` and :class:`WebSocketListener` (the broker's
``ws://HOST:PORT/PATH`` listener). It never parses or interprets STOMP frames (the Peer's
parser does; the outbound side only *finds frame boundaries* to choose message types), never
starts a task, and never imports the client or the broker.

Why wsproto, not trio-websocket's connection object
---------------------------------------------------
trio-websocket runs a reader task per connection (it needs a nursery from the caller) and
queues whole messages (1 MiB limit by default). A STOMP connection already has a reader task
(the Peer's), and the STOMP parser already bounds frames. So this adapter drives wsproto (the
sans-I/O WebSocket library trio-websocket is built on) directly: ``receive_some`` reads the
socket, feeds wsproto and returns message payload bytes as they arrive. No extra task, no
extra queue, no nursery to pass in (so it fits the client's transport seam and the broker's
accept loop), no message-size limit besides the STOMP parser's, and back-pressure is the
socket's: when the Peer stops reading, nobody reads the socket.

Inbound
-------
Text and binary messages are both accepted; a text message's payload is its UTF-8 encoding.
Message boundaries mean nothing: the payload bytes form one byte stream, so several frames in
one message, one frame over several messages (or WebSocket fragments), and heart-beat EOLs in
messages of their own all work. Pings are answered with pongs. A close from the other side
(or the socket's EOF) is the stream's EOF: ``receive_some`` returns ``b""``, as on TCP. A
WebSocket protocol violation raises ``trio.BrokenResourceError``.

Outbound
--------
``send_all`` gets whatever the Peer's writer batched (several frames and heart-beats). It is
split at frame boundaries into messages of whole frames (up to about 1 MiB each; a larger
frame goes alone) and never splits a frame, so clients that expect one or more *whole* frames
per message work too. A message is sent as **text** when it is valid UTF-8 and no body in it
holds a NUL byte, otherwise as **binary** (``@stomp/stompjs`` and other clients then hand the
exact bytes to the application). If the bytes cannot be split (not what our serializer
writes), they go as one binary message. All messages of one ``send_all`` are written with
one socket ``send_all``.

Subprotocols
------------
The server accepts ``v12.stomp``, ``v11.stomp``, ``v10.stomp`` (the highest the client
offers) or no subprotocol at all (lenient clients); a client that offers only other
subprotocols is refused with HTTP 400, a request for another path with 404. The subprotocol
does not choose the STOMP version: CONNECT's ``accept-version`` does, as on TCP. There is no
``Origin`` check: authenticate clients with STOMP's login and passcode.

Concurrency follows ``trio.abc.Stream``: one task may ``send_all`` while another
``receive_some``\\s. Internally one lock orders writes to the socket (data messages, pongs,
the close frame), so WebSocket frames never interleave.
"""

from __future__ import annotations

import re
import ssl
from typing import Final, NoReturn, Union
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

__all__ = [
    "STOMP_SUBPROTOCOLS",
    "WebSocketListener",
    "WebSocketStream",
    "open_websocket_stream",
    "split_messages",
    "wrap_client_stream",
    "wrap_server_stream",
]

#: The subprotocols we speak, best first (the names RabbitMQ, ActiveMQ and stompjs use).
STOMP_SUBPROTOCOLS: Final = ("v12.stomp", "v11.stomp", "v10.stomp")
#: Bytes asked of the socket per read.
RECEIVE_SIZE: Final = 65536
#: Frames are grouped into one outbound message until it holds about this many bytes.
MESSAGE_GROUP_SIZE: Final = 1 << 20
#: The close code we send on a normal close (RFC 6455 "normal closure").
NORMAL_CLOSURE: Final = 1000

_HEADERS_END: Final = re.compile(rb"\r?\n\r?\n")
_CONTENT_LENGTH: Final = re.compile(rb"^content-length:([0-9]+)\r?$", re.MULTILINE)
_EOLS: Final = re.compile(rb"[\r\n]*")
_Bytes = Union[bytes, bytearray, memoryview]


def split_messages(data: bytes, group_size: int = MESSAGE_GROUP_SIZE) -> list[tuple[bytes, bool]]:
    """Split serialized STOMP bytes into WebSocket messages: ``[(payload, is_text), ...]``.

    Each payload holds whole frames (and the heart-beat EOLs around them), at most about
    ``group_size`` bytes unless one frame is larger. ``is_text`` is true when
    no body in the payload contains a NUL byte and the payload is valid UTF-8. Bytes that do
    not split into frames (a partial frame, a header block holding NUL) are returned as one
    binary message. Never blocks; sans-I/O.
    """
    n = len(data)
    messages: list[tuple[bytes, bool]] = []
    start = 0  # start of the message being grouped
    pos = 0
    nul_in_body = False
    while True:
        eols = _EOLS.match(data, pos)
        pos = eols.end() if eols else pos
        if pos >= n:
            break
        head = _HEADERS_END.search(data, pos)
        if head is None or data.find(b"\0", pos, head.start()) != -1:
            return [*messages, (data[start:], False)]
        length = _CONTENT_LENGTH.search(data, pos, head.start())
        body_start = head.end()
        if length is not None:
            end = body_start + int(length.group(1))
            if end >= n or data[end] != 0:
                return [*messages, (data[start:], False)]
            if data.find(b"\0", body_start, end) != -1:
                nul_in_body = True
        else:
            end = data.find(b"\0", body_start)
            if end == -1:
                return [*messages, (data[start:], False)]
        pos = end + 1
        if pos - start >= group_size:
            eols = _EOLS.match(data, pos)
            pos = eols.end() if eols else pos
            messages.append(_message(data[start:pos], nul_in_body))
            start = pos
            nul_in_body = False
    if start < n or not messages:
        messages.append(_message(data[start:], nul_in_body))
    return messages


def _message(payload: bytes, nul_in_body: bool) -> tuple[bytes, bool]:
    if nul_in_body:
        return (payload, False)
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return (payload, False)
    return (payload, True)


def _choose_subprotocol(offered: list[str], supported: tuple[str, ...]) -> str | None:
    """The best of ``supported`` the client offered; ``None`` when it offered none.

    Raises ``ValueError`` when it offered subprotocols but none of ours.
    """
    if not offered:
        return None
    for name in supported:
        if name in offered:
            return name
    raise ValueError(f"none of the offered subprotocols {offered!r} is one of {supported!r}")


class WebSocketStream(trio.abc.Stream):
    """STOMP bytes over one WebSocket connection, client or server side.

    Made by :func:`wrap_client_stream`, :func:`open_websocket_stream`,
    :func:`wrap_server_stream` or :class:`WebSocketListener`. It owns ``transport_stream``
    and closes it in :meth:`aclose`.

    Attributes:
      transport_stream: the stream underneath (a ``trio.SocketStream`` or ``trio.SSLStream``).
      subprotocol: the negotiated subprotocol (``"v12.stomp"`` ...) or ``None``; on the
        server side, known once the handshake is done.
      resource: the request target's path (``"/ws"``); on the server side, known once the
        handshake is done.
    """

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        connection: WSConnection,
        *,
        subprotocol: str | None = None,
        resource: str | None = None,
        server_path: str | None = None,
        server_subprotocols: tuple[str, ...] = STOMP_SUBPROTOCOLS,
    ) -> None:
        self.transport_stream = transport_stream
        self.subprotocol = subprotocol
        self.resource = resource
        self._ws = connection
        self._server_path = server_path
        self._server_subprotocols = server_subprotocols
        self._handshake_done = connection.state is not ConnectionState.CONNECTING
        self._handshake_error: str | None = None
        self._handshake_event: trio.Event | None = None
        self._inbound = bytearray()
        self._eof = False
        self._closed = False
        self._transport_broken = False
        self._send_lock = trio.Lock()
        self._receiving = False
        self._sending = False

    # ----------------------------------------------------------------- handshake (server)

    async def handshake(self) -> None:
        """Finish the server-side opening handshake (a no-op once done, and on the client).

        ``receive_some`` calls it, so calling it is optional; call it to
        learn :attr:`subprotocol` and :attr:`resource` early. Bound it with a cancel scope:
        it waits for the client's HTTP request. A wrong path is answered with HTTP 404,
        unknown subprotocols with 400, a malformed request with 400.

        Raises:
          trio.BrokenResourceError: the handshake failed (now or in an earlier call).
          trio.ClosedResourceError: the stream was closed.
        """
        if self._handshake_done:
            await trio.lowlevel.checkpoint()
            return
        if self._closed:
            raise trio.ClosedResourceError("the WebSocket stream is closed")
        if self._handshake_error is not None:
            raise trio.BrokenResourceError(self._handshake_error)
        if self._handshake_event is not None:  # another task runs it: wait for the outcome
            await self._handshake_event.wait()
            await self.handshake()
            return
        self._handshake_event = trio.Event()
        try:
            await self._server_handshake()
        except BaseException as exc:
            self._handshake_error = self._handshake_error or f"WebSocket handshake failed: {exc!r}"
            raise
        finally:
            self._handshake_event.set()

    async def _server_handshake(self) -> None:
        ws = self._ws
        request: Request | None = None
        while request is None:
            try:
                data = await self.transport_stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, OSError) as exc:
                raise trio.BrokenResourceError(
                    f"connection lost during handshake: {exc!r}"
                ) from exc
            if not data:
                raise trio.BrokenResourceError("connection closed during the WebSocket handshake")
            try:
                ws.receive_data(bytes(data))
                for event in ws.events():
                    if isinstance(event, Request):
                        request = event
            except RemoteProtocolError as exc:
                await self._reject(400, f"bad WebSocket handshake: {exc}")
        resource = request.target.partition("?")[0]
        self.resource = resource
        if self._server_path is not None and resource != self._server_path:
            await self._reject(404, f"no STOMP endpoint at {resource!r}")
        try:
            subprotocol = _choose_subprotocol(request.subprotocols, self._server_subprotocols)
        except ValueError as exc:
            await self._reject(400, str(exc))
        self.subprotocol = subprotocol
        await self._write(ws.send(AcceptConnection(subprotocol=subprotocol)))
        self._handshake_done = True

    async def _reject(self, status: int, reason: str) -> NoReturn:
        self._handshake_error = f"WebSocket handshake refused ({status}): {reason}"
        body = reason.encode("utf-8", "replace") + b"\n"
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
        ]
        try:
            data = self._ws.send(
                RejectConnection(status_code=status, headers=headers, has_body=True)
            )
            data += self._ws.send(RejectData(data=body, body_finished=True))
            await self._write(data)
        except (LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        raise trio.BrokenResourceError(self._handshake_error)

    # ----------------------------------------------------------------- writing

    async def _write(self, data: bytes) -> None:
        """Write ``data`` to the socket under the send lock. A write that did not finish
        (cancelled or failed) breaks the stream: the socket may hold half a frame."""
        if self._transport_broken:
            raise trio.BrokenResourceError("the WebSocket connection broke while writing")
        async with self._send_lock:
            done = False
            try:
                await self.transport_stream.send_all(data)
                done = True
            except OSError as exc:
                raise trio.BrokenResourceError(f"WebSocket write failed: {exc!r}") from exc
            finally:
                if not done:
                    self._transport_broken = True

    async def send_all(self, data: _Bytes) -> None:
        """Send ``data`` (serialized STOMP frames) as WebSocket messages (see the module doc).

        Blocks until the socket accepted every byte (that is the push-back); a cancelled
        call breaks the stream, as on any trio stream. It never waits for a server-side
        handshake: before the handshake completed (in ``receive_some`` or
        :meth:`handshake`) it raises ``trio.BrokenResourceError``.

        Raises:
          trio.BrokenResourceError: the connection is broken or closed by the other side, or
            the server-side handshake is not complete.
          trio.ClosedResourceError: :meth:`aclose` was called.
          trio.BusyResourceError: another task is in ``send_all``.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            if not self._handshake_done:
                # Nothing may be sent before the client's request was answered, and STOMP
                # servers speak only after CONNECT: this is an error path (a CONNECT timeout
                # or a shutdown), which must not wait for a client that never asks.
                await trio.lowlevel.checkpoint()
                raise trio.BrokenResourceError(
                    self._handshake_error or "the WebSocket handshake is not complete"
                )
            if self._closed:
                raise trio.ClosedResourceError("the WebSocket stream is closed")
            payload = bytes(data)
            if not payload:
                await trio.lowlevel.checkpoint()
                return
            ws = self._ws
            out: list[bytes] = []
            try:
                for message, is_text in split_messages(payload):
                    if is_text:
                        out.append(ws.send(TextMessage(data=message.decode("utf-8"))))
                    else:
                        out.append(ws.send(BytesMessage(data=message)))
            except LocalProtocolError as exc:  # we sent or received a close already
                raise trio.BrokenResourceError(f"the WebSocket is closing: {exc}") from exc
            await self._write(b"".join(out))
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until ``send_all`` might not block (delegates to the socket)."""
        if not self._handshake_done:
            await trio.lowlevel.checkpoint()  # send_all would raise at once
            return
        await self.transport_stream.wait_send_all_might_not_block()

    # ----------------------------------------------------------------- reading

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return the next message payload bytes (at most ``max_bytes``), ``b""`` at the end.

        Blocks until some payload arrived (answering pings meanwhile). The end is a close
        from the other side or the socket's EOF; a normal close is answered.

        Raises:
          trio.BrokenResourceError: a WebSocket protocol violation, or a broken socket.
          trio.ClosedResourceError: :meth:`aclose` was called.
          trio.BusyResourceError: another task is in ``receive_some``.
        """
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            await self.handshake()
            if self._closed:
                raise trio.ClosedResourceError("the WebSocket stream is closed")
            while True:
                await self._process_events()
                inbound = self._inbound
                if inbound:
                    if max_bytes is None or len(inbound) <= max_bytes:
                        chunk = bytes(inbound)  # one copy, the common case
                        inbound.clear()
                    else:
                        with memoryview(inbound) as view:
                            chunk = bytes(view[:max_bytes])
                        del inbound[:max_bytes]
                    return chunk
                if self._eof:
                    await trio.lowlevel.checkpoint()
                    return b""
                try:
                    data = await self.transport_stream.receive_some(RECEIVE_SIZE)
                except OSError as exc:
                    raise trio.BrokenResourceError(f"WebSocket read failed: {exc!r}") from exc
                if self._closed:
                    raise trio.ClosedResourceError("the WebSocket stream is closed")
                if not data:
                    self._eof = True  # abrupt: no close frame, the socket just ended
                    continue
                try:
                    self._ws.receive_data(bytes(data))
                except LocalProtocolError:  # data after the closing handshake: ignore it
                    pass
        finally:
            self._receiving = False

    async def _process_events(self) -> None:
        ws = self._ws
        replies: list[bytes] = []
        error: str | None = None
        for event in ws.events():
            if isinstance(event, TextMessage):
                self._inbound += event.data.encode("utf-8")
            elif isinstance(event, BytesMessage):
                self._inbound += event.data
            elif isinstance(event, Ping):
                if ws.state is ConnectionState.OPEN:
                    replies.append(ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self._eof = True
                if ws.state is ConnectionState.REMOTE_CLOSING:
                    replies.append(ws.send(event.response()))
                elif ws.state is ConnectionState.OPEN:
                    # wsproto reports a protocol violation as a close event in state OPEN:
                    # tell the other side why, then fail.
                    error = f"WebSocket protocol error {event.code}: {event.reason}"
                    replies.append(ws.send(CloseConnection(code=event.code, reason=event.reason)))
            # Pong: nothing to do (we never ping; heart-beats are STOMP's).
        if replies and not self._transport_broken:
            try:
                await self._write(b"".join(replies))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                if error is None and not self._eof:
                    raise
        else:
            await trio.lowlevel.checkpoint()
        if error is not None:
            raise trio.BrokenResourceError(error)

    # ----------------------------------------------------------------- closing

    async def aclose(self) -> None:
        """Send a normal close (1000) if the connection is open, then close the socket.

        Idempotent. Does not wait for the other side's close reply (a task may be blocked
        in ``receive_some`` on the same socket). If cancelled, the socket is still closed.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if (
                self._handshake_done
                and not self._transport_broken
                and self._ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING)
            ):
                try:
                    await self._write(self._ws.send(CloseConnection(code=NORMAL_CLOSURE)))
                except (LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        finally:
            await self.transport_stream.aclose()


# --------------------------------------------------------------------- client side


async def wrap_client_stream(
    transport_stream: trio.abc.Stream,
    *,
    host: str,
    resource: str = "/",
    subprotocols: tuple[str, ...] = STOMP_SUBPROTOCOLS,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> WebSocketStream:
    """Run the client's opening handshake over a connected stream and return the adapter.

    ``host`` is the HTTP ``Host`` header (``"example.com:15674"``), ``resource`` the path
    (``"/ws"``, optionally with a query). Blocks until the server answered: bound it with a
    cancel scope. On failure the stream is closed.

    Raises:
      ConnectionRefusedError: the server refused the upgrade (an HTTP status, its body).
      trio.BrokenResourceError: the server answered something that is not a handshake, or
        the connection broke.
    """
    ws = WSConnection(ConnectionType.CLIENT)
    try:
        await transport_stream.send_all(
            ws.send(
                Request(
                    host=host,
                    target=resource,
                    subprotocols=list(subprotocols),
                    extra_headers=extra_headers or [],
                )
            )
        )
        accepted: AcceptConnection | None = None
        refused: RejectConnection | None = None
        body = bytearray()
        while accepted is None:
            data = await transport_stream.receive_some(RECEIVE_SIZE)
            if not data:
                if refused is not None:
                    break
                raise trio.BrokenResourceError("connection closed during the WebSocket handshake")
            try:
                ws.receive_data(bytes(data))
                events: list[Event] = list(ws.events())
            except RemoteProtocolError as exc:
                raise trio.BrokenResourceError(f"bad WebSocket handshake answer: {exc}") from exc
            finished = False
            for event in events:
                if isinstance(event, AcceptConnection):
                    accepted = event
                elif isinstance(event, RejectConnection):
                    refused = event
                    finished = not event.has_body
                elif isinstance(event, RejectData):
                    if len(body) < 4096:
                        body += event.data
                    finished = event.body_finished
            if refused is not None and finished:
                break
        if accepted is None:
            assert refused is not None
            text = bytes(body).decode("utf-8", "replace").strip()
            raise ConnectionRefusedError(
                f"WebSocket upgrade refused with HTTP {refused.status_code}: {text}"
            )
    except BaseException:
        await trio.aclose_forcefully(transport_stream)
        raise
    stream = WebSocketStream(
        transport_stream,
        ws,
        subprotocol=accepted.subprotocol,
        resource=resource.partition("?")[0],
    )
    return stream


async def open_websocket_stream(
    url: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    subprotocols: tuple[str, ...] = STOMP_SUBPROTOCOLS,
) -> WebSocketStream:
    """Connect to ``ws://HOST[:PORT]/PATH`` or ``wss://...`` and return the adapter.

    Default ports are 80 and 443; ``ssl_context`` (``wss`` only) defaults to
    ``ssl.create_default_context()``. Blocks for the TCP (and TLS) connection and the
    handshake: bound it with a cancel scope.

    Raises:
      ValueError: not a ``ws``/``wss`` URL.
      OSError: the TCP connection failed; ``ConnectionRefusedError`` also when the server
        refused the upgrade, ``ConnectionError`` when the TLS or WebSocket handshake failed.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a WebSocket URL: {url!r} (expected ws://HOST:PORT/PATH)")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    hostname = parts.hostname
    transport: trio.abc.Stream
    if secure:
        transport = await trio.open_ssl_over_tcp_stream(
            hostname, port, ssl_context=ssl_context or ssl.create_default_context()
        )
    else:
        transport = await trio.open_tcp_stream(hostname, port)
    shown = f"[{hostname}]" if ":" in hostname else hostname
    host = shown if parts.port is None else f"{shown}:{port}"
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        return await wrap_client_stream(
            transport, host=host, resource=resource, subprotocols=subprotocols
        )
    except trio.BrokenResourceError as exc:
        raise ConnectionError(f"{url}: {exc}") from exc


# --------------------------------------------------------------------- server side


def wrap_server_stream(
    transport_stream: trio.abc.Stream,
    *,
    path: str | None = "/",
    subprotocols: tuple[str, ...] = STOMP_SUBPROTOCOLS,
) -> WebSocketStream:
    """Wrap an accepted connection; the opening handshake runs on first use.

    The first ``receive_some`` (or an explicit :meth:`WebSocketStream.handshake`) reads the
    client's HTTP request and answers it, so whoever serves the stream bounds the handshake
    with its own timeout (the broker's CONNECT timeout); ``send_all`` before that raises
    ``trio.BrokenResourceError``. ``path`` is the only
    resource accepted (``None``: any). Never blocks.
    """
    return WebSocketStream(
        transport_stream,
        WSConnection(ConnectionType.SERVER),
        server_path=path,
        server_subprotocols=subprotocols,
    )


class WebSocketListener(trio.abc.Listener[WebSocketStream]):
    """A listener of WebSocket streams on top of a listener of byte streams.

    ``accept`` returns as soon as the transport connection is accepted: the handshake runs
    later, in the connection's own task (see :func:`wrap_server_stream`), so a slow client
    never holds up the accept loop.

    Attributes:
      transport_listener: the listener underneath (usually a ``trio.SocketListener``).
      path: the resource clients must ask for (``"/ws"``).
    """

    def __init__(
        self,
        transport_listener: trio.abc.Listener[trio.abc.Stream],
        *,
        path: str = "/",
        subprotocols: tuple[str, ...] = STOMP_SUBPROTOCOLS,
    ) -> None:
        self.transport_listener = transport_listener
        self.path = path
        self.subprotocols = subprotocols

    async def accept(self) -> WebSocketStream:
        """Accept the next connection (its handshake is still to come).

        Raises what the transport listener's ``accept`` raises (``OSError`` for EMFILE and
        friends, which ``trio.serve_listeners`` handles).
        """
        stream = await self.transport_listener.accept()
        return wrap_server_stream(stream, path=self.path, subprotocols=self.subprotocols)

    async def aclose(self) -> None:
        """Close the transport listener."""
        await self.transport_listener.aclose()
