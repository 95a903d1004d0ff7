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
writes to a disk: persistent queue messages and durable subscriptions are *journaled*
(``Journal.put`` / ``delete``...) and the broker's store task commits them; the session
holds back RECEIPTs until that commit.

Durability, expiry and dead letters (issue 6) live here too, as the
:class:`~._destinations.QueueHooks` every queue is made with: a message expires when its
``expires`` header (ms since the epoch) or its destination's ``ttl`` has passed, by the
injected ``clock`` (the router never reads one itself); it is then dropped or
dead-lettered, and counted. A queue message that came back more than ``max_redeliveries``
times moves to ``/queue/DLQ.NAME`` with ``original-destination``,
``original-message-id``, ``dead-letter-reason`` and ``dead-letter-count`` headers. A
durable topic subscription (CONNECT ``client-id`` + SUBSCRIBE
``durable-subscription-name``) is an internal queue fed by its topic, bounded by
``durable_backlog``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from .._errors import LocalProtocolError, RemoteProtocolError
from .._frames import Frame, Headers
from ._config import DestinationSettings
from ._destinations import (
    ACK_MODES,
    AckMode,
    Connection,
    CoreCounters,
    Journal,
    Message,
    Queue,
    SendPlan,
    Sink,
    Subscription,
    Topic,
    plain_middle,
    plain_tail,
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
        "user-id",  # the broker stamps the sender's principal (issue 5): never forged
    }
)
#: The prefixes themselves, which name no destination.
_BARE_PREFIXES: Final = frozenset(
    {QUEUE_PREFIX, TOPIC_PREFIX, TEMP_QUEUE_PREFIX, REPLY_QUEUE_PREFIX}
)
PREFETCH_HEADERS: Final = ("prefetch", "activemq.prefetchSize")
#: SUBSCRIBE / UNSUBSCRIBE headers naming a durable topic subscription.
DURABLE_HEADERS: Final = ("durable-subscription-name", "activemq.subscriptionName")
#: Headers a dead letter carries (beside the sender's own).
DEAD_LETTER_HEADERS: Final = (
    "original-destination",
    "original-message-id",
    "dead-letter-reason",
    "dead-letter-count",
)
#: Internal names of the queues behind durable subscriptions (never routable by clients).
DURABLE_QUEUE_PREFIX: Final = "\x00durable/"
_SETTINGS_CACHE_SIZE: Final = 10_000


class Durable:
    """A durable topic subscription: the queue that holds its messages while away."""

    __slots__ = ("client_id", "name", "queue", "topic")

    def __init__(self, client_id: str, name: str, topic: str, queue: Queue) -> None:
        self.client_id = client_id
        self.name = name
        self.topic = topic
        self.queue = queue


class Router:
    """Every destination, subscription and transaction of one broker.

    Args:
      default_destination_type: ``"topic"`` or ``"queue"``: what a name outside the known
        prefixes is.
      prefetch: default credit of a client-ack subscription.
      max_prefetch: the largest credit a SUBSCRIBE may ask for.
      slow_consumer_policy: ``"disconnect"`` or ``"drop"`` for topic subscribers.
      id_prefix: prepended to every message id (make it unique per broker run).
      journal: where persistent messages and durable subscriptions are recorded (None:
        nothing is persistent).
      clock: returns the time in ms since the epoch (None: nothing ever expires).
      settings: per-destination settings by name (persistent, ttl, dead letters).
      max_redeliveries: returns beyond which a queue message is dead-lettered (0: never).
      dead_letter_prefix: dead letters of ``/queue/NAME`` go to this + ``NAME``.
      expiry_policy: ``"drop"`` or ``"dead-letter"``.
      durable_backlog, durable_overflow: the bound of a durable subscription's queue and
        what happens beyond it (``"drop-oldest"`` or ``"drop-newest"``).
      on_expiring: called when the first message with an expiry time starts waiting (the
        broker then runs :meth:`sweep_expired` until :attr:`expiring` is False).
    """

    def __init__(
        self,
        *,
        default_destination_type: str = "topic",
        prefetch: int = 1000,
        max_prefetch: int = 100_000,
        slow_consumer_policy: str = "disconnect",
        id_prefix: str = "",
        journal: Journal | None = None,
        clock: Callable[[], int] | None = None,
        settings: Callable[[str], DestinationSettings | None] | None = None,
        max_redeliveries: int = 0,
        dead_letter_prefix: str = "/queue/DLQ.",
        expiry_policy: str = "drop",
        durable_backlog: int = 10_000,
        durable_overflow: str = "drop-oldest",
        on_expiring: Callable[[], None] | None = None,
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
        self.journal = journal
        self._clock = clock
        self._settings_for = settings
        self._settings_cache: dict[str, DestinationSettings | None] = {}
        self.max_redeliveries = max_redeliveries
        self.dead_letter_prefix = dead_letter_prefix
        self.expiry_policy = expiry_policy
        self.durable_backlog = durable_backlog
        self.durable_overflow = durable_overflow
        self.on_expiring = on_expiring
        #: True while some waiting message may expire (the broker sweeps meanwhile).
        self.expiring = False
        self.durables: dict[tuple[str, str], Durable] = {}
        self._durables_by_topic: dict[str, list[Durable]] = {}
        self._durables_by_queue: dict[str, Durable] = {}

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
            queue = Queue(TEMP_QUEUE_PREFIX + name, self.counters, owner=connection, hooks=self)
            connection.temp_queues[name] = queue
            self.reply_queues[self._reply_name(connection, name)] = queue
        return queue

    def _queue(self, name: str) -> Queue:
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = Queue(name, self.counters, hooks=self)
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
        self, connection: Connection, name: str, *, subscribe: bool, checked: bool = False
    ) -> Queue | Topic | None:
        """The destination ``name`` means for ``connection``; None only for a reply queue
        whose owner is gone (its messages are dropped, not an error: the sender cannot
        know). ``checked``: the caller already ran ``_check_name``."""
        if not checked:
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
        # The broker's hottest path: the headers are decoded once here (the passthrough
        # needs every pair anyway) and every later lookup is a dict lookup.
        headers = frame.headers
        first = headers._first or headers.first  # the slot once decoded: no property call
        destination = first.get("destination")
        if not destination:
            raise RemoteProtocolError("SEND frame has no destination header")
        if destination in _BARE_PREFIXES:
            self._check_name(destination)  # raises
        transaction = first.get("transaction")
        if transaction is not None:
            _expires(first)  # raises now: COMMIT must not fail half-way
            self._transaction(connection, transaction).append(frame)
            return
        self._publish(connection, frame, destination)

    def send_to_queue(
        self, connection: Connection, frame: Frame, queue: Queue, destination: str
    ) -> None:
        """Apply a SEND without a ``transaction`` whose ``destination`` names ``queue``, an
        existing queue (or reply queue): :meth:`send` for a caller that looked those up
        already (the security check, which needs them too).

        Raises:
          RemoteProtocolError: as :meth:`send`.
        """
        if destination in _BARE_PREFIXES:
            self._check_name(destination)  # raises
        self._publish(connection, frame, destination, queue)

    def _publish(
        self, connection: Connection, frame: Frame, name: str, queue: Queue | None = None
    ) -> None:
        """Publish ``frame`` to destination ``name`` (``queue``: the queue it names, if the
        caller has it)."""
        if queue is not None:
            target: Queue | Topic | None = queue
        elif name.startswith(QUEUE_PREFIX):
            target = self._queue(name)
        else:
            target = self._resolve(connection, name, subscribe=False, checked=True)
        counters = self.counters
        durables = self._durables_by_topic.get(name) if self._durables_by_topic else None
        if target is None and not durables:
            # A topic without subscribers, or a reply queue whose owner left.
            counters.enqueued += 1
            if name.startswith(REPLY_QUEUE_PREFIX):
                counters.dropped += 1
            else:
                counters.unrouted += 1
            return
        headers = frame.headers
        first = headers._first or headers.first
        plan = connection.send_plan
        if (
            plan is not None
            and plan.first is first
            and target is not None
            and target.name == plan.destination
        ):
            # The same head as this connection's last plain SEND (the decode cache hands
            # out one dict per head), to the same destination: no expiry, settings,
            # persistence or reply-to to work out (a reply-to's temp queue, made by the
            # first such SEND, lives as long as this connection).
            self._message_counter += 1
            message_id = f"{self._id_prefix}{self._message_counter}"
            message = Message(message_id, target.name, plan.passthrough, frame.body)
            if plan.middle is not None:
                message._plain = plain_tail(message_id, plan.middle, frame.body)
            if durables:
                for durable in durables:
                    self._publish_durable(durable, message, False)
            target.publish(message)
            return
        expires = _expires(first) if "expires" in first else 0  # before any state changes
        passthrough = [pair for pair in headers.raw if pair[0] not in RESERVED_HEADERS]
        if "reply-to" in first:
            passthrough = [self._rewrite_reply_to(connection, pair) for pair in passthrough]
        if connection.user_id is not None:
            passthrough.append(("user-id", connection.user_id))
        settings = self._settings(name) if self._settings_for is not None else None
        if not expires and settings is not None and settings.ttl and self._clock is not None:
            expires = self._clock() + int(settings.ttl * 1000)
            passthrough.append(("expires", str(expires)))
        self._message_counter += 1
        message = Message(
            f"{self._id_prefix}{self._message_counter}",
            name if target is None else target.name,
            passthrough,
            frame.body,
        )
        if expires:
            message.expires = expires
            if self._clock is not None and expires <= self._clock():
                counters.enqueued += 1
                self._expired(message)
                return
            self._mark_expiring()
        persistent = self.journal is not None and (
            first.get("persistent") == "true" or (settings is not None and settings.persistent)
        )
        if durables:
            for durable in durables:
                self._publish_durable(durable, message, persistent)
            if target is None:
                return
        assert target is not None
        if (
            self._settings_for is None
            and "expires" not in first
            and "persistent" not in first
            and "receipt" not in first  # a receipt id makes the head unique: never repeats
        ):
            # Frames repeating this head can skip the work above (see SendPlan).
            connection.send_plan = SendPlan(
                first,
                target.name,
                message.sender_headers,
                plain_middle(target.name, message.sender_headers),
            )
        if persistent and isinstance(target, Queue) and target.owner is None:
            assert self.journal is not None
            message.store_key = self.journal.put(
                target.name, target.name, message.message_id, passthrough, frame.body, expires
            )
        target.publish(message)

    def _rewrite_reply_to(self, connection: Connection, pair: tuple[str, str]) -> tuple[str, str]:
        """A ``reply-to`` naming the sender's own temp queue becomes the broker-unique
        name other connections can send to (the temp queue is made if need be)."""
        header, value = pair
        if header != "reply-to" or not value.startswith(TEMP_QUEUE_PREFIX):
            return pair
        queue = self._temp_queue(connection, value[len(TEMP_QUEUE_PREFIX) :])
        return header, self._reply_name(connection, queue.name[len(TEMP_QUEUE_PREFIX) :])

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
        durable_name = _durable_name(headers)
        target: Queue | Topic | None
        if durable_name is not None:
            target = self._durable_queue(connection, name, durable_name)
        else:
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
        durable_name = _durable_name(headers)
        if durable_name is not None:
            self._unsubscribe_durable(connection, headers.get("id"), durable_name)
            return
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
        headers = frame.headers
        first = headers._first or headers.first
        if connection.version == "1.2" and "transaction" not in first:
            # The common case, straight: one client-individual delivery acknowledged.
            key = first.get("id", "")
            subscription = connection.ack_index.get(key)
            if subscription is not None and subscription.ack_mode == "client-individual":
                # The ledger and the index hold the same keys (Subscription.offer, settle).
                message = subscription.unacked.pop(key)
                del connection.ack_index[key]
                counters = self.counters
                counters.unacked -= 1
                counters.acked += 1
                if message.store_key is not None:
                    self._forget(message)
                destination = subscription.destination
                if isinstance(destination, Queue) and destination.messages:
                    destination.dispatch()
                return
        self._ack_or_nack(connection, frame, nack=False)

    def nack(self, connection: Connection, frame: Frame) -> None:
        """Apply a NACK: the message (and, in ``client`` mode, every earlier unacknowledged
        one of that subscription) is redelivered: queue messages go back to the front of
        their queue, topic messages are sent again to the same subscription.

        Raises: as :meth:`ack`.
        """
        self._ack_or_nack(connection, frame, nack=True)

    def _ack_or_nack(self, connection: Connection, frame: Frame, *, nack: bool) -> None:
        first = frame.headers.first  # one decode, then dict lookups
        header = "id" if connection.version == "1.2" else "message-id"
        if header not in first:
            raise RemoteProtocolError(
                f"{frame.command} frame has no {header} header (required in STOMP "
                f"{connection.version})"
            )
        transaction = first.get("transaction")
        if transaction is not None:
            self._transaction(connection, transaction).append(frame)
            return
        self._settle(connection, frame, nack=nack)

    def _settle(self, connection: Connection, frame: Frame, *, nack: bool) -> None:
        first = frame.headers.first
        subscription: Subscription | None
        if connection.version == "1.2":
            key = first["id"]
            subscription = connection.ack_index.get(key)
        else:
            key = first["message-id"]
            subscription_id = first.get("subscription")
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
                for message in messages:
                    if message.store_key is not None:
                        self._forget(message)
                if destination.messages:
                    destination.dispatch()
            return
        if isinstance(destination, Queue):
            destination.requeue(messages)
        else:
            counters.redelivered += len(messages)
            for message in messages:
                destination.deliver(subscription, message, True)

    # -- durability: stored messages, expiry, dead letters (QueueHooks) -------------------

    def _settings(self, name: str) -> DestinationSettings | None:
        cache = self._settings_cache
        try:
            return cache[name]
        except KeyError:
            pass
        settings = self._settings_for(name) if self._settings_for is not None else None
        if len(cache) >= _SETTINGS_CACHE_SIZE:
            cache.clear()  # bounded: names can be made up by clients
        cache[name] = settings
        return settings

    def _mark_expiring(self) -> None:
        if not self.expiring:
            self.expiring = True
            if self.on_expiring is not None:
                self.on_expiring()

    def _forget(self, message: Message) -> None:
        """The message leaves the broker for good: remove its stored copy."""
        key = message.store_key
        if key is not None:
            message.store_key = None
            assert self.journal is not None
            self.journal.delete(key)

    def drop_oldest(self, queue: Queue) -> None:
        """Discard ``queue``'s oldest waiting message, if any (a full queue's overflow
        policy): counted in ``dropped`` and removed from the store. Use this rather than
        popping ``queue.messages``, or a persistent message comes back after a restart."""
        if queue.messages:
            message = queue.messages.popleft()
            self.counters.queued -= 1
            self.counters.dropped += 1
            self._forget(message)

    def expire(self, queue: Queue, message: Message) -> bool:
        """QueueHooks: has ``message`` expired? If so drop or dead-letter it."""
        if self._clock is None or message.expires > self._clock():
            return False
        self._expired(message)
        return True

    def _expired(self, message: Message) -> None:
        self.counters.expired += 1
        settings = self._settings(message.destination)
        policy = (settings.expiry_policy if settings else None) or self.expiry_policy
        if policy == "dead-letter":
            self._dead_letter(message, "expired")
        else:
            self._forget(message)

    def delivered(self, queue: Queue, message: Message, subscription: Subscription) -> None:
        """QueueHooks: a stored message went out; auto-ack settles it at once."""
        key = message.store_key
        assert key is not None and self.journal is not None
        if subscription.ack_mode == "auto":
            self._forget(message)
        else:
            self.journal.delivered(queue.name, key)

    def requeued(self, queue: Queue, messages: list[Message]) -> list[Message]:
        """QueueHooks: dead-letter what came back too often; the rest goes back."""
        keep: list[Message] = []
        for message in messages:
            settings = self._settings(message.destination)
            limit = self.max_redeliveries
            if settings is not None and settings.max_redeliveries is not None:
                limit = settings.max_redeliveries
            if limit and message.redeliveries > limit:
                self._dead_letter(message, "max-redeliveries")
                continue
            if message.store_key is not None:
                assert self.journal is not None
                self.journal.set_redeliveries(message.store_key, message.redeliveries)
            if message.expires:
                self._mark_expiring()
            keep.append(message)
        return keep

    def dead_letter_queue_name(self, destination: str) -> str:
        """Where dead letters of ``destination`` go."""
        settings = self._settings(destination)
        if settings is not None and settings.dead_letter_queue:
            return settings.dead_letter_queue
        short = destination
        for prefix in (QUEUE_PREFIX, TOPIC_PREFIX, TEMP_QUEUE_PREFIX):
            if destination.startswith(prefix):
                short = destination[len(prefix) :]
                break
        return self.dead_letter_prefix + short.lstrip("/")

    def _dead_letter(self, message: Message, reason: str) -> None:
        """Move ``message`` (already out of its queue and ledger) to its DLQ."""
        persistent = message.store_key is not None
        self._forget(message)
        counters = self.counters
        name = self.dead_letter_queue_name(message.destination)
        if message.destination.startswith(self.dead_letter_prefix) or name == message.destination:
            counters.dropped += 1  # a dead letter of a dead letter: no loops
            return
        headers = [
            (header, value)
            for header, value in message.sender_headers
            if header not in DEAD_LETTER_HEADERS and header != "expires"
        ]
        headers += [
            ("original-destination", message.destination),
            ("original-message-id", message.message_id),
            ("dead-letter-reason", reason),
            ("dead-letter-count", str(message.redeliveries)),
        ]
        self._message_counter += 1
        dead = Message(f"{self._id_prefix}{self._message_counter}", name, headers, message.body)
        queue = self._queue(name)
        settings = self._settings(name)
        if self.journal is not None and (persistent or (settings and settings.persistent)):
            dead.store_key = self.journal.put(
                name, name, dead.message_id, headers, message.body, 0, 0
            )
        counters.dead_lettered += 1
        queue.publish(dead)

    def sweep_expired(self) -> int:
        """Remove every expired message waiting in a queue (dropped or dead-lettered by
        policy); returns how many. Clears :attr:`expiring` when no waiting message has an
        expiry time left. Delivery checks expiry too: this only keeps unconsumed queues
        from holding expired messages."""
        if self._clock is None:
            self.expiring = False
            return 0
        now = self._clock()
        queues = [
            *self.queues.values(),
            *self.reply_queues.values(),
            *(durable.queue for durable in self.durables.values()),
        ]
        expired: list[Message] = []
        remaining = False
        for queue in queues:
            messages = queue.messages
            if not any(message.expires for message in messages):
                continue
            keep: deque[Message] = deque()
            for message in messages:
                if message.expires and message.expires <= now:
                    expired.append(message)
                else:
                    keep.append(message)
                    remaining = remaining or bool(message.expires)
            if len(keep) != len(messages):
                self.counters.queued -= len(messages) - len(keep)
                messages.clear()
                messages.extend(keep)
                if queue.idle and queue.owner is None and self.queues.get(queue.name) is queue:
                    del self.queues[queue.name]
        for message in expired:
            self._expired(message)
        self.expiring = remaining
        return len(expired)

    # -- durable subscriptions ---------------------------------------------------------

    def _is_topic_name(self, name: str) -> bool:
        if name.startswith(TOPIC_PREFIX):
            return True
        for prefix in (QUEUE_PREFIX, TEMP_QUEUE_PREFIX, REPLY_QUEUE_PREFIX):
            if name.startswith(prefix):
                return False
        return self.default_destination_type == "topic"

    def _add_durable(self, client_id: str, name: str, topic: str) -> Durable:
        queue_name = f"{DURABLE_QUEUE_PREFIX}{client_id}/{name}"
        durable = Durable(client_id, name, topic, Queue(queue_name, self.counters, hooks=self))
        self.durables[(client_id, name)] = durable
        self._durables_by_topic.setdefault(topic, []).append(durable)
        self._durables_by_queue[queue_name] = durable
        return durable

    def _drop_durable(self, durable: Durable) -> None:
        del self.durables[(durable.client_id, durable.name)]
        del self._durables_by_queue[durable.queue.name]
        siblings = self._durables_by_topic[durable.topic]
        siblings.remove(durable)
        if not siblings:
            del self._durables_by_topic[durable.topic]
        queue = durable.queue
        for message in queue.messages:
            self._forget(message)
        self.counters.queued -= len(queue.messages)
        self.counters.dropped += len(queue.messages)
        queue.messages.clear()
        if self.journal is not None:
            self.journal.remove_durable(durable.client_id, durable.name, queue.name)

    def _durable_queue(self, connection: Connection, topic: str, name: str) -> Queue:
        """The queue behind durable subscription ``name`` of the connection's client-id
        on ``topic``, made if new (re-made if it was on another topic). If it is active
        on another connection, that connection is closed (with an ERROR) and this one
        takes over; what the old one had not acknowledged is redelivered."""
        client_id = connection.client_id
        if not client_id:
            raise RemoteProtocolError("a durable subscription needs a client-id header on CONNECT")
        if not self._is_topic_name(topic):
            raise RemoteProtocolError(
                f"durable subscriptions are for topics; {topic!r} is not a topic"
            )
        durable = self.durables.get((client_id, name))
        if durable is not None and durable.queue.subscriptions:
            # The newest connection of a client-id wins: a client resuming after a link
            # loss must not wait for the broker to notice that its old connection died.
            for old in list(durable.queue.subscriptions):
                self._remove_subscription(old)
                if old.connection is not connection and old.connection.alive:
                    old.connection.alive = False
                    old.connection.sink.close(
                        f"durable subscription {name!r} of client-id {client_id!r} was "
                        "taken over by a newer connection"
                    )
        if durable is not None and durable.topic != topic:
            self._drop_durable(durable)
            durable = None
        if durable is None:
            durable = self._add_durable(client_id, name, topic)
            if self.journal is not None:
                self.journal.add_durable(client_id, name, topic, durable.queue.name)
        return durable.queue

    def _publish_durable(self, durable: Durable, message: Message, persistent: bool) -> None:
        queue = durable.queue
        counters = self.counters
        if len(queue.messages) >= self.durable_backlog:
            counters.dropped += 1
            if self.durable_overflow == "drop-newest":
                return
            oldest = queue.messages.popleft()
            counters.queued -= 1
            self._forget(oldest)
        copy = Message(
            message.message_id, message.destination, message.sender_headers, message.body
        )
        copy.expires = message.expires
        if persistent:
            assert self.journal is not None
            copy.store_key = self.journal.put(
                queue.name,
                copy.destination,
                copy.message_id,
                copy.sender_headers,
                copy.body,
                copy.expires,
            )
        queue.publish(copy)

    def _unsubscribe_durable(
        self, connection: Connection, subscription_id: str | None, name: str
    ) -> None:
        """UNSUBSCRIBE naming a durable subscription: end it for good (its waiting
        messages are dropped)."""
        subscription = None
        if subscription_id is not None:
            subscription = connection.subscriptions.get(subscription_id)
        durable = self.durables.get((connection.client_id or "", name))
        if durable is None:
            if subscription is None:
                raise RemoteProtocolError(
                    f"no durable subscription {name!r} for client-id {connection.client_id!r}"
                )
            self._remove_subscription(subscription)
            return
        holders = durable.queue.subscriptions
        if any(held.connection is not connection for held in holders):
            raise RemoteProtocolError(
                f"durable subscription {name!r} is active on another connection"
            )
        if subscription is not None:
            self._remove_subscription(subscription)
        for held in list(holders):  # this connection's, whatever id the frame named
            self._remove_subscription(held)
        self._drop_durable(durable)

    # -- recovery ------------------------------------------------------------------------

    def restore_durable(self, client_id: str, name: str, topic: str, queue: str) -> None:
        """Re-create a durable subscription from the store (before any connection)."""
        durable = self._add_durable(client_id, name, topic)
        assert durable.queue.name == queue, (durable.queue.name, queue)

    def restore_message(
        self,
        *,
        key: int,
        queue: str,
        destination: str,
        message_id: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        expires: int,
        redeliveries: int,
        redelivered: bool,
    ) -> None:
        """Put a stored message back at the end of its queue (call in store order)."""
        durable = self._durables_by_queue.get(queue)
        target = durable.queue if durable is not None else self._queue(queue)
        message = Message(message_id, destination, headers, body)
        message.store_key = key
        message.expires = expires
        message.redeliveries = redeliveries
        message.redelivered = redelivered
        target.messages.append(message)
        self.counters.enqueued += 1
        self.counters.queued += 1
        if expires:
            self.expiring = True

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


def _expires(headers: Mapping[str, str]) -> int:
    """The ``expires`` header: ms since the epoch, 0 (or absent) for never.

    Raises:
      RemoteProtocolError: it is not a non-negative integer.
    """
    value = headers.get("expires")
    if not value:
        return 0
    if not (value.isascii() and value.isdigit()):
        raise RemoteProtocolError(
            f"expires must be a time in ms since the epoch (0: never), not {value!r}"
        )
    return int(value)


def _durable_name(headers: Headers) -> str | None:
    for header in DURABLE_HEADERS:
        value = headers.get(header)
        if value is not None:
            return value
    return None


def _ack_mode(value: str) -> AckMode:
    if value == "client":
        return "client"
    if value == "client-individual":
        return "client-individual"
    return "auto"
