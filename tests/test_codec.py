"""FrameParser and serialize: vectors fed whole, byte by byte and followed by another frame
(in the manner of h11's test_io), the spec's examples, the nasty cases, and a hypothesis
round trip over arbitrary frames in random splits."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_stomp import (
    HEARTBEAT,
    Frame,
    FrameParser,
    Heartbeat,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    StompError,
    _codec,
    serialize,
)
from trio_stomp._codec import _FrameBuilder

TRAILER = b"RECEIPT\nreceipt-id:77\n\n\x00"
TRAILER_FRAME = Frame("RECEIPT", [("receipt-id", "77")])
Event = Frame | Heartbeat


def feed_whole(data: bytes, version: str = "1.2", **limits: int) -> list[Event]:
    parser = FrameParser(version, **limits)
    events = parser.feed(data)
    parser.feed(b"")
    return events


def feed_bytewise(data: bytes, version: str = "1.2", **limits: int) -> list[Event]:
    parser = FrameParser(version, **limits)
    events: list[Event] = []
    for i in range(len(data)):
        events += parser.feed(data[i : i + 1])
    parser.feed(b"")
    return events


def parse_all_ways(data: bytes, version: str = "1.2", **limits: int) -> list[Event]:
    """Parse ``data`` whole, byte by byte, and followed by a RECEIPT in the same chunk;
    check the three agree and return the events."""
    whole = feed_whole(data, version, **limits)
    assert feed_bytewise(data, version, **limits) == whole
    parser = FrameParser(version, **limits)
    with_trailer = parser.feed(data + TRAILER)
    assert with_trailer == [*whole, TRAILER_FRAME]
    return whole


def frames(events: Sequence[Event]) -> list[Frame]:
    return [event for event in events if isinstance(event, Frame)]


def fails_all_ways(data: bytes, match: str, version: str = "1.2", **limits: int) -> None:
    for feed in (feed_whole, feed_bytewise):
        with pytest.raises(RemoteProtocolError, match=match):
            feed(data, version, **limits)


# ---------------------------------------------------------------- frames parse


def test_spec_example_connect() -> None:
    data = b"CONNECT\naccept-version:1.2\nhost:stomp.github.org\n\n\x00"
    assert parse_all_ways(data) == [
        Frame("CONNECT", [("accept-version", "1.2"), ("host", "stomp.github.org")])
    ]


def test_spec_example_send_with_content_type() -> None:
    data = b"SEND\ndestination:/queue/a\ncontent-type:text/plain\n\nhello queue a\n\x00"
    (frame,) = parse_all_ways(data)
    assert isinstance(frame, Frame)
    assert frame.command == "SEND"
    assert frame.headers["destination"] == "/queue/a"
    assert frame.headers["content-type"] == "text/plain"
    assert frame.body == b"hello queue a\n"


def test_crlf_line_endings() -> None:
    data = b"SEND\r\ndestination:/queue/a\r\nreceipt:1\r\n\r\nbody\x00"
    assert parse_all_ways(data) == [
        Frame("SEND", [("destination", "/queue/a"), ("receipt", "1")], b"body")
    ]


def test_mixed_line_endings_and_no_headers() -> None:
    assert parse_all_ways(b"DISCONNECT\r\n\r\n\x00") == [Frame("DISCONNECT")]
    assert parse_all_ways(b"DISCONNECT\n\n\x00") == [Frame("DISCONNECT")]
    assert parse_all_ways(b"SEND\na:1\r\nb:2\n\n\x00") == [Frame("SEND", [("a", "1"), ("b", "2")])]


def test_content_length_body_with_nuls() -> None:
    body = b"\x00bin\x00ary\x00"
    data = b"SEND\ndestination:/q\ncontent-length:%d\n\n%s\x00" % (len(body), body)
    (frame,) = parse_all_ways(data)
    assert isinstance(frame, Frame)
    assert frame.body == body


def test_body_without_content_length_ends_at_first_nul() -> None:
    events = parse_all_ways(b"SEND\ndestination:/q\n\nab\x00")
    assert frames(events)[0].body == b"ab"


def test_empty_content_length_body() -> None:
    (frame,) = parse_all_ways(b"SEND\ncontent-length:0\n\n\x00")
    assert isinstance(frame, Frame)
    assert frame.body == b""


def test_heartbeats_between_frames() -> None:
    data = b"\n\r\nSEND\n\nx\x00\n\n\r\n"
    assert parse_all_ways(data) == [
        HEARTBEAT,
        HEARTBEAT,
        Frame("SEND", (), b"x"),
        HEARTBEAT,
        HEARTBEAT,
        HEARTBEAT,
    ]


def test_a_lone_cr_waits_for_its_lf() -> None:
    parser = FrameParser()
    assert parser.feed(b"\r") == []
    assert parser.feed(b"\n") == [HEARTBEAT]


def test_repeated_header_first_wins_and_raw_keeps_all() -> None:
    (frame,) = parse_all_ways(b"MESSAGE\nfoo:World\nfoo:Hello\n\n\x00")
    assert isinstance(frame, Frame)
    assert frame.headers["foo"] == "World"
    assert frame.headers.raw == (("foo", "World"), ("foo", "Hello"))
    assert list(frame.headers) == ["foo"]
    assert len(frame.headers) == 1


def test_repeated_content_length_first_wins() -> None:
    (frame,) = parse_all_ways(b"SEND\ncontent-length:2\ncontent-length:5\n\nab\x00")
    assert isinstance(frame, Frame)
    assert frame.body == b"ab"


def test_spaces_are_data() -> None:
    (frame,) = parse_all_ways(b"SEND\n name : value \n\n\x00")
    assert isinstance(frame, Frame)
    assert frame.headers.raw == ((" name ", " value "),)


def test_value_may_hold_colons() -> None:
    (frame,) = parse_all_ways(b"SEND\nurl:http://x:80/\n\n\x00", version="1.0")
    assert isinstance(frame, Frame)
    assert frame.headers["url"] == "http://x:80/"


def test_unicode_headers() -> None:
    data = "SEND\ndestination:/queue/caf\u00e9\nna\u00efve:\u2603\n\n\x00".encode()
    (frame,) = parse_all_ways(data)
    assert isinstance(frame, Frame)
    assert frame.headers["destination"] == "/queue/caf\u00e9"
    assert frame.headers["na\u00efve"] == "\u2603"


def test_lowercase_command_is_kept_as_is() -> None:
    # Commands are case-sensitive: the parser keeps the spelling; a broker rejects it.
    (frame,) = parse_all_ways(b"send\n\n\x00")
    assert isinstance(frame, Frame)
    assert frame.command == "send"


# ---------------------------------------------------------------- escaping


def test_escapes_in_1_2() -> None:
    data = b"MESSAGE\na\\cb:c\\\\d\\ne\\rf\n\n\x00"
    (frame,) = parse_all_ways(data, "1.2")
    assert isinstance(frame, Frame)
    assert frame.headers.raw == (("a:b", "c\\d\ne\rf"),)


def test_escapes_in_1_1_have_no_cr() -> None:
    (frame,) = parse_all_ways(b"MESSAGE\na:x\\cy\\n\\\\\n\n\x00", "1.1")
    assert isinstance(frame, Frame)
    assert frame.headers["a"] == "x:y\n\\"
    fails_all_ways(b"MESSAGE\na:x\\ry\n\n\x00", "undefined escape", "1.1")


def test_no_escaping_in_1_0() -> None:
    (frame,) = parse_all_ways(b"MESSAGE\na:x\\cy\\q\n\n\x00", "1.0")
    assert isinstance(frame, Frame)
    assert frame.headers["a"] == "x\\cy\\q"


@pytest.mark.parametrize("command", ["CONNECT", "STOMP", "CONNECTED"])
def test_connect_frames_are_never_unescaped(command: str) -> None:
    data = f"{command}\nlogin:me\npasscode:a:b\\c\\\\n\n\n\x00".encode()
    (frame,) = parse_all_ways(data, "1.2")
    assert isinstance(frame, Frame)
    assert frame.headers["passcode"] == "a:b\\c\\\\n"


@pytest.mark.parametrize("bad", [b"\\t", b"\\x", b"\\", b"\\ "])
def test_undefined_escape_is_an_error(bad: bytes) -> None:
    fails_all_ways(b"SEND\nname:val" + bad + b"\n\n\x00", "escape")


# ---------------------------------------------------------------- bad input and limits


@pytest.mark.parametrize("length", [b"-1", b"abc", b"1e3", b"+5", b" 5", b"\xc2\xb2", b""])
def test_bad_content_length(length: bytes) -> None:
    fails_all_ways(b"SEND\ncontent-length:" + length + b"\n\nhello\x00", "content-length")


def test_huge_content_length_is_refused_before_allocation() -> None:
    data = b"SEND\ncontent-length:99999999999999999999999999\n\n"
    fails_all_ways(data, "maximum body size")
    fails_all_ways(b"SEND\ncontent-length:1025\n\n", "maximum body size", max_body_size=1024)
    # Sizes seen are remembered across parsers; each parser still applies its own limit.
    frame = b"SEND\ncontent-length:1025\n\n" + b"x" * 1025 + b"\x00"
    assert len(parse_all_ways(frame)) == 1
    fails_all_ways(
        frame, "content-length 1025 exceeds the maximum body size of 1024 bytes", max_body_size=1024
    )


def test_missing_nul_after_content_length_body() -> None:
    fails_all_ways(b"SEND\ncontent-length:2\n\nabc\x00", "not followed by a NUL")


def test_body_without_content_length_over_limit() -> None:
    fails_all_ways(b"SEND\n\n" + b"x" * 101, "maximum size", max_body_size=100)
    fails_all_ways(b"SEND\n\n" + b"x" * 101 + b"\x00", "maximum size", max_body_size=100)


def test_limits_on_lines_and_header_count() -> None:
    fails_all_ways(b"SEND\na:" + b"x" * 200 + b"\n\n\x00", "line exceeds", max_line_length=100)
    many = b"".join(b"h%d:v\n" % i for i in range(11))
    fails_all_ways(b"SEND\n" + many + b"\n\x00", "headers", max_headers=10)
    fails_all_ways(b"SEND\n" + b"a:b\n" * 100, "frame size", max_frame_size=64)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x01\x02\x03garbage" * 20,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100,  # a TLS hello
        b"SEND MESSAGE\n\n\x00",
        b"SEND\nno colon here\n\n\x00",
        b"SEND\n\xff\xfe:x\n\n\x00",
        b"\r\r\n",
    ],
)
def test_garbage_raises_a_protocol_error(garbage: bytes) -> None:
    for feed in (feed_whole, feed_bytewise):
        with pytest.raises(ProtocolError) as info:
            events = feed(garbage)
            # A header line without a colon may surface when the headers are read.
            for event in events:
                if isinstance(event, Frame):
                    event.headers.raw  # noqa: B018
        assert isinstance(info.value, StompError)
        assert str(info.value)


def test_a_broken_parser_stays_broken() -> None:
    parser = FrameParser()
    with pytest.raises(RemoteProtocolError):
        parser.feed(b"SEND\ncontent-length:-1\n\n")
    with pytest.raises(RemoteProtocolError):
        parser.feed(b"SEND\n\n\x00")


def test_eof_in_the_middle_of_a_frame() -> None:
    for partial in [b"SEN", b"SEND\n", b"SEND\n\nbody", b"SEND\ncontent-length:4\n\nab"]:
        parser = FrameParser()
        assert parser.feed(partial) == []
        with pytest.raises(RemoteProtocolError, match="middle of a frame"):
            parser.feed(b"")
    parser = FrameParser()
    parser.feed(b"SEND\n\n\x00\n")
    assert parser.feed(b"") == []


def test_version_is_settable_and_validated() -> None:
    parser = FrameParser("1.0")
    assert parser.feed(b"MESSAGE\na:\\c\n\n\x00") == [Frame("MESSAGE", [("a", "\\c")])]
    parser.version = "1.2"
    assert parser.feed(b"MESSAGE\na:\\c\n\n\x00") == [Frame("MESSAGE", [("a", ":")])]
    with pytest.raises(ValueError):
        parser.version = "2.0"


def test_large_body_in_chunks_is_copied_once_and_exact() -> None:
    body = bytes(range(256)) * 4096
    data = serialize(Frame("SEND", [("destination", "/q")], body))
    parser = FrameParser()
    events: list[Event] = []
    for i in range(0, len(data), 65536):
        events += parser.feed(data[i : i + 65536])
        assert parser.buffered <= len(data)
    assert frames(events)[0].body == body


# ---------------------------------------------------------------- serialize


def test_serialize_writes_content_length_for_bodies() -> None:
    assert serialize(Frame("SEND", [("destination", "/q")], b"a\x00b")) == (
        b"SEND\ndestination:/q\ncontent-length:3\n\na\x00b\x00"
    )
    assert serialize(Frame("DISCONNECT")) == b"DISCONNECT\n\n\x00"


def test_serialize_never_writes_content_length_twice() -> None:
    frame = Frame("SEND", [("content-length", "2"), ("content-length", "9")], b"ab")
    assert serialize(frame) == b"SEND\ncontent-length:2\n\nab\x00"
    with pytest.raises(LocalProtocolError, match="content-length"):
        serialize(Frame("SEND", [("content-length", "5")], b"ab"))


def test_serialize_escapes_per_version() -> None:
    frame = Frame("MESSAGE", [("a:b", "c\\d\ne")])
    assert serialize(frame, "1.2") == b"MESSAGE\na\\cb:c\\\\d\\ne\n\n\x00"
    assert serialize(frame, "1.1") == b"MESSAGE\na\\cb:c\\\\d\\ne\n\n\x00"
    assert serialize(Frame("MESSAGE", [("a", "\r")]), "1.2") == b"MESSAGE\na:\\r\n\n\x00"
    with pytest.raises(LocalProtocolError, match="CR"):
        serialize(Frame("MESSAGE", [("a", "\r")]), "1.1")
    with pytest.raises(LocalProtocolError):
        serialize(frame, "1.0")
    assert serialize(Frame("MESSAGE", [("a", "b:c\\")]), "1.0") == b"MESSAGE\na:b:c\\\n\n\x00"


def test_serialize_connect_is_never_escaped() -> None:
    frame = Frame("CONNECT", [("passcode", "p:a\\ss")])
    assert serialize(frame, "1.2") == b"CONNECT\npasscode:p:a\\ss\n\n\x00"
    with pytest.raises(LocalProtocolError):
        serialize(Frame("CONNECT", [("passcode", "new\nline")]), "1.2")


def test_serialize_rejects_bad_commands() -> None:
    for command in ["", "SEND\n", "SE ND", "X" * 100]:
        with pytest.raises(LocalProtocolError):
            serialize(Frame(command))


# ---------------------------------------------------------------- Frame and Headers values


def test_frame_is_immutable_and_comparable() -> None:
    frame = Frame("SEND", {"destination": "/q"}, b"x")
    assert frame == Frame("SEND", [("destination", "/q")], b"x")
    assert hash(frame) == hash(Frame("SEND", [("destination", "/q")], b"x"))
    with pytest.raises(AttributeError):
        frame.body = b"y"
    assert frame.replace(body=b"y").body == b"y"
    assert frame.headers == {"destination": "/q"}
    with pytest.raises(TypeError):
        Frame("SEND", [("a", 1)])  # type: ignore[list-item]


def test_parsed_frames_are_plain_immutable_frames() -> None:
    # The parser builds frames as a mutable twin class and then sets __class__ = Frame.
    assert _FrameBuilder.__slots__ == Frame.__slots__
    data = b"SEND\ncontent-length:1\n\nx\x00ACK\nid:1\n\n\x00"
    for frame in [*feed_whole(data), *feed_bytewise(data)]:
        assert type(frame) is Frame
        with pytest.raises(AttributeError):
            frame.body = b"y"
        with pytest.raises(AttributeError):
            del frame.command
    assert parse_all_ways(data) == [
        Frame("SEND", {"content-length": "1"}, b"x"),
        Frame("ACK", {"id": "1"}),
    ]


def test_lazy_headers_match_eager_ones() -> None:
    (parsed,) = FrameParser().feed(b"SEND\ndestination:/q\nx:1\nx:2\ne:\n\n\x00")
    assert isinstance(parsed, Frame)
    assert parsed.headers.get("x") == "1"
    assert parsed.headers.get("e") == ""
    assert parsed.headers.get("missing") is None
    assert "destination" in parsed.headers
    assert "destinatio" not in parsed.headers
    assert parsed == Frame("SEND", [("destination", "/q"), ("x", "1"), ("x", "2"), ("e", "")])


# ---------------------------------------------------------------- round trip

header_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=20).filter(
    lambda s: s != "content-length"
)
command_names = st.from_regex(r"\A[A-Za-z][A-Za-z0-9_-]{0,20}\Z")
frames_strategy = st.builds(
    Frame,
    command=command_names.filter(lambda c: c not in {"CONNECT", "STOMP", "CONNECTED"}),
    headers=st.lists(st.tuples(header_text, header_text), max_size=6),
    body=st.binary(max_size=300),
)


def without_content_length(frame: Frame) -> Frame:
    return frame.replace(headers=[(n, v) for n, v in frame.headers.raw if n != "content-length"])


@settings(max_examples=300, deadline=None)
@given(
    frame_list=st.lists(frames_strategy, min_size=1, max_size=4),
    splits=st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
    heartbeats=st.booleans(),
)
def test_round_trip_in_random_splits(
    frame_list: list[Frame], splits: list[int], heartbeats: bool
) -> None:
    wire = b"".join(serialize(f, "1.2") + (b"\r\n" if heartbeats else b"") for f in frame_list)
    cuts = sorted({min(s, len(wire)) for s in splits})
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True) if a < b]
    parser = FrameParser("1.2")
    events: list[Event] = []
    for piece in pieces:
        events += parser.feed(piece)
    parser.feed(b"")
    assert [without_content_length(f) for f in frames(events)] == frame_list
    assert len(events) - len(frame_list) == (len(frame_list) if heartbeats else 0)


@settings(max_examples=150, deadline=None)
@given(frame=frames_strategy)
def test_round_trip_in_1_1(frame: Frame) -> None:
    if any("\r" in n or "\r" in v for n, v in frame.headers.raw):
        with pytest.raises(LocalProtocolError):
            serialize(frame, "1.1")
        return
    (parsed,) = feed_bytewise(serialize(frame, "1.1"), "1.1")
    assert isinstance(parsed, Frame)
    assert without_content_length(parsed) == frame


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_parser(data: bytes) -> None:
    parser = FrameParser(max_body_size=100, max_line_length=50, max_headers=5)
    try:
        for event in parser.feed(data):
            if isinstance(event, Frame):
                event.headers.raw  # noqa: B018
    except ProtocolError:
        pass


def test_lazy_lookup_never_matches_across_name_and_value() -> None:
    (parsed,) = FrameParser("1.0").feed(b"SEND\na:b:c\nx\n:y\n\n\x00")
    assert isinstance(parsed, Frame)
    assert parsed.headers.get("a") == "b:c"
    assert parsed.headers.get("a:b") is None
    assert parsed.headers.get("x\n") is None


def test_crlf_head_followed_by_a_body_holding_blank_lines() -> None:
    data = b"SEND\r\na:b\r\n\r\nbody\n\nmore\r\n\r\n\x00"
    (frame,) = parse_all_ways(data)
    assert isinstance(frame, Frame)
    assert frame.headers.raw == (("a", "b"),)
    assert frame.body == b"body\n\nmore\r\n\r\n"


def test_frames_with_the_same_head_share_one_decode_and_stay_correct() -> None:
    from trio_stomp import _frames

    head = b"SEND\ndestination:/queue/shared-decode\nx:1\nx:2\ncontent-length:1\n\n"
    first, second = FrameParser().feed(head + b"a\0" + head + b"b\0")
    assert isinstance(first, Frame) and isinstance(second, Frame)
    assert first.headers["x"] == "1"  # decoded: first value wins
    assert second.headers.raw == (
        ("destination", "/queue/shared-decode"),
        ("x", "1"),
        ("x", "2"),
        ("content-length", "1"),
    )
    assert second.headers.first is first.headers.first  # shared, not decoded again
    assert (first.body, second.body) == (b"a", b"b")
    # A bad head is never remembered: it fails for every frame that has it.
    for _ in range(2):
        (bad,) = FrameParser().feed(b"SEND\ndestination:/queue/q\nno-colon\n\n\0")
        assert isinstance(bad, Frame)
        with pytest.raises(RemoteProtocolError, match="without a colon"):
            bad.headers.raw  # noqa: B018 - decoding is what raises
    # Bounded, however many distinct heads arrive.
    for n in range(_frames._DECODED_MAX_ENTRIES * 3):
        (frame,) = FrameParser().feed(b"BEGIN\ntransaction:%d\n\n\0" % n)
        assert isinstance(frame, Frame) and frame.headers.first == {"transaction": str(n)}
    assert len(_frames._DECODED) <= _frames._DECODED_MAX_ENTRIES


# ---------------------------------------------------------------- repeated heads
# The parser remembers the last head it took the fast path for and reuses what it derived
# from it when the next head is byte-identical: the results must not tell the difference.


def _send(destination: bytes, body: bytes, eol: bytes = b"\n") -> bytes:
    return (
        b"SEND" + eol + b"destination:" + destination + eol
        + b"content-length:%d" % len(body) + eol + eol + body + b"\x00"
    )  # fmt: skip


def _fresh(data: bytes, version: str = "1.2") -> list[Event]:
    """Parse each frame of ``data`` with a parser of its own: nothing to remember."""
    events: list[Event] = []
    while data:
        parser = FrameParser(version)
        events += parser.feed(data.split(b"\x00", 1)[0] + b"\x00")
        data = data.split(b"\x00", 1)[1]
    return events


def test_repeated_heads_parse_like_fresh_ones() -> None:
    data = b"".join(
        [
            _send(b"/queue/a", b"x" * 10),
            _send(b"/queue/a", b"y" * 10),
            _send(b"/queue/a", b"z" * 10),
            _send(b"/queue/a", b"longer body"),  # same destination, new content-length
            _send(b"/queue/b", b"longer body"),  # same content-length, new destination
            _send(b"/queue/a", b"x" * 10),  # back to the first head
            _send(b"/queue/a", b"x" * 10, eol=b"\r\n"),  # the same head with CRLFs
            _send(b"/queue/a", b"x" * 10, eol=b"\r\n"),
            b"SEND\ndestination:/queue/a\n\nno length\x00",  # no content-length: up to NUL
            b"SEND\ndestination:/queue/a\n\nno length either\x00",
            _send(b"/queue/a", b"x" * 10),
        ]
    )
    expected = _fresh(data)
    assert len(expected) == 11
    assert parse_all_ways(data) == expected
    for size in (7, 50, 64):  # repeats split across feeds at different places
        parser = FrameParser()
        events: list[Event] = []
        for i in range(0, len(data), size):
            events += parser.feed(data[i : i + size])
        assert events == expected
    for got, want in zip(frames(parse_all_ways(data)), frames(expected), strict=True):
        assert got.headers.raw == want.headers.raw
        assert got.body == want.body
    first, second = frames(feed_whole(data))[:2]
    assert first.headers is not second.headers  # each frame has its own Headers


def test_repeated_heads_come_decoded_once_one_was() -> None:
    frame = _send(b"/queue/decoded-once", b"x")
    parser = FrameParser()
    first, second = frames(parser.feed(frame + frame))
    assert second.headers._first is None  # nothing decoded yet when the chunk was parsed
    decoded = first.headers.first
    (third,) = frames(parser.feed(frame))
    assert third.headers._first is decoded  # shared with its twin, not decoded again
    assert third.headers.raw is first.headers.raw
    assert third == first
    # A head that does not decode is never shared: each frame raises on its own.
    bad = b"SEND\ndestination:/queue/q\nno colon\n\n\x00"
    parser = FrameParser()
    for _ in range(3):
        (frame_,) = frames(parser.feed(bad))
        with pytest.raises(RemoteProtocolError, match="without a colon"):
            frame_.headers.first  # noqa: B018


def test_repeated_head_still_needs_its_nul() -> None:
    good = _send(b"/queue/a", b"x" * 10)
    fails_all_ways(good + good[:-1] + b"!", "not followed by a NUL")


def test_repeated_head_still_meets_the_body_limit() -> None:
    frame = _send(b"/queue/a", b"x" * 100)
    parser = FrameParser()
    assert len(parser.feed(frame)) == 1
    parser.max_body_size = 50
    with pytest.raises(RemoteProtocolError, match="content-length 100 exceeds the maximum body"):
        parser.feed(frame)


def test_repeated_head_follows_a_version_change() -> None:
    frame = b"MESSAGE\na:x\\cy\n\n\x00"
    parser = FrameParser("1.0")
    (before,) = frames(parser.feed(frame))
    parser.version = "1.2"
    (after,) = frames(parser.feed(frame))
    assert before.headers["a"] == "x\\cy"
    assert after.headers["a"] == "x:y"
    plain = b"SEND\ndestination:/queue/a\n\n\x00"
    parser = FrameParser("1.0")
    assert frames(parser.feed(plain)) == frames(_fresh(plain, "1.0"))
    parser.version = "1.2"
    assert frames(parser.feed(plain)) == frames(_fresh(plain))


# ---------------------------------------------------------------- ACK / NACK heads
# A 1.2 "ACK\nid:N" (or NACK) frame is matched whole and its header decoded at once; every
# other head goes the general way. The general path is the reference: the same input with
# the ACK match switched off must give the same events, headers and errors.


def _describe(event: Event) -> object:
    if isinstance(event, Heartbeat):
        return "heart-beat"
    headers = event.headers
    try:
        decoded: object = (
            headers.raw,
            dict(headers.first),
            list(headers),
            len(headers),
            headers.get("id"),
            headers.get("receipt"),
            "id" in headers,
            headers.get("x:y"),
        )
    except RemoteProtocolError as exc:
        decoded = ("bad headers", str(exc))
    return (event.command, type(event.command), decoded, event.body, repr(event))


def _outcome(pieces: Sequence[bytes], version: str, general: bool, **limits: int) -> object:
    parser = FrameParser(version, **limits)
    described: list[object] = []
    with contextlib.ExitStack() as stack:
        if general:
            for name in ("_ACK_FRAME", "_NACK_FRAME"):
                stack.enter_context(mock.patch.object(_codec, name, lambda buffer, pos: None))
        try:
            for piece in pieces:
                if piece:  # feed(b"") is the end of the stream
                    described += map(_describe, parser.feed(piece))
            parser.feed(b"")
        except RemoteProtocolError as exc:
            return described, str(exc)
    return described, None


def _same_as_general(data: bytes, version: str = "1.2", **limits: int) -> object:
    """Parse ``data`` whole, byte by byte and in two halves, with and without the ACK
    match; check each way agrees with its reference and return the outcome (whole)."""
    for pieces in ([data], [data[i : i + 1] for i in range(len(data))], _halves(data)):
        fast = _outcome(pieces, version, False, **limits)
        assert fast == _outcome(pieces, version, True, **limits), pieces
    return _outcome([data], version, False, **limits)


def _halves(data: bytes) -> list[bytes]:
    return [data[: len(data) // 2], data[len(data) // 2 :]]


ACK_VECTORS = [
    b"ACK\nid:17\n\n\x00",
    b"NACK\nid:17\n\n\x00",
    b"ACK\nid:\n\n\x00",
    b"ACK\nid:a:b\n\n\x00",
    b"ACK\nid: spaced [x]~ \n\n\x00",
    b"ACK\nid:a\\cb\n\n\x00",  # an escape: decoded by version
    b"ACK\nid:a\\tb\n\n\x00",  # an undefined escape: an error in 1.1 and 1.2
    b"ACK\nid:a\\rb\n\n\x00",  # \r: defined in 1.2 only
    b"ACK\r\nid:1\r\n\r\n\x00",
    b"ACK\nid:1\r\n\r\n\x00",
    b"ACK\nid:1\r\n\n\x00",
    b"ACK\nid:\xc3\xa9t\xc3\xa9\n\n\x00",  # UTF-8
    b"ACK\nid:\xff\n\n\x00",  # not UTF-8
    b"ACK\nid:a\tb\n\n\x00",
    b"ACK\nid:a\x00b\n\n\x00",
    b"ACK\nid:1\nreceipt:r-1\n\n\x00",
    b"ACK\nid:1\ntransaction:tx\n\n\x00",
    b"ACK\nid:1\nid:2\n\n\x00",
    b"ACK\nsubscription:0\nmessage-id:m-1\n\n\x00",  # 1.1
    b"ACK\nmessage-id:m-1\n\n\x00",  # 1.0
    b"ACK\nid:1\ncontent-length:0\n\n\x00",
    b"ACK\nid:1\ncontent-length:3\n\nabc\x00",
    b"ACK\nid:1\n\nbody\x00",
    b"ACK\nid:1\nno colon\n\n\x00",
    b"ACK\nID:1\n\n\x00",
    b"ACKS\nid:1\n\n\x00",
    b"NAC\nid:1\n\n\x00",
    b"ACK\nid:1\n\n",  # cut short
    b"ACK\nid:1\n\n\x00\nACK\nid:2\n\n\x00\r\n\r\nNACK\nid:3\n\n\x00\n",
    b"SEND\ndestination:/q\n\nx\x00ACK\nid:1\n\n\x00SEND\ndestination:/q\n\ny\x00",
]


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
@pytest.mark.parametrize("data", ACK_VECTORS)
def test_ack_heads_parse_as_the_general_path_does(data: bytes, version: str) -> None:
    _same_as_general(data, version)


def test_ack_frames_of_the_common_shape() -> None:
    ack, nack = FrameParser().feed(b"ACK\nid:17\n\n\x00NACK\nid:a:b\n\n\x00")
    assert ack == Frame("ACK", [("id", "17")])
    assert nack == Frame("NACK", [("id", "a:b")])
    assert isinstance(ack, Frame) and ack.headers.first == {"id": "17"}


@pytest.mark.parametrize(
    "limits",
    [
        {"max_line_length": 5},  # "id:123456" is too long
        {"max_line_length": 9},  # exactly fits
        {"max_headers": 0},
        {"max_headers": 1},
        {"max_headers": 4},  # the head is past the size below which limits are skipped
        {"max_body_size": 0},
        {"max_frame_size": 4},
    ],
)
def test_ack_heads_meet_the_same_limits(limits: dict[str, int]) -> None:
    for data in (b"ACK\nid:123456\n\n\x00", b"NACK\nid:1234567\n\n\x00", b"ACK\nid:1\n\n\x00"):
        _same_as_general(data, "1.2", **limits)


def test_ack_frames_leave_the_repeated_head_and_the_decode_cache_alone() -> None:
    from trio_stomp import _frames

    send = _send(b"/queue/ack-test", b"x")
    parser = FrameParser()
    parser.feed(send)
    last_head = parser._last_head
    cached = len(_frames._DECODED)
    for n in range(_frames._DECODED_MAX_ENTRIES + 1):
        (ack,) = parser.feed(b"ACK\nid:%d\n\n\x00" % n)
        assert isinstance(ack, Frame) and ack.headers.first == {"id": str(n)}
    assert parser._last_head is last_head
    assert len(_frames._DECODED) == cached


ack_values = st.text(
    alphabet=st.sampled_from(["1", "a", " ", ":", "\\", "\r", "\n", "\t", "\x00", "é", "~"]),
    max_size=8,
)
ack_heads = st.tuples(
    st.sampled_from(["ACK", "NACK", "ACKX", "SEND"]),
    st.lists(
        st.tuples(
            st.sampled_from(["id", "receipt", "transaction", "message-id", "content-length"]),
            ack_values,
        ),
        min_size=0,
        max_size=3,
    ),
    st.sampled_from(["\n", "\r\n"]),
    st.sampled_from([b"", b"\x00", b"body\x00", b"\n", b"\xff\x00"]),
)


@settings(max_examples=300, deadline=None)
@given(
    heads=st.lists(ack_heads, min_size=1, max_size=4),
    version=st.sampled_from(["1.0", "1.1", "1.2"]),
    max_line_length=st.sampled_from([6, 12, 16 * 1024]),
    max_headers=st.sampled_from([0, 2, 128]),
    cut=st.integers(min_value=0, max_value=200),
)
def test_ack_heads_fuzzed_against_the_general_path(
    heads: list[tuple[str, list[tuple[str, str]], str, bytes]],
    version: str,
    max_line_length: int,
    max_headers: int,
    cut: int,
) -> None:
    data = b"".join(
        (eol.join([command, *(f"{name}:{value}" for name, value in pairs)]) + eol + eol).encode()
        + tail
        for command, pairs, eol, tail in heads
    )
    limits = {"max_line_length": max_line_length, "max_headers": max_headers}
    for pieces in ([data], [data[:cut], data[cut:]]):
        assert _outcome(pieces, version, False, **limits) == _outcome(
            pieces, version, True, **limits
        )
