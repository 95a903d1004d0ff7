"""Destination semantics: queues, topics, subscriptions and the ack ledger.

This module owns what happens to a message once the broker has accepted it: a
:class:`Queue` hands each message to exactly one subscription, round-robin over the
subscriptions that have credit; a :class:`Topic` hands it to every current subscription;
each :class:`Subscription` keeps the ledger of what it delivered and has not had
acknowledged, and returns those messages (marked redelivered) on NACK, UNSUBSCRIBE or
disconnect.

It is sans-I/O: it never imports trio, never blocks, never reads a clock. Output goes
through the :class:`Sink` each connection registers: ``sink.write(data)`` either queues the
bytes of one MESSAGE frame and returns True, or returns False (nothing queued) because
that connection's outbound buffer is full. A sink must never call back into this module
or the router from ``write`` or ``close``: the routing core is not re-entrant.

Durability and expiry enter through two seams, so this module stays sans-I/O: a queue
made with :class:`QueueHooks` asks them whether a message has expired before handing it
out, tells them about each delivery of a stored message, and lets them dead-letter
messages that came back too often; the :class:`Journal` is what the router writes
persistent messages to (the broker's store implements it).

Encoding happens here, once per message and protocol version: :meth:`Message.wire` is the
serialized tail of the MESSAGE frame (``message-id``, ``destination``, the sender's
headers, ``content-length``, body and NUL); per delivery only the ``subscription``, ``ack``
and ``redelivered`` lines are prepended.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Final, Literal, Protocol

from .._codec import serialize
from .._errors import LocalProtocolError
from .._frames import Frame

__all__ = [
    "AckMode",
    "Connection",
    "CoreCounters",
    "Journal",
    "Message",
    "Queue",
    "QueueHooks",
    "Sink",
    "Subscription",
    "Topic",
    "subscription_prefix",
]

AckMode = Literal["auto", "client", "client-individual"]
ACK_MODES: Final = ("auto", "client", "client-individual")

_MESSAGE_COMMAND_LEN: Final = len(b"MESSAGE\n")
_REDELIVERED_LINE: Final = b"redelivered:true\n"


class Sink(Protocol):
    """How the routing core talks to one connection's I/O (implemented by the session)."""

    def write(self, data: bytes) -> bool:
        """Queue ``data`` (whole frames) for sending. Return False, queueing nothing, when
        the connection's outbound buffer is full; the session then calls
        ``Router.resume`` once it has drained. Must not block or re-enter the router."""
        ...

    def close(self, message: str) -> None:
        """The core gives up on this connection (a slow consumer): send an ERROR carrying
        ``message`` if possible and close. Must not block or re-enter the router."""
        ...


class Journal(Protocol):
    """Where the router records what must survive a restart (the broker's store). Every
    method returns at once: the store writes in the background, in batches."""

    def put(
        self,
        queue: str,
        destination: str,
        message_id: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        expires: int = 0,
        redeliveries: int = 0,
    ) -> int:
        """A persistent message entered ``queue``; returns its store key."""
        ...

    def delete(self, key: int) -> None:
        """The message left the store (acknowledged, expired, dead-lettered)."""
        ...

    def set_redeliveries(self, key: int, count: int) -> None: ...

    def delivered(self, queue: str, key: int) -> None:
        """The message was handed to a consumer (the redelivered watermark)."""
        ...

    def add_durable(self, client_id: str, name: str, destination: str, queue: str) -> None: ...

    def remove_durable(self, client_id: str, name: str, queue: str) -> None: ...


class QueueHooks(Protocol):
    """What a :class:`Queue` asks its router about expiry, stored messages and dead
    letters. Hooks may publish to *other* queues, never touch the calling queue."""

    def expire(self, queue: Queue, message: Message) -> bool:
        """Called before handing out a message that has an ``expires`` time: return True
        when it has expired (the hook has dropped or dead-lettered it; the queue forgets
        it), False to deliver it."""
        ...

    def delivered(self, queue: Queue, message: Message, subscription: Subscription) -> None:
        """A stored message (``store_key`` set) was written to ``subscription``."""
        ...

    def requeued(self, queue: Queue, messages: list[Message]) -> list[Message]:
        """Messages came back (their ``redeliveries`` already counted): return those that
        go back into the queue; the hook dead-letters the others."""
        ...


class CoreCounters:
    """Running totals shared by every destination of one router (plain ints: no locks
    are needed, the core runs on one thread)."""

    __slots__ = (
        "acked",
        "dead_lettered",
        "delivered",
        "dropped",
        "enqueued",
        "expired",
        "queued",
        "redelivered",
        "slow_consumers",
        "unacked",
        "unrouted",
    )

    def __init__(self) -> None:
        self.enqueued = 0  # messages accepted into a destination
        self.delivered = 0  # MESSAGE frames handed to a connection (redeliveries included)
        self.acked = 0  # messages acknowledged (auto mode counts on delivery)
        self.redelivered = 0  # messages returned for redelivery (NACK, unsubscribe, loss)
        self.dropped = 0  # messages discarded: slow topic subscriber (drop), temp queue gone
        self.unrouted = 0  # messages published to a topic that had no subscriber
        self.slow_consumers = 0  # connections closed by the "disconnect" policy
        self.queued = 0  # messages waiting in queues right now
        self.expired = 0  # messages that expired before delivery (dropped or dead-lettered)
        self.dead_lettered = 0  # messages moved to a dead-letter queue
        self.unacked = 0  # messages delivered and not yet acknowledged right now


class Message:
    """One published message, shared by every subscription it is delivered to.

    Attributes:
      message_id: broker-unique; stays the same across redeliveries.
      destination: the destination header MESSAGE frames carry.
      headers: the MESSAGE headers common to every delivery (``message-id``,
        ``destination``, the sender's own headers, ``content-length``).
      body: the body, untouched.
      redelivered: True once the message came back to its queue undelivered-for-good.
      redeliveries: how many times it came back (the seam for dead-lettering).
      expires: absolute expiry time in ms since the epoch; 0 = never.
      store_key: the key of its stored copy, or None when it is not persistent.
    """

    __slots__ = (
        "_plain",
        "_wire",
        "body",
        "destination",
        "expires",
        "message_id",
        "redelivered",
        "redeliveries",
        "sender_headers",
        "store_key",
    )

    def __init__(
        self,
        message_id: str,
        destination: str,
        sender_headers: Iterable[tuple[str, str]],
        body: bytes,
    ) -> None:
        self.message_id = message_id
        self.destination = destination
        #: The headers the sender chose (without message-id, destination,
        #: content-length).
        self.sender_headers = tuple(sender_headers)
        self.body = body
        self.redelivered = False
        self.redeliveries = 0
        self.expires = 0
        self.store_key: int | None = None
        # The frame tail when it is the same in every version (the common case), else
        # None and the tails per version in _wire (made on first use).
        self._plain: bytes | None = None
        self._wire: dict[str, bytes] | None = None

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """Every header of the MESSAGE frame but the per-delivery ones."""
        return (
            ("message-id", self.message_id),
            ("destination", self.destination),
            *self.sender_headers,
            ("content-length", str(len(self.body))),
        )

    def wire(self, version: str) -> bytes:
        """The MESSAGE frame's bytes after the per-delivery header lines, for ``version``.

        Computed once per version and cached. A sender's header that ``version`` cannot
        carry (a line break in 1.0, a CR in 1.1) is left out for that version only.
        """
        data = self._plain
        if data is not None:
            return data
        wire = self._wire
        if wire is None:
            data = _plain_tail(self)
            if data is not None:
                # Nothing to escape: the same bytes serve every version.
                self._plain = data
                return data
            wire = self._wire = {}
        data = wire.get(version)
        if data is None:
            try:
                data = serialize(Frame("MESSAGE", self.headers, self.body), version)
            except LocalProtocolError:
                data = serialize(
                    Frame("MESSAGE", _encodable(self.headers, version), self.body), version
                )
            data = data[_MESSAGE_COMMAND_LEN:]
            wire[version] = data
        return data

    def __repr__(self) -> str:
        return f"<Message {self.message_id} to {self.destination} ({len(self.body)} bytes)>"


def _plain_tail(message: Message) -> bytes | None:
    """The frame tail ``serialize`` would write, when no header needs escaping in any
    version (the common case: a few searches instead of a regex search per header);
    else None."""
    middle = plain_middle(message.destination, message.sender_headers)
    if middle is None or not _is_plain(message.message_id):
        return None
    return plain_tail(message.message_id, middle, message.body)


def plain_middle(destination: str, sender_headers: tuple[tuple[str, str], ...]) -> bytes | None:
    """The bytes of a MESSAGE tail between its ``message-id`` value and its
    ``content-length`` value (``\ndestination:...`` up to ``content-length:``), when
    neither the destination nor a sender's header needs escaping in any version; else
    None. A router can make it once for many messages with the same headers."""
    if not _is_plain(destination):
        return None
    if not sender_headers:
        return f"\ndestination:{destination}\ncontent-length:".encode()
    text = "\n".join(map(":".join, sender_headers))
    if (
        "\\" in text
        or "\r" in text
        or text.count(":") != len(sender_headers)
        or text.count("\n") != len(sender_headers) - 1
    ):
        return None
    return f"\ndestination:{destination}\n{text}\ncontent-length:".encode()


def plain_tail(message_id: str, middle: bytes, body: bytes) -> bytes:
    """The MESSAGE tail from a plain ``message_id``, a :func:`plain_middle` and the body."""
    return b"".join(
        (b"message-id:", message_id.encode(), middle, b"%d\n\n" % len(body), body, b"\0")
    )


def _is_plain(value: str) -> bool:
    return not ("\\" in value or ":" in value or "\n" in value or "\r" in value)


def _encodable(headers: tuple[tuple[str, str], ...], version: str) -> tuple[tuple[str, str], ...]:
    kept = []
    for name, value in headers:
        try:
            serialize(Frame("MESSAGE", ((name, value),)), version)
        except LocalProtocolError:
            continue
        kept.append((name, value))
    return tuple(kept)


def subscription_prefix(subscription_id: str, version: str) -> bytes:
    """``MESSAGE`` + the ``subscription`` line, escaped for ``version``.

    Raises:
      LocalProtocolError: the id cannot be written in ``version``.
    """
    data = serialize(Frame("MESSAGE", (("subscription", subscription_id),)), version)
    return data[:-2]  # drop the blank line and the NUL: more header lines follow


class SendPlan:
    """What a SEND head means, worked out once for the frames that repeat it: the
    sender's headers to pass through (a ``reply-to`` already rewritten: a plan belongs to
    one connection) and the MESSAGE bytes between message-id and content-length (None
    when they need escaping), for the destination it resolved to. Only for heads without
    ``expires``, ``persistent``, ``receipt`` or ``transaction`` and with no
    per-destination settings (each of those depends on more than the head)."""

    __slots__ = ("destination", "first", "middle", "passthrough")

    def __init__(
        self,
        first: dict[str, str],
        destination: str,
        passthrough: tuple[tuple[str, str], ...],
        middle: bytes | None,
    ) -> None:
        self.first = first  # the head's decoded dict, shared by frames with that head
        self.destination = destination  # the name of the queue or topic it resolved to
        self.passthrough = passthrough
        self.middle = middle


class Connection:
    """The routing core's view of one client connection.

    Attributes:
      session_id: the ``session`` the broker announced in CONNECTED; unique in the broker.
      version: the negotiated STOMP version (it decides escaping and ACK headers).
      sink: where this connection's MESSAGE frames go.
      alive: False once the core or the session gave up on the connection; nothing is
        delivered to it any more.
      writable: False while its outbound buffer is full (queues skip it, topics apply the
        slow-consumer policy); ``Router.resume`` sets it back.
    """

    __slots__ = (
        "_ack_counter",
        "ack_index",
        "alive",
        "client_id",
        "send_plan",
        "session_id",
        "sink",
        "subscriptions",
        "temp_queues",
        "transactions",
        "user_id",
        "version",
        "writable",
    )

    def __init__(self, session_id: str, version: str, sink: Sink) -> None:
        self.session_id = session_id
        self.version = version
        self.sink = sink
        self.alive = True
        self.writable = True
        self.subscriptions: dict[str, Subscription] = {}
        # 1.2 only: ack id -> the subscription that holds it unacknowledged.
        self.ack_index: dict[str, Subscription] = {}
        # transaction id -> buffered (command, frame) pairs, applied on COMMIT.
        self.transactions: dict[str, list[Frame]] = {}
        # temp queue name (after /temp-queue/) -> the queue.
        self.temp_queues: dict[str, Queue] = {}
        # The CONNECT client-id (durable subscriptions belong to it), if any.
        self.client_id: str | None = None
        # The authenticated principal's name, stamped as user-id on what it sends.
        self.user_id: str | None = None
        # What the router worked out for this connection's last plain SEND head (see
        # Router._publish); None until then.
        self.send_plan: SendPlan | None = None
        # The last 1.2 ack id handed out (Subscription.offer counts up).
        self._ack_counter = 0

    def __repr__(self) -> str:
        return f"<Connection {self.session_id} {self.version}>"


class Subscription:
    """One SUBSCRIBE: a connection's interest in a destination, with its ack ledger.

    ``unacked`` maps the ack key (1.2: the ``ack`` header value; 1.0/1.1: the
    ``message-id``) to the message, in delivery order, so a cumulative (``client``) ACK
    pops from the front.
    """

    __slots__ = (
        "ack_mode",
        "connection",
        "destination",
        "id",
        "prefetch",
        "prefix",
        "unacked",
    )

    def __init__(
        self,
        connection: Connection,
        subscription_id: str,
        destination: Queue | Topic,
        ack_mode: AckMode,
        prefetch: int,
    ) -> None:
        self.connection = connection
        self.id = subscription_id
        self.destination = destination
        self.ack_mode = ack_mode
        self.prefetch = prefetch
        self.prefix = subscription_prefix(subscription_id, connection.version)
        self.unacked: dict[str, Message] = {}

    def offer(self, message: Message, counters: CoreCounters, redelivered: bool) -> bool:
        """Write ``message`` to the connection; record it in the ledger unless auto-acked.

        Returns False (nothing written) when the connection's buffer is full, which also
        marks the connection not writable.
        """
        connection = self.connection
        version = connection.version
        auto = self.ack_mode == "auto"
        if auto:
            head = self.prefix
        elif version == "1.2":
            connection._ack_counter += 1
            key = str(connection._ack_counter)
            head = b"%sack:%s\n" % (self.prefix, key.encode())
        else:
            key = message.message_id
            head = self.prefix
        if redelivered:
            head += _REDELIVERED_LINE
        tail = message._plain or message.wire(version)  # the common case without a call
        if not connection.sink.write(head + tail):
            connection.writable = False
            return False
        counters.delivered += 1
        if auto:
            counters.acked += 1
        else:
            self.unacked[key] = message
            counters.unacked += 1
            if version == "1.2":
                connection.ack_index[key] = self
        return True

    def settle(self, key: str, cumulative: bool, counters: CoreCounters) -> list[Message]:
        """Remove ``key`` (and, if ``cumulative``, every earlier delivery) from the ledger.

        Returns the removed messages in delivery order; empty when ``key`` is unknown.
        """
        unacked = self.unacked
        if key not in unacked:
            return []
        index = self.connection.ack_index
        if not cumulative:
            removed = [unacked.pop(key)]
            index.pop(key, None)
        else:
            removed = []
            for k in list(unacked):
                removed.append(unacked.pop(k))
                index.pop(k, None)
                if k == key:
                    break
        counters.unacked -= len(removed)
        return removed

    def take_unacked(self, counters: CoreCounters) -> list[Message]:
        """Empty the ledger (unsubscribe, disconnect); returns the messages in order."""
        removed = list(self.unacked.values())
        index = self.connection.ack_index
        for key in self.unacked:
            index.pop(key, None)
        self.unacked.clear()
        counters.unacked -= len(removed)
        return removed

    def __repr__(self) -> str:
        return f"<Subscription {self.id!r} of {self.connection.session_id} on {self.destination}>"


class Queue:
    """A point-to-point destination: each message to exactly one subscription.

    Messages wait in FIFO order until a subscription with credit takes them; messages that
    come back (NACK, unsubscribe, disconnect) go to the front, in their original order,
    marked redelivered. Delivery is round-robin over the subscriptions that have credit.

    Attributes:
      name: the destination as clients name it (``/queue/a``, ``/temp-queue/x``...).
      owner: for a temp queue, the only connection that may subscribe; else None.
      hooks: expiry, stored-message and dead-letter hooks (None: none of those).
    """

    __slots__ = ("_counters", "_next", "hooks", "messages", "name", "owner", "subscriptions")

    kind: Final = "queue"

    def __init__(
        self,
        name: str,
        counters: CoreCounters,
        owner: Connection | None = None,
        hooks: QueueHooks | None = None,
    ) -> None:
        self.name = name
        self.owner = owner
        self.hooks = hooks
        self.messages: deque[Message] = deque()
        self.subscriptions: list[Subscription] = []
        self._counters = counters
        self._next = 0

    @property
    def idle(self) -> bool:
        """No messages and no subscriptions: the queue can be forgotten."""
        return not self.messages and not self.subscriptions

    def publish(self, message: Message) -> None:
        """Accept ``message`` and deliver whatever can be delivered now."""
        counters = self._counters
        counters.enqueued += 1
        if not self.messages and self.subscriptions and self._offer(message):
            return  # the common case: straight through to a subscriber with credit
        self.messages.append(message)
        counters.queued += 1
        self.dispatch()

    def requeue(self, messages: list[Message]) -> None:
        """Put messages that were delivered but not acknowledged back at the front."""
        if not messages:
            return
        for message in messages:
            message.redelivered = True
            message.redeliveries += 1
        if self.hooks is not None:
            messages = self.hooks.requeued(self, messages)
            if not messages:
                return
        self._counters.redelivered += len(messages)
        self.messages.extendleft(reversed(messages))
        self._counters.queued += len(messages)
        self.dispatch()

    def add(self, subscription: Subscription) -> None:
        self.subscriptions.append(subscription)
        self.dispatch()

    def remove(self, subscription: Subscription) -> None:
        """Forget ``subscription`` (its unacked messages are the caller's to requeue)."""
        index = self.subscriptions.index(subscription)
        del self.subscriptions[index]
        if index < self._next:
            self._next -= 1

    def dispatch(self) -> None:
        """Deliver queued messages round-robin to subscriptions with credit, until the
        queue is empty or nobody can take more."""
        messages = self.messages
        counters = self._counters
        hooks = self.hooks
        while messages and self.subscriptions:
            message = messages[0]
            if message.expires and hooks is not None and hooks.expire(self, message):
                messages.popleft()
                counters.queued -= 1
                continue
            if not self._offer(message):
                return
            messages.popleft()
            counters.queued -= 1

    def _offer(self, message: Message) -> bool:
        """Give ``message`` to the next subscription (round-robin) that has credit and
        takes it; False when none does."""
        subscriptions = self.subscriptions
        count = len(subscriptions)
        start = self._next % count
        for step in range(count):
            index = (start + step) % count
            subscription = subscriptions[index]
            connection = subscription.connection
            if not (
                connection.alive
                and connection.writable
                and (
                    subscription.ack_mode == "auto"
                    or len(subscription.unacked) < subscription.prefetch
                )
            ):
                continue  # no credit
            if subscription.offer(message, self._counters, message.redelivered):
                self._next = index + 1
                if message.store_key is not None and self.hooks is not None:
                    self.hooks.delivered(self, message, subscription)
                return True
        return False

    def drop_all(self) -> int:
        """Discard every waiting message (a temp queue whose owner left); returns how many."""
        count = len(self.messages)
        self.messages.clear()
        self._counters.queued -= count
        self._counters.dropped += count
        return count

    def __repr__(self) -> str:
        return f"<Queue {self.name} ({len(self.messages)} waiting)>"


class Topic:
    """A publish-subscribe destination: each message to every current subscription.

    Nothing is kept for absent subscribers. A subscription that cannot take a message (its
    connection's buffer is full, or, in a client ack mode, it holds ``prefetch``
    unacknowledged messages) is a slow consumer: by policy its connection is closed with
    an ERROR (``"disconnect"``) or the message is skipped for it and counted
    (``"drop"``).
    """

    __slots__ = ("_counters", "name", "policy", "subscriptions")

    kind: Final = "topic"

    def __init__(self, name: str, counters: CoreCounters, policy: str = "disconnect") -> None:
        self.name = name
        self.policy = policy
        self.subscriptions: list[Subscription] = []
        self._counters = counters

    @property
    def idle(self) -> bool:
        return not self.subscriptions

    def publish(self, message: Message) -> None:
        """Deliver ``message`` to every subscription now, applying the slow-consumer
        policy to those that cannot take it."""
        counters = self._counters
        counters.enqueued += 1
        subscriptions = self.subscriptions
        if not subscriptions:
            counters.unrouted += 1
            return
        # Topic.deliver inlined, and for an auto-ack subscription Subscription.offer too
        # (the fan-out's per-delivery cost is mostly calls). A slow consumer's removal may
        # change the list meanwhile, hence the copy.
        message.wire(subscriptions[0].connection.version)  # the tail, made once
        plain = message._plain  # None when the versions need different escaping
        for subscription in tuple(subscriptions) if len(subscriptions) > 1 else subscriptions:
            connection = subscription.connection
            if not connection.alive:
                continue
            if connection.writable:
                if plain is not None and subscription.ack_mode == "auto":
                    if connection.sink.write(subscription.prefix + plain):
                        counters.delivered += 1
                        counters.acked += 1
                        continue
                    connection.writable = False
                elif (
                    subscription.ack_mode == "auto"
                    or len(subscription.unacked) < subscription.prefetch
                ) and subscription.offer(message, counters, False):
                    continue
            self._slow(subscription)

    def deliver(self, subscription: Subscription, message: Message, redelivered: bool) -> None:
        """Deliver to one subscription (also used to redeliver after a NACK)."""
        connection = subscription.connection
        if not connection.alive:
            return
        if (
            connection.writable
            and (
                subscription.ack_mode == "auto" or len(subscription.unacked) < subscription.prefetch
            )
            and subscription.offer(message, self._counters, redelivered)
        ):
            return
        self._slow(subscription)

    def _slow(self, subscription: Subscription) -> None:
        counters = self._counters
        if self.policy == "drop":
            counters.dropped += 1
            return
        connection = subscription.connection
        counters.dropped += 1
        counters.slow_consumers += 1
        connection.alive = False
        reason = (
            f"slow consumer: subscription {subscription.id!r} on {self.name} "
            "could not keep up (its buffer is full)"
        )
        connection.sink.close(reason)

    def add(self, subscription: Subscription) -> None:
        self.subscriptions.append(subscription)

    def remove(self, subscription: Subscription) -> None:
        self.subscriptions.remove(subscription)

    def __repr__(self) -> str:
        return f"<Topic {self.name} ({len(self.subscriptions)} subscribers)>"
