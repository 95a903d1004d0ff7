"""Tests of trio_stomp._client against a scripted fake broker over memory streams.

The fake broker (:class:`MiniBroker`) stands on our own Peer (tested in test_peer.py) and
implements just enough STOMP to drive the client: CONNECT, SUBSCRIBE/UNSUBSCRIBE, SEND routed
to matching subscriptions, RabbitMQ-style ``/temp-queue/`` replies, receipts, DISCONNECT. Tests
change its behaviour through attributes (refuse connections, answer ERROR, stay silent...).
Timing logic runs on the autojump clock.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing

import trio_stomp
from trio_stomp import (
    BrokerError,
    ConnectionLost,
    Frame,
    HeartbeatTimeout,
    LocalProtocolError,
    RemoteProtocolError,
)
from trio_stomp._client import (
    Client,
    Message,
    ReconnectPolicy,
    open_client,
    open_client_over_stream,
    open_client_over_stream_factory,
)
from trio_stomp._peer import Peer, open_peer
from trio_stomp._util import unwrap_lone_exception


@attrs.define(eq=False)
class Conn:
    peer: Peer
    number: int
    version: str = "1.2"
    temp_queues: dict[str, str] = attrs.Factory(dict)


@attrs.define(eq=False)
class Sub:
    conn: Conn
    id: str
    destination: str
    ack: str


@attrs.define(eq=False)
class MiniBroker:
    nursery: trio.Nursery
    versions: tuple[str, ...] = ("1.0", "1.1", "1.2")
    heart_beat: tuple[int, int] = (0, 0)
    refuse: int = 0  # refuse that many connection attempts (OSError)
    connect_error: str | None = None  # answer CONNECT with this ERROR
    answer_receipts: bool = True
    server: str = "mini/1"
    error_on_subscribe: bool = False
    silent: bool = False  # after CONNECTED: read everything, answer nothing, beat nothing
    received: list[tuple[int, Frame]] = attrs.Factory(list)
    attempts: list[float] = attrs.Factory(list)
    conns: list[Conn] = attrs.Factory(list)
    subs: list[Sub] = attrs.Factory(list)
    counter: itertools.count[int] = attrs.Factory(lambda: itertools.count(1))
    connections: int = 0

    async def connect(self) -> trio.abc.Stream:
        """The client's stream factory."""
        self.attempts.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        if self.refuse:
            self.refuse -= 1
            raise ConnectionRefusedError("refused")
        ours, theirs = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.serve, theirs)
        return ours

    def frames(self, command: str | None = None, conn: int | None = None) -> list[Frame]:
        return [
            f
            for n, f in self.received
            if (command is None or f.command == command) and (conn is None or n == conn)
        ]

    async def kill(self) -> None:
        """Drop every live connection (the client sees EOF)."""
        for conn in self.conns:
            await conn.peer.aclose()

    async def serve(self, stream: trio.abc.Stream) -> None:
        async with open_peer(stream) as peer:
            self.connections += 1
            conn = Conn(peer, self.connections)
            self.conns.append(conn)
            try:
                async for frame in peer:
                    self.received.append((conn.number, frame))
                    if not await self.handle(conn, frame):
                        return
            except ConnectionLost:
                return
            finally:
                self.subs = [s for s in self.subs if s.conn is not conn]
                self.conns.remove(conn)

    async def handle(self, conn: Conn, frame: Frame) -> bool:
        peer = conn.peer
        h = frame.headers
        if frame.command in ("CONNECT", "STOMP"):
            if self.connect_error is not None:
                await peer.send(Frame("ERROR", {"message": self.connect_error}, b"go away"))
                return False
            offered = (h.get("accept-version") or "1.0").split(",")
            version = max(v for v in self.versions if v in offered)
            conn.version = version
            await peer.send(
                Frame(
                    "CONNECTED",
                    {
                        "version": version,
                        "server": self.server,
                        "session": f"s{conn.number}",
                        "heart-beat": f"{self.heart_beat[0]},{self.heart_beat[1]}",
                    },
                )
            )
            peer.version = version
            if not self.silent:
                client = trio_stomp._negotiation.parse_heart_beat(h.get("heart-beat"))
                mine = trio_stomp.negotiate_heart_beat(self.heart_beat, client)
                peer.set_heart_beat(*mine)
            return True
        if self.silent:
            return True
        if frame.command == "SUBSCRIBE" and self.error_on_subscribe:
            await peer.send(Frame("ERROR", {"message": "forbidden"}))
            await peer.aclose()
            return False
        if frame.command == "SUBSCRIBE":
            self.subs.append(Sub(conn, h.get("id") or "", h["destination"], h.get("ack") or "auto"))
        elif frame.command == "UNSUBSCRIBE":
            self.subs = [s for s in self.subs if not (s.conn is conn and s.id == h.get("id"))]
        elif frame.command == "SEND":
            await self.route(conn, frame)
        elif frame.command == "DISCONNECT":
            if "receipt" in h:
                await peer.send(Frame("RECEIPT", {"receipt-id": h["receipt"]}))
            await peer.aclose()
            return False
        if "receipt" in h and self.answer_receipts:
            await peer.send(Frame("RECEIPT", {"receipt-id": h["receipt"]}))
        return True

    async def route(self, conn: Conn, frame: Frame) -> None:
        h = frame.headers
        destination = h["destination"]
        passed = [
            (k, v)
            for k, v in h.raw
            if k not in ("destination", "receipt", "transaction", "content-length")
        ]
        if "transaction" in h:
            return  # tests check the frames; the mini broker does not apply transactions
        reply_to = h.get("reply-to")
        if reply_to is not None and reply_to.startswith("/temp-queue/"):
            rewritten = f"/reply-queue/{conn.number}{reply_to[len('/temp-queue') :]}"
            conn.temp_queues[rewritten] = reply_to
            passed = [(k, rewritten if k == "reply-to" else v) for k, v in passed]
        if destination.startswith("/reply-queue/"):
            for target in self.conns:
                if destination in target.temp_queues:
                    sid = target.temp_queues[destination]
                    headers = [
                        ("destination", destination),
                        ("message-id", f"m{next(self.counter)}"),
                        ("subscription", sid),
                        *passed,
                    ]
                    await target.peer.send(Frame("MESSAGE", headers, frame.body))
            return
        for sub in list(self.subs):
            if sub.destination != destination:
                continue
            n = next(self.counter)
            headers = [("destination", destination), ("message-id", f"m{n}")]
            if sub.id:
                headers.append(("subscription", sub.id))
            if sub.ack != "auto" and sub.conn.version == "1.2":
                headers.append(("ack", f"a{n}"))
            headers.extend(passed)
            await sub.conn.peer.send(Frame("MESSAGE", headers, frame.body))

    async def publish(self, destination: str, body: bytes, **headers: str) -> None:
        """Deliver a message as if another client sent it."""
        assert self.conns, "no client connected"
        await self.route(
            self.conns[0], Frame("SEND", {"destination": destination, **headers}, body)
        )


@asynccontextmanager
async def mini_broker(**kwargs: Any) -> AsyncIterator[MiniBroker]:
    with unwrap_lone_exception():
        async with trio.open_nursery() as nursery:
            yield MiniBroker(nursery, **kwargs)
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def connected(**kwargs: Any) -> AsyncIterator[tuple[MiniBroker, Client]]:
    broker_options = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("broker_")}
    async with mini_broker(**{k[7:]: v for k, v in broker_options.items()}) as broker:
        kwargs.setdefault("heart_beat", (0, 0))
        async with open_client_over_stream_factory(broker.connect, **kwargs) as client:
            yield broker, client


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


# --------------------------------------------------------------------------- connecting


async def test_negotiation_and_connect_headers() -> None:
    async with connected(login="me", passcode="p:w\\d", vhost="/", heart_beat=(0, 0)) as (
        broker,
        client,
    ):
        assert client.version == "1.2"
        assert client.server == "mini/1"
        assert client.session == "s1"
        assert client.connected
        [connect] = broker.frames("CONNECT")
        assert connect.headers["accept-version"] == "1.0,1.1,1.2"
        assert connect.headers["host"] == "/"
        assert connect.headers["login"] == "me"
        assert connect.headers["passcode"] == "p:w\\d"  # CONNECT is never escaped
        assert connect.headers["heart-beat"] == "0,0"


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
async def test_each_version_is_negotiated(version: str) -> None:
    async with connected(broker_versions=(version,)) as (_broker, client):
        assert client.version == version


async def test_offering_only_old_versions() -> None:
    async with connected(versions=["1.0", "1.1"]) as (broker, client):
        assert client.version == "1.1"
        assert broker.frames("CONNECT")[0].headers["accept-version"] == "1.0,1.1"


async def test_error_during_connect_raises_broker_error() -> None:
    with pytest.raises(BrokerError) as info:
        async with connected(broker_connect_error="access refused"):
            pytest.fail("connected")  # pragma: no cover
    assert info.value.message == "access refused"
    assert "go away" in str(info.value)
    assert info.value.frame is not None


async def test_version_we_did_not_offer_is_a_protocol_error() -> None:
    async def rogue() -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        await theirs.send_all(b"CONNECTED\nversion:1.2\n\n\0")
        return ours

    with pytest.raises(RemoteProtocolError, match="did not offer"):
        async with open_client_over_stream_factory(rogue, versions=["1.0"]):
            pass  # pragma: no cover


async def test_no_connected_frame_times_out(autojump_clock: trio.testing.MockClock) -> None:
    async with mini_broker(silent=True, heart_beat=(0, 0)) as broker:
        broker_ = broker

        async def mute() -> trio.abc.Stream:
            ours, _theirs = trio.testing.memory_stream_pair()
            await trio.lowlevel.checkpoint()
            return ours

        with pytest.raises(ConnectionLost, match="no CONNECTED frame"):
            async with open_client_over_stream_factory(mute, connect_timeout=3):
                pass  # pragma: no cover
        assert trio.current_time() == pytest.approx(3)
        del broker_


async def test_unreachable_broker_is_connection_lost() -> None:
    async with mini_broker(refuse=1) as broker:
        with pytest.raises(ConnectionLost, match="refused"):
            async with open_client_over_stream_factory(broker.connect):
                pass  # pragma: no cover


async def test_failover_list_tries_the_next_endpoint() -> None:
    async with mini_broker() as broker:

        async def down() -> trio.abc.Stream:
            await trio.lowlevel.checkpoint()
            raise ConnectionRefusedError("first broker is down")

        async with open_client_over_stream_factory(
            [down, broker.connect], heart_beat=(0, 0)
        ) as client:
            assert client.connected
            assert len(broker.attempts) == 1


async def test_graceful_disconnect_waits_for_the_receipt() -> None:
    async with connected() as (broker, client):
        await client.send("/queue/a", b"x")
    disconnect = broker.frames("DISCONNECT")[0]
    assert "receipt" in disconnect.headers
    assert [f.command for f in broker.frames()][-2:] == ["SEND", "DISCONNECT"]
    with pytest.raises(ConnectionLost, match="closed"):
        await client.send("/queue/a", b"too late")


async def test_disconnect_is_bounded_when_the_broker_never_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connected(broker_silent=True, disconnect_timeout=2) as (_broker, _client):
        start = trio.current_time()
    assert trio.current_time() - start == pytest.approx(2)


async def test_exception_in_block_comes_out_bare() -> None:
    with pytest.raises(KeyError):
        async with connected():
            raise KeyError("mine")


# --------------------------------------------------------------------------- sending


async def test_send_text_and_binary_bodies() -> None:
    async with connected() as (broker, client):
        await client.send("/queue/a", "héllo", headers={"x-custom": "1"})
        await client.send("/queue/a", b"\x00\x01\x00", content_type="application/octet-stream")
        await client.send("/queue/a", "{}", content_type="application/json", receipt=True)
        text, binary, json = broker.frames("SEND")
    assert text.body == "héllo".encode()
    assert text.headers["content-type"] == "text/plain;charset=utf-8"
    assert text.headers["x-custom"] == "1"
    assert binary.body == b"\x00\x01\x00"
    assert binary.headers["content-type"] == "application/octet-stream"
    assert json.headers["content-type"] == "application/json"


async def test_receipt_waits_for_the_receipt_frame() -> None:
    async with connected(broker_answer_receipts=False) as (broker, client):
        done = trio.Event()

        async def send() -> None:
            await client.send("/queue/a", b"x", receipt=True)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await settle()
            assert not done.is_set()
            [sent] = broker.frames("SEND")
            await broker.conns[0].peer.send(
                Frame("RECEIPT", {"receipt-id": sent.headers["receipt"]})
            )
        assert done.is_set()
        assert client.statistics().pending_receipts == 0


async def test_receipt_wait_raises_when_the_link_drops() -> None:
    async with (
        connected(broker_answer_receipts=False) as (broker, client),
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(broker.kill)
        with pytest.raises(ConnectionLost):
            await client.send("/queue/a", b"x", receipt=True)


async def test_cancelled_receipt_wait_leaves_the_connection_usable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connected(broker_answer_receipts=False) as (broker, client):
        with trio.move_on_after(0.01):
            await client.send("/queue/a", b"1", receipt=True)
        assert client.statistics().pending_receipts == 0
        broker.answer_receipts = True
        # The late RECEIPT for the abandoned wait is ignored; the next one works.
        [first] = broker.frames("SEND")
        await broker.conns[0].peer.send(Frame("RECEIPT", {"receipt-id": first.headers["receipt"]}))
        await client.send("/queue/a", b"2", receipt=True)
        assert [f.body for f in broker.frames("SEND")] == [b"1", b"2"]


async def test_cancelled_sends_never_half_write() -> None:
    async with connected(max_send_buffer=100) as (broker, client):
        body = b"z" * 80
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(client.send, "/queue/a", body)
            await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()
        await client.send("/queue/a", b"end", receipt=True)
        sends = broker.frames("SEND")
        assert sends[-1].body == b"end"
        assert all(f.body == body for f in sends[:-1])


# --------------------------------------------------------------------------- subscribing


async def test_subscribe_receive_and_unsubscribe() -> None:
    async with connected() as (broker, client):
        async with client.subscribe("/queue/a", receipt=True) as sub:
            await client.send("/queue/a", "one", headers={"x": "y"})
            await client.send("/queue/a", b"two")
            first = await sub.receive()
            second = await sub.receive()
            assert first.text == "one"
            assert first.headers["x"] == "y"
            assert first.destination == "/queue/a"
            assert first.message_id
            assert first.content_type == "text/plain;charset=utf-8"
            assert second.body == b"two"
        await client.send("/queue/sync", b"", receipt=True)
        [subscribe] = broker.frames("SUBSCRIBE")
        [unsubscribe] = broker.frames("UNSUBSCRIBE")
        assert subscribe.headers["ack"] == "auto"
        assert unsubscribe.headers["id"] == subscribe.headers["id"] == sub.id


async def test_messages_are_dispatched_by_subscription() -> None:
    async with connected() as (_broker, client):
        a_cm, b_cm = client.subscribe("/topic/a"), client.subscribe("/topic/b")
        async with a_cm as a, b_cm as b:
            await client.send("/topic/b", b"for b", receipt=True)
            await client.send("/topic/a", b"for a", receipt=True)
            assert (await a.receive()).body == b"for a"
            assert (await b.receive()).body == b"for b"
            with pytest.raises(trio.WouldBlock):
                a.receive_nowait()


async def test_async_iteration_over_a_subscription() -> None:
    async with connected() as (_broker, client):
        async with client.subscribe("/queue/it") as sub:
            for n in range(5):
                await client.send("/queue/it", str(n))
            got = []
            async for message in sub:
                got.append(message.text)
                if len(got) == 5:
                    break
        assert got == ["0", "1", "2", "3", "4"]


async def test_unsubscribe_is_sent_even_when_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connected() as (broker, client):
        with trio.move_on_after(0.01):
            async with client.subscribe("/queue/a") as sub:
                await sub.receive()
        await client.send("/queue/a", b"x", receipt=True)
        assert len(broker.frames("UNSUBSCRIBE")) == 1
        assert broker.subs == []


async def test_duplicate_subscription_id_and_bad_ack_mode() -> None:
    async with connected() as (_broker, client):
        with pytest.raises(ValueError, match="ack must be"):
            async with client.subscribe("/queue/a", ack="sometimes"):  # type: ignore[arg-type]
                pass  # pragma: no cover
        async with client.subscribe("/queue/a", id="same"):
            with pytest.raises(ValueError, match="already in use"):
                async with client.subscribe("/queue/b", id="same"):
                    pass  # pragma: no cover


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("1.2", {"id"}),
        ("1.1", {"message-id", "subscription"}),
        ("1.0", {"message-id"}),
    ],
)
async def test_ack_header_per_version(version: str, expected: set[str]) -> None:
    async with connected(broker_versions=(version,)) as (broker, client):
        async with client.subscribe("/queue/a", ack="client-individual") as sub:
            await client.send("/queue/a", b"x")
            message = await sub.receive()
            await message.ack(receipt=True)
        [ack] = broker.frames("ACK")
        assert set(ack.headers) - {"receipt"} == expected
        if version == "1.2":
            assert ack.headers["id"] == message.headers["ack"]
        else:
            assert ack.headers["message-id"] == message.message_id
        if version == "1.1":
            assert ack.headers["subscription"] == sub.id


async def test_nack_needs_1_1() -> None:
    async with connected(broker_versions=("1.0",)) as (_broker, client):
        async with client.subscribe("/queue/a", ack="client") as sub:
            await client.send("/queue/a", b"x")
            message = await sub.receive()
        with pytest.raises(LocalProtocolError, match=r"1\.0"):
            await message.nack()


async def test_auto_mode_messages_cannot_be_acked() -> None:
    async with connected() as (_broker, client), client.subscribe("/queue/a") as sub:
        await client.send("/queue/a", b"x")
        with pytest.raises(LocalProtocolError, match="auto"):
            await (await sub.receive()).ack()


async def test_client_mode_ack_is_cumulative_and_never_repeated() -> None:
    async with connected() as (broker, client):
        async with client.subscribe("/queue/a", ack="client") as sub:
            for n in range(4):
                await client.send("/queue/a", str(n))
            messages = [await sub.receive() for _ in range(4)]
            await messages[2].ack()
            await messages[0].ack()  # covered by the cumulative ACK: nothing sent
            await messages[2].ack()  # twice: nothing sent
            await messages[3].nack(receipt=True)
        assert [
            (f.command, f.headers["id"]) for f in broker.frames() if f.command in ("ACK", "NACK")
        ] == [
            ("ACK", messages[2].headers["ack"]),
            ("NACK", messages[3].headers["ack"]),
        ]


async def test_client_individual_mode_is_not_cumulative() -> None:
    async with connected() as (broker, client):
        async with client.subscribe("/queue/a", ack="client-individual") as sub:
            for n in range(3):
                await client.send("/queue/a", str(n))
            messages = [await sub.receive() for _ in range(3)]
            await messages[2].ack()
            await messages[0].nack()
            await messages[0].nack()
            await messages[1].ack(receipt=True)
        assert [f.headers["id"] for f in broker.frames() if f.command in ("ACK", "NACK")] == [
            messages[2].headers["ack"],
            messages[0].headers["ack"],
            messages[1].headers["ack"],
        ]


async def test_slow_consumer_pushes_back_without_a_false_heart_beat_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connected(heart_beat=(1000, 1000), broker_heart_beat=(1000, 1000)) as (
        broker,
        client,
    ):
        assert client.heart_beat == (1000, 1000)
        async with client.subscribe("/topic/flood", max_buffer=2, receipt=True) as sub:
            body = b"b" * 30000
            for _ in range(40):  # ~1.2 MB: more than the client's buffers hold
                await broker.publish("/topic/flood", body)
            await settle()
            stats = client.statistics()
            assert sub.buffered == 2
            assert stats.peer is not None and stats.peer.reader_stalled
            await trio.sleep(60)  # the application is busy for a minute
            assert client.connected
            for _ in range(40):
                assert (await sub.receive()).body == body
            await client.send("/topic/other", b"still alive", receipt=True)


# --------------------------------------------------------------------------- heart-beats


async def test_heart_beats_are_sent_and_a_silent_broker_is_detected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connected(
        heart_beat=(500, 1000), broker_heart_beat=(0, 500), broker_silent=True
    ) as (_broker, client):
        assert client.heart_beat == (500, 0)
        await trio.sleep(3.2)
        stats = client.statistics().peer
        assert stats is not None and stats.heart_beats_out == 6
    async with connected(heart_beat=(0, 1000), broker_heart_beat=(1000, 0), broker_silent=True) as (
        _broker,
        client,
    ):
        start = trio.current_time()
        async with client.subscribe("/queue/a") as sub:
            with pytest.raises(HeartbeatTimeout):
                await sub.receive()
        assert trio.current_time() - start == pytest.approx(2.0)
        with pytest.raises(HeartbeatTimeout):
            await client.send("/queue/a", b"x")


async def test_live_broker_heart_beats_keep_the_link(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connected(heart_beat=(1000, 1000), broker_heart_beat=(1000, 1000)) as (
        _broker,
        client,
    ):
        await trio.sleep(30)
        assert client.connected
        await client.send("/queue/a", b"x", receipt=True)


# --------------------------------------------------------------------------- transactions


async def test_transaction_commits_on_success() -> None:
    async with connected() as (broker, client):
        async with client.subscribe("/queue/a", ack="client-individual") as sub:
            await client.send("/queue/a", b"in")
            message = await sub.receive()
            async with client.transaction() as tx:
                await tx.send("/queue/b", b"out")
                await tx.ack(message)
            await message.ack()  # settled by the committed transaction: nothing sent
        commands = [f.command for f in broker.frames() if f.command != "SUBSCRIBE"]
        assert commands[2:6] == ["BEGIN", "SEND", "ACK", "COMMIT"]
        begin, send, ack, commit = (
            broker.frames(c)[-1] for c in ("BEGIN", "SEND", "ACK", "COMMIT")
        )
        assert begin.headers["transaction"] == send.headers["transaction"] == tx.id
        assert ack.headers["transaction"] == commit.headers["transaction"] == tx.id
        assert "receipt" in commit.headers
        assert len(broker.frames("ACK")) == 1


async def test_transaction_aborts_on_exception_and_cancellation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connected() as (broker, client):
        with pytest.raises(KeyError):
            async with client.transaction() as tx1:
                await tx1.send("/queue/b", b"never")
                raise KeyError("oops")
        with trio.move_on_after(0.01):
            async with client.transaction() as tx2:
                await trio.sleep_forever()
        await client.send("/queue/x", b"sync", receipt=True)
        aborts = [f.headers["transaction"] for f in broker.frames("ABORT")]
        assert aborts == [tx1.id, tx2.id]
        assert broker.frames("COMMIT") == []


async def test_transaction_on_a_lost_connection_raises() -> None:
    policy = ReconnectPolicy(initial_delay=0, jitter=0)
    async with connected(reconnect=policy) as (broker, client):
        with pytest.raises(ConnectionLost, match="transaction"):
            async with client.transaction() as tx:
                await broker.kill()
                await settle()
                await tx.send("/queue/b", b"x")


# --------------------------------------------------------------------------- reconnecting


async def test_reconnect_resubscribes_and_messages_flow_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = ReconnectPolicy(initial_delay=1, jitter=0)
    async with (
        connected(reconnect=policy) as (broker, client),
        client.subscribe("/queue/a", ack="client", headers={"prefetch-count": "5"}) as sub,
    ):
        await client.send("/queue/a", b"before")
        old = await sub.receive()
        await broker.kill()
        await settle()
        assert not client.statistics().connected
        await trio.sleep(1.5)
        assert client.connected
        assert client.statistics().connections == 2
        assert client.session == "s2"
        [resubscribe] = broker.frames("SUBSCRIBE", conn=2)
        assert resubscribe.headers["id"] == sub.id
        assert resubscribe.headers["prefetch-count"] == "5"
        await old.ack()  # its connection is gone: the broker redelivers it, nothing sent
        assert broker.frames("ACK") == []
        await client.send("/queue/a", b"after")
        assert (await sub.receive()).body == b"after"


async def test_reconnect_back_off_is_exponential_and_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = ReconnectPolicy(initial_delay=1, multiplier=2, max_delay=5, jitter=0)
    async with connected(reconnect=policy) as (broker, client):
        broker.refuse = 4
        lost_at = trio.current_time()
        await broker.kill()
        await trio.sleep(60)
        assert client.connected
        gaps = [b - a for a, b in itertools.pairwise([lost_at, *broker.attempts[1:]])]
        assert gaps == pytest.approx([1, 2, 4, 5, 5])


def test_jitter_stays_within_bounds() -> None:
    policy = ReconnectPolicy(initial_delay=1, multiplier=2, max_delay=10, jitter=0.5)
    rng = random.Random(42)
    delays = [policy.delay(n, rng) for n in range(8) for _ in range(20)]
    for n in range(8):
        chunk = delays[n * 20 : (n + 1) * 20]
        top = min(10, 2**n)
        assert all(top * 0.5 <= d <= top for d in chunk)
        assert len(set(chunk)) > 1  # actually random
    with pytest.raises(ValueError):
        ReconnectPolicy(jitter=2)


async def test_reconnect_gives_up_after_max_attempts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = ReconnectPolicy(max_attempts=3, initial_delay=1, jitter=0)
    async with connected(reconnect=policy) as (broker, client):
        async with client.subscribe("/queue/a") as sub:
            broker.refuse = 100
            await broker.kill()
            with pytest.raises(ConnectionLost, match="gave up connecting after 3 attempts"):
                await sub.receive()
        assert len(broker.attempts) == 1 + 3


async def test_initial_connect_retries_with_a_policy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with mini_broker(refuse=2) as broker:
        policy = ReconnectPolicy(initial_delay=1, jitter=0)
        async with open_client_over_stream_factory(
            broker.connect, reconnect=policy, heart_beat=(0, 0)
        ) as client:
            assert client.connected
        assert broker.attempts == pytest.approx([0, 2, 6])


async def test_send_while_disconnected_waits_or_raises(
    autojump_clock: trio.testing.MockClock,
) -> None:
    waiting = ReconnectPolicy(initial_delay=5, jitter=0)
    async with connected(reconnect=waiting) as (broker, client):
        await broker.kill()
        await settle()
        await client.send("/queue/a", b"queued while down", receipt=True)
        assert trio.current_time() == pytest.approx(5)
        assert [f.body for f in broker.frames("SEND", conn=2)] == [b"queued while down"]
    raising = ReconnectPolicy(initial_delay=5, jitter=0, wait_for_connection=False)
    async with connected(reconnect=raising) as (broker, client):
        await broker.kill()
        await settle()
        with pytest.raises(ConnectionLost, match="not connected"):
            await client.send("/queue/a", b"x")
        await trio.sleep(6)
        await client.send("/queue/a", b"y", receipt=True)


async def test_without_a_policy_a_lost_connection_fails_the_client() -> None:
    async with connected() as (broker, client):
        async with client.subscribe("/queue/a") as sub:
            await broker.kill()
            # EOF, or a write into the closed stream, whichever the client notices first
            with pytest.raises(ConnectionLost, match=r"peer closed|broken"):
                await sub.receive()
        with pytest.raises(ConnectionLost):
            await client.send("/queue/a", b"x")


async def test_error_frame_fails_the_client_without_a_policy() -> None:
    async with connected() as (broker, client):
        async with client.subscribe("/queue/a") as sub:
            await broker.conns[0].peer.send(
                Frame("ERROR", {"message": "not_found"}, b"NOT_FOUND - no queue")
            )
            with pytest.raises(BrokerError, match="NOT_FOUND") as info:
                await sub.receive()
            assert info.value.message == "not_found"
        with pytest.raises(BrokerError):
            await client.send("/queue/a", b"x")
        assert client.statistics().connections == 1


async def test_error_frame_after_connected_is_retried_with_a_policy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = ReconnectPolicy(initial_delay=1, jitter=0)
    async with (
        connected(reconnect=policy) as (broker, client),
        client.subscribe("/queue/a") as sub,
    ):
        await broker.conns[0].peer.send(Frame("ERROR", {"message": "shutting down"}))
        await trio.sleep(5)
        assert client.statistics().connections == 2
        await client.send("/queue/a", b"after", receipt=True)
        assert (await sub.receive()).body == b"after"


async def test_an_error_every_time_ends_at_max_attempts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = ReconnectPolicy(initial_delay=1, jitter=0, max_attempts=3)
    async with connected(reconnect=policy) as (broker, client):
        async with client.subscribe("/queue/a") as sub:
            broker.error_on_subscribe = True
            await broker.kill()  # the re-SUBSCRIBE on every new connection gets an ERROR
            with pytest.raises(ConnectionLost, match=r"gave up .* 3 attempts.*forbidden"):
                await sub.receive()
        # Connection 1 was lost (EOF); 2, 3 and 4 ended with an ERROR each: attempts 1, 2, 3.
        assert client.statistics().connections == 4
        # Back-off grew across the ERROR-closed connections (1, 2, 4 s) instead of resetting.
        gaps = [b - a for a, b in itertools.pairwise(broker.attempts[1:])]
        assert gaps == pytest.approx([2, 4])


def test_broker_error_text_is_not_repeated() -> None:
    from trio_stomp._client import _broker_error

    same = _broker_error(Frame("ERROR", {"message": "bye"}, b"bye"))
    assert str(same) == "bye"
    more = _broker_error(Frame("ERROR", {"message": "bye"}, b"details"))
    assert str(more) == "bye: details"


# --------------------------------------------------------------------------- request / reply


async def test_request_reply_over_temp_queue() -> None:
    async with connected() as (broker, client):

        async def replier(task_status: trio.TaskStatus[None]) -> None:
            async with client.subscribe("/queue/service", receipt=True) as sub:
                task_status.started()
                request = await sub.receive()
                assert request.headers["reply-to"].startswith("/reply-queue/")
                await client.reply(request, "pong:" + request.text)

        async with trio.open_nursery() as nursery:
            await nursery.start(replier)
            reply = await client.request("/queue/service", "ping", timeout=5)
        assert reply.text == "pong:ping"
        [request] = [
            f for f in broker.frames("SEND") if f.headers["destination"] == "/queue/service"
        ]
        assert request.headers["reply-to"] == "/temp-queue/trio-stomp-replies"
        assert reply.headers["correlation-id"] == request.headers["correlation-id"]
        assert client.statistics().pending_requests == 0


async def test_request_times_out(autojump_clock: trio.testing.MockClock) -> None:
    async with connected() as (_broker, client):
        with pytest.raises(trio.TooSlowError):
            await client.request("/queue/nobody", b"?", timeout=2)
        assert client.statistics().pending_requests == 0


@pytest.mark.parametrize(
    ("server", "option", "subscribes"),
    [
        ("mini/1", None, True),
        ("RabbitMQ/3.10.8", None, False),
        ("RabbitMQ/3.10.8", True, True),
        ("mini/1", False, False),
    ],
)
async def test_request_subscribes_the_temp_queue_unless_rabbitmq(
    server: str,
    option: bool | None,
    subscribes: bool,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connected(subscribe_temp_queue=option, broker_server=server) as (broker, client):
        for _ in range(2):  # once per connection at most
            with trio.move_on_after(0.01):
                await client.request("/queue/nobody", b"?")
        await client.send("/queue/sync", b"", receipt=True)
        subscribed = [f.headers["destination"] for f in broker.frames("SUBSCRIBE")]
        assert subscribed == (["/temp-queue/trio-stomp-replies"] if subscribes else [])


async def test_reply_needs_reply_to() -> None:
    async with connected() as (_broker, client), client.subscribe("/queue/a") as sub:
        await client.send("/queue/a", b"x")
        with pytest.raises(LocalProtocolError, match="reply-to"):
            await client.reply(await sub.receive(), b"y")


# --------------------------------------------------------------------------- the URL layer


async def test_open_client_over_tcp_with_credentials_in_the_url() -> None:
    async with mini_broker() as broker:

        async def handler(stream: trio.SocketStream) -> None:
            await broker.serve(stream)

        listeners = await broker.nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        async with open_client(
            f"stomp://guest:s%3Ac@127.0.0.1:{port}", heart_beat=(0, 0)
        ) as client:
            await client.send("/queue/a", b"over tcp", receipt=True)
        [connect] = broker.frames("CONNECT")
        assert connect.headers["login"] == "guest"
        assert connect.headers["passcode"] == "s:c"
        assert connect.headers["host"] == "127.0.0.1"
        assert broker.frames("SEND")[0].body == b"over tcp"


async def test_unsupported_url_schemes_are_refused() -> None:
    for url in ("http://127.0.0.1", "amqp://127.0.0.1:5672"):
        with pytest.raises(ValueError, match="unsupported URL scheme"):
            async with open_client(url):
                pass  # pragma: no cover


async def test_connection_refused_over_tcp() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    with pytest.raises(ConnectionLost, match="cannot connect"):
        async with open_client(f"stomp://127.0.0.1:{port}"):
            pass  # pragma: no cover


async def test_open_client_over_one_stream() -> None:
    async with mini_broker() as broker:
        stream = await broker.connect()
        async with open_client_over_stream(stream, heart_beat=(0, 0)) as client:
            await client.send("/queue/a", b"x", receipt=True)
        assert len(broker.frames("SEND")) == 1


def test_public_names_are_exported() -> None:
    for name in (
        "open_client",
        "open_client_over_stream",
        "open_client_over_stream_factory",
        "Client",
        "Subscription",
        "Message",
        "Transaction",
        "ReconnectPolicy",
        "open_peer",
        "Peer",
    ):
        assert hasattr(trio_stomp, name), name


def test_message_text_uses_the_charset() -> None:
    frame = Frame("MESSAGE", {"content-type": "text/plain; charset=latin-1"}, "é".encode("latin-1"))
    assert Message(frame, None, 0, 0).text == "é"


async def test_send_frame_is_an_escape_hatch() -> None:
    async with connected() as (broker, client):
        await client.send_frame(Frame("SEND", {"destination": "/queue/raw"}, b"r"), receipt=True)
        [sent] = broker.frames("SEND")
        assert sent.headers["destination"] == "/queue/raw"


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
@pytest.mark.parametrize(
    ("command", "pairs", "body"),
    [
        ("SEND", [("destination", "/queue/a")], b""),
        ("SEND", [("destination", "/queue/a"), ("x", "é ü")], b"\x00body\x00"),
        ("ACK", [("id", "a:1")], b""),  # needs escaping (or cannot be sent in 1.0)
        ("SEND", [("destination", "/q"), ("content-length", "3")], b"abc"),
        ("SEND", [("destination", "/q"), ("multi", "line\nvalue")], b""),
        ("SUBSCRIBE", [("destination", "/q"), ("id", "1"), ("ack", "auto")], b""),
    ],
)
def test_fast_encoding_matches_serialize(
    version: str, command: str, pairs: list[tuple[str, str]], body: bytes
) -> None:
    from trio_stomp._client import _encode
    from trio_stomp._codec import serialize

    try:
        expected = serialize(Frame(command, pairs, body), version)
    except LocalProtocolError:
        with pytest.raises(LocalProtocolError):
            _encode(command, pairs, body, version)
        return
    assert _encode(command, pairs, body, version) == expected


def test_the_client_never_imports_the_broker() -> None:
    import subprocess
    import sys

    probe = (
        "import sys, trio_stomp, trio_stomp._client, trio_stomp._peer;"
        "print(sorted(m for m in sys.modules if m.startswith('trio_stomp.broker')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, check=True, timeout=60
    )
    assert result.stdout.strip() == b"[]"


async def test_open_client_over_tls() -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with mini_broker() as broker:
        listeners = await broker.nursery.start(
            functools.partial(
                trio.serve_ssl_over_tcp, broker.serve, 0, server_context, host="127.0.0.1"
            )
        )
        port = listeners[0].transport_listener.socket.getsockname()[1]
        async with open_client(
            f"stomp+ssl://127.0.0.1:{port}", ssl_context=client_context, heart_beat=(0, 0)
        ) as client:
            await client.send("/queue/a", b"over tls", receipt=True)
        assert broker.frames("SEND")[0].body == b"over tls"


async def test_cancelling_the_connect_leaves_nothing_behind() -> None:
    entered = trio.Event()

    async def hang() -> trio.abc.Stream:
        ours, _theirs = trio.testing.memory_stream_pair()
        entered.set()
        await trio.sleep(3600)  # far beyond the test's bound: only cancellation ends it
        return ours

    with trio.move_on_after(5) as scope:
        async with trio.open_nursery() as nursery:

            async def connect() -> None:
                async with open_client_over_stream_factory(hang):
                    pytest.fail("connected")  # pragma: no cover

            nursery.start_soon(connect)
            await entered.wait()
            nursery.cancel_scope.cancel()
    assert not scope.cancelled_caught


async def test_a_frame_refused_by_a_broken_peer_is_retried_on_the_next_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = ReconnectPolicy(initial_delay=1, jitter=0)
    async with connected(reconnect=policy) as (broker, client):
        old = client._peer
        assert old is not None
        # The link breaks; the send below reaches the dead peer before the supervisor noticed.
        old._die(ConnectionLost("reset"))
        await client.send("/queue/a", b"retried", receipt=True)
        assert client.statistics().connections == 2
        [sent] = broker.frames("SEND", conn=2)
        assert sent.body == b"retried"
        assert [name for name, _ in sent.headers.raw].count("receipt") == 1


async def test_messages_without_a_subscription_header_are_routed_by_destination() -> None:
    async with connected(broker_versions=("1.0",)) as (broker, client):
        cm_a, cm_b = client.subscribe("/queue/a"), client.subscribe("/queue/b")
        async with cm_a as a, cm_b as b:
            peer = broker.conns[0].peer
            await peer.send(Frame("MESSAGE", {"destination": "/queue/b", "message-id": "1"}, b"b"))
            await peer.send(Frame("MESSAGE", {"destination": "/queue/a", "message-id": "2"}, b"a"))
            assert (await a.receive()).body == b"a"
            assert (await b.receive()).body == b"b"
            # Ambiguous or unknown: dropped and counted, never misrouted.
            async with client.subscribe("/queue/a"):
                await peer.send(Frame("MESSAGE", {"destination": "/queue/a", "message-id": "3"}))
                await peer.send(Frame("MESSAGE", {"destination": "/queue/z", "message-id": "4"}))
                await client.send("/queue/sync", b"", receipt=True)
            assert client.statistics().messages_unroutable == 2
            with pytest.raises(trio.WouldBlock):
                a.receive_nowait()
