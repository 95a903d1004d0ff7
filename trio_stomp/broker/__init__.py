"""trio_stomp.broker: a STOMP 1.0/1.1/1.2 message broker on Trio.

This package holds the broker's public names only; everything else is private. Run it
with ``python -m trio_stomp.broker`` or embed it::

    async with trio_stomp.broker.open_broker(listen=["tcp://127.0.0.1:0"]) as broker:
        print(broker.addresses)

It never imports the client (``trio_stomp._client``); both stand on the Peer.
"""

from ._auth import Authenticator, Credentials, Principal, hash_password
from ._broker import Broker, BrokerStatistics, open_broker, serve_broker
from ._config import Config, load_config

BrokerConfig = Config

__all__ = [
    "Authenticator",
    "Broker",
    "BrokerConfig",
    "BrokerStatistics",
    "Config",
    "Credentials",
    "Principal",
    "hash_password",
    "load_config",
    "open_broker",
    "serve_broker",
]
