"""Tests of trio_stomp._peer (and the exception-group helper in trio_stomp._util)."""

from __future__ import annotations

import struct
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import trio
import trio.testing

from trio_stomp import ConnectionLost, Frame, HeartbeatTimeout, RemoteProtocolError
from trio_stomp._codec import FrameParser, serialize
from trio_stomp._peer import Peer, open_peer, start_inline_peer
from trio_stomp._util import unwrap_lone_exception

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup


class Boom(Exception):
    pass


async def test_unwrap_lone_exception_from_nursery() -> None:
    cause = ValueError("root")

    async def fail() -> None:
        raise Boom("x") from cause

    with pytest.raises(Boom) as info, unwrap_lone_exception():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail)
    assert info.value.__cause__ is cause
    assert not isinstance(info.value.__context__, BaseExceptionGroup)


async def test_unwrap_keeps_groups_of_several() -> None:
    async def fail(n: int) -> None:
        raise Boom(n)

    with pytest.raises(BaseExceptionGroup) as info, unwrap_lone_exception():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail, 1)
            nursery.start_soon(fail, 2)
    assert len(info.value.exceptions) == 2


async def test_unwrap_keeps_an_application_group_intact() -> None:
    inner = ExceptionGroup("app", [Boom(1)])
    with pytest.raises(ExceptionGroup) as info, unwrap_lone_exception():
        async with trio.open_nursery():
            raise inner
    assert info.value.message == "app"
    assert [type(e) for e in info.value.exceptions] == [Boom]


async def test_unwrap_reraises_cancelled() -> None:
    with trio.CancelScope() as scope, unwrap_lone_exception():
        async with trio.open_nursery():
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught


# --------------------------------------------------------------------------- the Peer


class RecordingStream(trio.abc.Stream):
    """Wraps a stream and records every ``send_all`` call (to check batching)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes: list[bytes] = []
        self.fail_send: BaseException | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.fail_send is not None:
            await trio.lowlevel.checkpoint()
            raise self.fail_send
        self.writes.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Remote:
    """The far end of a peer's stream, speaking raw bytes."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.parser = FrameParser()
        self.received = b""

    async def send(self, *frames: Frame) -> None:
        await self.stream.send_all(b"".join(serialize(f) for f in frames))

    async def read_some(self) -> bytes:
        data = bytes(await self.stream.receive_some(65536))
        self.received += data
        return data

    async def frames(self, n: int) -> list[Frame]:
        out: list[Frame] = []
        while len(out) < n:
            data = await self.read_some()
            assert data, "unexpected EOF"
            out.extend(e for e in self.parser.feed(data) if isinstance(e, Frame))
        return out

    async def read_until_eof(self) -> bytes:
        while await self.read_some():
            pass
        return self.received


@asynccontextmanager
async def peer_pair(
    *, lockstep: bool = False, **kwargs: object
) -> AsyncIterator[tuple[Peer, Remote, RecordingStream]]:
    ours: trio.abc.Stream
    theirs: trio.abc.Stream
    if lockstep:
        ours, theirs = trio.testing.lockstep_stream_pair()
    else:
        ours, theirs = trio.testing.memory_stream_pair()
    recording = RecordingStream(ours)
    async with open_peer(recording, **kwargs) as peer:  # type: ignore[arg-type]
        yield peer, Remote(theirs), recording


def message(n: int, body: bytes = b"x") -> Frame:
    headers = {"destination": "/queue/a", "message-id": str(n), "content-length": str(len(body))}
    return Frame("MESSAGE", headers, body)


async def test_frames_round_trip_both_ways() -> None:
    async with peer_pair() as (peer, remote, _):
        sent = Frame("SEND", {"destination": "/q/a", "x": "a:b", "content-length": "5"}, b"\0bin\0")
        await peer.send(sent)
        [got] = await remote.frames(1)
        assert got == sent
        await remote.send(message(1, b"hello"))
        frame = await peer.receive()
        assert frame == message(1, b"hello")


async def test_several_frames_go_out_in_one_send_all() -> None:
    async with peer_pair() as (peer, remote, recording):
        for n in range(10):
            peer.send_nowait(message(n))
        await peer.flush()
        assert len(recording.writes) == 1
        assert await remote.frames(10) == [message(n) for n in range(10)]
        assert peer.statistics().frames_out == 10


async def test_a_sending_loop_is_coalesced_into_few_writes() -> None:
    async with peer_pair() as (peer, remote, recording):
        for n in range(200):
            await peer.send(message(n))  # a checkpoint per frame
        await peer.flush()
        assert len(recording.writes) <= 200 // 8
        assert await remote.frames(200) == [message(n) for n in range(200)]


async def test_a_lone_frame_is_written_promptly() -> None:
    async with peer_pair() as (peer, _remote, recording):
        await peer.send(message(1))
        for _ in range(10):  # a few scheduling rounds, no clock time at all
            await trio.lowlevel.checkpoint()
        assert len(recording.writes) == 1


async def test_one_chunk_is_one_batch() -> None:
    async with peer_pair() as (peer, remote, _):
        await remote.send(*(message(n) for n in range(5)))
        batch = await peer.receive_batch()
        assert batch == [message(n) for n in range(5)]
        # receive() splits a batch without losing the rest
        await remote.send(*(message(n) for n in range(5, 8)))
        assert await peer.receive() == message(5)
        assert await peer.receive_batch() == [message(6), message(7)]


async def test_heart_beats_are_filtered_and_count_as_liveness(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with peer_pair() as (peer, remote, _):
        await remote.stream.send_all(b"\n\r\n\n")
        await trio.testing.wait_all_tasks_blocked()
        assert peer.last_received == trio.current_time()
        await trio.sleep(5)
        await remote.send(message(1))
        assert await peer.receive() == message(1)
        assert peer.statistics().frames_in == 1
        assert peer.statistics().bytes_in == 4 + len(serialize(message(1)))


async def test_send_blocks_on_the_byte_bound_and_resumes() -> None:
    async with peer_pair(lockstep=True, max_send_buffer=100) as (peer, remote, _):
        big = message(0, b"y" * 60)
        # The writer takes the first frame and blocks in send_all (nobody reads).
        peer.send_nowait(big)
        await trio.testing.wait_all_tasks_blocked()
        peer.send_nowait(big)  # 0 queued bytes < 100: accepted, although it makes > 100
        assert peer.statistics().send_buffer_used > 100
        with pytest.raises(trio.WouldBlock):
            peer.send_nowait(big)
        sent = trio.Event()

        async def blocked_send() -> None:
            await peer.send(big)
            sent.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked_send)
            await trio.testing.wait_all_tasks_blocked()
            assert not sent.is_set()
            # Read: the writer finishes, takes the queued bytes, the sender gets room.
            await remote.frames(3)
        assert sent.is_set()


async def test_cancelled_send_queues_nothing(autojump_clock: trio.testing.MockClock) -> None:
    async with peer_pair(lockstep=True, max_send_buffer=10) as (peer, remote, _):
        peer.send_nowait(message(0))
        await trio.testing.wait_all_tasks_blocked()
        peer.send_nowait(message(1))
        before = peer.statistics()
        with trio.move_on_after(1) as scope:
            await peer.send(message(2))
        assert scope.cancelled_caught
        assert peer.statistics().send_buffer_used == before.send_buffer_used
        assert await remote.frames(2) == [message(0), message(1)]


async def test_heart_beats_are_sent_only_when_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with peer_pair() as (peer, remote, _):
        peer.set_heart_beat(1000, 0)
        await trio.sleep(3.5)
        assert await remote.read_some() == b"\n\n\n"
        assert peer.statistics().heart_beats_out == 3
        # Busy for 3 s: a frame every 0.5 s, so no heart-beat is needed.
        for n in range(6):
            await peer.send(message(n))
            await trio.sleep(0.5)
        frames = await remote.frames(6)
        assert len(frames) == 6
        assert remote.received.startswith(b"\n\n\nMESSAGE")
        assert b"\x00\n" not in remote.received  # no beat between or after the frames
        assert peer.statistics().heart_beats_out == 3


async def test_watchdog_declares_a_silent_peer_dead(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with peer_pair(heart_beat_tolerance=1.5) as (peer, _remote, _):
        start = trio.current_time()
        peer.set_heart_beat(0, 1000)
        with pytest.raises(HeartbeatTimeout, match="no heart-beat"):
            await peer.receive()
        assert trio.current_time() - start == pytest.approx(1.5)
        with pytest.raises(HeartbeatTimeout):
            await peer.send(message(1))
        assert isinstance(HeartbeatTimeout(), ConnectionLost)


async def test_watchdog_is_content_with_beats(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with peer_pair() as (peer, remote, _):
        peer.set_heart_beat(0, 1000)

        async def beat() -> None:
            for _ in range(10):
                await trio.sleep(1)
                await remote.stream.send_all(b"\n")
            await remote.send(message(99))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(beat)
            assert await peer.receive() == message(99)
        assert trio.current_time() >= 10


async def test_our_own_stall_is_not_a_dead_peer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with peer_pair(max_receive_batches=1) as (peer, remote, _):
        peer.set_heart_beat(0, 1000)
        # Two chunks: one fills the channel, the reader holds the other and stalls.
        await remote.send(message(1))
        await trio.testing.wait_all_tasks_blocked()
        await remote.send(message(2))
        await trio.testing.wait_all_tasks_blocked()
        assert peer.statistics().reader_stalled
        await trio.sleep(30)  # the application is busy; the peer is silent too
        resumed = trio.current_time()
        assert await peer.receive() == message(1)
        assert await peer.receive() == message(2)
        # A fresh window from the moment we resumed reading, then the truth comes out.
        with pytest.raises(HeartbeatTimeout):
            await peer.receive()
        assert trio.current_time() - resumed == pytest.approx(2.0)


async def test_eof_delivers_pending_frames_then_connection_lost() -> None:
    async with peer_pair() as (peer, remote, _):
        await remote.send(message(1), message(2))
        await remote.stream.aclose()
        assert [f async for f in _take(peer, 2)] == [message(1), message(2)]
        with pytest.raises(ConnectionLost, match="peer closed the connection"):
            await peer.receive()
        with pytest.raises(ConnectionLost):  # and again, every later call
            await peer.receive_batch()


async def _take(peer: Peer, n: int) -> AsyncIterator[Frame]:
    async for frame in peer:
        yield frame
        n -= 1
        if n == 0:
            return


async def test_eof_mid_frame_is_a_protocol_error() -> None:
    async with peer_pair() as (peer, remote, _):
        await remote.stream.send_all(b"MESSAGE\ndestination:/q/a\n\nhal")
        await remote.stream.aclose()
        with pytest.raises(RemoteProtocolError, match="middle of a frame"):
            await peer.receive()


async def test_parser_error_reaches_the_reader_and_sending_still_works() -> None:
    async with peer_pair() as (peer, remote, _):
        await remote.stream.send_all(b"SEND\ncontent-length:-1\n\n\0")
        with pytest.raises(RemoteProtocolError):
            await peer.receive()
        await peer.send(Frame("ERROR", {"message": "bad frame"}))
        [error] = await remote.frames(1)
        assert error.headers["message"] == "bad frame"


async def test_broken_stream_is_connection_lost() -> None:
    async with peer_pair() as (peer, _remote, recording):
        recording.fail_send = trio.BrokenResourceError("reset by peer")
        await peer.send(message(1))  # queued; the writer then fails
        with pytest.raises(ConnectionLost, match="broken") as info:
            await peer.flush()
        assert isinstance(info.value.__cause__, ConnectionLost)
        with pytest.raises(ConnectionLost):
            await peer.send(message(2))
        with pytest.raises(ConnectionLost):
            peer.send_nowait(message(2))
        # A connection we cannot write to is dead both ways: the reader stops too.
        with pytest.raises(ConnectionLost, match="broken"):
            await peer.receive()


async def test_os_error_on_receive_is_connection_lost() -> None:
    class FailingReceive(RecordingStream):
        async def receive_some(self, max_bytes: int | None = None) -> bytes:
            await trio.lowlevel.checkpoint()
            raise ConnectionResetError("reset")

    ours, _ = trio.testing.memory_stream_pair()
    async with open_peer(FailingReceive(ours)) as peer:
        with pytest.raises(ConnectionLost, match="ConnectionResetError") as info:
            await peer.receive()
        assert isinstance(info.value.__cause__, ConnectionLost)
        assert isinstance(info.value.__cause__.__cause__, ConnectionResetError)


async def test_body_exception_comes_out_bare() -> None:
    with pytest.raises(KeyError):
        async with peer_pair():
            raise KeyError("mine")


async def test_clean_exit_flushes_then_closes() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    remote = Remote(theirs)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(remote.read_until_eof)
        async with open_peer(ours) as peer:
            for n in range(100):
                await peer.send(message(n))
    assert remote.parser.feed(remote.received) == [message(n) for n in range(100)]


async def test_receive_after_close_is_connection_lost() -> None:
    async with peer_pair() as (peer, _remote, _):
        await peer.aclose()
        await peer.aclose()  # idempotent
        with pytest.raises(ConnectionLost, match="closed"):
            await peer.receive()
        with pytest.raises(ConnectionLost, match="closed"):
            await peer.send(message(1))


async def test_version_setter_changes_escaping() -> None:
    async with peer_pair(version="1.0") as (peer, remote, _):
        assert peer.version == "1.0"
        peer.version = "1.2"
        await peer.send(Frame("SEND", {"destination": "/q", "k": "a:b"}))
        await remote.frames(1)
        assert b"k:a\\cb" in remote.received
        with pytest.raises(ValueError):
            peer.version = "2.0"


async def test_parser_limits_are_passed_on() -> None:
    async with peer_pair(max_body_size=10) as (peer, remote, _):
        await remote.send(message(1, b"z" * 11))
        with pytest.raises(RemoteProtocolError):
            await peer.receive()


# --------------------------------------------------------------------------- inline reading


async def _ticker(peer: Peer) -> None:
    """What the broker's shared ticker does for one peer."""
    while True:
        due = peer.check_heart_beat()
        if due == float("inf"):
            return
        await trio.sleep_until(due)


def inline_pair(
    heart_beat_tolerance: float = 2.0,
) -> AbstractAsyncContextManager[tuple[Peer, Remote, RecordingStream]]:
    return peer_pair(
        reader_task=False, run_heart_beat_timer=False, heart_beat_tolerance=heart_beat_tolerance
    )


async def test_inline_reading_reads_only_when_asked() -> None:
    async with inline_pair() as (peer, remote, _):
        await remote.send(*(message(n) for n in range(5)))
        await trio.testing.wait_all_tasks_blocked()
        # No reader task: nothing was read ahead.
        assert peer.statistics().bytes_in == 0
        assert await peer.receive_batch() == [message(n) for n in range(5)]
        await remote.send(*(message(n) for n in range(5, 8)))
        assert await peer.receive() == message(5)
        assert await peer.receive_batch() == [message(6), message(7)]
        stats = peer.statistics()
        assert (stats.frames_in, stats.receive_batches_buffered) == (8, 0)
        await peer.send(message(9))
        assert await remote.frames(1) == [message(9)]


async def test_inline_reading_eof_and_errors() -> None:
    async with inline_pair() as (peer, remote, _):
        await remote.send(message(1))
        await remote.stream.send_all(b"\n")  # a heart-beat alone completes no frame
        await remote.stream.aclose()
        assert await peer.receive() == message(1)
        with pytest.raises(ConnectionLost, match="peer closed the connection"):
            await peer.receive()
        with pytest.raises(ConnectionLost):
            await peer.receive_batch()
    async with inline_pair() as (peer, remote, _):
        await remote.stream.send_all(b"NOT STOMP\n\n\0")
        with pytest.raises(RemoteProtocolError):
            await peer.receive()


async def test_inline_reading_needs_a_shared_ticker() -> None:
    with pytest.raises(ValueError, match="run_heart_beat_timer=False"):
        async with peer_pair(reader_task=False):
            pass  # pragma: no cover


async def test_inline_watchdog_ends_a_pending_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        inline_pair(heart_beat_tolerance=1.5) as (peer, remote, _),
        trio.open_nursery() as nursery,
    ):
        peer.set_heart_beat(0, 1000)
        nursery.start_soon(_ticker, peer)
        start = trio.current_time()
        await remote.stream.send_all(b"\n")
        await trio.sleep(1)  # a beat arrived but nobody read it yet: still alive
        with pytest.raises(HeartbeatTimeout, match="no heart-beat"):
            await peer.receive()
        # The unread beat is read at 1 s (when receive starts): dead 1.5 s later.
        assert trio.current_time() - start == pytest.approx(2.5)
        with pytest.raises(HeartbeatTimeout):
            await peer.send(message(1))


async def test_inline_silence_while_we_do_not_read_is_ours(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with inline_pair() as (peer, remote, _), trio.open_nursery() as nursery:
        peer.set_heart_beat(0, 1000)
        nursery.start_soon(_ticker, peer)
        await remote.send(message(1))
        assert await peer.receive() == message(1)
        await trio.sleep(30)  # the application is busy (pushing back); the peer is silent
        assert not peer.closed
        resumed = trio.current_time()
        # A fresh window from the moment we read again, then the truth comes out.
        with pytest.raises(HeartbeatTimeout):
            await peer.receive()
        assert trio.current_time() - resumed == pytest.approx(2.0)
        nursery.cancel_scope.cancel()


async def test_inline_close_reads_what_arrived_so_the_last_frame_is_not_reset() -> None:
    # Closing a TCP socket with unread bytes sends a reset, which can destroy our last
    # frame (an ERROR) before the other end reads it. The peer reads those bytes first.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    async with open_peer(server, reader_task=False, run_heart_beat_timer=False) as peer:
        await client.send_all(serialize(message(1)))
        assert await peer.receive() == message(1)
        await client.send_all(b"".join(serialize(message(n)) for n in range(2, 50)))
        await trio.sleep(0.05)  # the bytes are in the server's socket buffer, unread
        await peer.send(Frame("ERROR", {"message": "bye"}))
        # leaving the block flushes the ERROR and closes
    received = b""
    while data := await client.receive_some(65536):
        received += data
    assert received.startswith(b"ERROR\nmessage:bye\n")
    await client.aclose()
    await listeners[0].aclose()


@asynccontextmanager
async def tcp_pair() -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    """A connected loopback TCP pair: (server side, client side)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    try:
        yield server, client
    finally:
        await trio.aclose_forcefully(client)


async def test_inline_socket_peer_writes_at_the_end_of_the_round() -> None:
    # Write-through: what a round queued is written before trio next waits for I/O, in
    # one write per peer; no writer task has to wake up and no coalescing rounds pass.
    async with (
        tcp_pair() as (server, client),
        open_peer(server, reader_task=False, run_heart_beat_timer=False) as peer,
    ):
        for n in range(10):
            peer.send_nowait(message(n))
        size = peer.statistics().send_buffer_used
        await trio.lowlevel.checkpoint()  # one scheduling round
        stats = peer.statistics()
        assert (stats.bytes_out, stats.send_buffer_used) == (size, 0)
        remote = Remote(client)
        assert await remote.frames(10) == [message(n) for n in range(10)]


async def test_inline_socket_peer_writes_before_reading_again() -> None:
    # The task that applied a batch writes what it queued when it asks for the next one.
    async with (
        tcp_pair() as (server, client),
        open_peer(server, reader_task=False, run_heart_beat_timer=False) as peer,
    ):
        await client.send_all(serialize(message(1)))
        assert await peer.receive() == message(1)
        peer.send_nowait(message(2))
        with trio.CancelScope() as scope:
            scope.cancel()  # the receive gets no further than its first checkpoint...
            await peer.receive()
        assert peer.statistics().bytes_out == len(serialize(message(2)))  # ...it wrote first
        assert await Remote(client).frames(1) == [message(2)]


async def test_inline_socket_peer_hands_what_the_socket_refuses_to_the_writer() -> None:
    # The other end does not read: the socket takes part of a big batch, the writer waits
    # for room and writes the rest, in order, once the other end reads.
    frames = [message(n, b"y" * 1000) for n in range(8000)]
    async with (
        tcp_pair() as (server, client),
        open_peer(
            server, reader_task=False, run_heart_beat_timer=False, max_send_buffer=16 << 20
        ) as peer,
    ):
        for frame in frames:
            peer.send_nowait(frame)
        await trio.lowlevel.checkpoint()
        assert 0 < peer.statistics().bytes_out < sum(len(serialize(f)) for f in frames)
        remote = Remote(client)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.flush)
            assert await remote.frames(len(frames)) == frames
        assert peer.statistics().send_buffer_used == 0


async def test_start_inline_peer_runs_a_writer_only_while_the_socket_is_full() -> None:
    # The broker's peers: no nursery and no task of their own. A written-through peer
    # starts a writer task in the given nursery when the socket refuses bytes, and the
    # task ends once it has written them: an idle connection has no writer.
    frames = [message(n, b"y" * 1000) for n in range(8000)]
    async with tcp_pair() as (server, client), trio.open_nursery() as nursery:
        peer = start_inline_peer(nursery, server, max_send_buffer=16 << 20)
        peer.send_nowait(message(0))
        await trio.lowlevel.checkpoint()
        assert not nursery.child_tasks
        remote = Remote(client)
        assert await remote.frames(1) == [message(0)]
        for frame in frames:
            peer.send_nowait(frame)
        await trio.lowlevel.checkpoint()
        assert len(nursery.child_tasks) == 1  # the socket is full: a writer waits for room
        async with trio.open_nursery() as flushing:
            flushing.start_soon(peer.flush)
            assert await remote.frames(len(frames)) == frames
        await trio.testing.wait_all_tasks_blocked()
        assert not nursery.child_tasks  # everything written: the writer ended
        peer.send_nowait(message(1))  # written through again
        assert await remote.frames(1) == [message(1)]
        await peer.aclose()
        await remote.read_until_eof()  # closed


async def test_start_inline_peer_close_ends_its_tasks() -> None:
    # Over a stream that is not written through the writer runs for the peer's life; both
    # ways of closing the peer end it (the nursery would not exit otherwise).
    for forcefully in (False, True):
        ours, theirs = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            peer = start_inline_peer(nursery, ours)
            assert len(nursery.child_tasks) == 1
            remote = Remote(theirs)
            await remote.send(message(1))
            assert await peer.receive_batch() == [message(1)]
            await peer.send(message(2))
            assert await remote.frames(1) == [message(2)]
            if forcefully:
                await trio.aclose_forcefully(peer)
            else:
                await peer.aclose()
            assert peer.closed
        with pytest.raises(ConnectionLost):
            await peer.send(message(3))


async def test_inline_socket_peer_write_error_breaks_the_peer() -> None:
    async with (
        tcp_pair() as (server, client),
        open_peer(server, reader_task=False, run_heart_beat_timer=False) as peer,
    ):
        # The other end goes away with a reset: our writes fail.
        client.socket.setsockopt(
            trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        await client.aclose()
        with pytest.raises(ConnectionLost):
            for n in range(100):
                await peer.send(message(n))
                await trio.sleep(0.001)
        with pytest.raises(ConnectionLost):
            await peer.receive()


async def test_inline_socket_watchdog_ends_a_pending_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A TCP peer reads without a cancel scope per read: the watchdog wakes the wait.
    async with (
        tcp_pair() as (server, _client),
        open_peer(server, reader_task=False, run_heart_beat_timer=False) as peer,
        trio.open_nursery() as nursery,
    ):
        peer.set_heart_beat(0, 1000)
        nursery.start_soon(_ticker, peer)
        start = trio.current_time()
        with pytest.raises(HeartbeatTimeout, match="no heart-beat"):
            await peer.receive()
        assert trio.current_time() - start == pytest.approx(2.0)
        with pytest.raises(HeartbeatTimeout):
            await peer.receive()


async def test_inline_socket_cancelled_read_loses_nothing() -> None:
    async with (
        tcp_pair() as (server, client),
        open_peer(server, reader_task=False, run_heart_beat_timer=False) as peer,
    ):
        with trio.move_on_after(0.01) as scope:
            await peer.receive()
        assert scope.cancelled_caught
        await client.send_all(serialize(message(1)))
        assert await peer.receive() == message(1)
        await client.aclose()
        with pytest.raises(ConnectionLost, match="peer closed the connection"):
            await peer.receive()
