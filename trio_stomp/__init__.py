"""trio_stomp: a STOMP 1.0/1.1/1.2 client library and message broker for Trio.

This module holds the public names only; everything else lives in private modules.
The broker lives in :mod:`trio_stomp.broker`; its main names are also reachable here
(``trio_stomp.open_broker``...), loaded on first use so the client never pays for them.
"""

from typing import TYPE_CHECKING

from ._client import (
    Client,
    ClientStatistics,
    Message,
    ReconnectPolicy,
    Subscription,
    Transaction,
    open_client,
    open_client_over_stream,
    open_client_over_stream_factory,
)
from ._codec import FrameParser, serialize
from ._errors import (
    BrokerError,
    ConnectionLost,
    HeartbeatTimeout,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    StompError,
)
from ._frames import HEARTBEAT, Command, Frame, Headers, Heartbeat
from ._negotiation import SUPPORTED_VERSIONS, choose_version, negotiate_heart_beat
from ._peer import Peer, PeerStatistics, open_peer

if TYPE_CHECKING:
    from .broker import Broker, BrokerConfig, BrokerStatistics, open_broker, serve_broker

__version__ = "0.1.0"

__all__ = [
    "HEARTBEAT",
    "SUPPORTED_VERSIONS",
    "Broker",
    "BrokerConfig",
    "BrokerError",
    "BrokerStatistics",
    "Client",
    "ClientStatistics",
    "Command",
    "ConnectionLost",
    "Frame",
    "FrameParser",
    "Headers",
    "Heartbeat",
    "HeartbeatTimeout",
    "LocalProtocolError",
    "Message",
    "Peer",
    "PeerStatistics",
    "ProtocolError",
    "ReconnectPolicy",
    "RemoteProtocolError",
    "StompError",
    "Subscription",
    "Transaction",
    "choose_version",
    "negotiate_heart_beat",
    "open_broker",
    "open_client",
    "open_client_over_stream",
    "open_client_over_stream_factory",
    "open_peer",
    "serialize",
    "serve_broker",
]

_BROKER_NAMES = frozenset(
    {"Broker", "BrokerConfig", "BrokerStatistics", "open_broker", "serve_broker"}
)


def __getattr__(name: str) -> object:
    # The broker's names are imported on first use (PEP 562).
    if name in _BROKER_NAMES:
        from . import broker

        return getattr(broker, name)
    raise AttributeError(f"module 'trio_stomp' has no attribute {name!r}")
