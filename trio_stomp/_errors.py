"""The exception family of trio_stomp.

This module owns every exception type the library raises. It imports nothing from trio
(it is shared by the sans-I/O layer), and it never formats frames: callers put the human
readable explanation in the message.

The tree::

    StompError
    ├── ProtocolError              somebody broke the STOMP protocol
    │   ├── RemoteProtocolError    ... the peer did (answer with an ERROR frame, then close)
    │   └── LocalProtocolError     ... we did (a misuse of the API; raised to the caller)
    ├── ConnectionLost             the link is gone (EOF, reset, heart-beat timeout, closed)
    │   └── HeartbeatTimeout       nothing arrived within the negotiated interval x tolerance
    └── BrokerError                the broker sent an ERROR frame
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ._frames import Frame

__all__ = [
    "BrokerError",
    "ConnectionLost",
    "HeartbeatTimeout",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "StompError",
]


class StompError(Exception):
    """Base class of every error trio_stomp raises on purpose."""


class ProtocolError(StompError):
    """The STOMP protocol was violated.

    Catch this to handle both directions; the subclasses say who was at fault.
    ``FrameParser`` raises :class:`RemoteProtocolError` (it parses what a peer sent),
    ``serialize`` raises :class:`LocalProtocolError` (it encodes what we are about to send).
    """


class RemoteProtocolError(ProtocolError):
    """The peer sent something that is not valid STOMP (bad framing, bad escape, a limit
    exceeded...). A broker answers with an ERROR frame carrying ``str(exc)`` and closes."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something that is not valid STOMP (a programming error)."""


class ConnectionLost(StompError):
    """The connection to the peer is gone: end of stream, a broken socket, a heart-beat
    timeout, or a close we started. Any frame not yet acknowledged by a receipt may or may
    not have been processed by the peer."""


class HeartbeatTimeout(ConnectionLost):
    """Nothing arrived from the peer within the negotiated heart-beat interval multiplied by
    the configured tolerance, so the link was declared dead."""


class BrokerError(StompError):
    """The broker sent an ERROR frame.

    Attributes:
      message: the ERROR frame's ``message`` header ("" when absent).
      frame: the whole ERROR frame (headers and body), or ``None`` if it was not kept.
    """

    def __init__(self, message: str, frame: Frame | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.frame = frame
