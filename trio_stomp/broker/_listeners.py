"""Listeners: turn ``listen`` addresses into bound Trio listeners, and name them.

This module owns binding (``tcp://HOST:PORT`` → ``trio.SocketListener`` objects) and the
printable URL of what was actually bound (the real port when port 0 was asked for). It
never accepts connections or speaks STOMP: the broker serves the listeners it returns.

``ws://HOST:PORT/PATH`` listeners are TCP listeners wrapped in
:class:`~trio_stomp._websocket.WebSocketListener` (imported only when one is asked for, so
the broker runs without the ``websocket`` extra); each connection's WebSocket handshake runs
in its session's task, never in the accept loop.

``tls://HOST:PORT`` listeners are TCP listeners wrapped in ``trio.SSLListener`` with the
context of :func:`make_server_ssl_context` (TLS 1.2 or later; client certificates required
when a CA is configured). The TLS handshake happens on the session's first read, so it runs
under the CONNECT timeout and never in the accept loop.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import trio

from ._config import parse_listen_url

__all__ = [
    "Listener",
    "listener_url",
    "make_server_ssl_context",
    "open_listeners",
    "peer_certificate",
    "remote_address",
]

#: What :func:`open_listeners` returns: listeners of byte streams (TCP, WebSocket).
Listener = trio.abc.Listener[trio.abc.Stream]


def _websocket_path(url: str) -> str:
    """The PATH of ``ws://HOST:PORT/PATH`` (``"/"`` when there is none)."""
    return "/" + url.partition("://")[2].partition("/")[2]


async def open_listeners(url: str, *, ssl_context: ssl.SSLContext | None = None) -> list[Listener]:
    """Bind every listener ``url`` names (a host name may resolve to several addresses).

    Blocks while resolving the host name and binding.

    Raises:
      ValueError: the URL is malformed or its scheme is not supported.
      OSError: the address cannot be bound (in use, not local, permission).
      ImportError: a ``ws://`` URL without the ``websocket`` extra (wsproto) installed.
      ValueError: a ``tls://`` or ``wss://`` URL without ``ssl_context``.
    """
    scheme, host, port = parse_listen_url(url)
    if scheme == "tls":
        if ssl_context is None:
            raise ValueError(f"listen address {url!r} needs a certificate (tls_cert, tls_key)")
        return [
            trio.SSLListener(listener, ssl_context, https_compatible=False)
            for listener in await trio.open_tcp_listeners(port, host=host)
        ]
    if scheme in ("ws", "wss"):
        from .._websocket import WebSocketListener

        if scheme == "wss" and ssl_context is None:
            raise ValueError(f"listen address {url!r} needs a certificate (tls_cert, tls_key)")
        transports: list[Listener] = list(await trio.open_tcp_listeners(port, host=host))
        if ssl_context is not None and scheme == "wss":
            # https_compatible: browsers close TLS the way they close HTTPS (no close_notify)
            transports = [
                trio.SSLListener(transport, ssl_context, https_compatible=True)
                for transport in transports
            ]
        path = _websocket_path(url)
        return [WebSocketListener(transport, path=path) for transport in transports]
    if scheme != "tcp":  # pragma: no cover - parse_listen_url rejects the others today
        raise ValueError(f"unsupported listener scheme {scheme!r}")
    return list(await trio.open_tcp_listeners(port, host=host))


def _format(family: int, address: object, scheme: str) -> str:
    if family == socket.AF_INET6 and isinstance(address, tuple):
        return f"{scheme}://[{address[0]}]:{address[1]}"
    if isinstance(address, tuple):
        return f"{scheme}://{address[0]}:{address[1]}"
    return f"{scheme}://{address}"


def listener_url(listener: Listener, scheme: str = "tcp") -> str:
    """The URL a listener is bound to, with the real port: ``tcp://127.0.0.1:54321``,
    ``ws://127.0.0.1:54322/ws``."""
    if isinstance(listener, trio.SSLListener):
        inner = listener.transport_listener
        assert isinstance(inner, trio.SocketListener)
        return listener_url(inner, "tls")
    if not isinstance(listener, trio.SocketListener):
        from .._websocket import WebSocketListener

        if not isinstance(listener, WebSocketListener):  # pragma: no cover
            raise TypeError(f"cannot name listener {listener!r}")
        inner = listener.transport_listener
        scheme = "ws"
        if isinstance(inner, trio.SSLListener):
            inner, scheme = inner.transport_listener, "wss"
        assert isinstance(inner, trio.SocketListener)
        return listener_url(inner, scheme) + listener.path
    sock = listener.socket
    return _format(sock.family, sock.getsockname(), scheme)


def remote_address(stream: trio.abc.Stream) -> str:
    """A printable address of the other end of ``stream`` (``"memory"`` if it has none).

    Looks through wrappers that name their ``transport_stream`` (TLS, WebSocket)."""
    while not isinstance(stream, trio.SocketStream):
        inner = getattr(stream, "transport_stream", None)
        if not isinstance(inner, trio.abc.Stream):
            break
        stream = inner
    if isinstance(stream, trio.SocketStream):
        try:
            address = stream.socket.getpeername()
        except OSError:
            return "unknown"
        if isinstance(address, tuple):
            host = address[0]
            return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
        return str(address)
    return "memory"


def make_server_ssl_context(
    cert: str, key: str | None = None, ca: str | None = None
) -> ssl.SSLContext:
    """The TLS context of ``tls://`` listeners: TLS 1.2 or later, the broker's certificate
    chain from ``cert`` (and ``key``, when the key is not in ``cert``), and, when ``ca``
    is given, mutual TLS: every client must present a certificate that ``ca`` signed.

    Blocks on file I/O (call it from a thread inside Trio).

    Raises:
      OSError: a file cannot be read. ssl.SSLError: a file holds no valid certificate/key.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if ca is not None:
        context.load_verify_locations(ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def peer_certificate(stream: trio.abc.Stream) -> dict[str, Any] | None:
    """The verified client certificate of a TLS ``stream`` as ``getpeercert()`` gives it,
    or None: not TLS, no certificate, or no handshake yet. Looks through a WebSocket
    (``wss://``) to the TLS stream under it."""
    while not isinstance(stream, (trio.SSLStream, trio.SocketStream)):
        inner = getattr(stream, "transport_stream", None)
        if not isinstance(inner, trio.abc.Stream):
            break
        stream = inner
    if isinstance(stream, trio.SSLStream):
        try:
            certificate = stream.getpeercert()
        except (ValueError, AttributeError):  # the handshake has not happened
            return None
        return dict(certificate) if certificate else None
    return None
