"""The routing core: destinations by name, subscriptions per connection, transactions.

This module owns the broker's state between frames: which destinations exist
(:class:`~._destinations.Queue` / :class:`~._destinations.Topic` by name), which
connection holds which subscriptions and transactions, how a destination name maps to a
destination (``/queue/``, ``/topic/``, ``/temp-queue/``, the private ``/reply-queue/``
names that ``reply-to`` rewriting hands out, and the configurable default for any other
name), and what SEND, SUBSCRIBE, UNSUBSCRIBE, ACK, NACK, BEGIN, COMMIT and ABORT do.

It is sans-I/O: it never imports trio, never blocks, never reads a clock. Each method
applies one frame synchronously and completely (a COMMIT applies its whole transaction
before returning, so a transaction is atomic to every other connection). A frame the
client should not have sent raises :class:`~trio_stomp.RemoteProtocolError`, whose message
the session puts in an ERROR frame before closing the connection; the router's state is
unchanged by a frame that raised.

It never handles CONNECT, DISCONNECT, receipts or heart-beats (the session does), never
authenticates or authorizes (a later seam: the session asks before calling in), and never
stores anything durably.
"""

from __future__ import annotations

from typing import Final

from .._errors import LocalProtocolError, RemoteProtocolError
from .._frames import Frame
from ._destinations import (
    ACK_MODES,
    AckMode,
    Connection,
    CoreCounters,
    Message,
    Queue,
    Sink,
    Subscription,
    Topic,
    subscription_prefix,
)

__all__ = ["QUEUE_PREFIX", "REPLY_QUEUE_PREFIX", "TEMP_QUEUE_PREFIX", "TOPIC_PREFIX", "Router"]

QUEUE_PREFIX: Final = "/queue/"
TOPIC_PREFIX: Final = "/topic/"
TEMP_QUEUE_PREFIX: Final = "/temp-queue/"
REPLY_QUEUE_PREFIX: Final = "/reply-queue/"

#: SEND headers that never pass through to MESSAGE: the broker sets or consumes them.
RESERVED_HEADERS: Final = frozenset(
    {
        "destination",
        "receipt",
        "transaction",
        "content-length",
        "message-id",
        "subscription",
        "ack",
        "redelivered",
    }
)
PREFETCH_HEADERS: Final = ("prefetch", "activemq.prefetchSize")


class Router:
    """Every destination, subscription and transaction of one broker.

    Args:
      default_destination_type: ``"topic"`` or ``"queue"``: what a name outside the known
        prefixes is.
      prefetch: default credit of a client-ack subscription.
      max_prefetch: the largest credit a SUBSCRIBE may ask for.
      slow_consumer_policy: ``"disconnect"`` or ``"drop"`` for topic subscribers.
      id_prefix: prepended to every message id (make it unique per broker run).
    """

    def __init__(
        self,
        *,
        default_destination_type: str = "topic",
        prefetch: int = 1000,
        max_prefetch: int = 100_000,
        slow_consumer_policy: str = "disconnect",
        id_prefix: str = "",
    ) -> None:
        if default_destination_type not in ("topic", "queue"):
            raise ValueError(f"unknown destination type {default_destination_type!r}")
        self.default_destination_type = default_destination_type
        self.prefetch = prefetch
        self.max_prefetch = max_prefetch
        self.slow_consumer_policy = slow_consumer_policy
        self.counters = CoreCounters()
        self.queues: dict[str, Queue] = {}
        self.topics: dict[str, Topic] = {}
        # "/reply-queue/<session>.<name>" -> the temp queue it names.
        self.reply_queues: dict[str, Queue] = {}
        self.connections: dict[str, Connection] = {}
        self._id_prefix = id_prefix
        self._message_counter = 0

    # -- connections -------------------------------------------------------------------

    def connect(self, session_id: str, version: str, sink: Sink) -> Connection:
        """Register a connection that completed CONNECT. ``session_id`` must be unique."""
        if session_id in self.connections:
            raise ValueError(f"session id {session_id!r} is already connected")
        connection = Connection(session_id, version, sink)
        self.connections[session_id] = connection
        return connection

    def disconnect(self, connection: Connection) -> None:
        """The connection ended (DISCONNECT, error, loss): abort its transactions, drop its
        subscriptions (queue messages it held unacknowledged go back, redelivered) and its
        temp queues. Idempotent."""
        connection.alive = False
        if self.connections.get(connection.session_id) is not connection:
            return
        del self.connections[connection.session_id]
        connection.transactions.clear()
        for subscription in list(connection.subscriptions.values()):
            self._remove_subscription(subscription)
        for name, queue in connection.temp_queues.items():
            queue.drop_all()
            self.reply_queues.pop(self._reply_name(connection, name), None)
        connection.temp_queues.clear()

    def resume(self, connection: Connection) -> None:
        """The connection's outbound buffer drained: deliver to it again."""
        connection.writable = True
        if not connection.alive:
            return
        seen: set[int] = set()
        for subscription in list(connection.subscriptions.values()):
            destination = subscription.destination
            if isinstance(destination, Queue) and id(destination) not in seen:
                seen.add(id(destination))
                destination.dispatch()
                if not connection.writable:
                    return

    # -- destinations ------------------------------------------------------------------

    @property
    def counts(self) -> tuple[int, int, int]:
        """``(queues, topics, temp_queues)`` that exist right now."""
        return (len(self.queues), len(self.topics), len(self.reply_queues))

    def _reply_name(self, connection: Connection, name: str) -> str:
        return f"{REPLY_QUEUE_PREFIX}{connection.session_id}.{name}"

    def _temp_queue(self, connection: Connection, name: str) -> Queue:
        queue = connection.temp_queues.get(name)
        if queue is None:
            queue = Queue(TEMP_QUEUE_PREFIX + name, self.counters, owner=connection)
            connection.temp_queues[name] = queue
            self.reply_queues[self._reply_name(connection, name)] = queue
        return queue

    def _queue(self, name: str) -> Queue:
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = Queue(name, self.counters)
        return queue

    def _topic(self, name: str) -> Topic:
        topic = self.topics.get(name)
        if topic is None:
            topic = self.topics[name] = Topic(name, self.counters, self.slow_consumer_policy)
        return topic

    def _check_name(self, name: str) -> None:
        for prefix in (QUEUE_PREFIX, TOPIC_PREFIX, TEMP_QUEUE_PREFIX, REPLY_QUEUE_PREFIX):
            if name.startswith(prefix):
                if len(name) == len(prefix):
                    raise RemoteProtocolError(f"destination {name!r} has no name after the prefix")
                return

    def _resolve(
        self, connection: Connection, name: str, *, subscribe: bool
    ) -> Queue | Topic | None:
        """The destination ``name`` means for ``connection``; None only for a reply queue
        whose owner is gone (its messages are dropped, not an error: the sender cannot
        know)."""
        self._check_name(name)
        if name.startswith(QUEUE_PREFIX):
            return self._queue(name)
        if name.startswith(TOPIC_PREFIX):
            return self._topic(name) if subscribe else self.topics.get(name)
        if name.startswith(TEMP_QUEUE_PREFIX):
            return self._temp_queue(connection, name[len(TEMP_QUEUE_PREFIX) :])
        if name.startswith(REPLY_QUEUE_PREFIX):
            if subscribe:
                raise RemoteProtocolError(
                    f"cannot subscribe to {name!r}: reply queues are private to the connection "
                    f"that created them (subscribe to {TEMP_QUEUE_PREFIX}NAME instead)"
                )
            return self.reply_queues.get(name)
        if self.default_destination_type == "queue":
            return self._queue(name)
        return self._topic(name) if subscribe else self.topics.get(name)

    # -- SEND ----------------------------------------------------------------------------

    def send(self, connection: Connection, frame: Frame) -> None:
        """Apply a SEND: publish it now, or buffer it in its transaction.

        Raises:
          RemoteProtocolError: no ``destination``, an empty name, a subscription-only
            name, or an unknown ``transaction``.
        """
        headers = frame.headers
        destination = headers.get("destination")
        if not destination:
            raise RemoteProtocolError("SEND frame has no destination header")
        self._check_name(destination)
        transaction = headers.get("transaction")
        if transaction is not None:
            self._transaction(connection, transaction).append(frame)
            return
        self._publish(connection, frame, destination)

    def _publish(self, connection: Connection, frame: Frame, name: str) -> None:
        target = self._resolve(connection, name, subscribe=False)
        counters = self.counters
        if target is None:
            # A topic without subscribers, or a reply queue whose owner left.
            counters.enqueued += 1
            if name.startswith(REPLY_QUEUE_PREFIX):
                counters.dropped += 1
            else:
                counters.unrouted += 1
            return
        passthrough: list[tuple[str, str]] = []
        for header, value in frame.headers.raw:
            if header in RESERVED_HEADERS:
                continue
            if header == "reply-to" and value.startswith(TEMP_QUEUE_PREFIX):
                queue = self._temp_queue(connection, value[len(TEMP_QUEUE_PREFIX) :])
                value = self._reply_name(connection, queue.name[len(TEMP_QUEUE_PREFIX) :])
            passthrough.append((header, value))
        self._message_counter += 1
        message = Message(
            f"{self._id_prefix}{self._message_counter}", target.name, passthrough, frame.body
        )
        target.publish(message)

    # -- SUBSCRIBE / UNSUBSCRIBE ---------------------------------------------------------

    def subscribe(self, connection: Connection, frame: Frame) -> Subscription:
        """Apply a SUBSCRIBE; queued messages may be delivered before this returns.

        Raises:
          RemoteProtocolError: no ``destination``; no ``id`` (1.1+); a duplicate ``id``; an
            unknown ``ack`` mode; a bad ``prefetch``; a reply-queue name.
        """
        headers = frame.headers
        name = headers.get("destination")
        if not name:
            raise RemoteProtocolError("SUBSCRIBE frame has no destination header")
        subscription_id = headers.get("id")
        if subscription_id is None:
            if connection.version != "1.0":
                raise RemoteProtocolError("SUBSCRIBE frame has no id header")
            subscription_id = name
        if subscription_id in connection.subscriptions:
            raise RemoteProtocolError(
                f"subscription id {subscription_id!r} is already in use on this connection"
            )
        ack_mode = headers.get("ack", "auto")
        if ack_mode not in ACK_MODES:
            raise RemoteProtocolError(
                f"unknown ack mode {ack_mode!r}; expected one of {', '.join(ACK_MODES)}"
            )
        prefetch = self.prefetch
        for header in PREFETCH_HEADERS:
            value = headers.get(header)
            if value is not None:
                if not (value.isascii() and value.isdigit()) or not (
                    0 < int(value) <= self.max_prefetch
                ):
                    raise RemoteProtocolError(
                        f"{header} must be an integer in 1..{self.max_prefetch}, not {value!r}"
                    )
                prefetch = int(value)
                break
        try:
            subscription_prefix(subscription_id, connection.version)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(f"subscription id cannot be encoded: {exc}") from None
        target = self._resolve(connection, name, subscribe=True)
        assert target is not None  # only SEND resolves to None
        subscription = Subscription(
            connection, subscription_id, target, _ack_mode(ack_mode), prefetch
        )
        connection.subscriptions[subscription_id] = subscription
        target.add(subscription)
        return subscription

    def unsubscribe(self, connection: Connection, frame: Frame) -> None:
        """Apply an UNSUBSCRIBE: the subscription's unacknowledged queue messages go back
        to their queue, redelivered.

        Raises:
          RemoteProtocolError: no ``id`` (1.1+; 1.0 may name the ``destination``), or no
            subscription with that id.
        """
        headers = frame.headers
        subscription_id = headers.get("id")
        if subscription_id is None:
            if connection.version == "1.0":
                subscription_id = headers.get("destination")
            if subscription_id is None:
                raise RemoteProtocolError("UNSUBSCRIBE frame has no id header")
        subscription = connection.subscriptions.get(subscription_id)
        if subscription is None:
            raise RemoteProtocolError(f"no subscription with id {subscription_id!r}")
        self._remove_subscription(subscription)

    def _remove_subscription(self, subscription: Subscription) -> None:
        connection = subscription.connection
        connection.subscriptions.pop(subscription.id, None)
        destination = subscription.destination
        destination.remove(subscription)
        unacked = subscription.take_unacked(self.counters)
        if isinstance(destination, Queue):
            destination.requeue(unacked)
            if destination.idle and destination.owner is None:
                self.queues.pop(destination.name, None)
        elif destination.idle:
            self.topics.pop(destination.name, None)

    # -- ACK / NACK ----------------------------------------------------------------------

    def ack(self, connection: Connection, frame: Frame) -> None:
        """Apply an ACK (now, or on COMMIT of its transaction).

        An ack id that names nothing unacknowledged (already acknowledged, or returned to
        its queue) is ignored: the client cannot always know, so it is not an error.

        Raises:
          RemoteProtocolError: the version's ack header is missing (1.2 ``id``, 1.0/1.1
            ``message-id``), or an unknown ``transaction``.
        """
        self._ack_or_nack(connection, frame, nack=False)

    def nack(self, connection: Connection, frame: Frame) -> None:
        """Apply a NACK: the message (and, in ``client`` mode, every earlier unacknowledged
        one of that subscription) is redelivered: queue messages go back to the front of
        their queue, topic messages are sent again to the same subscription.

        Raises: as :meth:`ack`.
        """
        self._ack_or_nack(connection, frame, nack=True)

    def _ack_or_nack(self, connection: Connection, frame: Frame, *, nack: bool) -> None:
        headers = frame.headers
        header = "id" if connection.version == "1.2" else "message-id"
        if headers.get(header) is None:
            raise RemoteProtocolError(
                f"{frame.command} frame has no {header} header (required in STOMP "
                f"{connection.version})"
            )
        transaction = headers.get("transaction")
        if transaction is not None:
            self._transaction(connection, transaction).append(frame)
            return
        self._settle(connection, frame, nack=nack)

    def _settle(self, connection: Connection, frame: Frame, *, nack: bool) -> None:
        headers = frame.headers
        subscription: Subscription | None
        if connection.version == "1.2":
            key = headers["id"]
            subscription = connection.ack_index.get(key)
        else:
            key = headers["message-id"]
            subscription_id = headers.get("subscription")
            if subscription_id is not None:
                subscription = connection.subscriptions.get(subscription_id)
            else:
                subscription = next(
                    (s for s in connection.subscriptions.values() if key in s.unacked), None
                )
        if subscription is None:
            return
        counters = self.counters
        messages = subscription.settle(key, subscription.ack_mode == "client", counters)
        if not messages:
            return
        destination = subscription.destination
        if not nack:
            counters.acked += len(messages)
            if isinstance(destination, Queue):
                destination.dispatch()
            return
        if isinstance(destination, Queue):
            destination.requeue(messages)
        else:
            counters.redelivered += len(messages)
            for message in messages:
                destination.deliver(subscription, message, True)

    # -- transactions --------------------------------------------------------------------

    def _transaction(self, connection: Connection, transaction: str) -> list[Frame]:
        frames = connection.transactions.get(transaction)
        if frames is None:
            raise RemoteProtocolError(f"unknown transaction {transaction!r}")
        return frames

    def _transaction_id(self, frame: Frame) -> str:
        transaction = frame.headers.get("transaction")
        if transaction is None:
            raise RemoteProtocolError(f"{frame.command} frame has no transaction header")
        return transaction

    def begin(self, connection: Connection, frame: Frame) -> None:
        """Apply BEGIN.

        Raises:
          RemoteProtocolError: no ``transaction`` header, or that transaction is open.
        """
        transaction = self._transaction_id(frame)
        if transaction in connection.transactions:
            raise RemoteProtocolError(f"transaction {transaction!r} has already begun")
        connection.transactions[transaction] = []

    def commit(self, connection: Connection, frame: Frame) -> None:
        """Apply COMMIT: every SEND, ACK and NACK of the transaction, in order, at once.

        Raises:
          RemoteProtocolError: no ``transaction`` header, or no such open transaction.
        """
        transaction = self._transaction_id(frame)
        frames = self._transaction(connection, transaction)
        del connection.transactions[transaction]
        for buffered in frames:
            command = buffered.command
            if command == "SEND":
                self._publish(connection, buffered, buffered.headers["destination"])
            else:
                self._settle(connection, buffered, nack=command == "NACK")

    def abort(self, connection: Connection, frame: Frame) -> None:
        """Apply ABORT: forget the transaction's frames.

        Raises:
          RemoteProtocolError: no ``transaction`` header, or no such open transaction.
        """
        transaction = self._transaction_id(frame)
        self._transaction(connection, transaction)
        del connection.transactions[transaction]


def _ack_mode(value: str) -> AckMode:
    if value == "client":
        return "client"
    if value == "client-individual":
        return "client-individual"
    return "auto"
