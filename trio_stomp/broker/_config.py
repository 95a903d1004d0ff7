"""The broker's configuration: one frozen value, its defaults, validation and TOML loading.

This module owns :class:`Config` (exported as ``BrokerConfig``) and :func:`load_config`.
It never opens sockets, never starts tasks and never imports trio: a configuration is a
value that can be built, compared and validated anywhere (tests, the CLI, an embedding
application). Every setting has a safe default; an invalid value raises ``ValueError``
when the ``Config`` is built, so a broker never starts half-configured.

Names are the same everywhere: the attribute ``connect_timeout`` is the TOML key
``connect_timeout`` (``connect-timeout`` is accepted too) and the CLI flag
``--connect-timeout``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any, Final, Literal

import attrs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "DEFAULT_LISTEN",
    "Config",
    "DestinationSettings",
    "DestinationType",
    "SlowConsumerPolicy",
    "load_config",
    "parse_listen_url",
]

DEFAULT_LISTEN: Final = "tcp://127.0.0.1:61613"
LISTEN_SCHEMES: Final = ("tcp", "ws", "tls", "wss")

DestinationType = Literal["topic", "queue"]
SlowConsumerPolicy = Literal["disconnect", "drop"]
ExpiryPolicy = Literal["drop", "dead-letter"]
DurableOverflow = Literal["drop-oldest", "drop-newest"]
StoreSync = Literal["full", "normal"]
QueueFullPolicy = Literal["error", "drop-oldest"]
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_listen_url(url: str) -> tuple[str, str, int]:
    """Split ``tcp://HOST:PORT`` into ``("tcp", HOST, PORT)``.

    ``[::1]:61613`` style IPv6 hosts are accepted. Port 0 means "any free port".

    Raises:
      ValueError: the URL is malformed, the scheme is not served, or the port is out of range.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"listen address {url!r} must look like tcp://HOST:PORT")
    if scheme not in LISTEN_SCHEMES:
        raise ValueError(
            f"listen address {url!r}: scheme {scheme!r} is not supported "
            f"(supported: {', '.join(LISTEN_SCHEMES)})"
        )
    if scheme in ("ws", "wss"):  # ws://HOST:PORT/PATH: the path is the listener's
        rest = rest.partition("/")[0]
    rest = rest.rstrip("/")
    if rest.startswith("["):
        host, bracket, port_text = rest[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise ValueError(f"listen address {url!r} must look like tcp://[HOST]:PORT")
        port_text = port_text[1:]
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon or not host:
            raise ValueError(f"listen address {url!r} must look like tcp://HOST:PORT")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"listen address {url!r}: port must be an integer in 0..65535")
    return scheme, host, int(port_text)


def _check_listen(instance: Config, attribute: attrs.Attribute[Any], value: Any) -> None:
    for url in value:
        parse_listen_url(url)


def _positive(instance: Config, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, not {value!r}")


def _non_negative(instance: Config, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, not {value!r}")


def _check_heart_beat(instance: Config, attribute: attrs.Attribute[Any], value: Any) -> None:
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        raise ValueError(f"heart_beat must be two integers >= 0 (ms), not {value!r}")


def _check_store(instance: Config, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not (
        value == "memory" or (value.startswith("sqlite:") and len(value) > len("sqlite:"))
    ):
        raise ValueError(f"store must be 'memory' or 'sqlite:PATH', not {value!r}")


@attrs.frozen(kw_only=True)
class DestinationSettings:
    """Durability and expiry settings for the destinations whose name matches ``pattern``
    (shell-style: ``/queue/orders.*``). In TOML, one table per pattern:
    ``[destinations."/queue/orders.*"]`` with the other attributes as keys.

    Attributes:
      pattern: which destination names these settings apply to (the first match wins).
      persistent: every message sent to a matching queue is persistent, as if it carried
        ``persistent:true``.
      ttl: seconds a message may wait before it expires, when it has no ``expires``
        header (0: no default expiry).
      expiry_policy: ``"drop"`` or ``"dead-letter"`` (None: the broker's default).
      max_redeliveries: redeliveries before a message is dead-lettered (0: never; None:
        the broker's default).
      dead_letter_queue: where its dead letters go (None: ``dead_letter_prefix`` + the
        destination's name without its ``/queue/`` or ``/topic/`` prefix).
    """

    pattern: str
    persistent: bool = False
    ttl: float = attrs.field(default=0.0, converter=float, validator=_non_negative)
    expiry_policy: ExpiryPolicy | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(attrs.validators.in_(("drop", "dead-letter"))),
    )
    max_redeliveries: int | None = None
    dead_letter_queue: str | None = None


def _destinations_converter(value: Any) -> tuple[DestinationSettings, ...]:
    """``{pattern: {key: value}}`` (TOML tables), the same as an inline TOML string (the
    CLI flag), or a sequence of DestinationSettings."""
    if isinstance(value, str):
        try:
            value = tomllib.loads(value)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"destinations: {exc}") from None
    if isinstance(value, Mapping):
        result = []
        for pattern, table in value.items():
            if not isinstance(table, Mapping):
                raise ValueError(f"destinations.{pattern!r} must be a table")
            try:
                result.append(
                    DestinationSettings(
                        pattern=pattern, **{k.replace("-", "_"): v for k, v in table.items()}
                    )
                )
            except TypeError as exc:
                raise ValueError(f"destinations.{pattern!r}: {exc}") from None
        return tuple(result)
    return tuple(value)


def _check_authenticator(instance: Config, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not callable(getattr(value, "authenticate", None)):
        raise ValueError("authenticator must have an async authenticate(credentials) method")


def _upper(value: Any) -> str:
    return str(value).upper()


def _to_tuple(value: Any) -> tuple[Any, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _heart_beat_converter(value: Any) -> tuple[int, int]:
    if isinstance(value, str):
        first, _, second = value.partition(",")
        try:
            return (int(first), int(second))
        except ValueError:
            raise ValueError(f"heart_beat must look like 'CX,CY' (ms), not {value!r}") from None
    first, second = value
    return (first, second)


@attrs.frozen(kw_only=True)
class Config:
    """Everything a broker can be told. Every field has a default; ``Config()`` is a
    loopback broker on port 61613.

    Attributes:
      listen: addresses to listen on, ``tcp://HOST:PORT`` or ``ws://HOST:PORT/PATH`` (STOMP
        over WebSocket; needs ``trio-stomp[websocket]``) (port 0 = any free port). Empty:
        no listener at all, the broker serves only ``Broker.connect_in_memory()``.
      connect_timeout: seconds a new connection may take to send CONNECT before it is
        closed (with an ERROR frame).
      shutdown_grace: seconds sessions get, on shutdown, to send their ERROR frame and flush
        what they had queued before they are cancelled.
      heart_beat: ``(cx, cy)`` the broker announces in CONNECTED, in ms: it can send a
        heart-beat every ``cx`` ms and wants one from the client every ``cy`` ms (0 = never).
      heart_beat_tolerance: a client is disconnected when nothing arrived for the negotiated
        receive interval times this factor.
      default_destination_type: what a destination outside ``/queue/``, ``/topic/`` and
        ``/temp-queue/`` is: ``"topic"`` (the default, as the Go broker) or ``"queue"``.
      prefetch: the default credit of a ``client``/``client-individual`` subscription: how
        many messages it may hold unacknowledged. A SUBSCRIBE can ask for less (or more, up
        to ``max_prefetch``) with a ``prefetch`` (or ``activemq.prefetchSize``) header.
      max_prefetch: the largest ``prefetch`` a SUBSCRIBE may ask for.
      max_send_buffer: bytes queued for one connection before it counts as slow: queues
        stop delivering to it, topics apply ``slow_consumer_policy``, and the session stops
        reading its frames until the buffer drains.
      slow_consumer_policy: what a topic does with a subscriber whose buffer is full:
        ``"disconnect"`` (send an ERROR, close the connection) or ``"drop"`` (skip the
        message for that subscriber and count it).
      max_frame_size, max_body_size, max_line_length, max_headers: parser limits; a frame
        beyond any of them gets an ERROR and the connection closes.
      server_name: the ``server`` header of CONNECTED.
      log_level: the level of the ``trio_stomp.broker`` logger when run from the CLI.
      store: where persistent messages and durable subscriptions are kept: ``"memory"``
        (the default: nothing survives the process) or ``"sqlite:PATH"``.
      store_sync: SQLite's ``synchronous`` level: ``"full"`` (a RECEIPT means the message
        survives a power loss) or ``"normal"`` (it survives a crash of the broker process).
      max_redeliveries: a queue message that came back (NACK, consumer lost) more often
        than this goes to its dead-letter queue (0: never).
      dead_letter_prefix: a dead letter from ``/queue/NAME`` (or ``/topic/NAME``) goes to
        ``dead_letter_prefix + NAME``.
      expiry_policy: what happens to an expired message: ``"drop"`` (counted) or
        ``"dead-letter"``.
      expiry_sweep_interval: seconds between sweeps that remove expired messages from
        queues nobody consumes (a consumer never gets an expired message either way).
      durable_backlog: messages a durable topic subscription keeps while its client is
        away; beyond that ``durable_overflow`` applies.
      durable_overflow: ``"drop-oldest"`` or ``"drop-newest"`` (both counted as dropped).
      destinations: per-destination :class:`DestinationSettings` (persistent, ttl...).

    Security (docs/security.md):

    Attributes:
      users: a TOML users file (password hashes, groups, ACL rules); None: no users.
      allow_anonymous: let clients without credentials in. None (the default): only when
        no users are configured and every listener is on loopback (logged as a warning).
      authenticator: a custom ``trio_stomp.broker.Authenticator`` object (not in TOML); it
        replaces the users file and certificate checks.
      tls_cert, tls_key: the broker's certificate chain and key (PEM) for ``tls://``
        listeners; ``tls_key`` may be omitted when ``tls_cert`` holds the key.
      tls_ca: CA certificates (PEM); when set, ``tls://`` clients must present a
        certificate it signed, and its subject's common name is their principal.
      auth_failure_delay, auth_failure_max_delay: the per-address back-off after a failed
        CONNECT: the first delay in seconds, doubled per failure up to the maximum.
      max_connections: connections open at once (over every listener).
      max_connections_per_address: connections open at once from one IP address.
      max_subscriptions: subscriptions per connection.
      max_transactions: open transactions per connection.
      max_transaction_frames: SEND/ACK/NACK frames one transaction may hold.
      max_queue_depth: messages waiting in one queue; beyond it ``queue_full_policy``.
      queue_full_policy: ``"error"`` (the SEND gets an ERROR, the connection closes) or
        ``"drop-oldest"`` (the oldest waiting message is dropped and counted).
      max_destinations: queues, topics and temp queues that may exist at once.
    """

    listen: tuple[str, ...] = attrs.field(
        default=(DEFAULT_LISTEN,), converter=_to_tuple, validator=_check_listen
    )
    connect_timeout: float = attrs.field(default=10.0, converter=float, validator=_positive)
    shutdown_grace: float = attrs.field(default=5.0, converter=float, validator=_non_negative)
    heart_beat: tuple[int, int] = attrs.field(
        default=(10_000, 10_000), converter=_heart_beat_converter, validator=_check_heart_beat
    )
    heart_beat_tolerance: float = attrs.field(default=2.0, converter=float)
    default_destination_type: DestinationType = attrs.field(
        default="topic", validator=attrs.validators.in_(("topic", "queue"))
    )
    prefetch: int = attrs.field(default=1000, validator=_positive)
    max_prefetch: int = attrs.field(default=100_000, validator=_positive)
    max_send_buffer: int = attrs.field(default=1 << 20, validator=_positive)
    slow_consumer_policy: SlowConsumerPolicy = attrs.field(
        default="disconnect", validator=attrs.validators.in_(("disconnect", "drop"))
    )
    max_frame_size: int = attrs.field(default=16 * 1024 * 1024 + 64 * 1024, validator=_positive)
    max_body_size: int = attrs.field(default=16 * 1024 * 1024, validator=_positive)
    max_line_length: int = attrs.field(default=16 * 1024, validator=_positive)
    max_headers: int = attrs.field(default=128, validator=_positive)
    server_name: str = "trio_stomp/0.1.0"
    log_level: str = attrs.field(
        default="INFO", converter=_upper, validator=attrs.validators.in_(LOG_LEVELS)
    )
    store: str = attrs.field(default="memory", validator=_check_store)
    store_sync: StoreSync = attrs.field(
        default="full", validator=attrs.validators.in_(("full", "normal"))
    )
    max_redeliveries: int = attrs.field(default=10, validator=_non_negative)
    dead_letter_prefix: str = "/queue/DLQ."
    expiry_policy: ExpiryPolicy = attrs.field(
        default="drop", validator=attrs.validators.in_(("drop", "dead-letter"))
    )
    expiry_sweep_interval: float = attrs.field(default=1.0, converter=float, validator=_positive)
    durable_backlog: int = attrs.field(default=10_000, validator=_positive)
    durable_overflow: DurableOverflow = attrs.field(
        default="drop-oldest", validator=attrs.validators.in_(("drop-oldest", "drop-newest"))
    )
    destinations: tuple[DestinationSettings, ...] = attrs.field(
        default=(), converter=_destinations_converter
    )
    # Security (issue 5).
    users: str | None = None
    allow_anonymous: bool | None = None
    authenticator: Any = attrs.field(default=None, validator=_check_authenticator)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    auth_failure_delay: float = attrs.field(default=0.25, converter=float, validator=_non_negative)
    auth_failure_max_delay: float = attrs.field(
        default=10.0, converter=float, validator=_non_negative
    )
    max_connections: int = attrs.field(default=10_000, validator=_positive)
    max_connections_per_address: int = attrs.field(default=1_000, validator=_positive)
    max_subscriptions: int = attrs.field(default=1_000, validator=_positive)
    max_transactions: int = attrs.field(default=100, validator=_positive)
    max_transaction_frames: int = attrs.field(default=10_000, validator=_positive)
    max_queue_depth: int = attrs.field(default=100_000, validator=_positive)
    queue_full_policy: QueueFullPolicy = attrs.field(
        default="error", validator=attrs.validators.in_(("error", "drop-oldest"))
    )
    max_destinations: int = attrs.field(default=100_000, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.heart_beat_tolerance < 1.0:
            raise ValueError(
                f"heart_beat_tolerance must be >= 1.0, not {self.heart_beat_tolerance!r}"
            )
        if self.prefetch > self.max_prefetch:
            raise ValueError(
                f"prefetch ({self.prefetch}) must not exceed max_prefetch ({self.max_prefetch})"
            )
        if "\n" in self.server_name or "\r" in self.server_name:
            raise ValueError("server_name must not contain line breaks")
        if (
            any(url.startswith(("tls://", "wss://")) for url in self.listen)
            and self.tls_cert is None
        ):
            raise ValueError("a tls:// or wss:// listener needs tls_cert (and tls_key)")
        if (self.tls_key is not None or self.tls_ca is not None) and self.tls_cert is None:
            raise ValueError("tls_key and tls_ca need tls_cert")

    def destination_settings(self, name: str) -> DestinationSettings | None:
        """The first :attr:`destinations` entry whose pattern matches ``name``, if any."""
        for settings in self.destinations:
            if fnmatchcase(name, settings.pattern):
                return settings
        return None

    def parser_limits(self) -> dict[str, int]:
        """The keyword arguments for ``FrameParser`` / ``open_peer``."""
        return {
            "max_frame_size": self.max_frame_size,
            "max_body_size": self.max_body_size,
            "max_line_length": self.max_line_length,
            "max_headers": self.max_headers,
        }


CONFIG_KEYS: Final = frozenset(field.name for field in attrs.fields(Config))


def config_from_mapping(data: Mapping[str, Any], **overrides: Any) -> Config:
    """Build a :class:`Config` from a mapping (a parsed TOML table), then ``overrides``.

    Keys may use ``-`` or ``_``. A ``[broker]`` table is used if present.

    Raises:
      ValueError: an unknown key or an invalid value.
    """
    if "broker" in data and isinstance(data["broker"], Mapping):
        data = data["broker"]
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in CONFIG_KEYS:
            raise ValueError(
                f"unknown configuration key {key!r}; known keys: {', '.join(sorted(CONFIG_KEYS))}"
            )
        values[name] = value
    values.update(overrides)
    try:
        return Config(**values)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def load_config(path: str, **overrides: Any) -> Config:
    """Read a TOML file (the keys are :class:`Config`'s attribute names) into a Config.

    Blocks on file I/O: call it before starting Trio, or through ``trio.to_thread``.

    Raises:
      OSError: the file cannot be read.
      ValueError: the TOML is invalid, or holds an unknown key or an invalid value.
    """
    with open(path, "rb") as file:
        try:
            data = tomllib.load(file)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: {exc}") from None
    return config_from_mapping(data, **overrides)
