"""Broker conformance, one test (or more) per item of stomp-checklist.md.

These tests speak raw STOMP to an in-process broker (``Broker.connect_in_memory()``), so
what is checked is the wire: the bytes the broker sends back, parsed by the real parser.
Timing logic (CONNECT timeout, heart-beats) runs on the autojump clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from trio_stomp import Frame, FrameParser, Heartbeat, serialize
from trio_stomp.broker import Broker, open_broker


class RawClient:
    """A deliberately dumb STOMP client: frames in, frames out, nothing hidden."""

    def __init__(self, stream: trio.abc.Stream, version: str = "1.2") -> None:
        self.stream = stream
        self.version = version
        self.parser = FrameParser(version)
        self.pending: deque[Frame] = deque()
        self.heart_beats = 0

    async def send(self, command: str, headers: Any = (), body: bytes = b"", **more: str) -> None:
        frame = Frame(command, [*dict(headers).items(), *more.items()], body)
        await self.stream.send_all(serialize(frame, self.version))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        if not data:
            return False
        for event in self.parser.feed(bytes(data)):
            if isinstance(event, Heartbeat):
                self.heart_beats += 1
            else:
                self.pending.append(Frame(event.command, event.headers, bytes(event.body)))
        return True

    async def _fill_forever(self) -> None:
        while await self._fill():
            pass

    async def receive(self) -> Frame:
        while not self.pending:
            if not await self._fill():
                raise EOFError("the broker closed the connection")
        return self.pending.popleft()

    async def expect(self, command: str) -> Frame:
        frame = await self.receive()
        assert frame.command == command, frame
        return frame

    async def expect_error_and_close(self) -> Frame:
        """The next frame is an ERROR, and then the connection ends."""
        error = await self.expect("ERROR")
        with trio.fail_after(5):
            while await self._fill():
                pass
        assert not self.pending, self.pending
        return error

    async def connect(
        self, accept_version: str | None = None, command: str = "CONNECT", **headers: str
    ) -> Frame:
        accept = self.version if accept_version is None else accept_version
        all_headers = {"accept-version": accept, "host": "localhost", **headers}
        if self.version == "1.0" and accept_version is None:
            del all_headers["accept-version"]
        await self.send(command, all_headers)
        return await self.expect("CONNECTED")

    async def aclose(self) -> None:
        await self.stream.aclose()


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    async with open_broker(listen=[], shutdown_grace=1.0) as running:
        yield running


async def client(broker: Broker, version: str = "1.2", **headers: str) -> RawClient:
    raw = RawClient(broker.connect_in_memory(), version)
    await raw.connect(**headers)
    return raw


# -- connecting ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("1.0,1.1,1.2", "1.2"),
        ("1.1", "1.1"),
        ("1.0,1.1", "1.1"),
        ("1.2,2.0", "1.2"),
        ("1.0", "1.0"),
    ],
)
async def test_version_negotiation_picks_highest_common(
    broker: Broker, accept: str, expected: str
) -> None:
    raw = RawClient(broker.connect_in_memory())
    connected = await raw.connect(accept)
    assert connected.headers["version"] == expected


async def test_no_accept_version_means_1_0(broker: Broker) -> None:
    raw = RawClient(broker.connect_in_memory(), "1.0")
    await raw.send("CONNECT", {"login": "a", "passcode": "b"})
    connected = await raw.expect("CONNECTED")
    assert connected.headers["version"] == "1.0"
    assert connected.headers["session"]


async def test_stomp_frame_is_accepted_like_connect(broker: Broker) -> None:
    raw = RawClient(broker.connect_in_memory())
    connected = await raw.connect(command="STOMP")
    assert connected.headers["version"] == "1.2"


async def test_connected_carries_version_heart_beat_session_server(broker: Broker) -> None:
    first = await client(broker)
    second = RawClient(broker.connect_in_memory())
    connected = await second.connect()
    assert connected.headers["heart-beat"] == "10000,10000"
    assert connected.headers["server"].startswith("trio_stomp/")
    assert connected.headers["session"]
    assert "content-length" not in connected.headers
    await first.aclose()


async def test_no_common_version_is_an_error_with_our_versions(broker: Broker) -> None:
    raw = RawClient(broker.connect_in_memory())
    await raw.send("CONNECT", {"accept-version": "2.0,3.1", "host": "x"})
    error = await raw.expect_error_and_close()
    assert error.headers["version"] == "1.0,1.1,1.2"
    assert "version" in error.headers["message"]


@pytest.mark.parametrize("host", ["localhost", "some.vhost", "/", ""])
async def test_any_reasonable_host_is_accepted(broker: Broker, host: str) -> None:
    raw = RawClient(broker.connect_in_memory())
    await raw.connect(host=host)


async def test_connect_passcode_is_not_unescaped(broker: Broker) -> None:
    # CONNECT headers are never escaped: a backslash sequence that would be illegal in
    # 1.2 escaping must be accepted verbatim.
    raw = RawClient(broker.connect_in_memory())
    await raw.send_raw(b"CONNECT\naccept-version:1.2\nhost:h\nlogin:u\npasscode:a:b\\t\\\n\n\0")
    await raw.expect("CONNECTED")


async def test_frame_before_connect_is_an_error(broker: Broker) -> None:
    raw = RawClient(broker.connect_in_memory())
    await raw.send("SEND", {"destination": "/queue/a", "receipt": "r1"}, b"x")
    error = await raw.expect_error_and_close()
    assert "CONNECT" in error.headers["message"]
    assert error.headers["receipt-id"] == "r1"
    assert broker.statistics().messages_enqueued == 0


async def test_second_connect_is_an_error(broker: Broker) -> None:
    raw = await client(broker)
    await raw.send("CONNECT", {"accept-version": "1.2", "host": "h"})
    error = await raw.expect_error_and_close()
    assert "already connected" in error.headers["message"]


async def test_connect_timeout_closes_silent_connections(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_broker(listen=[], connect_timeout=3.0) as broker:
        raw = RawClient(broker.connect_in_memory())
        start = trio.current_time()
        error = await raw.expect_error_and_close()
        assert "no CONNECT" in error.headers["message"]
        assert 3.0 <= trio.current_time() - start < 4.0
        await trio.testing.wait_all_tasks_blocked()
        assert broker.statistics().connections == 0


# -- heart-beats ---------------------------------------------------------------------------


async def test_broker_sends_heart_beats_on_time(autojump_clock: trio.testing.MockClock) -> None:
    async with open_broker(listen=[], heart_beat=(100, 0)) as broker:
        raw = RawClient(broker.connect_in_memory())
        connected = await raw.connect(**{"heart-beat": "0,250"})
        assert connected.headers["heart-beat"] == "100,0"
        start = trio.current_time()
        # negotiated: broker sends every max(100, 250) = 250 ms
        with trio.move_on_after(2.6):
            while True:
                await raw._fill()
        assert raw.heart_beats in (10, 11), raw.heart_beats
        assert trio.current_time() - start >= 2.5


async def test_no_heart_beats_for_1_0_or_when_either_side_says_0(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_broker(listen=[], heart_beat=(100, 100)) as broker:
        raw = RawClient(broker.connect_in_memory())
        await raw.connect(**{"heart-beat": "0,0"})
        old = RawClient(broker.connect_in_memory(), "1.0")
        await old.connect(**{"heart-beat": "100,100"})
        with trio.move_on_after(5):
            await raw._fill()
        with trio.move_on_after(5):
            await old._fill()
        assert raw.heart_beats == 0 and old.heart_beats == 0
        assert broker.statistics().connections == 2


async def test_silent_client_is_dropped_and_its_unacked_redelivered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_broker(listen=[], heart_beat=(0, 100), heart_beat_tolerance=2.0) as broker:
        silent = RawClient(broker.connect_in_memory())
        # It promises a beat every 500 ms: the broker expects max(100, 500) = 500 ms.
        await silent.connect(**{"heart-beat": "500,0"})
        await silent.send("SUBSCRIBE", {"destination": "/queue/hb", "id": "1", "ack": "client"})
        producer = await client(broker)
        await producer.send("SEND", {"destination": "/queue/hb"}, b"precious")
        msg = await silent.expect("MESSAGE")
        assert msg.body == b"precious"
        start = trio.current_time()
        with trio.fail_after(5):
            while await silent._fill():
                pass  # the broker closes the link
        assert 1.0 <= trio.current_time() - start <= 1.2
        other = await client(broker)
        await other.send("SUBSCRIBE", {"destination": "/queue/hb", "id": "1"})
        again = await other.expect("MESSAGE")
        assert again.body == b"precious" and again.headers["redelivered"] == "true"


async def test_client_heart_beats_keep_the_link_alive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_broker(listen=[], heart_beat=(0, 100)) as broker:
        raw = RawClient(broker.connect_in_memory())
        await raw.connect(**{"heart-beat": "200,0"})
        for _ in range(20):
            await trio.sleep(0.3)  # under 200 ms x 2 tolerance
            await raw.send_raw(b"\n")
        await raw.send("SEND", {"destination": "/queue/a", "receipt": "alive"})
        assert (await raw.expect("RECEIPT")).headers["receipt-id"] == "alive"


# -- messages --------------------------------------------------------------------------------


async def test_message_headers_and_pass_through(broker: Broker) -> None:
    consumer = await client(broker)
    await consumer.send(
        "SUBSCRIBE", {"destination": "/queue/h", "id": "sub-7", "ack": "client", "receipt": "s"}
    )
    await consumer.expect("RECEIPT")
    producer = await client(broker)
    await producer.send(
        "SEND",
        {
            "destination": "/queue/h",
            "content-type": "application/octet-stream",
            "reply-to": "/queue/replies",
            "correlation-id": "c-1",
            "x-custom": "a:b",
        },
        b"\x00binary\x00body\x00",
    )
    msg = await consumer.expect("MESSAGE")
    h = msg.headers
    assert h["destination"] == "/queue/h"
    assert h["subscription"] == "sub-7"
    assert h["message-id"]
    assert h["ack"]
    assert h["content-length"] == str(len(b"\x00binary\x00body\x00"))
    assert msg.body == b"\x00binary\x00body\x00"
    assert h["content-type"] == "application/octet-stream"
    assert h["reply-to"] == "/queue/replies"
    assert h["correlation-id"] == "c-1"
    assert h["x-custom"] == "a:b"


async def test_message_ids_are_unique(broker: Broker) -> None:
    consumer = await client(broker)
    await consumer.send("SUBSCRIBE", {"destination": "/topic/ids", "id": "1"})
    await consumer.send("SUBSCRIBE", {"destination": "/queue/ids", "id": "2", "receipt": "r"})
    await consumer.expect("RECEIPT")
    for i in range(10):
        await consumer.send("SEND", {"destination": "/topic/ids" if i % 2 else "/queue/ids"})
    ids = {(await consumer.expect("MESSAGE")).headers["message-id"] for _ in range(10)}
    assert len(ids) == 10


async def test_ack_header_only_in_client_modes_of_1_2(broker: Broker) -> None:
    c12 = await client(broker)
    c11 = await client(broker, "1.1")
    for raw, sid, mode in (
        (c12, "auto", "auto"),
        (c12, "ind", "client-individual"),
        (c11, "c", "client"),
    ):
        await raw.send("SUBSCRIBE", {"destination": "/topic/ackhdr", "id": sid, "ack": mode})
    await c12.send("SEND", {"destination": "/topic/ackhdr", "receipt": "r"})
    frames = [await c12.receive() for _ in range(3)]
    messages = {f.headers["subscription"]: f for f in frames if f.command == "MESSAGE"}
    assert "ack" not in messages["auto"].headers
    assert "ack" in messages["ind"].headers
    old = await c11.expect("MESSAGE")
    assert "ack" not in old.headers


async def test_nack_redelivers_and_is_not_an_ack(broker: Broker) -> None:
    consumer = await client(broker)
    await consumer.send(
        "SUBSCRIBE", {"destination": "/queue/n", "id": "1", "ack": "client-individual"}
    )
    producer = await client(broker)
    await producer.send("SEND", {"destination": "/queue/n"}, b"m")
    msg = await consumer.expect("MESSAGE")
    await consumer.send("NACK", {"id": msg.headers["ack"]})
    again = await consumer.expect("MESSAGE")
    assert again.body == b"m" and again.headers["redelivered"] == "true"
    await consumer.send("ACK", {"id": again.headers["ack"], "receipt": "done"})
    await consumer.expect("RECEIPT")
    stats = broker.statistics()
    assert stats.messages_acked == 1 and stats.messages_unacked == 0
    assert stats.messages_redelivered == 1


async def test_client_ack_is_cumulative_over_the_wire(broker: Broker) -> None:
    consumer = await client(broker)
    await consumer.send("SUBSCRIBE", {"destination": "/queue/cum", "id": "1", "ack": "client"})
    producer = await client(broker)
    for i in range(3):
        await producer.send("SEND", {"destination": "/queue/cum"}, b"%d" % i)
    messages = [await consumer.expect("MESSAGE") for _ in range(3)]
    await consumer.send("ACK", {"id": messages[1].headers["ack"], "receipt": "r"})
    await consumer.expect("RECEIPT")
    assert broker.statistics().messages_unacked == 1
    await consumer.aclose()
    other = await client(broker)
    await other.send("SUBSCRIBE", {"destination": "/queue/cum", "id": "1"})
    again = await other.expect("MESSAGE")
    assert again.body == b"2" and again.headers["redelivered"] == "true"


@pytest.mark.parametrize("version", ["1.0", "1.1"])
async def test_old_versions_ack_by_message_id(broker: Broker, version: str) -> None:
    consumer = await client(broker, version)
    await consumer.send("SUBSCRIBE", {"destination": "/queue/old", "id": "s", "ack": "client"})
    producer = await client(broker)
    await producer.send("SEND", {"destination": "/queue/old"}, b"m")
    msg = await consumer.expect("MESSAGE")
    headers = {"message-id": msg.headers["message-id"], "receipt": "r"}
    if version == "1.1":
        headers["subscription"] = "s"
    await consumer.send("ACK", headers)
    await consumer.expect("RECEIPT")
    assert broker.statistics().messages_unacked == 0


async def test_wrong_ack_header_for_the_version_is_an_error(broker: Broker) -> None:
    consumer = await client(broker)
    await consumer.send("ACK", {"message-id": "1", "receipt": "bad"})
    error = await consumer.expect_error_and_close()
    assert error.headers["receipt-id"] == "bad"
    assert "id" in error.headers["message"]


async def test_unsubscribe_returns_unacked_messages(broker: Broker) -> None:
    consumer = await client(broker)
    await consumer.send("SUBSCRIBE", {"destination": "/queue/u", "id": "1", "ack": "client"})
    producer = await client(broker)
    await producer.send("SEND", {"destination": "/queue/u"}, b"m")
    await consumer.expect("MESSAGE")
    await consumer.send("UNSUBSCRIBE", {"id": "1", "receipt": "gone"})
    await consumer.expect("RECEIPT")
    await consumer.send("SUBSCRIBE", {"destination": "/queue/u", "id": "2"})
    again = await consumer.expect("MESSAGE")
    assert again.headers["subscription"] == "2" and again.headers["redelivered"] == "true"


async def test_queue_round_robin_and_topic_fan_out(broker: Broker) -> None:
    consumers = [await client(broker) for _ in range(3)]
    for raw in consumers:
        await raw.send("SUBSCRIBE", {"destination": "/queue/rr", "id": "q"})
        await raw.send("SUBSCRIBE", {"destination": "/topic/all", "id": "t", "receipt": "r"})
        await raw.expect("RECEIPT")
    producer = await client(broker)
    for i in range(6):
        await producer.send("SEND", {"destination": "/queue/rr"}, b"q%d" % i)
    await producer.send("SEND", {"destination": "/topic/all"}, b"t")
    for raw in consumers:
        got = [await raw.expect("MESSAGE") for _ in range(3)]
        assert [m.headers["subscription"] for m in got] == ["q", "q", "t"]
    assert broker.statistics().messages_delivered == 9


async def test_messages_wait_in_a_queue_for_a_subscriber(broker: Broker) -> None:
    producer = await client(broker)
    for i in range(3):
        await producer.send("SEND", {"destination": "/queue/wait"}, b"%d" % i)
    await producer.send("DISCONNECT", {"receipt": "bye"})
    await producer.expect("RECEIPT")
    consumer = await client(broker)
    await consumer.send("SUBSCRIBE", {"destination": "/queue/wait", "id": "1"})
    assert [(await consumer.expect("MESSAGE")).body for _ in range(3)] == [b"0", b"1", b"2"]


async def test_prefetch_header_limits_unacked(broker: Broker) -> None:
    consumer = await client(broker)
    await consumer.send(
        "SUBSCRIBE",
        {"destination": "/queue/pf", "id": "1", "ack": "client-individual", "prefetch": "2"},
    )
    producer = await client(broker)
    for i in range(5):
        await producer.send("SEND", {"destination": "/queue/pf"}, b"%d" % i)
    await producer.send("DISCONNECT", {"receipt": "bye"})
    await producer.expect("RECEIPT")
    first = [await consumer.expect("MESSAGE") for _ in range(2)]
    assert broker.statistics().messages_queued == 3
    await consumer.send("ACK", {"id": first[0].headers["ack"]})
    third = await consumer.expect("MESSAGE")
    assert third.body == b"2"


async def test_temp_queue_request_reply(broker: Broker) -> None:
    requester = await client(broker)
    await requester.send("SUBSCRIBE", {"destination": "/temp-queue/answers", "id": "a"})
    service = await client(broker)
    await service.send("SUBSCRIBE", {"destination": "/queue/svc", "id": "s", "receipt": "r"})
    await service.expect("RECEIPT")
    await requester.send(
        "SEND", {"destination": "/queue/svc", "reply-to": "/temp-queue/answers"}, b"2+2"
    )
    request = await service.expect("MESSAGE")
    assert request.headers["reply-to"] != "/temp-queue/answers"
    await service.send("SEND", {"destination": request.headers["reply-to"]}, b"4")
    reply = await requester.expect("MESSAGE")
    assert reply.body == b"4"
    assert reply.headers["destination"] == "/temp-queue/answers"


# -- transactions ----------------------------------------------------------------------------


async def test_transaction_commit_and_abort(broker: Broker) -> None:
    consumer = await client(broker)
    await consumer.send("SUBSCRIBE", {"destination": "/queue/tx", "id": "1", "receipt": "r"})
    await consumer.expect("RECEIPT")
    producer = await client(broker)
    await producer.send("BEGIN", {"transaction": "t1"})
    await producer.send("SEND", {"destination": "/queue/tx", "transaction": "t1"}, b"a")
    await producer.send("BEGIN", {"transaction": "t2"})
    await producer.send("SEND", {"destination": "/queue/tx", "transaction": "t2"}, b"b")
    await producer.send("SEND", {"destination": "/queue/tx", "receipt": "outside"}, b"now")
    await producer.expect("RECEIPT")
    assert (await consumer.expect("MESSAGE")).body == b"now"
    await producer.send("ABORT", {"transaction": "t2"})
    await producer.send("COMMIT", {"transaction": "t1", "receipt": "c"})
    await producer.expect("RECEIPT")
    assert (await consumer.expect("MESSAGE")).body == b"a"
    await producer.send("SEND", {"destination": "/queue/tx", "receipt": "end"}, b"last")
    await producer.expect("RECEIPT")
    assert (await consumer.expect("MESSAGE")).body == b"last"


async def test_ack_in_transaction_takes_effect_on_commit(broker: Broker) -> None:
    consumer = await client(broker)
    await consumer.send(
        "SUBSCRIBE", {"destination": "/queue/txa", "id": "1", "ack": "client-individual"}
    )
    producer = await client(broker)
    await producer.send("SEND", {"destination": "/queue/txa"}, b"m")
    msg = await consumer.expect("MESSAGE")
    await consumer.send("BEGIN", {"transaction": "t"})
    await consumer.send("ACK", {"id": msg.headers["ack"], "transaction": "t", "receipt": "a"})
    await consumer.expect("RECEIPT")
    assert broker.statistics().messages_unacked == 1
    await consumer.send("COMMIT", {"transaction": "t", "receipt": "c"})
    await consumer.expect("RECEIPT")
    assert broker.statistics().messages_unacked == 0


async def test_open_transaction_is_aborted_when_the_connection_ends(broker: Broker) -> None:
    consumer = await client(broker)
    await consumer.send("SUBSCRIBE", {"destination": "/queue/txd", "id": "1"})
    producer = await client(broker)
    await producer.send("BEGIN", {"transaction": "t"})
    await producer.send("SEND", {"destination": "/queue/txd", "transaction": "t"}, b"never")
    await producer.send("DISCONNECT", {"receipt": "bye"})
    await producer.expect("RECEIPT")
    await consumer.send("SEND", {"destination": "/queue/txd"}, b"after")
    assert (await consumer.expect("MESSAGE")).body == b"after"
    assert broker.statistics().messages_enqueued == 1


@pytest.mark.parametrize(
    ("command", "headers", "match"),
    [
        ("COMMIT", {"transaction": "nope"}, "unknown transaction"),
        ("ABORT", {"transaction": "nope"}, "unknown transaction"),
        ("BEGIN", {}, "transaction header"),
        ("SEND", {"destination": "/queue/a", "transaction": "nope"}, "unknown transaction"),
    ],
)
async def test_transaction_errors(
    broker: Broker, command: str, headers: dict[str, str], match: str
) -> None:
    raw = await client(broker)
    await raw.send(command, {**headers, "receipt": "r"})
    error = await raw.expect_error_and_close()
    assert match in error.headers["message"] and error.headers["receipt-id"] == "r"


async def test_duplicate_begin_is_an_error(broker: Broker) -> None:
    raw = await client(broker)
    await raw.send("BEGIN", {"transaction": "t"})
    await raw.send("BEGIN", {"transaction": "t"})
    error = await raw.expect_error_and_close()
    assert "already begun" in error.headers["message"]


# -- receipts, errors, disconnect --------------------------------------------------------------


async def test_every_frame_can_ask_for_a_receipt(broker: Broker) -> None:
    raw = await client(broker)
    frames: list[tuple[str, dict[str, str]]] = [
        ("SUBSCRIBE", {"destination": "/topic/r", "id": "1"}),
        ("SEND", {"destination": "/topic/nobody"}),
        ("BEGIN", {"transaction": "t"}),
        ("SEND", {"destination": "/queue/r", "transaction": "t"}),
        ("COMMIT", {"transaction": "t"}),
        ("BEGIN", {"transaction": "t2"}),
        ("ABORT", {"transaction": "t2"}),
        ("ACK", {"id": "unknown"}),
        ("NACK", {"id": "unknown"}),
        ("UNSUBSCRIBE", {"id": "1"}),
    ]
    for i, (command, headers) in enumerate(frames):
        await raw.send(command, {**headers, "receipt": f"r{i}"})
    for i in range(len(frames)):
        receipt = await raw.expect("RECEIPT")
        assert receipt.headers["receipt-id"] == f"r{i}"


async def test_disconnect_receipt_comes_after_everything_and_nothing_after_is_processed(
    broker: Broker,
) -> None:
    consumer = await client(broker)
    await consumer.send("SUBSCRIBE", {"destination": "/queue/d", "id": "1", "receipt": "s"})
    await consumer.expect("RECEIPT")
    producer = await client(broker)
    data = b"".join(
        serialize(Frame("SEND", {"destination": "/queue/d"}, b"%d" % i)) for i in range(50)
    )
    data += serialize(Frame("DISCONNECT", {"receipt": "bye"}))
    data += serialize(Frame("SEND", {"destination": "/queue/d"}, b"after"))
    await producer.send_raw(data)
    receipt = await producer.expect("RECEIPT")
    assert receipt.headers["receipt-id"] == "bye"
    with trio.fail_after(5):
        while await producer._fill():
            pass
    assert not producer.pending
    bodies = [(await consumer.expect("MESSAGE")).body for _ in range(50)]
    assert bodies == [b"%d" % i for i in range(50)]
    assert broker.statistics().messages_enqueued == 50


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"FROB\n\n\0", "unknown command"),
        (b"SEND\nreceipt:r\n\nno destination\0", "destination"),
        (b"SUBSCRIBE\ndestination:/queue/a\nreceipt:r\n\n\0", "id"),
        (b"SUBSCRIBE\nid:1\ndestination:/queue/a\nreceipt:r\n\nbody!\0", "body"),
        (b"SEND\ndestination:/queue/a\nbad:\\t\n\n\0", "escape"),
        (b"SEND\ndestination:/queue/a\ncontent-length:-1\n\n\0", "content-length"),
        (b"SEND\ndestination:/queue/a\ncontent-length:99999999999\n\n\0", "content-length"),
        (b"SEND\ndestination:/queue/a\ncontent-length:1\n\nab\0", "NUL"),
        (b"\x00\x01\x02garbage\n\n\0", "command"),
        (b"UNSUBSCRIBE\nid:never\nreceipt:r\n\n\0", "subscription"),
        (b"ACK\nreceipt:r\n\n\0", "id"),
    ],
)
async def test_protocol_violations_get_error_then_close(
    broker: Broker, data: bytes, match: str
) -> None:
    bystander = await client(broker)
    await bystander.send("SUBSCRIBE", {"destination": "/queue/by", "id": "1"})
    raw = await client(broker)
    await raw.send_raw(data)
    error = await raw.expect_error_and_close()
    assert match in error.headers["message"], error.headers["message"]
    if b"receipt:r" in data:
        assert error.headers["receipt-id"] == "r"
    assert error.body  # explains, and shows the offending frame when there is one
    # Every other connection carries on.
    await bystander.send("SEND", {"destination": "/queue/by"}, b"still here")
    assert (await bystander.expect("MESSAGE")).body == b"still here"


async def test_oversize_frame_is_an_error() -> None:
    async with open_broker(listen=[], max_body_size=1000, max_frame_size=2000) as broker:
        raw = await client(broker)
        await raw.send("SEND", {"destination": "/queue/big"}, b"x" * 5000)
        error = await raw.expect_error_and_close()
        assert "maximum" in error.headers["message"]
        raw = await client(broker)
        await raw.send_raw(b"SEND\ndestination:/queue/big\n" + b"h" * 5000)
        error = await raw.expect_error_and_close()
        assert "maximum" in error.headers["message"]
        assert broker.statistics().messages_enqueued == 0


async def test_shutdown_sends_error_to_every_session() -> None:
    async with open_broker(listen=[]) as broker:
        connected = await client(broker)
        unconnected = RawClient(broker.connect_in_memory())
        await trio.testing.wait_all_tasks_blocked()
    error = await connected.expect_error_and_close()
    assert error.headers["message"] == "broker shutting down"
    error = await unconnected.expect_error_and_close()
    assert error.headers["message"] == "broker shutting down"
    with pytest.raises(RuntimeError):
        broker.connect_in_memory()


async def test_statistics_count_connections_destinations_bytes(broker: Broker) -> None:
    raw = await client(broker)
    await raw.send("SUBSCRIBE", {"destination": "/queue/s", "id": "1"})
    await raw.send("SUBSCRIBE", {"destination": "/topic/s", "id": "2", "receipt": "r"})
    await raw.expect("RECEIPT")
    stats = broker.statistics()
    assert stats.connections == 1 and stats.connections_total == 1
    assert (stats.queues, stats.topics, stats.destinations) == (1, 1, 2)
    assert stats.subscriptions == 2
    assert stats.bytes_in > 0 and stats.bytes_out > 0
    with pytest.raises(AttributeError):
        stats.connections = 5  # type: ignore[misc]


async def test_broker_names_are_reachable_from_trio_stomp_lazily() -> None:
    import sys

    import trio_stomp
    import trio_stomp.broker

    assert trio_stomp.open_broker is trio_stomp.broker.open_broker
    assert trio_stomp.serve_broker is trio_stomp.broker.serve_broker
    assert trio_stomp.BrokerConfig is trio_stomp.broker.Config
    with pytest.raises(AttributeError):
        trio_stomp.no_such_name  # noqa: B018
    code = "import sys, trio_stomp; assert 'trio_stomp.broker' not in sys.modules"
    result = await trio.run_process([sys.executable, "-c", code], check=False)
    assert result.returncode == 0


async def test_a_bug_in_one_session_closes_only_that_connection(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    original = broker.router.send

    def buggy(connection: Any, frame: Frame) -> None:
        if frame.headers.get("destination") == "/queue/bug":
            raise KeyError("a bug in the broker")
        original(connection, frame)

    monkeypatch.setattr(broker.router, "send", buggy)
    bystander = await client(broker)
    await bystander.send("SUBSCRIBE", {"destination": "/queue/fine", "id": "1", "receipt": "r"})
    await bystander.expect("RECEIPT")
    victim = await client(broker)
    await victim.send("SEND", {"destination": "/queue/bug"}, b"x")
    with trio.fail_after(5), pytest.raises(EOFError):
        await victim.receive()
    await trio.testing.wait_all_tasks_blocked()
    assert "failed" in caplog.text and "a bug in the broker" in caplog.text
    await bystander.send("SEND", {"destination": "/queue/fine"}, b"still serving")
    assert (await bystander.expect("MESSAGE")).body == b"still serving"
    await trio.testing.wait_all_tasks_blocked()
    assert broker.statistics().connections == 1
