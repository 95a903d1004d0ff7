"""Hostile input, fuzzed with hypothesis: random and mutated frame streams through the
parser, and through a whole broker session.

What must hold, whatever the bytes:
- the parser returns frames/heart-beats or raises ``RemoteProtocolError`` (nothing else),
  whatever the split of the input, and never holds more than its frame-size bound;
- a broker session answers with zero or more frames, at most one ERROR and only as its
  last frame, then closes; it never logs a crash; and the broker keeps serving a
  well-behaved client, whose messages arrive intact.

Example counts are bounded so the file runs in a few seconds in CI. For long runs, raise
``FUZZ_EXAMPLES`` or use the atheris harnesses in ``tests/fuzz/``.
"""

from __future__ import annotations

import logging
import os

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trio_stomp import Frame, FrameParser, Heartbeat, RemoteProtocolError, serialize
from trio_stomp.broker import open_broker

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # caplog is cleared per example
    ],
)

COMMANDS = [
    "CONNECT", "STOMP", "SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK", "BEGIN",
    "COMMIT", "ABORT", "DISCONNECT", "MESSAGE", "ERROR", "CONNECTED", "RECEIPT", "BOGUS",
]  # fmt: skip
HEADER_NAMES = [
    "destination", "id", "ack", "receipt", "transaction", "content-length", "content-type",
    "accept-version", "heart-beat", "login", "passcode", "host", "prefetch", "reply-to",
    "message-id", "subscription", "user-id", "persistent", "expires", "x",
]  # fmt: skip
VALUES = st.one_of(
    st.sampled_from(
        [
            "/queue/a",
            "/topic/b",
            "/temp-queue/c",
            "/reply-queue/session-1.c",
            "1",
            "0",
            "-1",
            "99999999999999999999",
            "client",
            "client-individual",
            "auto",
            "1.0",
            "1.1",
            "1.2",
            "1.0,1.1,1.2",
            "0,0",
            "10,10",
            "x,y",
            "t1",
            "",
            "\\c",
            "\\q",
        ]
    ),
    st.text(max_size=12),
)
SPECIALS = [
    b"\x00", b"\n", b"\r\n", b":", b"\\", b"\\c", b"\\q", b"content-length:-1\n",
    b"content-length:5\n", b"\n\n", b"\xff\xfe", b"CONNECT\n", b"SEND\n",
]  # fmt: skip


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    command = draw(st.sampled_from(COMMANDS))
    headers = draw(st.lists(st.tuples(st.sampled_from(HEADER_NAMES), VALUES), max_size=6))
    body = draw(st.binary(max_size=40))
    version = draw(st.sampled_from(["1.0", "1.1", "1.2"]))
    try:
        return serialize(Frame(command, headers, body), version)
    except Exception:  # unencodable for this version: write it raw
        head = "".join(f"{k}:{v}\n" for k, v in headers).encode("utf-8", "replace")
        return command.encode() + b"\n" + head + b"\n" + body + b"\x00"


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(b"".join(draw(st.lists(frames(), min_size=1, max_size=4))))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "duplicate", "special"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 32))]
        else:
            data[at:at] = draw(st.sampled_from(SPECIALS))
    return bytes(data)


streams = st.one_of(mutated(), st.binary(max_size=300), frames())


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return [p for p in pieces if p]


def parse_all(chunks: list[bytes], version: str) -> tuple[list[object], str | None]:
    parser = FrameParser(version, max_frame_size=2048, max_body_size=1024, max_headers=16)
    events: list[object] = []
    try:
        for chunk in [*chunks, b""]:
            for event in parser.feed(chunk):
                if isinstance(event, Frame):
                    event.headers.raw  # noqa: B018 - headers decode lazily: may raise here
                events.append(event)
            assert parser.buffered <= 2048 + 64 * 1024
    except RemoteProtocolError as exc:
        return events, str(exc)
    return events, None


@FUZZ
@given(
    data=streams,
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
    version=st.sampled_from(["1.0", "1.1", "1.2"]),
)
def test_parser_survives_anything_in_any_split(data: bytes, cuts: list[int], version: str) -> None:
    whole, whole_error = parse_all([data], version)
    pieces, pieces_error = parse_all(split(data, cuts), version)
    # The same verdict whatever the split. Without an error, the same events; with one,
    # a split only lets more of the frames before the error out (``feed`` raising loses
    # what that call had parsed), never different ones.
    assert (whole_error is None) == (pieces_error is None)
    if whole_error is None:
        assert whole == pieces
    else:
        assert pieces[: len(whole)] == whole
    for event in whole:
        assert isinstance(event, (Frame, Heartbeat))


# -- through a broker session --------------------------------------------------------------


async def read_all(stream: trio.abc.Stream) -> list[Frame]:
    parser = FrameParser("1.0")
    frames: list[Frame] = []
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return frames
        for event in parser.feed(bytes(data)):
            if isinstance(event, Frame):
                frames.append(event)


async def hostile_session(data: bytes, connect_first: bool) -> None:
    async with open_broker(
        listen=[],
        connect_timeout=5,
        shutdown_grace=0.5,
        heart_beat=(0, 0),
        max_body_size=1024,
        max_frame_size=4096,
        max_subscriptions=4,
        max_transactions=2,
        max_transaction_frames=4,
        max_queue_depth=8,
        max_destinations=16,
    ) as broker:
        # A well-behaved pair, connected before the attack.
        consumer = broker.connect_in_memory()
        producer = broker.connect_in_memory()
        for stream in (consumer, producer):
            await stream.send_all(b"CONNECT\naccept-version:1.2\n\n\x00")
        await consumer.send_all(b"SUBSCRIBE\ndestination:/queue/good\nid:g\nreceipt:r\n\n\x00")

        attacker = broker.connect_in_memory()
        assert isinstance(attacker, trio.StapledStream)
        if connect_first:
            data = b"CONNECT\naccept-version:1.2\n\n\x00" + data
        await attacker.send_all(data)
        await attacker.send_stream.aclose()  # EOF
        with trio.fail_after(60):
            answers = await read_all(attacker)
        errors = [i for i, f in enumerate(answers) if f.command == "ERROR"]
        assert errors in ([], [len(answers) - 1]), answers
        for frame in answers:
            assert frame.command in ("CONNECTED", "RECEIPT", "ERROR", "MESSAGE"), frame

        # The good clients are unaffected.
        body = bytes(range(256)) + b"\x00end"
        await producer.send_all(serialize(Frame("SEND", [("destination", "/queue/good")], body)))
        parser = FrameParser("1.2")
        seen: list[Frame] = []
        with trio.fail_after(60):
            while not any(f.command == "MESSAGE" for f in seen):
                chunk = await consumer.receive_some(65536)
                assert chunk, "the good consumer was disconnected"
                seen.extend(e for e in parser.feed(bytes(chunk)) if isinstance(e, Frame))
        message = next(f for f in seen if f.command == "MESSAGE")
        assert message.body == body


@settings(FUZZ, max_examples=max(1, EXAMPLES * 2 // 3))
@given(data=streams, connect_first=st.booleans())
# Found by this test: a header line without a colon (headers decode lazily) crashed the
# session while it built the ERROR frame for that very frame.
@example(data=b"SEND\ndestination:/queue/a\nreceipt;/queue/a\n\n\x00", connect_first=False).via(
    "discovered failure"
)
@example(data=b"SEND\ndestination:/queue/a\nreceipt;x\n\n\x00", connect_first=True).via(
    "discovered failure"
)
@example(data=b"CONNECT\naccept-version:1.2\nlogin\n\n\x00", connect_first=False).via(
    "discovered failure"
)
def test_broker_session_survives_anything(
    data: bytes, connect_first: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="trio_stomp.broker"):
        trio.run(
            hostile_session, data, connect_first, clock=trio.testing.MockClock(autojump_threshold=0)
        )
    crashes = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not crashes, [r.getMessage() for r in crashes]
