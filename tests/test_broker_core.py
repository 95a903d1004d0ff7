"""The broker's sans-I/O routing core (``_router`` + ``_destinations``), without trio.

Every test drives the Router with Frames and reads what it wrote to fake sinks, parsed
back with the real FrameParser, so the bytes the core produces are checked too.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from trio_stomp import Frame, FrameParser, RemoteProtocolError, serialize
from trio_stomp.broker._destinations import Connection, Subscription
from trio_stomp.broker._router import Router


class FakeSink:
    """Collects MESSAGE bytes; ``room`` bounds how many frames it accepts."""

    def __init__(self, version: str = "1.2", room: int | None = None) -> None:
        self.parser = FrameParser(version)
        self.frames: list[Frame] = []
        self.room = room
        self.closed: str | None = None

    def write(self, data: bytes) -> bool:
        if self.room is not None:
            if self.room <= 0:
                return False
            self.room -= 1
        self.frames.extend(f for f in self.parser.feed(data) if isinstance(f, Frame))
        return True

    def close(self, message: str) -> None:
        self.closed = message

    def take(self) -> list[Frame]:
        frames, self.frames = self.frames, []
        return frames


def connect(
    router: Router, name: str, version: str = "1.2", room: int | None = None
) -> tuple[Connection, FakeSink]:
    sink = FakeSink(version, room)
    return router.connect(name, version, sink), sink


def send(router: Router, conn: Connection, dest: str, body: bytes = b"x", **headers: str) -> None:
    router.send(conn, Frame("SEND", {"destination": dest, **headers}, body))


def sub(
    router: Router, conn: Connection, dest: str, sid: str, ack: str = "auto", **headers: str
) -> Subscription:
    return router.subscribe(
        conn, Frame("SUBSCRIBE", {"destination": dest, "id": sid, "ack": ack, **headers})
    )


def ack(router: Router, conn: Connection, msg: Frame, command: str = "ACK", **extra: str) -> None:
    if conn.version == "1.2":
        headers = {"id": msg.headers["ack"]}
    else:
        headers = {
            "message-id": msg.headers["message-id"],
            "subscription": msg.headers["subscription"],
        }
    headers.update(extra)
    if command == "ACK":
        router.ack(conn, Frame("ACK", headers))
    else:
        router.nack(conn, Frame("NACK", headers))


def bodies(frames: list[Frame]) -> list[bytes]:
    return [f.body for f in frames]


def test_sans_io_modules_never_import_trio() -> None:
    root = pathlib.Path(__file__).parent.parent / "trio_stomp" / "broker"
    for module in ("_router.py", "_destinations.py", "_config.py"):
        tree = ast.parse((root / module).read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
                if node.level and node.module in (None, ""):
                    names = [alias.name for alias in node.names]
                if node.level == 2:  # from .. import: only the sans-I/O foundation
                    assert node.module in ("_codec", "_errors", "_frames", "_negotiation"), module
            for name in names:
                assert not name.startswith("trio") or name.startswith("trio_stomp"), (module, name)
                assert name not in ("_peer", "_client", "_session", "_broker"), (module, name)


def test_queue_waits_for_a_subscriber_then_delivers_in_order() -> None:
    router = Router()
    producer, _ = connect(router, "p")
    for i in range(5):
        send(router, producer, "/queue/a", b"%d" % i)
    assert router.counters.queued == 5
    consumer, sink = connect(router, "c")
    sub(router, consumer, "/queue/a", "s1")
    frames = sink.take()
    assert bodies(frames) == [b"0", b"1", b"2", b"3", b"4"]
    assert router.counters.queued == 0
    first = frames[0]
    assert first.command == "MESSAGE"
    assert first.headers["destination"] == "/queue/a"
    assert first.headers["subscription"] == "s1"
    assert first.headers["content-length"] == "1"
    assert "ack" not in first.headers  # auto mode
    assert len({f.headers["message-id"] for f in frames}) == 5


def test_queue_round_robin_delivers_each_message_once() -> None:
    router = Router()
    producer, _ = connect(router, "p")
    c1, s1 = connect(router, "c1")
    c2, s2 = connect(router, "c2")
    sub(router, c1, "/queue/rr", "a")
    sub(router, c2, "/queue/rr", "b")
    for i in range(10):
        send(router, producer, "/queue/rr", b"%d" % i)
    got1, got2 = bodies(s1.take()), bodies(s2.take())
    assert len(got1) == 5 and len(got2) == 5
    assert sorted(got1 + got2, key=int) == [b"%d" % i for i in range(10)]
    assert got1 == [b"0", b"2", b"4", b"6", b"8"]


def test_sender_headers_pass_through_and_reserved_ones_do_not() -> None:
    router = Router()
    producer, _ = connect(router, "p")
    consumer, sink = connect(router, "c")
    sub(router, consumer, "/topic/h", "s")
    router.send(
        producer,
        Frame(
            "SEND",
            [
                ("destination", "/topic/h"),
                ("content-type", "text/plain"),
                ("correlation-id", "42"),
                ("custom", "a:b\\c"),
                ("receipt", "r1"),
                ("message-id", "forged"),
                ("subscription", "forged"),
                ("content-length", "3"),
            ],
            b"a\0b",
        ),
    )
    (msg,) = sink.take()
    assert msg.body == b"a\0b"
    assert msg.headers["content-type"] == "text/plain"
    assert msg.headers["correlation-id"] == "42"
    assert msg.headers["custom"] == "a:b\\c"
    assert msg.headers["subscription"] == "s"
    assert msg.headers["message-id"] != "forged"
    assert "receipt" not in msg.headers
    assert [v for n, v in msg.headers.raw if n == "subscription"] == ["s"]


def test_message_is_encoded_once_per_version() -> None:
    router = Router()
    producer, _ = connect(router, "p")
    sinks = []
    for i in range(3):
        conn, sink = connect(router, f"c{i}")
        sub(router, conn, "/topic/t", f"s{i}")
        sinks.append(sink)
    send(router, producer, "/topic/t", b"hello")
    topic = router.topics["/topic/t"]
    message_wires = []
    for s in topic.subscriptions:
        assert s.prefix.startswith(b"MESSAGE\nsubscription:")
    for sink in sinks:
        (frame,) = sink.take()
        assert frame.body == b"hello"
        message_wires.append(frame.headers["message-id"])
    assert len(set(message_wires)) == 1  # one message, one id, fanned out


def test_client_individual_ack_and_nack_redelivers() -> None:
    router = Router()
    producer, _ = connect(router, "p")
    consumer, sink = connect(router, "c")
    sub(router, consumer, "/queue/n", "s", ack="client-individual")
    for i in range(3):
        send(router, producer, "/queue/n", b"%d" % i)
    m0, m1, m2 = sink.take()
    assert router.counters.unacked == 3
    ack(router, consumer, m1)
    assert router.counters.unacked == 2
    ack(router, consumer, m2, "NACK")
    (again,) = sink.take()
    assert again.body == b"2"
    assert again.headers["redelivered"] == "true"
    assert again.headers["message-id"] == m2.headers["message-id"]
    assert again.headers["ack"] != m2.headers["ack"]
    assert router.counters.unacked == 2  # m0 and the redelivered m2
    assert "redelivered" not in m0.headers


def test_client_mode_ack_is_cumulative() -> None:
    router = Router()
    producer, _ = connect(router, "p")
    consumer, sink = connect(router, "c")
    sub(router, consumer, "/queue/c", "s", ack="client")
    for i in range(4):
        send(router, producer, "/queue/c", b"%d" % i)
    frames = sink.take()
    ack(router, consumer, frames[2])
    assert router.counters.unacked == 1
    assert router.counters.acked == 3
    # Acking an already-acked message is ignored, not an error.
    ack(router, consumer, frames[0])
    assert router.counters.unacked == 1


def test_client_mode_nack_is_cumulative_and_keeps_order() -> None:
    router = Router()
    producer, _ = connect(router, "p")
    consumer, sink = connect(router, "c")
    sub(router, consumer, "/queue/c", "s", ack="client")
    for i in range(4):
        send(router, producer, "/queue/c", b"%d" % i)
    frames = sink.take()
    ack(router, consumer, frames[1], "NACK")
    again = sink.take()
    assert bodies(again) == [b"0", b"1"]
    assert all(f.headers["redelivered"] == "true" for f in again)


def test_prefetch_is_credit() -> None:
    router = Router(prefetch=2)
    producer, _ = connect(router, "p")
    c1, s1 = connect(router, "c1")
    c2, s2 = connect(router, "c2")
    sub(router, c1, "/queue/q", "a", ack="client-individual")
    sub(router, c2, "/queue/q", "b", ack="client-individual", prefetch="1")
    for i in range(6):
        send(router, producer, "/queue/q", b"%d" % i)
    f1, f2 = s1.take(), s2.take()
    assert len(f1) == 2 and len(f2) == 1
    assert router.counters.queued == 3
    ack(router, c2, f2[0])
    assert bodies(s2.take()) == [b"3"]
    ack(router, c1, f1[0])
    assert bodies(s1.take()) == [b"4"]


@pytest.mark.parametrize("value", ["0", "-1", "x", "999999999"])
def test_bad_prefetch_is_an_error(value: str) -> None:
    router = Router()
    conn, _ = connect(router, "c")
    with pytest.raises(RemoteProtocolError, match="prefetch"):
        sub(router, conn, "/queue/q", "s", prefetch=value)
    assert conn.subscriptions == {}


def test_unsubscribe_and_disconnect_return_unacked_to_the_queue() -> None:
    router = Router()
    producer, _ = connect(router, "p")
    c1, s1 = connect(router, "c1")
    sub(router, c1, "/queue/u", "a", ack="client")
    send(router, producer, "/queue/u", b"1")
    send(router, producer, "/queue/u", b"2")
    assert len(s1.take()) == 2
    router.unsubscribe(c1, Frame("UNSUBSCRIBE", {"id": "a"}))
    assert router.counters.queued == 2 and router.counters.unacked == 0
    c2, s2 = connect(router, "c2")
    sub(router, c2, "/queue/u", "b", ack="client")
    got = s2.take()
    assert bodies(got) == [b"1", b"2"]
    assert all(f.headers["redelivered"] == "true" for f in got)
    router.disconnect(c2)
    c3, s3 = connect(router, "c3")
    sub(router, c3, "/queue/u", "c")
    assert bodies(s3.take()) == [b"1", b"2"]
    assert router.counters.redelivered == 4


def test_idle_queues_and_topics_are_forgotten() -> None:
    router = Router()
    conn, _ = connect(router, "c")
    sub(router, conn, "/queue/x", "a")
    sub(router, conn, "/topic/y", "b")
    assert router.counts == (1, 1, 0)
    router.unsubscribe(conn, Frame("UNSUBSCRIBE", {"id": "a"}))
    router.unsubscribe(conn, Frame("UNSUBSCRIBE", {"id": "b"}))
    assert router.counts == (0, 0, 0)


def test_topic_fans_out_and_drops_when_nobody_listens() -> None:
    router = Router()
    producer, _ = connect(router, "p")
    send(router, producer, "/topic/t", b"lost")
    assert router.counters.unrouted == 1
    sinks = []
    for i in range(3):
        conn, sink = connect(router, f"c{i}")
        sub(router, conn, "/topic/t", "s")
        sinks.append(sink)
    send(router, producer, "/topic/t", b"all")
    for sink in sinks:
        assert bodies(sink.take()) == [b"all"]


def test_topic_nack_redelivers_to_the_same_subscription() -> None:
    router = Router()
    producer, _ = connect(router, "p")
    c1, s1 = connect(router, "c1")
    c2, s2 = connect(router, "c2")
    sub(router, c1, "/topic/t", "a", ack="client-individual")
    sub(router, c2, "/topic/t", "b", ack="client-individual")
    send(router, producer, "/topic/t", b"m")
    (m1,) = s1.take()
    (m2,) = s2.take()
    ack(router, c1, m1, "NACK")
    (again,) = s1.take()
    assert again.headers["redelivered"] == "true"
    assert s2.take() == []
    ack(router, c2, m2)
    assert router.counters.unacked == 1


def test_topic_slow_consumer_is_disconnected_by_default() -> None:
    router = Router()
    producer, _ = connect(router, "p")
    slow, slow_sink = connect(router, "slow", room=1)
    fast, fast_sink = connect(router, "fast")
    sub(router, slow, "/topic/t", "s")
    sub(router, fast, "/topic/t", "f")
    for i in range(3):
        send(router, producer, "/topic/t", b"%d" % i)
    assert bodies(fast_sink.take()) == [b"0", b"1", b"2"]
    assert bodies(slow_sink.take()) == [b"0"]
    assert slow_sink.closed is not None and "slow consumer" in slow_sink.closed
    assert not slow.alive
    assert router.counters.slow_consumers == 1


def test_topic_slow_consumer_drop_policy_counts() -> None:
    router = Router(slow_consumer_policy="drop")
    producer, _ = connect(router, "p")
    slow, slow_sink = connect(router, "slow", room=1)
    sub(router, slow, "/topic/t", "s")
    for i in range(3):
        send(router, producer, "/topic/t", b"%d" % i)
    assert slow_sink.closed is None and slow.alive
    assert router.counters.dropped == 2
    slow_sink.room = None
    router.resume(slow)
    send(router, producer, "/topic/t", b"3")
    assert bodies(slow_sink.take()) == [b"0", b"3"]


def test_topic_client_mode_unacked_beyond_prefetch_is_slow() -> None:
    router = Router(prefetch=2, slow_consumer_policy="drop")
    producer, _ = connect(router, "p")
    conn, sink = connect(router, "c")
    sub(router, conn, "/topic/t", "s", ack="client")
    for i in range(4):
        send(router, producer, "/topic/t", b"%d" % i)
    assert bodies(sink.take()) == [b"0", b"1"]
    assert router.counters.dropped == 2


def test_full_queue_consumer_is_skipped_until_resumed() -> None:
    router = Router()
    producer, _ = connect(router, "p")
    blocked, blocked_sink = connect(router, "b", room=1)
    other, other_sink = connect(router, "o")
    sub(router, blocked, "/queue/q", "a")
    sub(router, other, "/queue/q", "b")
    for i in range(6):
        send(router, producer, "/queue/q", b"%d" % i)
    assert bodies(blocked_sink.take()) == [b"0"]
    assert bodies(other_sink.take()) == [b"1", b"2", b"3", b"4", b"5"]
    assert not blocked.writable and blocked.alive  # queues never disconnect: they stop crediting
    router.unsubscribe(other, Frame("UNSUBSCRIBE", {"id": "b"}))
    send(router, producer, "/queue/q", b"6")
    assert router.counters.queued == 1
    blocked_sink.room = None
    router.resume(blocked)
    assert bodies(blocked_sink.take()) == [b"6"]


def test_transactions_apply_on_commit_and_vanish_on_abort() -> None:
    router = Router()
    producer, _ = connect(router, "p")
    consumer, sink = connect(router, "c")
    sub(router, consumer, "/queue/t", "s", ack="client-individual")
    router.begin(producer, Frame("BEGIN", {"transaction": "tx1"}))
    send(router, producer, "/queue/t", b"1", transaction="tx1")
    send(router, producer, "/queue/t", b"2", transaction="tx1")
    assert sink.take() == []
    router.commit(producer, Frame("COMMIT", {"transaction": "tx1"}))
    m1, m2 = sink.take()
    assert bodies([m1, m2]) == [b"1", b"2"]
    router.begin(producer, Frame("BEGIN", {"transaction": "tx2"}))
    send(router, producer, "/queue/t", b"3", transaction="tx2")
    router.abort(producer, Frame("ABORT", {"transaction": "tx2"}))
    assert sink.take() == []
    # ACK and NACK in a transaction take effect on commit only.
    router.begin(consumer, Frame("BEGIN", {"transaction": "a"}))
    ack(router, consumer, m1, transaction="a")
    ack(router, consumer, m2, "NACK", transaction="a")
    assert router.counters.unacked == 2 and sink.take() == []
    router.commit(consumer, Frame("COMMIT", {"transaction": "a"}))
    (again,) = sink.take()
    assert again.body == b"2" and again.headers["redelivered"] == "true"
    assert router.counters.acked == 1


def test_transaction_errors() -> None:
    router = Router()
    conn, _ = connect(router, "c")
    with pytest.raises(RemoteProtocolError, match="unknown transaction"):
        send(router, conn, "/queue/a", transaction="nope")
    with pytest.raises(RemoteProtocolError, match="unknown transaction"):
        router.commit(conn, Frame("COMMIT", {"transaction": "nope"}))
    with pytest.raises(RemoteProtocolError, match="unknown transaction"):
        router.abort(conn, Frame("ABORT", {"transaction": "nope"}))
    with pytest.raises(RemoteProtocolError, match="transaction header"):
        router.begin(conn, Frame("BEGIN"))
    router.begin(conn, Frame("BEGIN", {"transaction": "t"}))
    with pytest.raises(RemoteProtocolError, match="already begun"):
        router.begin(conn, Frame("BEGIN", {"transaction": "t"}))
    assert router.counters.queued == 0


def test_disconnect_aborts_open_transactions() -> None:
    router = Router()
    producer, _ = connect(router, "p")
    router.begin(producer, Frame("BEGIN", {"transaction": "t"}))
    send(router, producer, "/queue/a", transaction="t")
    router.disconnect(producer)
    assert router.counters.enqueued == 0 and router.counts == (0, 0, 0)


def test_temp_queue_and_reply_to_rewriting() -> None:
    router = Router()
    requester, req_sink = connect(router, "req")
    responder, resp_sink = connect(router, "resp")
    sub(router, requester, "/temp-queue/replies", "r")
    sub(router, responder, "/queue/service", "svc")
    send(router, requester, "/queue/service", b"ping", **{"reply-to": "/temp-queue/replies"})
    (request,) = resp_sink.take()
    reply_to = request.headers["reply-to"]
    assert reply_to.startswith("/reply-queue/") and "req" in reply_to
    send(router, responder, reply_to, b"pong")
    (reply,) = req_sink.take()
    assert reply.body == b"pong"
    assert reply.headers["destination"] == "/temp-queue/replies"
    assert reply.headers["subscription"] == "r"
    # Another connection's /temp-queue/replies is a different queue.
    other, other_sink = connect(router, "other")
    sub(router, other, "/temp-queue/replies", "x")
    send(router, responder, reply_to, b"pong2")
    assert bodies(req_sink.take()) == [b"pong2"] and other_sink.take() == []
    with pytest.raises(RemoteProtocolError, match="private"):
        sub(router, other, reply_to, "y")
    # When the owner leaves, replies to it are dropped, not an error.
    router.disconnect(requester)
    send(router, responder, reply_to, b"late")
    assert router.counters.dropped == 1


def test_reply_to_a_temp_queue_without_subscription_waits() -> None:
    router = Router()
    requester, req_sink = connect(router, "req")
    responder, resp_sink = connect(router, "resp")
    sub(router, responder, "/queue/service", "svc")
    send(router, requester, "/queue/service", b"ping", **{"reply-to": "/temp-queue/r"})
    (request,) = resp_sink.take()
    send(router, responder, request.headers["reply-to"], b"pong")
    sub(router, requester, "/temp-queue/r", "late")
    assert bodies(req_sink.take()) == [b"pong"]


@pytest.mark.parametrize("kind", ["topic", "queue"])
def test_default_destination_type(kind: str) -> None:
    router = Router(default_destination_type=kind)
    producer, _ = connect(router, "p")
    sinks = []
    for i in range(2):
        conn, sink = connect(router, f"c{i}")
        sub(router, conn, "plain-name", "s")
        sinks.append(sink)
    send(router, producer, "plain-name", b"m")
    total = sum(len(s.take()) for s in sinks)
    assert total == (2 if kind == "topic" else 1)


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (Frame("SEND", {}), "destination"),
        (Frame("SEND", {"destination": "/queue/"}), "no name"),
        (Frame("SUBSCRIBE", {"destination": "/queue/a"}), "id header"),
        (Frame("SUBSCRIBE", {"id": "1"}), "destination"),
        (
            Frame("SUBSCRIBE", {"id": "1", "destination": "/queue/a", "ack": "sometimes"}),
            "ack mode",
        ),
        (Frame("UNSUBSCRIBE", {}), "id header"),
        (Frame("UNSUBSCRIBE", {"id": "nope"}), "no subscription"),
        (Frame("ACK", {"message-id": "1"}), "no id header"),
        (Frame("NACK", {}), "no id header"),
    ],
)
def test_bad_frames_raise_remote_protocol_errors(frame: Frame, match: str) -> None:
    router = Router()
    conn, _ = connect(router, "c")
    method = {
        "SEND": router.send,
        "SUBSCRIBE": router.subscribe,
        "UNSUBSCRIBE": router.unsubscribe,
        "ACK": router.ack,
        "NACK": router.nack,
    }[frame.command]
    with pytest.raises(RemoteProtocolError, match=match):
        method(conn, frame)


def test_duplicate_subscription_id() -> None:
    router = Router()
    conn, _ = connect(router, "c")
    sub(router, conn, "/queue/a", "s")
    with pytest.raises(RemoteProtocolError, match="already in use"):
        sub(router, conn, "/queue/b", "s")
    assert "/queue/b" not in router.queues


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_old_versions_ack_by_message_id(version: str) -> None:
    router = Router()
    producer, _ = connect(router, "p")
    consumer, sink = connect(router, "c", version=version)
    sub(router, consumer, "/queue/a", "s", ack="client")
    send(router, producer, "/queue/a", b"1")
    (msg,) = sink.take()
    assert "ack" not in msg.headers
    with pytest.raises(RemoteProtocolError, match="message-id"):
        router.ack(consumer, Frame("ACK", {"id": "1"}))
    if version == "1.0":
        router.ack(consumer, Frame("ACK", {"message-id": msg.headers["message-id"]}))
    else:
        ack(router, consumer, msg)
    assert router.counters.unacked == 0 and router.counters.acked == 1


def test_version_1_0_subscribe_without_id_and_unsubscribe_by_destination() -> None:
    router = Router()
    producer, _ = connect(router, "p")
    consumer, sink = connect(router, "c", version="1.0")
    router.subscribe(consumer, Frame("SUBSCRIBE", {"destination": "/queue/a"}))
    send(router, producer, "/queue/a")
    assert len(sink.take()) == 1
    router.unsubscribe(consumer, Frame("UNSUBSCRIBE", {"destination": "/queue/a"}))
    assert consumer.subscriptions == {}


def test_header_that_an_old_version_cannot_carry_is_left_out_for_it_only() -> None:
    router = Router()
    producer, _ = connect(router, "p")
    old, old_sink = connect(router, "old", version="1.0")
    new, new_sink = connect(router, "new", version="1.2")
    sub(router, old, "/topic/t", "o")
    sub(router, new, "/topic/t", "n")
    send(router, producer, "/topic/t", b"b", note="two\nlines", keep="yes")
    (old_msg,) = old_sink.take()
    (new_msg,) = new_sink.take()
    assert "note" not in old_msg.headers and old_msg.headers["keep"] == "yes"
    assert new_msg.headers["note"] == "two\nlines"


@pytest.mark.parametrize(
    "headers",
    [
        [("content-type", "text/plain"), ("x", "y")],
        [],
        [("colon", "a:b")],
        [("back", "a\\b")],
        [("nl", "a\nb")],
        [("cr", "a\rb")],
        [("na:me", "v")],
        [("unicode", "h\u00e9llo \u2603")],
    ],
)
@pytest.mark.parametrize("body", [b"", b"x", b"\0bin\0"])
@pytest.mark.parametrize("destination", ["/queue/w", "/queue/w:x", "/queue/w\\x", "/topic/\u00e9"])
def test_message_wire_matches_the_codec_for_every_version(
    headers: list[tuple[str, str]], body: bytes, destination: str
) -> None:
    from trio_stomp.broker._destinations import Message, _encodable

    for version in ("1.0", "1.1", "1.2"):
        message = Message("m-1", destination, headers, body)
        expected_headers = _encodable(message.headers, version)
        expected = serialize(Frame("MESSAGE", expected_headers, body), version)
        assert b"MESSAGE\n" + message.wire(version) == expected
        # cached: the same object every time
        assert message.wire(version) is message.wire(version)


@pytest.mark.parametrize(
    ("destination", "extra"),
    [
        ("/queue/plan", b""),
        ("/queue/plan", b"content-type:text/plain\nx-id:7\n"),
        ("/topic/plan", b"x-colon:a:b\n"),  # a value the MESSAGE must escape (1.1, 1.2)
    ],
)
@pytest.mark.parametrize("version", ["1.0", "1.2"])
def test_a_repeated_send_head_is_routed_exactly_as_a_fresh_one(
    destination: str, extra: bytes, version: str
) -> None:
    """Frames with the same head take the router's SendPlan; what they deliver must be
    what hand-made frames (never planned) deliver, message-id aside."""
    bodies_sent = [b"one", b"two", b"six", b"three", b"\0bin"]

    def deliveries(parsed: bool) -> list[tuple[tuple[tuple[str, str], ...], bytes]]:
        router = Router()
        producer, _ = connect(router, "p")
        producer.user_id = "alice"
        consumer, sink = connect(router, "c", version)
        sub(router, consumer, destination, "s")
        head = b"SEND\ndestination:%s\n%scontent-length:%%d\n\n" % (destination.encode(), extra)
        wire = b"".join(head % len(body) + body + b"\0" for body in bodies_sent)
        frames = [f for f in FrameParser().feed(wire) if isinstance(f, Frame)]
        for frame in frames:
            if not parsed:
                frame = Frame(frame.command, list(frame.headers.raw), frame.body)
            router.send(producer, frame)
        if parsed and b":a:b" not in extra:
            assert producer.send_plan is not None  # the repeated heads took the plan
        return [
            (tuple(pair for pair in msg.headers.raw if pair[0] != "message-id"), msg.body)
            for msg in sink.take()
        ]

    planned, fresh = deliveries(parsed=True), deliveries(parsed=False)
    assert [body for _, body in planned] == bodies_sent
    assert planned == fresh
    assert all(("user-id", "alice") in headers for headers, _ in planned)


@pytest.mark.parametrize("version", ["1.0", "1.2"])
def test_repeated_request_and_reply_heads_are_routed_exactly_as_fresh_ones(
    version: str,
) -> None:
    """Request/reply with repeated heads: the request's ``reply-to`` (rewritten per
    connection) and the reply sent to the ``/reply-queue/`` name it became both take the
    SendPlan, and deliver what hand-made frames (never planned) deliver, message-id
    aside; a reply queue whose owner left drops later replies, plan or not."""
    bodies_sent = [b"one", b"two", b"six"]

    def deliveries(parsed: bool) -> list[list[tuple[tuple[tuple[str, str], ...], bytes]]]:
        router = Router()
        requester, requests_back = connect(router, "req", version)
        responder, requests = connect(router, "resp", version)
        sub(router, responder, "/queue/rr", "s")
        sub(router, requester, "/temp-queue/rr", "t")

        def feed(conn: Connection, wire: bytes) -> None:
            for frame in FrameParser().feed(wire):
                if isinstance(frame, Frame):
                    if not parsed:
                        frame = Frame(frame.command, list(frame.headers.raw), frame.body)
                    router.send(conn, frame)

        head = b"SEND\ndestination:/queue/rr\nreply-to:/temp-queue/rr\ncontent-length:%d\n\n"
        feed(requester, b"".join(head % len(body) + body + b"\0" for body in bodies_sent))
        got = requests.take()
        reply_to = got[0].headers["reply-to"]
        assert reply_to.startswith("/reply-queue/")
        head = b"SEND\ndestination:%s\ncontent-length:%%d\n\n" % reply_to.encode()
        feed(responder, b"".join(head % len(body) + body + b"\0" for body in bodies_sent))
        if parsed:
            assert requester.send_plan is not None and responder.send_plan is not None
        replies = requests_back.take()
        router.disconnect(requester)
        feed(responder, head % 4 + b"late\0")  # the reply queue is gone: dropped
        assert router.counters.dropped == 1
        return [
            [
                (tuple(pair for pair in msg.headers.raw if pair[0] != "message-id"), msg.body)
                for msg in msgs
            ]
            for msgs in (got, replies)
        ]

    planned, fresh = deliveries(parsed=True), deliveries(parsed=False)
    assert [[body for _, body in msgs] for msgs in planned] == [bodies_sent, bodies_sent]
    assert planned == fresh
    assert all(("destination", "/temp-queue/rr") in headers for headers, _ in planned[1])
