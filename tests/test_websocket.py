"""The WebSocket adapter (trio_stomp/_websocket.py) on its own: message splitting, both
handshakes, inbound reassembly, pings, closes, and a Peer running over it.

The other end is a raw wsproto connection driven by the test, over memory streams, so each
test sees exactly which WebSocket messages went over the wire.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from trio_stomp import Frame, FrameParser, open_peer, serialize
from trio_stomp._websocket import (
    MESSAGE_GROUP_SIZE,
    WebSocketListener,
    WebSocketStream,
    split_messages,
    wrap_client_stream,
    wrap_server_stream,
)

# ------------------------------------------------------------------ split_messages


def _frame(body: bytes, command: str = "MESSAGE") -> bytes:
    return serialize(Frame(command, {"destination": "/queue/a"}, body))


def test_split_text_frame_is_one_text_message() -> None:
    data = _frame(b"hello, w\xc3\xb6rld")
    assert split_messages(data) == [(data, True)]


def test_split_heart_beat_only() -> None:
    assert split_messages(b"\n") == [(b"\n", True)]


def test_split_nul_in_body_makes_binary() -> None:
    data = _frame(b"a\x00b")
    assert split_messages(data) == [(data, False)]


def test_split_invalid_utf8_makes_binary() -> None:
    data = _frame(b"\xff\xfe")
    assert split_messages(data) == [(data, False)]


def test_split_frame_without_content_length() -> None:
    data = b"SEND\ndestination:/q\n\nhi\x00\n"
    assert split_messages(data) == [(data, True)]


def test_split_groups_frames_and_keeps_them_whole() -> None:
    big = b"x" * (MESSAGE_GROUP_SIZE // 3)
    frames = [_frame(big) for _ in range(7)]
    data = b"\n".join(frames) + b"\n"
    messages = split_messages(data)
    assert b"".join(m for m, _ in messages) == data
    assert len(messages) == 3  # 3 + 3 + 1 frames
    for payload, is_text in messages:
        assert is_text
        # every message is whole frames: it parses to complete frames with nothing left
        parser = FrameParser()
        assert parser.feed(payload)
        parser.feed(b"")  # EOF: raises if a frame was cut


def test_split_one_large_frame_goes_alone() -> None:
    huge = _frame(b"y" * (MESSAGE_GROUP_SIZE + 10))
    small = _frame(b"z")
    messages = split_messages(small + huge + small)
    assert [len(m) for m, _ in messages] == [len(small) + len(huge), len(small)]


def test_split_binary_frame_among_text_frames() -> None:
    data = _frame(b"text") + _frame(b"\x00\x01") + _frame(b"more")
    assert split_messages(data) == [(data, False)]


@pytest.mark.parametrize(
    "data",
    [
        b"SEND\ndestination:/q\n\nno terminator",
        b"SEND\ndestination:/q\ncontent-length:10\n\nshort\x00",
        b"SEND\ndestination:/q\ncontent-length:2\n\nabc\x00",
        b"SEND\nbad\x00header\n\nx\x00",
        b"SEND\ndestination:/q",
    ],
)
def test_split_unsplittable_bytes_go_as_one_binary_message(data: bytes) -> None:
    assert split_messages(data) == [(data, False)]


def test_split_keeps_whole_messages_before_an_unsplittable_tail() -> None:
    big = _frame(b"x" * MESSAGE_GROUP_SIZE)
    tail = b"SEND\n\nno end"
    assert split_messages(big + tail) == [(big, True), (tail, False)]


# ------------------------------------------------------------------ a raw wsproto peer


class RawWebSocket:
    """The test's end: a wsproto connection over a memory stream."""

    def __init__(self, stream: trio.abc.Stream, role: ConnectionType) -> None:
        self.stream = stream
        self.ws = WSConnection(role)
        self.events: list[Event] = []

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next_event(self) -> Event:
        while not self.events:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(bytes(data) or None)
            self.events.extend(self.ws.events())
        return self.events.pop(0)

    async def messages_until(self, size: int) -> list[TextMessage | BytesMessage]:
        """Messages received until their payloads add up to ``size`` bytes."""
        got: list[TextMessage | BytesMessage] = []
        total = 0
        while total < size:
            event = await self.next_event()
            if isinstance(event, (TextMessage, BytesMessage)):
                got.append(event)
                payload = event.data
                total += len(payload.encode() if isinstance(payload, str) else payload)
        return got


async def _server_pair(
    path: str | None = "/ws",
) -> tuple[WebSocketStream, RawWebSocket]:
    server_end, client_end = trio.testing.memory_stream_pair()
    return wrap_server_stream(server_end, path=path), RawWebSocket(
        client_end, ConnectionType.CLIENT
    )


async def _connected_server(
    subprotocols: list[str] | None = None,
) -> tuple[WebSocketStream, RawWebSocket]:
    stream, raw = await _server_pair()
    await raw.send(
        Request(host="localhost", target="/ws", subprotocols=subprotocols or ["v12.stomp"])
    )
    await stream.handshake()
    event = await raw.next_event()
    assert isinstance(event, AcceptConnection)
    return stream, raw


# ------------------------------------------------------------------ server handshake


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (["v10.stomp", "v11.stomp", "v12.stomp"], "v12.stomp"),
        (["v10.stomp", "v11.stomp"], "v11.stomp"),
        (["mqtt", "v10.stomp"], "v10.stomp"),
        ([], None),
    ],
)
async def test_server_chooses_the_best_subprotocol(offered: list[str], chosen: str | None) -> None:
    stream, raw = await _server_pair()
    await raw.send(Request(host="localhost", target="/ws?x=1", subprotocols=offered))
    await stream.handshake()
    event = await raw.next_event()
    assert isinstance(event, AcceptConnection)
    assert event.subprotocol == chosen
    assert stream.subprotocol == chosen
    assert stream.resource == "/ws"


async def _refused(raw: RawWebSocket) -> tuple[int, bytes]:
    event = await raw.next_event()
    assert isinstance(event, RejectConnection)
    body = b""
    while True:
        data = await raw.next_event()
        assert isinstance(data, RejectData)
        body += data.data
        if data.body_finished:
            return event.status_code, body


async def test_server_refuses_wrong_path_with_404() -> None:
    stream, raw = await _server_pair()
    await raw.send(Request(host="localhost", target="/other", subprotocols=["v12.stomp"]))
    with pytest.raises(trio.BrokenResourceError, match="404"):
        await stream.receive_some()
    status, body = await _refused(raw)
    assert status == 404
    assert b"/other" in body
    # later calls fail the same way, without touching the transport
    with pytest.raises(trio.BrokenResourceError, match="404"):
        await stream.send_all(b"x")


async def test_server_refuses_foreign_subprotocols_with_400() -> None:
    stream, raw = await _server_pair()
    await raw.send(Request(host="localhost", target="/ws", subprotocols=["mqtt"]))
    with pytest.raises(trio.BrokenResourceError, match="400"):
        await stream.handshake()
    status, _ = await _refused(raw)
    assert status == 400


async def test_server_refuses_garbage_with_400() -> None:
    stream, raw = await _server_pair()
    await raw.stream.send_all(b"CONNECT\naccept-version:1.2\n\n\x00")
    with pytest.raises(trio.BrokenResourceError, match="400"):
        await stream.receive_some()
    assert b"400" in await raw.stream.receive_some()


async def test_server_handshake_eof() -> None:
    stream, raw = await _server_pair()
    await raw.stream.send_all(b"GET /ws HTTP/1.1\r\n")
    await raw.stream.aclose()
    with pytest.raises(trio.BrokenResourceError, match="closed during"):
        await stream.receive_some()


async def test_any_path_when_path_is_none() -> None:
    stream, raw = await _server_pair(path=None)
    await raw.send(Request(host="localhost", target="/anything", subprotocols=[]))
    await stream.handshake()
    assert isinstance(await raw.next_event(), AcceptConnection)
    assert stream.resource == "/anything"


async def test_send_all_before_the_handshake_fails_at_once() -> None:
    stream, raw = await _server_pair()
    with pytest.raises(trio.BrokenResourceError, match="not complete"):
        await stream.send_all(b"ERROR\n\n\x00")
    await stream.wait_send_all_might_not_block()  # does not wait for the client either
    await raw.send(Request(host="localhost", target="/ws", subprotocols=["v12.stomp"]))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.receive_some)
        event = await raw.next_event()
        assert isinstance(event, AcceptConnection)  # nothing was written before the 101
        await stream.send_all(b"\n")
        assert isinstance(await raw.next_event(), TextMessage)
        await raw.send(TextMessage(data="x"))


# ------------------------------------------------------------------ data both ways


async def test_inbound_text_binary_fragments_and_frames_form_one_byte_stream() -> None:
    stream, raw = await _connected_server()
    frame_a = _frame(b"first")
    frame_b = _frame(b"\x00binary\xff")
    wire = frame_a + frame_b + b"\n" + frame_a
    # two frames in one text message... no: frame_b is not UTF-8, so send it as bytes;
    # frame_a + half of frame_b, the rest, then EOL + frame_a split over two fragments.
    cut = len(frame_a) + 5
    await raw.send(BytesMessage(data=wire[:cut]))
    await raw.send(BytesMessage(data=wire[cut : len(frame_a) + len(frame_b)]))
    tail = (b"\n" + frame_a).decode()
    await raw.send(TextMessage(data=tail[:4], message_finished=False))
    await raw.send(TextMessage(data=tail[4:], message_finished=True))
    got = b""
    while len(got) < len(wire):
        got += await stream.receive_some(7)
    assert got == wire


async def test_outbound_text_and_binary_messages() -> None:
    stream, raw = await _connected_server()
    text = _frame(b"plain")
    binary = _frame(b"\x00\x01\x02")
    await stream.send_all(text)
    await stream.send_all(binary)
    await stream.send_all(b"\n")
    messages = await raw.messages_until(len(text) + len(binary) + 1)
    assert [type(m) for m in messages] == [TextMessage, BytesMessage, TextMessage]
    assert messages[0].data == text.decode()
    assert messages[1].data == binary
    assert messages[2].data == "\n"


async def test_ping_is_answered_and_pong_ignored() -> None:
    stream, raw = await _connected_server()
    await raw.send(Ping(payload=b"are you there"))
    await raw.send(Pong(payload=b"unsolicited"))
    await raw.send(TextMessage(data="\n"))
    assert await stream.receive_some() == b"\n"
    event = await raw.next_event()
    assert isinstance(event, Pong)
    assert event.payload == b"are you there"


async def test_remote_close_is_eof_and_is_answered() -> None:
    stream, raw = await _connected_server()
    await raw.send(TextMessage(data="last\n"))
    await raw.send(CloseConnection(code=1000, reason="bye"))
    assert await stream.receive_some() == b"last\n"
    assert await stream.receive_some() == b""
    assert await stream.receive_some() == b""
    event = await raw.next_event()
    assert isinstance(event, CloseConnection)
    assert event.code == 1000
    assert raw.ws.state is ConnectionState.CLOSED
    with pytest.raises(trio.BrokenResourceError):
        await stream.send_all(b"\n")


async def test_socket_eof_without_close_is_eof() -> None:
    stream, raw = await _connected_server()
    await raw.stream.aclose()
    assert await stream.receive_some() == b""


async def test_protocol_violation_breaks_the_stream() -> None:
    stream, raw = await _connected_server()
    # an unmasked frame from a client is a protocol error (RFC 6455 section 5.1)
    await raw.stream.send_all(b"\x81\x02hi")
    with pytest.raises(trio.BrokenResourceError, match="protocol error"):
        await stream.receive_some()
    event = await raw.next_event()
    assert isinstance(event, CloseConnection)
    assert event.code == 1002


async def test_aclose_sends_a_normal_close() -> None:
    stream, raw = await _connected_server()
    await stream.aclose()
    await stream.aclose()  # idempotent
    event = await raw.next_event()
    assert isinstance(event, CloseConnection)
    assert event.code == 1000
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"\n")
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()


async def test_concurrent_use_is_detected() -> None:
    stream, raw = await _connected_server()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.receive_some)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await stream.receive_some()
        await raw.send(TextMessage(data="\n"))


# ------------------------------------------------------------------ client handshake


async def _serve_raw(raw: RawWebSocket, answer: Event | list[Event]) -> Request:
    request = await raw.next_event()
    assert isinstance(request, Request)
    for event in answer if isinstance(answer, list) else [answer]:
        await raw.send(event)
    return request


async def test_client_handshake_and_round_trip() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    raw = RawWebSocket(server_end, ConnectionType.SERVER)
    async with trio.open_nursery() as nursery:
        requests: list[Request] = []

        async def serve() -> None:
            requests.append(await _serve_raw(raw, AcceptConnection(subprotocol="v11.stomp")))

        nursery.start_soon(serve)
        stream = await wrap_client_stream(client_end, host="h:1", resource="/stomp?a=b")
    assert requests[0].target == "/stomp?a=b"
    assert requests[0].host == "h:1"
    assert requests[0].subprotocols == ["v12.stomp", "v11.stomp", "v10.stomp"]
    assert stream.subprotocol == "v11.stomp"
    frame = _frame(b"\x00\xff")
    await stream.send_all(frame)
    (message,) = await raw.messages_until(len(frame))
    assert isinstance(message, BytesMessage)  # masked by the client, unmasked by wsproto
    assert message.data == frame
    await raw.send(TextMessage(data="pong\n"))
    assert await stream.receive_some() == b"pong\n"


async def test_client_sees_refusal_with_status_and_body() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    raw = RawWebSocket(server_end, ConnectionType.SERVER)
    refusal: list[Event] = [
        RejectConnection(status_code=403, headers=[(b"content-length", b"7")], has_body=True),
        RejectData(data=b"go ", body_finished=False),
        RejectData(data=b"away", body_finished=True),
    ]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_raw, raw, refusal)
        with pytest.raises(ConnectionRefusedError, match="403: go away"):
            await wrap_client_stream(client_end, host="h")


async def test_client_sees_garbage_as_broken() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def answer() -> None:
            await server_end.receive_some()
            await server_end.send_all(b"STOMP is not HTTP\r\n\r\n")

        nursery.start_soon(answer)
        with pytest.raises(trio.BrokenResourceError, match="bad WebSocket handshake"):
            await wrap_client_stream(client_end, host="h")


# ------------------------------------------------------------------ both sides of ours


async def _pair() -> tuple[WebSocketStream, WebSocketStream]:
    client_end, server_end = trio.testing.memory_stream_pair()
    server = wrap_server_stream(server_end, path="/")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handshake)
        client = await wrap_client_stream(client_end, host="localhost")
    return client, server


async def test_peers_over_websocket_exchange_binary_bodies() -> None:
    client_stream, server_stream = await _pair()
    body = bytes(range(256)) * 3
    async with open_peer(client_stream) as client, open_peer(server_stream) as server:
        await client.send(Frame("SEND", {"destination": "/queue/a"}, body))
        await client.send(Frame("SEND", {"destination": "/queue/a"}, "text ✓".encode()))
        first = await server.receive()
        second = await server.receive()
        assert first.body == body
        assert second.body == "text ✓".encode()
        await server.send(Frame("MESSAGE", {"destination": "/queue/a"}, b"\x00" * 10))
        assert (await client.receive()).body == b"\x00" * 10


async def test_listener_accepts_without_handshaking() -> None:
    (tcp,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = WebSocketListener(tcp, path="/ws")
    port = tcp.socket.getsockname()[1]
    silent = await trio.open_tcp_stream("127.0.0.1", port)
    first = await listener.accept()  # returns although this client never sent a request
    transport = await trio.open_tcp_stream("127.0.0.1", port)
    second = await listener.accept()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(second.handshake)
        client = await wrap_client_stream(transport, host=f"127.0.0.1:{port}", resource="/ws")
    assert client.subprotocol == second.subprotocol == "v12.stomp"
    await client.send_all(b"\n")
    assert await second.receive_some() == b"\n"
    for stream in (first, second, client, silent):
        await stream.aclose()
    await listener.aclose()


# ------------------------------------------------------------------ split_messages, any input

_bodies = st.binary(max_size=300) | st.text(max_size=100).map(str.encode)


@given(
    bodies=st.lists(_bodies, min_size=1, max_size=12),
    eols=st.lists(st.sampled_from([b"", b"\n", b"\r\n", b"\n\n"]), min_size=12, max_size=12),
    group_size=st.integers(1, 2000),
)
@settings(max_examples=300, deadline=None)
def test_split_messages_keeps_frames_whole_and_labels_text_exactly(
    bodies: list[bytes], eols: list[bytes], group_size: int
) -> None:
    frames = [
        serialize(Frame("MESSAGE", {"destination": "/q", "n": str(i)}, b))
        for i, b in enumerate(bodies)
    ]
    data = b"".join(frame + eol for frame, eol in zip(frames, eols[: len(frames)], strict=True))
    messages = split_messages(data, group_size)
    assert b"".join(payload for payload, _ in messages) == data
    seen: list[bytes] = []
    for payload, is_text in messages:
        parser = FrameParser()
        parsed = [event for event in parser.feed(payload) if isinstance(event, Frame)]
        parser.feed(b"")  # nothing left half-way: every message holds whole frames
        seen.extend(bytes(frame.body) for frame in parsed)
        expected_text = all(b"\x00" not in frame.body for frame in parsed)
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            expected_text = False
        assert is_text == expected_text
    assert seen == bodies
