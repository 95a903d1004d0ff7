"""The broker's ``ws://`` listener and the client's ``ws://`` URLs, over real loopback sockets.

The same session code serves TCP and WebSocket, so these tests only check what the WebSocket
layer adds or could break: subprotocols, message splits, binary bodies, heart-beats as
WebSocket messages, a WebSocket close ending the session (with redelivery), the handshake
under the CONNECT timeout, and the CLI's ``listening on ws://...`` line.
"""

from __future__ import annotations

import functools
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing
from _rabbitmq import RabbitMQ
from _requirements import require_module
from test_broker import RawClient
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, Event, Request, TextMessage

import trio_stomp
from trio_stomp import Frame, serialize
from trio_stomp._websocket import WebSocketStream, open_websocket_stream
from trio_stomp.broker import Broker, open_broker

PATH = "/stomp"


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    async with open_broker(
        listen=["tcp://127.0.0.1:0", f"ws://127.0.0.1:0{PATH}"],
        connect_timeout=2.0,
        shutdown_grace=1.0,
        heart_beat=(0, 0),
    ) as broker:
        yield broker


def ws_url(broker: Broker) -> str:
    (url,) = [a for a in broker.addresses if a.startswith("ws://")]
    return url


def tcp_address(broker: Broker) -> tuple[str, int]:
    (url,) = [a for a in broker.addresses if a.startswith("tcp://")]
    host, _, port = url.removeprefix("tcp://").rpartition(":")
    return host, int(port)


async def raw_ws(broker: Broker, subprotocols: tuple[str, ...] = ("v12.stomp",)) -> RawClient:
    stream = await open_websocket_stream(ws_url(broker), subprotocols=subprotocols)
    return RawClient(stream)


async def raw_tcp(broker: Broker) -> RawClient:
    return RawClient(await trio.open_tcp_stream(*tcp_address(broker)))


async def test_addresses_name_the_ws_listener(broker: Broker) -> None:
    url = ws_url(broker)
    assert url.startswith("ws://127.0.0.1:") and url.endswith(PATH)
    assert not url.endswith(f":0{PATH}")


@pytest.mark.parametrize(
    ("subprotocols", "version"),
    [
        (("v12.stomp", "v11.stomp", "v10.stomp"), "1.2"),
        (("v11.stomp",), "1.1"),
        (("v10.stomp",), "1.0"),
        ((), "1.2"),
    ],
)
async def test_every_subprotocol_connects(
    broker: Broker, subprotocols: tuple[str, ...], version: str
) -> None:
    client = await raw_ws(broker, subprotocols)
    assert isinstance(client.stream, WebSocketStream)
    assert client.stream.subprotocol == (subprotocols[0] if subprotocols else None)
    accept = {"1.2": "1.0,1.1,1.2", "1.1": "1.0,1.1", "1.0": "1.0"}[version]
    connected = await client.connect(accept_version=accept)
    assert connected.headers["version"] == version
    await client.aclose()


async def test_frames_split_and_joined_across_messages(broker: Broker) -> None:
    consumer = await raw_tcp(broker)
    await consumer.connect()
    await consumer.send("SUBSCRIBE", {"destination": "/queue/split", "id": "1", "receipt": "s"})
    await consumer.expect("RECEIPT")
    client = await raw_ws(broker)
    stream = client.stream
    connect = serialize(Frame("CONNECT", {"accept-version": "1.2", "host": "localhost"}))
    # CONNECT in three messages, then two SENDs (one with NULs) and a DISCONNECT in one.
    for piece in (connect[:3], connect[3:10], connect[10:]):
        await stream.send_all(piece)
    await client.expect("CONNECTED")
    batch = (
        serialize(Frame("SEND", {"destination": "/queue/split"}, b"one"))
        + serialize(Frame("SEND", {"destination": "/queue/split"}, b"\x00two\x00"))
        + serialize(Frame("DISCONNECT", {"receipt": "bye"}))
    )
    await stream.send_all(batch)
    await client.expect("RECEIPT")
    assert (await consumer.expect("MESSAGE")).body == b"one"
    assert (await consumer.expect("MESSAGE")).body == b"\x00two\x00"
    await client.aclose()
    await consumer.aclose()


async def test_client_over_ws_and_tcp_both_directions(broker: Broker) -> None:
    binary = bytes(range(256)) + b"\x00\x00end"
    host, port = tcp_address(broker)
    async with (
        trio_stomp.open_client(ws_url(broker)) as ws_client,
        trio_stomp.open_client(f"stomp://{host}:{port}") as tcp_client,
        ws_client.subscribe("/queue/to-ws") as to_ws,
        tcp_client.subscribe("/queue/to-tcp") as to_tcp,
    ):
        await ws_client.send("/queue/to-tcp", "héllo from ws", receipt=True)
        await ws_client.send("/queue/to-tcp", binary, receipt=True)
        await tcp_client.send("/queue/to-ws", binary, receipt=True)
        await tcp_client.send("/queue/to-ws", "héllo from tcp", receipt=True)
        with trio.fail_after(5):
            got_tcp = [(await to_tcp.receive()).body for _ in range(2)]
            got_ws = [await to_ws.receive() for _ in range(2)]
        assert got_tcp == ["héllo from ws".encode(), binary]
        assert got_ws[0].body == binary
        assert got_ws[1].text == "héllo from tcp"


async def test_ws_close_ends_the_session_and_unacked_messages_come_back(broker: Broker) -> None:
    first = await raw_ws(broker)
    await first.connect()
    await first.send(
        "SUBSCRIBE",
        {"destination": "/queue/redo", "id": "1", "ack": "client-individual", "receipt": "r"},
    )
    await first.expect("RECEIPT")
    producer = await raw_tcp(broker)
    await producer.connect()
    await producer.send("SEND", {"destination": "/queue/redo", "receipt": "p"}, b"\x00again")
    await producer.expect("RECEIPT")
    message = await first.expect("MESSAGE")
    assert message.body == b"\x00again"
    assert broker.statistics().messages_unacked == 1
    await first.aclose()  # a WebSocket close frame, then the socket closes; no DISCONNECT
    second = await raw_tcp(broker)
    await second.connect()
    await second.send(
        "SUBSCRIBE", {"destination": "/queue/redo", "id": "2", "ack": "client-individual"}
    )
    with trio.fail_after(5):
        again = await second.expect("MESSAGE")
    assert again.body == b"\x00again"
    await second.send("ACK", {"id": again.headers["ack"]})
    await producer.aclose()
    await second.aclose()


async def test_heart_beats_travel_as_websocket_messages() -> None:
    # A 500 ms window (100 ms x tolerance 5): wide enough that a stall of this shared VM
    # does not drop a client that beats every 20 ms, narrow enough to test in 1.6 s.
    async with open_broker(
        listen=[f"ws://127.0.0.1:0{PATH}"], heart_beat=(100, 100), heart_beat_tolerance=5.0
    ) as broker:
        stream = await open_websocket_stream(broker.addresses[0])
        client = RawClient(stream)
        try:
            connected = await client.connect(**{"heart-beat": "100,100"})
            assert connected.headers["heart-beat"] == "100,100"
            # The broker sends EOLs; we send ours as WebSocket messages of their own.
            # Silence for 500 ms would get us dropped (the TCP test suite checks that part).

            async def beat() -> None:
                while True:
                    await stream.send_all(b"\n")
                    await trio.sleep(0.02)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(beat)
                with trio.fail_after(5):
                    while client.heart_beats < 5:
                        assert await client._fill()
                await trio.sleep(1.6)  # more than three of the broker's 500 ms windows
                nursery.cancel_scope.cancel()
            assert client.heart_beats >= 5
            # still alive: a receipt comes back after the beats
            await client.send("SEND", {"destination": "/topic/hb", "receipt": "alive"}, b"x")
            assert (await client.expect("RECEIPT")).headers["receipt-id"] == "alive"
        finally:
            await client.aclose()  # also when it failed: no socket left for the GC to find


async def test_broker_sends_text_and_binary_messages() -> None:
    """What a browser sees: text messages for text frames, binary ones for NUL bodies."""
    async with open_broker(listen=[f"ws://127.0.0.1:0{PATH}"], heart_beat=(0, 0)) as broker:
        host, _, port = broker.addresses[0].removeprefix("ws://").partition("/")[0].rpartition(":")
        sock = await trio.open_tcp_stream(host, int(port))
        ws = WSConnection(ConnectionType.CLIENT)
        events: list[Event] = []

        async def next_event() -> Event:
            while not events:
                ws.receive_data(bytes(await sock.receive_some(65536)))
                events.extend(ws.events())
            return events.pop(0)

        async def send(frame: bytes, text: bool) -> None:
            message = TextMessage(data=frame.decode()) if text else BytesMessage(data=frame)
            await sock.send_all(ws.send(message))

        def frame(command: str, body: bytes = b"", **headers: str) -> bytes:
            return serialize(Frame(command, headers, body))

        with trio.fail_after(5):
            await sock.send_all(ws.send(Request(host="x", target=PATH, subprotocols=["v12.stomp"])))
            assert isinstance(await next_event(), AcceptConnection)
            await send(serialize(Frame("CONNECT", {"accept-version": "1.2"})), text=False)
            connected = await next_event()
            assert isinstance(connected, TextMessage)
            assert connected.data.startswith("CONNECTED\n")
            await send(frame("SUBSCRIBE", destination="/topic/t", id="1", receipt="r"), text=True)
            assert isinstance(await next_event(), TextMessage)  # RECEIPT
            # one at a time, so that each MESSAGE is a write (and a WebSocket message) alone
            await send(frame("SEND", b"a\x00b", destination="/topic/t"), text=False)
            binary = await next_event()
            await send(frame("SEND", b"ok", destination="/topic/t"), text=True)
            text = await next_event()
            await send(frame("SEND", b"\xff", destination="/topic/t"), text=False)
            not_utf8 = await next_event()
        assert isinstance(binary, BytesMessage) and binary.data.endswith(b"\n\na\x00b\x00")
        assert isinstance(text, TextMessage) and text.data.endswith("\n\nok\x00")
        assert isinstance(not_utf8, BytesMessage) and not_utf8.data.endswith(b"\n\n\xff\x00")
        await sock.aclose()


async def test_silent_connection_is_dropped_after_the_connect_timeout() -> None:
    async with open_broker(listen=[f"ws://127.0.0.1:0{PATH}"], connect_timeout=0.2) as broker:
        host, _, port = broker.addresses[0].removeprefix("ws://").partition("/")[0].rpartition(":")
        silent = await trio.open_tcp_stream(host, int(port))
        with trio.fail_after(5):
            assert await silent.receive_some(1024) == b""  # closed without a word
        await silent.aclose()
        # the broker still serves
        client = RawClient(await open_websocket_stream(broker.addresses[0]))
        await client.connect()
        await client.aclose()


async def test_wrong_path_is_refused_with_404(broker: Broker) -> None:
    wrong = ws_url(broker).removesuffix(PATH) + "/nope"
    with pytest.raises(ConnectionRefusedError, match="404"):
        await open_websocket_stream(wrong)
    with pytest.raises(trio_stomp.ConnectionLost, match="404"):
        async with trio_stomp.open_client(wrong):
            pass  # pragma: no cover


async def test_cli_prints_the_ws_listener() -> None:
    command = [sys.executable, "-m", "trio_stomp.broker", "--listen", "ws://127.0.0.1:0/ws"]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            functools.partial(trio.run_process, command, stdout=subprocess.PIPE, check=False)
        )
        assert process.stdout is not None
        line = b""
        with trio.fail_after(20):
            while not line.endswith(b"\n"):
                line += await process.stdout.receive_some(1)
        text = line.decode().strip()
        assert text.startswith("listening on ws://127.0.0.1:") and text.endswith("/ws")
        client = RawClient(await open_websocket_stream(text.removeprefix("listening on ")))
        await client.connect()
        await client.aclose()
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await process.wait() == 0


async def test_wss_listener_and_client(tmp_path: Path) -> None:
    """wss://: TLS (the broker's tls_cert) under the WebSocket, both sides."""
    trustme = require_module("trustme")  # skips locally, fails under CI=true
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file = tmp_path / "broker.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with open_broker(
        listen=["tcp://127.0.0.1:0", f"wss://127.0.0.1:0{PATH}"],
        tls_cert=str(cert_file),
        heart_beat=(0, 0),
    ) as broker:
        (url,) = [a for a in broker.addresses if a.startswith("wss://")]
        assert url.startswith("wss://127.0.0.1:") and url.endswith(PATH)
        async with (
            trio_stomp.open_client(url, ssl_context=client_context) as client,
            client.subscribe("/queue/secure") as messages,
        ):
            await client.send("/queue/secure", b"\x00over wss\xff", receipt=True)
            with trio.fail_after(5):
                assert (await messages.receive()).body == b"\x00over wss\xff"
        # a plain ws:// client cannot talk to it
        with pytest.raises(OSError):
            await open_websocket_stream(url.replace("wss://", "ws://"))


def test_wss_needs_a_certificate() -> None:
    from trio_stomp.broker import Config

    with pytest.raises(ValueError, match="wss://"):
        Config(listen=["wss://127.0.0.1:0/stomp"])


@pytest.mark.rabbitmq
async def test_client_over_rabbitmq_web_stomp(rabbitmq: RabbitMQ) -> None:
    """Our ws:// client against an independent WebSocket server: RabbitMQ's Web-STOMP.

    RabbitMQ sends every frame as a *text* message by default (``web_stomp.ws_frame =
    text``), so a body that is not UTF-8 would break the connection (RFC 6455 requires UTF-8
    text; wsproto, like browsers, closes with 1007). Bodies with NULs are fine either way.
    """
    url = f"ws://{rabbitmq.host}:{rabbitmq.web_stomp_port}/ws"
    queue = "/queue/trio-stomp-ws-interop"
    body = "\x00web-stomp ✓\x00".encode()
    async with (
        trio_stomp.open_client(
            url, login=rabbitmq.login, passcode=rabbitmq.passcode, vhost="/"
        ) as client,
        client.subscribe(queue, ack="client-individual") as messages,
    ):
        assert isinstance(client.version, str) and client.version == "1.2"
        await client.send(queue, body, content_type="application/octet-stream", receipt=True)
        await client.send(queue, "text ✓", receipt=True)
        with trio.fail_after(10):
            first = await messages.receive()
            second = await messages.receive()
        assert first.body == body
        assert second.text == "text ✓"
        await first.ack()
        await second.ack()


async def test_refused_connection_gets_its_error_over_websocket() -> None:
    async with open_broker(listen=[f"ws://127.0.0.1:0{PATH}"], max_connections=1) as broker:
        first = RawClient(await open_websocket_stream(broker.addresses[0]))
        await first.connect()
        second = RawClient(await open_websocket_stream(broker.addresses[0]))
        with trio.fail_after(5):
            error = await second.expect_error_and_close()
        assert "connections" in error.headers["message"]
        await second.aclose()
        await first.aclose()


async def test_slow_websocket_consumer_pushes_back_like_tcp() -> None:
    """The adapter adds no buffer of its own: a WebSocket subscriber that stops reading
    fills the broker's send buffer and is dropped as a slow topic consumer, while a
    WebSocket subscriber that reads gets everything."""
    async with open_broker(
        listen=["tcp://127.0.0.1:0", f"ws://127.0.0.1:0{PATH}"],
        max_send_buffer=64 * 1024,
        shutdown_grace=1.0,
        heart_beat=(0, 0),
    ) as broker:
        slow = await raw_ws(broker)
        fast = await raw_ws(broker)
        producer = await raw_tcp(broker)
        for raw in (slow, fast, producer):
            await raw.connect()
        for raw in (slow, fast):
            await raw.send("SUBSCRIBE", {"destination": "/topic/flood", "id": "1", "receipt": "r"})
            await raw.expect("RECEIPT")
        payload = b"\x00" + b"y" * 16 * 1024  # binary messages
        count = 600  # ~10 MB: far beyond the slow reader's socket buffers and 64 KiB
        received = 0
        # The producer stays at most 3 messages (48 KiB) ahead of the fast reader, so the
        # fast one never counts as slow however the machine schedules us; the slow one
        # still gets all 10 MB thrown at it.
        window = trio.Semaphore(3)

        async def drain_fast() -> None:
            nonlocal received
            while received < count:
                assert (await fast.expect("MESSAGE")).body == payload
                received += 1
                window.release()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain_fast)
                for _ in range(count):
                    await window.acquire()
                    await producer.send("SEND", {"destination": "/topic/flood"}, payload)
        assert received == count
        assert broker.statistics().slow_consumers == 1
        for raw in (slow, fast, producer):
            await raw.aclose()
