"""The broker over real loopback TCP: exchange, slow consumers, hostile input.

These need real sockets because memory streams never push back: a consumer that stops
reading only fills a buffer when there is a kernel socket buffer behind it.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from test_broker import RawClient

from trio_stomp import Frame, serialize
from trio_stomp.broker import Broker, Config, open_broker, serve_broker

_open_clients: list[RawClient] = []


@pytest.fixture
async def close_clients() -> AsyncIterator[None]:
    """Close every client a test opened. Requested by name: pytest-trio 0.8 under pytest 9
    never runs an autouse (or usefixtures) async fixture."""
    yield
    while _open_clients:
        await _open_clients.pop().aclose()


@pytest.fixture
async def tcp_broker(close_clients: None) -> AsyncIterator[Broker]:
    async with open_broker(
        listen=["tcp://127.0.0.1:0"],
        max_send_buffer=64 * 1024,
        connect_timeout=1.0,
        shutdown_grace=1.0,
        max_body_size=256 * 1024,
        max_frame_size=300 * 1024,
    ) as broker:
        yield broker


async def tcp_client(broker: Broker, version: str = "1.2", connect: bool = True) -> RawClient:
    host_port = broker.addresses[0].removeprefix("tcp://")
    host, _, port = host_port.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    raw = RawClient(stream, version)
    _open_clients.append(raw)
    if connect:
        await raw.connect()
    return raw


async def test_listens_on_the_real_port_and_serves(tcp_broker: Broker) -> None:
    (address,) = tcp_broker.addresses
    assert address.startswith("tcp://127.0.0.1:") and not address.endswith(":0")
    consumer = await tcp_client(tcp_broker)
    producer = await tcp_client(tcp_broker, "1.1")
    await consumer.send("SUBSCRIBE", {"destination": "/queue/tcp", "id": "1", "receipt": "r"})
    await consumer.expect("RECEIPT")
    await producer.send("SEND", {"destination": "/queue/tcp"}, b"over tcp")
    assert (await consumer.expect("MESSAGE")).body == b"over tcp"
    await producer.send("DISCONNECT", {"receipt": "bye"})
    await producer.expect("RECEIPT")


async def test_slow_topic_subscriber_is_disconnected_others_keep_going(close_clients: None) -> None:
    # The ERROR for the slow consumer can only reach it once it reads again, and the broker
    # waits for that at most shutdown_grace: make the grace outlast the flood, however
    # slowly a loaded machine runs it, so the test checks the ERROR, not the scheduler.
    async with open_broker(
        listen=["tcp://127.0.0.1:0"],
        max_send_buffer=64 * 1024,
        shutdown_grace=60.0,
        max_body_size=256 * 1024,
        max_frame_size=300 * 1024,
    ) as broker:
        await _slow_topic_subscriber_is_disconnected(broker)


async def _slow_topic_subscriber_is_disconnected(tcp_broker: Broker) -> None:
    slow = await tcp_client(tcp_broker)
    fast = await tcp_client(tcp_broker)
    producer = await tcp_client(tcp_broker)
    for raw in (slow, fast):
        await raw.send("SUBSCRIBE", {"destination": "/topic/flood", "id": "1", "receipt": "r"})
        await raw.expect("RECEIPT")
    payload = b"x" * 16 * 1024
    count = 600  # ~10 MB: far more than the slow reader's socket buffers and our 64 KiB
    received = 0

    async def drain_fast() -> None:
        nonlocal received
        while received < count:
            await fast.expect("MESSAGE")
            received += 1

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain_fast)
            for i in range(count):
                receipt = {"receipt": f"p{i}"} if i % 100 == 99 else {}
                await producer.send("SEND", {"destination": "/topic/flood", **receipt}, payload)
                if receipt:
                    await producer.expect("RECEIPT")
    assert received == count
    stats = tcp_broker.statistics()
    assert stats.slow_consumers == 1
    # The slow one finally reads: what was buffered, then an ERROR, then the end.
    with trio.fail_after(10):
        while True:
            frame = await slow.receive()
            if frame.command == "ERROR":
                break
    assert "slow consumer" in frame.headers["message"]
    with trio.fail_after(5):
        while await slow._fill():
            pass


async def test_slow_topic_subscriber_drop_policy(close_clients: None) -> None:
    async with open_broker(
        listen=["tcp://127.0.0.1:0"],
        max_send_buffer=32 * 1024,
        slow_consumer_policy="drop",
        shutdown_grace=0.2,
    ) as broker:
        slow = await tcp_client(broker)
        producer = await tcp_client(broker)
        await slow.send("SUBSCRIBE", {"destination": "/topic/d", "id": "1", "receipt": "r"})
        await slow.expect("RECEIPT")
        for _ in range(400):
            await producer.send("SEND", {"destination": "/topic/d"}, b"y" * 16 * 1024)
        await producer.send("SEND", {"destination": "/topic/x", "receipt": "done"})
        with trio.fail_after(10):
            await producer.expect("RECEIPT")
        stats = broker.statistics()
        assert stats.messages_dropped > 0 and stats.slow_consumers == 0
        assert stats.connections == 2


async def test_slow_queue_consumer_is_skipped_and_nothing_is_lost(tcp_broker: Broker) -> None:
    slow = await tcp_client(tcp_broker)
    await slow.send(
        "SUBSCRIBE",
        {"destination": "/queue/work", "id": "1", "ack": "client", "prefetch": "5", "receipt": "r"},
    )
    await slow.expect("RECEIPT")
    fast = await tcp_client(tcp_broker)
    await fast.send("SUBSCRIBE", {"destination": "/queue/work", "id": "1", "receipt": "r"})
    await fast.expect("RECEIPT")
    producer = await tcp_client(tcp_broker)
    count = 300
    with trio.fail_after(20):
        for i in range(count):
            await producer.send("SEND", {"destination": "/queue/work"}, b"%d" % i)
        await producer.send("DISCONNECT", {"receipt": "bye"})
        await producer.expect("RECEIPT")
        got: list[bytes] = []
        while len(got) < count - 5:
            got.append((await fast.expect("MESSAGE")).body)
    stats = tcp_broker.statistics()
    assert stats.messages_unacked == 5  # the slow consumer's credit, no more
    await slow.aclose()  # its unacked messages come back to the queue
    with trio.fail_after(10):
        while len(got) < count:
            msg = await fast.expect("MESSAGE")
            assert msg.headers["redelivered"] == "true"
            got.append(msg.body)
    assert sorted(got, key=int) == [b"%d" % i for i in range(count)]


async def test_hostile_connections_do_not_disturb_good_clients(tcp_broker: Broker) -> None:
    hostile_payloads = [
        b"\x00\xff\xfe garbage garbage\n\n\0",
        b"CONNECT\naccept-version:1.2\nhost:h\n\n\0SEND\ndestination:/queue/a\ncontent-length:-1\n\n\0",
        b"CONNECT\naccept-version:1.2\nhost:h\n\n\0SEND\ndestination:/queue/a\ncontent-length:999999999\n\n",
        b"CONNECT\naccept-version:1.2\nhost:h\n\n\0SEND\ndestination:/queue/a\n\n" + b"z" * 400_000,
        b"CONNECT\naccept-version:1.2\nhost:h\n\n\0SEND\n" + b"h" * 400_000,
        b"CONNECT\naccept-version:1.2\nhost:h\n\n\0" + b"SEND\ndestination:/queue/a\nbad:\\q\n\n\0",
        b"SEND\ndestination:/queue/a\n\nnot connected\0",
        b"CONNECT\naccept-version:9.9\n\n\0",
        b"",  # half-open: connects and never says anything
        b"CONN",  # half-open: starts a frame and never finishes it
    ]
    closed_hostile = 0
    good_round_trips = 0

    async def hostile(payload: bytes) -> None:
        nonlocal closed_hostile
        raw = await tcp_client(tcp_broker, connect=False)
        if payload:
            try:
                await raw.send_raw(payload)
            except trio.BrokenResourceError:
                pass  # the broker already hung up on us mid-send
        with trio.fail_after(5):
            try:
                while await raw._fill():
                    pass
            except (trio.BrokenResourceError, Exception):
                pass
        closed_hostile += 1

    async def good_pair() -> None:
        nonlocal good_round_trips
        consumer = await tcp_client(tcp_broker)
        producer = await tcp_client(tcp_broker)
        await consumer.send("SUBSCRIBE", {"destination": "/queue/good", "id": "1", "receipt": "r"})
        await consumer.expect("RECEIPT")
        while closed_hostile < 3 * len(hostile_payloads) or good_round_trips < 50:
            await producer.send("SEND", {"destination": "/queue/good"}, b"ping")
            assert (await consumer.expect("MESSAGE")).body == b"ping"
            good_round_trips += 1

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(good_pair)
            for _ in range(3):
                for payload in hostile_payloads:
                    nursery.start_soon(hostile, payload)
    assert closed_hostile == 3 * len(hostile_payloads)
    assert good_round_trips >= 50
    stats = tcp_broker.statistics()
    assert stats.errors_sent >= 3 * (len(hostile_payloads) - 1)
    await trio.testing.wait_all_tasks_blocked()
    assert tcp_broker.statistics().connections == 2


async def test_many_frames_in_one_chunk_are_routed_in_order(tcp_broker: Broker) -> None:
    consumer = await tcp_client(tcp_broker)
    await consumer.send("SUBSCRIBE", {"destination": "/queue/batch", "id": "1", "receipt": "r"})
    await consumer.expect("RECEIPT")
    producer = await tcp_client(tcp_broker)
    data = b"".join(
        serialize(Frame("SEND", {"destination": "/queue/batch"}, b"%d" % i)) for i in range(2000)
    )
    await producer.send_raw(data + serialize(Frame("SEND", {"destination": "/x", "receipt": "e"})))
    with trio.fail_after(10):
        await producer.expect("RECEIPT")
        bodies = [(await consumer.expect("MESSAGE")).body for _ in range(2000)]
    assert bodies == [b"%d" % i for i in range(2000)]


async def test_a_client_that_never_reads_its_receipts_is_pushed_back(close_clients: None) -> None:
    async with open_broker(listen=["tcp://127.0.0.1:0"], max_send_buffer=16 * 1024) as broker:
        greedy = await tcp_client(broker)
        assert isinstance(greedy.stream, trio.SocketStream)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            greedy.stream.setsockopt(socket.SOL_SOCKET, option, 32 * 1024)
        receipt_id = "r" * 4000
        frame = serialize(Frame("SEND", {"destination": "/topic/void", "receipt": receipt_id}))
        count = 5_000  # ~20 MB each way: more than every socket buffer on the path
        sent = 0

        async def flood() -> None:
            nonlocal sent
            for _ in range(count // 100):
                await greedy.send_raw(frame * 100)
                sent += 100

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            # Wait until the flood stalls: the broker stopped reading this client.
            previous = -1
            with trio.fail_after(20):
                while sent != previous:
                    previous = sent
                    await trio.sleep(0.3)
            assert sent < count
            session = next(iter(broker._sessions))
            assert session.peer is not None
            used = session.peer.statistics().send_buffer_used
            assert used <= 16 * 1024 + len(frame) + 100, used
            # Once the client reads, everything flows again, in order.
            with trio.fail_after(30):
                for _ in range(count):
                    receipt = await greedy.expect("RECEIPT")
                    assert receipt.headers["receipt-id"] == receipt_id
        assert sent == count


def _tasks_under(nursery: trio.Nursery) -> list[trio.lowlevel.Task]:
    tasks = []
    for task in nursery.child_tasks:
        tasks.append(task)
        for child in task.child_nurseries:
            tasks.extend(_tasks_under(child))
    return tasks


async def test_an_idle_tcp_connection_is_one_task(tcp_broker: Broker) -> None:
    # Memory per idle connection: the session reads inline and its peer is written
    # through, so no reader and no writer task wait beside it.
    clients = [await tcp_client(tcp_broker) for _ in range(3)]
    await clients[0].send("SUBSCRIBE", {"destination": "/queue/idle", "id": "1", "receipt": "r"})
    await clients[0].expect("RECEIPT")
    await trio.testing.wait_all_tasks_blocked()
    assert tcp_broker._connections is not None
    tasks = _tasks_under(tcp_broker._connections)
    assert len(tasks) == len(clients), [task.name for task in tasks]


async def test_shutdown_ends_a_session_whose_client_does_not_read(close_clients: None) -> None:
    # The socket is full, so the session's writer task waits for room; the closing
    # deadline (the grace) still ends the flush of the last frames, and no task is left.
    frame = serialize(Frame("SEND", {"destination": "/topic/void", "receipt": "r" * 4000}))
    with trio.fail_after(30):  # a hang guard, not a timing assertion
        async with open_broker(
            listen=["tcp://127.0.0.1:0"], max_send_buffer=16 * 1024, shutdown_grace=0.2
        ) as broker:
            greedy = await tcp_client(broker)
            assert isinstance(greedy.stream, trio.SocketStream)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                greedy.stream.setsockopt(socket.SOL_SOCKET, option, 32 * 1024)
            session = next(iter(broker._sessions))
            connections = broker._connections
            assert connections is not None

            async def flood() -> None:
                for _ in range(50):
                    await greedy.send_raw(frame * 100)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                while True:  # until the writer task waits for room
                    await trio.sleep(0.05)
                    if len(_tasks_under(connections)) == 2:
                        break
                nursery.cancel_scope.cancel()
            # leaving the block shuts the broker down while the writer waits for room
    assert session.peer is not None and session.peer.closed
    assert broker.statistics().connections == 0


async def test_shutdown_stops_listeners_before_telling_sessions(close_clients: None) -> None:
    async with trio.open_nursery() as nursery:
        broker: Broker = await nursery.start(
            serve_broker, Config(listen=["tcp://127.0.0.1:0"], shutdown_grace=2.0)
        )
        connected = await tcp_client(broker)
        # A client that does not read: its session must not delay the others past the grace.
        await connected.send("SUBSCRIBE", {"destination": "/queue/sd", "id": "1", "receipt": "r"})
        await connected.expect("RECEIPT")
        port = int(broker.addresses[0].rpartition(":")[2])
        start = trio.current_time()
        nursery.cancel_scope.cancel()  # what SIGTERM does in the CLI
    # serve_broker returned only after the sessions were told and flushed.
    assert trio.current_time() - start < 2.0
    error = await connected.expect_error_and_close()
    assert error.headers["message"] == "broker shutting down"
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)
    stats = broker.statistics()
    assert stats.connections == 0 and stats.errors_sent == 1


async def test_one_ticker_keeps_many_heart_beats_on_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_broker(listen=[], heart_beat=(100, 0)) as broker:
        clients = []
        for i in range(50):
            raw = RawClient(broker.connect_in_memory())
            await raw.connect(**{"heart-beat": f"0,{100 + i}"})
            clients.append(raw)
        async with trio.open_nursery() as nursery:
            for raw in clients:
                nursery.start_soon(raw._fill_forever)
            await trio.sleep(3)
            nursery.cancel_scope.cancel()
        for i, raw in enumerate(clients):
            interval = (100 + i) / 1000
            # ~3 s / interval beats, give or take the first and last one
            assert abs(raw.heart_beats - 3 / interval) <= 2, (i, raw.heart_beats)
