"""Listeners: turn ``listen`` addresses into bound Trio listeners, and name them.

This module owns binding (``tcp://HOST:PORT`` → ``trio.SocketListener`` objects) and the
printable URL of what was actually bound (the real port when port 0 was asked for). It
never accepts connections or speaks STOMP: the broker serves the listeners it returns.

Seam: ``tls://`` (issue 5) and ``ws://`` listeners plug in here as other schemes that
return ``trio.abc.Listener[trio.abc.Stream]`` objects; ``_config.parse_listen_url`` must
learn the scheme at the same time.
"""

from __future__ import annotations

import socket

import trio

from ._config import parse_listen_url

__all__ = ["listener_url", "open_listeners", "remote_address"]


async def open_listeners(url: str) -> list[trio.SocketListener]:
    """Bind every listener ``url`` names (a host name may resolve to several addresses).

    Blocks while resolving the host name and binding.

    Raises:
      ValueError: the URL is malformed or its scheme is not supported.
      OSError: the address cannot be bound (in use, not local, permission).
    """
    scheme, host, port = parse_listen_url(url)
    if scheme != "tcp":  # pragma: no cover - parse_listen_url rejects the others today
        raise ValueError(f"unsupported listener scheme {scheme!r}")
    return await trio.open_tcp_listeners(port, host=host)


def _format(family: int, address: object, scheme: str) -> str:
    if family == socket.AF_INET6 and isinstance(address, tuple):
        return f"{scheme}://[{address[0]}]:{address[1]}"
    if isinstance(address, tuple):
        return f"{scheme}://{address[0]}:{address[1]}"
    return f"{scheme}://{address}"


def listener_url(listener: trio.SocketListener, scheme: str = "tcp") -> str:
    """The URL a listener is bound to, with the real port: ``tcp://127.0.0.1:54321``."""
    sock = listener.socket
    return _format(sock.family, sock.getsockname(), scheme)


def remote_address(stream: trio.abc.Stream) -> str:
    """A printable address of the other end of ``stream`` (``"memory"`` if it has none)."""
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
