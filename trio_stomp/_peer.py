"""The Peer: one STOMP connection over any ``trio.abc.Stream``, on either side.

This module owns the I/O of a connection: a *reader* task (bytes → :class:`FrameParser` →
batches of frames on a bounded memory channel), a *writer* task (a byte-bounded outbound
buffer → one ``send_all`` per batch) and the heart-beat timer (sending EOLs when we have been
silent, declaring the link dead when the peer has been). It is used by the client and by the
broker alike. It never interprets frames (no negotiation, no receipts, no subscriptions: those
belong to the client and the broker) and it never lets a bare ``OSError``,
``trio.BrokenResourceError`` or a lone-exception ``ExceptionGroup`` out: errors surface as
:class:`ConnectionLost`, :class:`HeartbeatTimeout` or :class:`RemoteProtocolError`.

The hot path
------------
- Inbound: one ``receive_some(65536)``, one ``parser.feed`` per chunk, and everything that
  chunk completed goes over the channel as *one* list (``receive_batch()``). There is no
  await per frame.
- Outbound: ``send``/``send_bytes`` append encoded bytes to a list and wake the writer; the
  writer takes *all* pending bytes and writes them with one ``send_all``. A task that sends
  in a loop adds one frame per scheduling round, so while the buffer keeps growing the writer
  lets a few more rounds pass (at most ``COALESCE_ROUNDS``, or until ``COALESCE_BYTES`` or a
  quarter of ``max_send_buffer`` are pending) before writing; a lone frame costs two extra
  rounds. Only the writer ever calls ``send_all``: a cancelled or failed write may have written
  part of a frame, so it breaks the peer (:class:`ConnectionLost` on every later send) instead
  of leaving it half-written. A broker's peers write through instead (below).

Write-through (inline reading over a TCP socket, the broker's mode)
-------------------------------------------------------------------
A broker's session applies a whole batch synchronously, so everything a round queued is known
when the round ends: waking a writer task and letting rounds pass (each with an ``epoll``) only
adds latency to a request/reply round trip and CPU to every message. So a peer with
``reader_task=False`` over a ``trio.SocketStream`` (not on Windows) is written through: sending
only lists the peer (no wake-up), and the listed peers' bytes are written with one
non-blocking ``os.write`` each, by the receiving task before it reads again (its batch's
replies go out first) or, at the latest, at the end of the scheduling round (a
``trio.abc.Instrument``'s ``before_io_wait``, installed once per run: heart-beats, receipts
and deliveries queued by other tasks). Whatever the socket does not take (it is full, the
other end is slow) is handed to a writer task, started then and ending once nothing is left:
it waits for room and writes with ``send_all``, in order, and while it exists queued bytes
wait for it. So most of the time a written-through peer has no task of its own. The byte
bound and back-pressure are the same as with a writer task. A write error breaks the peer
like a failed ``send_all``. A write cannot be cancelled, so it never leaves half a frame.

Bounds and back-pressure
------------------------
- Outbound is bounded in *bytes*: ``send`` waits while ``max_send_buffer`` bytes or more are
  queued (and ``*_nowait`` raises ``trio.WouldBlock``). One frame is always accepted into a
  buffer below the bound, so a frame larger than the bound still goes out. At most
  ``max_send_buffer`` (plus one frame) is queued while the writer has one batch in flight.
- Inbound is bounded in *batches* (``max_receive_batches`` lists, each at most one 64 KiB
  chunk's frames). When the channel is full the reader stops reading, TCP's window fills and
  the remote sender is pushed back.

Heart-beats and our own stalls
------------------------------
``set_heart_beat(send_every_ms, expect_every_ms)`` turns heart-beating on. We write one EOL
when nothing was written for ``send_every_ms``. The watchdog declares the link dead
(:class:`HeartbeatTimeout`) when no byte arrived for ``expect_every_ms * heart_beat_tolerance``.

The trap (see trio-websocket's back-pressure notes) is a slow application: when nobody drains
the inbound channel, the reader stops reading, and the peer's heart-beats sit unread in the
kernel. We do **not** keep reading into an unbounded buffer to see them. Instead, while the
reader is blocked on a full inbound channel it is *stalled*, and the watchdog is suspended:
the silence is ours, not the peer's (we know it sent data: we hold a full batch of it). When
the application catches up, the reader resumes, and the peer gets a fresh
``expect_every_ms * tolerance`` window from that moment. A dead link that was hidden behind
our own stall is therefore detected at most one window after we start reading again. The
heart-beat *sender* is independent of the reader and keeps beating during the stall, so the
peer does not drop us either.

By default each peer runs a small heart-beat task. A server with thousands of connections may
pass ``run_heart_beat_timer=False`` and call :meth:`Peer.check_heart_beat` from one shared
ticker instead.

Inline reading (``reader_task=False``, the broker's mode)
---------------------------------------------------------
A server whose one receiving task applies each batch synchronously gains nothing from a
reader task and a channel: they only cost memory per connection (a task, a channel, a
nursery). With ``reader_task=False`` there is no reader task: :meth:`Peer.receive_batch`
itself does ``receive_some`` + ``parser.feed`` in the caller's task, and only the writer task
runs beside it, under its own cancel scope, in the ``open_peer`` nursery or, with
:func:`start_inline_peer`, in a nursery the server already has (then the peer has no nursery
and no context manager of its own: less memory per connection); written through, the writer
runs only while the socket is full. Only one task may receive at a time (a second concurrent
receive raises ``trio.BusyResourceError``).

Liveness: ``last_received`` is updated on each read. The watchdog only counts silence while
the application is *inside* a receive: between two receives (while it routes, or pushes back
on its client by not reading) the silence is ours, exactly as a stalled reader task's is, so
the watchdog is suspended, and the next receive gives the peer a fresh
``expect_every_ms * tolerance`` window. When the watchdog fires it cancels the pending read,
and that receive raises :class:`HeartbeatTimeout`. Heart-beats must come from a shared
ticker (``run_heart_beat_timer=False``).

Over a TCP socket (not on Windows) the inline read skips ``receive_some``: it waits with
``trio.lowlevel.wait_readable`` and reads with one non-blocking ``os.read``. Per read that
saves a cancel scope, two context managers and a ``recv`` that fails with ``EAGAIN`` before
the wait: about a third of the broker's instructions per request/reply round trip. The
watchdog then ends the pending wait with ``trio.lowlevel.notify_closing`` instead of a cancel
scope: the peer is dead by then, and its stream is closed when ``open_peer`` exits.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import attrs
import trio

from ._codec import FrameParser, serialize
from ._errors import ConnectionLost, HeartbeatTimeout, RemoteProtocolError, StompError
from ._frames import Frame
from ._util import unwrap_lone_exception

__all__ = ["Peer", "PeerStatistics", "open_peer", "start_inline_peer"]

#: Bytes asked of the stream per read.
RECEIVE_SIZE = 65536
#: The writer waits at most this many scheduling rounds for more frames before a send_all...
COALESCE_ROUNDS = 32
#: ... and stops waiting once this many bytes are pending.
COALESCE_BYTES = 65536

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
#: Inline reading: unread bytes dropped on close, at most (what a reader task's channel of
#: four batches would have read ahead).
_DISCARD_BYTES = 4 * RECEIVE_SIZE


@attrs.frozen
class PeerStatistics:
    """A snapshot of one peer's counters, from :meth:`Peer.statistics`.

    Attributes:
      bytes_in: bytes read from the stream (heart-beats included).
      bytes_out: bytes written to the stream (heart-beats included).
      frames_in: frames received (heart-beats excluded).
      frames_out: frames queued for sending (``send_bytes(..., frames=n)`` counts ``n``).
      heart_beats_out: heart-beat EOLs we queued.
      send_buffer_used: bytes queued and not yet handed to the writer's ``send_all``.
      receive_batches_buffered: batches the reader parsed that nobody has received yet.
      reader_stalled: the reader is waiting for the application to drain the inbound channel.
    """

    bytes_in: int
    bytes_out: int
    frames_in: int
    frames_out: int
    heart_beats_out: int
    send_buffer_used: int
    receive_batches_buffered: int
    reader_stalled: bool


@attrs.define(eq=False, init=False)
class Peer(trio.abc.AsyncResource):
    """One STOMP connection. Made by :func:`open_peer` (or :func:`start_inline_peer`), never
    directly. An ``AsyncResource``: ``trio.aclose_forcefully(peer)`` closes it at once.

    Safe to share between tasks: several tasks may send at once (frames are never interleaved:
    each ``send`` queues whole frames) and several may receive (each frame goes to exactly one).
    """

    _stream: trio.abc.Stream
    _parser: FrameParser
    _version: str
    _send_limit: int
    _tolerance: float
    _run_timer: bool
    # outbound
    _pending: list[bytes]
    _pending_bytes: int
    _enqueued_total: int
    _written_total: int
    _writing: bool
    # Set to wake the writer task (None when written through: no persistent writer).
    _writer_wake: trio.Event | None
    # write-through (inline reading over a socket): the socket, and the run's list of peers
    # to write when the applying task reads again (None: no write-through)
    _socket: trio.socket.SocketType | None
    _end_of_round: _EndOfRound | None
    _listed: bool
    # Made only when a task has to wait (most connections never do: less memory).
    _space: trio.Event | None
    _progress: trio.Event | None
    _send_error: StompError | None
    # inbound (the channel is None with inline reading; the inbox exists only while a
    # split batch has frames left)
    _batches_in: trio.MemorySendChannel[list[Frame]] | None
    _batches_out: trio.MemoryReceiveChannel[list[Frame]] | None
    _inbox: deque[Frame] | None
    _receive_error: StompError | None
    _reader_stalled: bool
    _reading: bool
    _read_scope: trio.CancelScope | None
    # heart-beats
    _send_every: float
    _expect_every: float
    _last_sent: float
    _last_received: float
    _clock: trio.abc.Clock
    _timer_started: bool
    _timer_sleep: trio.CancelScope | None
    # lifetime
    _io_nursery: trio.Nursery | None
    _writer_scope: trio.CancelScope | None
    _nursery: trio.Nursery | None  # where the tasks of inline reading run
    _closed: bool
    # counters
    _bytes_in: int
    _bytes_out: int
    _frames_in: int
    _frames_out: int
    _heart_beats_out: int

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        version: str,
        max_receive_batches: int,
        max_send_buffer: int,
        heart_beat_tolerance: float,
        run_heart_beat_timer: bool,
        parser_limits: dict[str, Any],
        reader_task: bool = True,
    ) -> None:
        if max_send_buffer < 1:
            raise ValueError(f"max_send_buffer must be >= 1, not {max_send_buffer}")
        if heart_beat_tolerance < 1.0:
            raise ValueError(f"heart_beat_tolerance must be >= 1.0, not {heart_beat_tolerance}")
        if not reader_task and run_heart_beat_timer:
            raise ValueError("reader_task=False needs run_heart_beat_timer=False")
        self._stream = stream
        self._parser = FrameParser(version, **parser_limits)
        self._version = version
        self._send_limit = max_send_buffer
        self._tolerance = heart_beat_tolerance
        self._run_timer = run_heart_beat_timer
        self._pending = []
        self._pending_bytes = 0
        self._enqueued_total = 0
        self._written_total = 0
        self._writing = False
        self._socket = None
        self._end_of_round = None
        self._listed = False
        if not reader_task and isinstance(stream, trio.SocketStream) and sys.platform != "win32":
            self._socket = stream.socket
            self._end_of_round = _end_of_round()
            self._writer_wake = None
        else:
            self._writer_wake = trio.Event()
        self._space = None
        self._progress = None
        self._send_error = None
        if reader_task:
            self._batches_in, self._batches_out = trio.open_memory_channel[list[Frame]](
                max_receive_batches
            )
        else:
            self._batches_in = self._batches_out = None
        # Frames of a batch that ``receive()`` split: at most one batch, so bounded.
        self._inbox = None
        self._receive_error = None
        self._reader_stalled = False
        self._reading = False
        self._read_scope = None
        # The run's clock, bound once: ``trio.current_time()`` is three calls, this one.
        self._clock = trio.lowlevel.current_clock()
        now = self._clock.current_time()
        self._send_every = 0.0
        self._expect_every = 0.0
        self._last_sent = now
        self._last_received = now
        self._timer_started = False
        self._timer_sleep = None
        self._io_nursery = None
        self._writer_scope = None
        self._nursery = None
        self._closed = False
        self._bytes_in = self._bytes_out = 0
        self._frames_in = self._frames_out = self._heart_beats_out = 0

    # ----------------------------------------------------------------- properties

    @property
    def stream(self) -> trio.abc.Stream:
        """The underlying stream (do not read from or write to it directly)."""
        return self._stream

    @property
    def version(self) -> str:
        """The protocol version used to escape and unescape headers in both directions."""
        return self._version

    @version.setter
    def version(self, version: str) -> None:
        self._parser.version = version  # validates
        self._version = version

    @property
    def last_received(self) -> float:
        """``trio.current_time()`` when the last byte arrived (or the reader last resumed)."""
        return self._last_received

    @property
    def heart_beat(self) -> tuple[int, int]:
        """The current ``(send_every_ms, expect_every_ms)``; 0 means off."""
        return (round(self._send_every * 1000), round(self._expect_every * 1000))

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` started or the peer was torn down."""
        return self._closed

    def statistics(self) -> PeerStatistics:
        """Return a snapshot of this peer's counters. Never blocks."""
        return PeerStatistics(
            bytes_in=self._bytes_in,
            bytes_out=self._bytes_out,
            frames_in=self._frames_in,
            frames_out=self._frames_out,
            heart_beats_out=self._heart_beats_out,
            send_buffer_used=self._pending_bytes,
            receive_batches_buffered=(
                0
                if self._batches_out is None
                else self._batches_out.statistics().current_buffer_used
            ),
            reader_stalled=self._reader_stalled,
        )

    # ----------------------------------------------------------------- sending

    def _raise_if_cannot_send(self) -> None:
        if self._send_error is not None:
            _reraise(self._send_error)

    def _enqueue(self, data: bytes, frames: int) -> None:
        self._pending.append(data)
        n = len(data)
        self._pending_bytes += n
        self._enqueued_total += n
        self._frames_out += frames
        wake = self._writer_wake
        if wake is not None:
            wake.set()
        elif not self._listed:
            self._listed = True
            assert self._end_of_round is not None
            self._end_of_round.peers.append(self)

    async def send(self, frame: Frame) -> None:
        """Serialize ``frame`` for the current version and queue it for writing.

        Blocks while ``max_send_buffer`` bytes or more are queued (back-pressure from a slow
        stream). Returning means *queued*, not written: use :meth:`flush` to wait for the
        write. Cancellation-atomic: if cancelled, nothing was queued.

        Raises:
          LocalProtocolError: the frame cannot be encoded in this version.
          ConnectionLost: the connection is closed or broken (:class:`HeartbeatTimeout` when
            the watchdog declared it dead).
        """
        await self.send_bytes(serialize(frame, self._version))

    def send_nowait(self, frame: Frame) -> None:
        """Like :meth:`send`, but raise ``trio.WouldBlock`` instead of waiting for room."""
        self.send_bytes_nowait(serialize(frame, self._version))

    async def send_bytes(self, data: bytes, *, frames: int = 1) -> None:
        """Queue already-encoded frames (``frames`` of them, for the statistics).

        The caller vouches that ``data`` holds whole frames encoded for :attr:`version`.
        Blocks, raises and is cancellation-atomic like :meth:`send`.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._raise_if_cannot_send()
        if self._pending_bytes < self._send_limit:
            self._enqueue(data, frames)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        while True:
            if self._space is None:
                self._space = trio.Event()
            await self._space.wait()
            self._raise_if_cannot_send()
            if self._pending_bytes < self._send_limit:
                self._enqueue(data, frames)
                return

    def send_bytes_nowait(self, data: bytes, *, frames: int = 1) -> None:
        """Like :meth:`send_bytes`, but raise ``trio.WouldBlock`` instead of waiting.

        Raises:
          trio.WouldBlock: ``max_send_buffer`` bytes or more are already queued.
          ConnectionLost: the connection is closed or broken.
        """
        # The broker's per-delivery path: _raise_if_cannot_send and _enqueue inlined (two
        # calls fewer: 527 -> 410 ns per call). Keep in step with those two.
        if self._send_error is not None:
            _reraise(self._send_error)
        if self._pending_bytes >= self._send_limit:
            raise trio.WouldBlock
        self._pending.append(data)
        n = len(data)
        self._pending_bytes += n
        self._enqueued_total += n
        self._frames_out += frames
        wake = self._writer_wake
        if wake is not None:
            wake.set()
        elif not self._listed:
            self._listed = True
            assert self._end_of_round is not None
            self._end_of_round.peers.append(self)

    async def flush(self) -> None:
        """Wait until every byte queued before this call was handed to the stream.

        Blocks as long as the stream does not accept the bytes; bound it with the caller's
        cancel scope.

        Raises:
          ConnectionLost: the connection broke before everything was written.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        target = self._enqueued_total
        if self._written_total >= target:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        while self._written_total < target:
            self._raise_if_cannot_send()
            if self._progress is None:
                self._progress = trio.Event()
            await self._progress.wait()

    async def _writer(self) -> None:
        """The writer task of a peer that is not written through: waits for queued bytes
        and writes them, a batch per ``send_all``, until the peer dies."""
        while True:
            if not self._pending:
                self._writer_wake = wake = trio.Event()
                await wake.wait()
                continue
            # Coalesce: a task sending in a loop adds one frame per scheduling round (each
            # send is a checkpoint). While the buffer keeps growing, give the senders a few
            # more rounds, so that one send_all carries many frames instead of one each.
            # A lone frame (nothing more arrives) is written after two rounds.
            # (Two quiet rounds, not one: trio runs each round's tasks in a random order, so
            # one round without growth is often just the sender being scheduled after us.)
            # Never wait near the bound: a full buffer would push senders back (and a broker
            # would take its subscriber for a slow consumer) only because we were waiting.
            enough = min(COALESCE_BYTES, self._send_limit // 4)
            quiet = 0
            for _ in range(COALESCE_ROUNDS):
                if self._pending_bytes >= enough:
                    break
                before = self._enqueued_total
                await trio.lowlevel.cancel_shielded_checkpoint()
                if self._enqueued_total == before:
                    quiet += 1
                    if quiet == 2:
                        break
                else:
                    quiet = 0
            if not self._pending:
                continue  # the peer broke meanwhile (its pending bytes were dropped)
            if not await self._write_pending():
                return

    async def _drain(self) -> None:
        """Write-through: the writer task, started only when the socket refused bytes (it
        is full). Writes them and whatever was queued meanwhile with ``send_all``, in
        order, and ends when nothing is left; :meth:`_die` cancels its scope. ``_writing``
        is True from the moment it is started until it ends, so that nothing is written
        through past it."""
        try:
            with trio.CancelScope() as self._writer_scope:
                while self._pending:
                    if not await self._write_pending():
                        break
        finally:
            self._writer_scope = None
            self._writing = False

    async def _write_pending(self) -> bool:
        """Write everything queued with one ``send_all``; False if that broke the peer."""
        pending = self._pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        n = self._pending_bytes
        self._pending = []
        self._pending_bytes = 0
        space = self._space
        if space is not None:
            self._space = None
            space.set()
        self._writing = True
        written = False
        try:
            await self._stream.send_all(data)
            written = True
        except _STREAM_ERRORS as exc:
            # A connection we cannot write to is dead both ways: stop the reader too
            # (frames it already parsed are still delivered, then the error).
            error = _lost(exc)
            error.__cause__ = exc
            self._die(error)
            return False
        finally:
            self._writing = False
            if not written:
                # Cancelled mid-write: part of a frame may be on the wire.
                self._break_send(ConnectionLost("connection closed while writing"), None)
        self._wrote(n)
        return True

    def _wrote(self, n: int) -> None:
        self._written_total += n
        self._bytes_out += n
        self._last_sent = self._clock.current_time()
        progress = self._progress
        if progress is not None:
            self._progress = None
            progress.set()

    def _write_through(self) -> bool:
        """Write what is queued now, with one non-blocking write; what the socket does not
        take is left to the writer. Never blocks. Returns True if it woke a task."""
        self._listed = False
        pending = self._pending
        if not pending or self._writing or self._send_error is not None:
            # Nothing to do, or the writer takes it after its current write.
            return False
        assert self._socket is not None
        fd = self._socket.fileno()
        if fd < 0:
            return False
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            error = _lost(exc)
            error.__cause__ = exc
            self._die(error)
            return True
        woke = False
        if n == len(data):
            self._pending = []
            self._pending_bytes = 0
        else:
            # The socket is full: a writer task waits until it can take the rest.
            self._pending = [data[n:]]
            self._pending_bytes -= n
            # (From the Instrument this runs outside any task: the writer then starts with
            # the run's context variables, not the session's; it uses none.)
            assert self._nursery is not None
            self._writing = True
            try:
                self._nursery.start_soon(self._drain)
            except RuntimeError as exc:  # the nursery is closed: nobody owns this peer now
                self._writing = False
                error = ConnectionLost("connection closed")
                error.__cause__ = exc
                self._die(error)
            woke = True
        if n:
            space = self._space
            if space is not None:
                self._space = None
                space.set()
                woke = True
            if self._progress is not None:
                woke = True
            self._wrote(n)
        return woke

    def _break_send(self, error: StompError, cause: BaseException | None) -> None:
        if self._send_error is None:
            if cause is not None:
                error.__cause__ = cause
            self._send_error = error
        # Wake everyone waiting for room or progress: they will see the error.
        if self._space is not None:
            self._space.set()
        if self._progress is not None:
            self._progress.set()
        self._pending = []
        self._pending_bytes = 0

    # ----------------------------------------------------------------- receiving

    async def receive(self) -> Frame:
        """Return the next frame from the peer (heart-beats are filtered out).

        Blocks until a frame arrives. Cancellation-atomic: if cancelled, no frame was lost.
        Frames that arrived before the connection ended are delivered first.

        Raises:
          ConnectionLost: the peer closed the connection ("peer closed the connection"), the
            stream broke, or we closed it.
          HeartbeatTimeout: the watchdog declared the link dead.
          RemoteProtocolError: the peer sent something that is not STOMP.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        inbox = self._inbox
        if inbox:
            frame = inbox.popleft()
            if not inbox:
                self._inbox = None
            await trio.lowlevel.cancel_shielded_checkpoint()
            return frame
        batch = await self._next_batch()
        if len(batch) > 1:
            self._inbox = deque(batch)
            return self._inbox.popleft()
        return batch[0]

    def receive_batch(self) -> Coroutine[Any, Any, list[Frame]]:
        """Return every frame that one received chunk held (at least one frame).

        This is the hot path's receive: one await per chunk, not per frame. Blocks, raises and
        is cancellation-atomic like :meth:`receive`. Use it as ``await peer.receive_batch()``:
        it is a plain method that returns the coroutine that does the work (with inline
        reading, the read itself: one coroutine frame fewer per connection while it waits).
        """
        if self._inbox is None and self._batches_out is None:
            return self._read_inline()
        return self._receive_batch()

    async def _receive_batch(self) -> list[Frame]:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._inbox:
            batch = list(self._inbox)
            self._inbox = None
            await trio.lowlevel.cancel_shielded_checkpoint()
            return batch
        return await self._next_batch()

    async def _next_batch(self) -> list[Frame]:
        if self._batches_out is None:
            return await self._read_inline()
        try:
            return await self._batches_out.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            pass
        error = self._receive_error
        if error is None:
            error = self._send_error or ConnectionLost("connection closed")
        _reraise(error)

    async def _read_inline(self) -> list[Frame]:
        """Inline reading: read and parse in the caller's task until a chunk completes at
        least one frame. Cancellation-atomic: ``receive_some`` loses nothing when
        cancelled, and parsing does not await.

        Over a TCP socket: wait until it is readable, then one non-blocking ``os.read``.
        The same as ``receive_some`` without, per read, a cancel scope, two context
        managers, and a ``recv`` that fails with ``EAGAIN`` before the wait. :meth:`_die`
        wakes a pending wait with ``trio.lowlevel.notify_closing`` (the peer is dead: the
        stream is only closed afterwards). A cancelled wait has read nothing. (One
        coroutine, not one per kind of stream: each is a frame per idle connection.)"""
        await trio.lowlevel.checkpoint_if_cancelled()
        end_of_round = self._end_of_round
        if end_of_round is not None and end_of_round.peers:
            # Write what the last batch queued before reading, not after.
            end_of_round.write()
        # The silence before this call was ours (see "Inline reading").
        now = self._clock.current_time()
        if now > self._last_received:
            self._last_received = now
        data: bytes | bytearray
        sock = self._socket
        while sock is not None:
            error = self._receive_error
            if error is not None:
                _reraise(error)
            fd = sock.fileno()
            if fd < 0:
                self._fail_receive(ConnectionLost("connection closed"), None)
                continue
            self._reading = True
            try:
                await trio.lowlevel.wait_readable(fd)  # (the fd: no second fileno())
                data = os.read(fd, RECEIVE_SIZE)
            except BlockingIOError:
                continue
            except _STREAM_ERRORS as exc:
                self._fail_receive(_lost(exc), exc)
                continue
            finally:
                self._reading = False
            if self._receive_error is not None:
                continue  # the watchdog or the writer broke the peer while we waited
            frames = self._take_in(data)
            if frames:
                return frames
        stream = self._stream
        while True:
            error = self._receive_error
            if error is not None:
                _reraise(error)
            self._reading = True
            try:
                with trio.CancelScope() as self._read_scope:  # _die cancels it
                    try:
                        data = await stream.receive_some(RECEIVE_SIZE)
                    except _STREAM_ERRORS as exc:
                        self._fail_receive(_lost(exc), exc)
                        continue
            finally:
                self._reading = False
                self._read_scope = None
            if self._receive_error is not None:
                continue  # the watchdog or the writer broke the peer while we waited
            frames = self._take_in(data)
            if frames:
                return frames

    def __aiter__(self) -> Peer:
        return self

    async def __anext__(self) -> Frame:
        """``async for frame in peer``: :meth:`receive` in a loop; raises what it raises."""
        return await self.receive()

    async def _reader(self) -> None:
        stream = self._stream
        assert self._batches_in is not None
        with self._batches_in as channel:
            while True:
                try:
                    data = await stream.receive_some(RECEIVE_SIZE)
                except _STREAM_ERRORS as exc:
                    self._fail_receive(_lost(exc), exc)
                    return
                frames = self._take_in(data)
                if frames is None:
                    return
                if not frames:
                    continue
                try:
                    channel.send_nowait(frames)
                except trio.WouldBlock:
                    # The application is behind: stop reading (TCP pushes back) and suspend
                    # the watchdog, as the module docstring explains.
                    self._reader_stalled = True
                    try:
                        await channel.send(frames)
                    except trio.BrokenResourceError:
                        return
                    finally:
                        self._reader_stalled = False
                        self._last_received = trio.current_time()
                except trio.BrokenResourceError:
                    return

    def _take_in(self, data: bytes | bytearray) -> list[Frame] | None:
        """Account for one received chunk and parse it (both reading modes share this).

        Returns the frames it completed (possibly none), or ``None`` when the peer is now
        broken: end of stream or a protocol error, recorded for ``receive()`` to raise.
        """
        self._last_received = self._clock.current_time()
        if data.__class__ is not bytes:
            data = bytes(data)  # e.g. a bytearray from a memory stream
        try:
            events = self._parser.feed(data)
        except RemoteProtocolError as exc:
            self._fail_receive(exc, None)
            return None
        if not data:
            self._fail_receive(ConnectionLost("peer closed the connection"), None)
            return None
        self._bytes_in += len(data)
        frames: list[Frame]
        if len(events) == 1 and events[0].__class__ is Frame:
            # The common chunk: one frame, no heart-beat (no list to make).
            frames = events  # type: ignore[assignment]
        else:
            frames = [event for event in events if isinstance(event, Frame)]
        self._frames_in += len(frames)
        return frames

    def _fail_receive(self, error: StompError, cause: BaseException | None) -> None:
        if self._receive_error is None:
            if cause is not None:
                error.__cause__ = cause
            self._receive_error = error

    # ----------------------------------------------------------------- heart-beats

    def set_heart_beat(self, send_every_ms: int, expect_every_ms: int) -> None:
        """Start, replace or stop (``0, 0``) heart-beating. Never blocks.

        ``send_every_ms``: write an EOL whenever nothing was written for that long.
        ``expect_every_ms``: declare the link dead (:class:`HeartbeatTimeout`, raised by every
        later :meth:`receive` and :meth:`send`) when nothing arrived for that long times
        ``heart_beat_tolerance``. The watchdog's clock starts now.
        """
        if send_every_ms < 0 or expect_every_ms < 0:
            raise ValueError("heart-beat intervals must be >= 0")
        self._send_every = send_every_ms / 1000
        self._expect_every = expect_every_ms / 1000
        now = trio.current_time()
        self._last_received = max(self._last_received, now)
        if not self._run_timer:
            return
        if self._timer_sleep is not None:
            self._timer_sleep.cancel()
        elif (
            not self._timer_started
            and (send_every_ms or expect_every_ms)
            and self._io_nursery is not None
        ):
            self._timer_started = True
            self._io_nursery.start_soon(self._heart_beat_timer)

    def check_heart_beat(self, now: float | None = None) -> float:
        """Do the heart-beat work due at ``now`` and return when it is next due.

        Queues an EOL when we have been silent for ``send_every_ms``; breaks the peer with
        :class:`HeartbeatTimeout` when the peer has been silent too long. Returns the
        ``trio.current_time()`` at which to call again (``math.inf``: never). Called by the
        peer's own timer task, or by a shared ticker when ``run_heart_beat_timer=False``.
        Never blocks.
        """
        if now is None:
            now = trio.current_time()
        if self._closed or self._send_error is not None:
            return math.inf
        deadline = math.inf
        if self._expect_every:
            window = self._expect_every * self._tolerance
            if self._reader_stalled or (self._batches_out is None and not self._reading):
                deadline = now + window
            else:
                limit = self._last_received + window
                if now >= limit:
                    self._die(
                        HeartbeatTimeout(
                            f"no heart-beat from the peer for {now - self._last_received:.3f} s "
                            f"(expected one every {self._expect_every:.3f} s, tolerance "
                            f"x{self._tolerance:g})"
                        )
                    )
                    return math.inf
                deadline = limit
        if self._send_every:
            due = self._last_sent + self._send_every
            if now >= due:
                if not self._pending and not self._writing:
                    self._enqueue(b"\n", 0)
                    self._heart_beats_out += 1
                due = now + self._send_every
            deadline = min(deadline, due)
        return deadline

    async def _heart_beat_timer(self) -> None:
        while True:
            deadline = self.check_heart_beat()
            with trio.CancelScope(deadline=deadline) as self._timer_sleep:
                await trio.sleep_forever()
            self._timer_sleep = None

    # ----------------------------------------------------------------- lifetime

    def _die(self, error: StompError) -> None:
        """Break both directions with ``error`` and stop the I/O tasks. Never blocks."""
        self._fail_receive(error, None)
        self._break_send(error, None)
        if self._io_nursery is not None:
            self._io_nursery.cancel_scope.cancel()
        if self._writer_scope is not None:
            self._writer_scope.cancel()
        if self._read_scope is not None:
            self._read_scope.cancel()
        if self._reading and self._socket is not None:
            trio.lowlevel.notify_closing(self._socket)  # wakes _read_inline's wait

    async def _run_io(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._io_nursery = nursery
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer)
                task_status.started()
        finally:
            self._io_nursery = None

    def _attach(self, nursery: trio.Nursery) -> None:
        """Inline reading: run this peer's tasks in ``nursery`` (no nursery of its own): the
        writer for the peer's life, or, written through, only while the socket is full."""
        self._nursery = nursery
        if self._writer_wake is not None:
            nursery.start_soon(self._run_writer)

    async def _run_writer(self) -> None:
        """Inline reading, not written through: the writer alone, in the nursery given to
        :meth:`_attach`; :meth:`_die` cancels its scope."""
        with trio.CancelScope() as self._writer_scope:
            if self._send_error is not None:
                return
            await self._writer()
        self._writer_scope = None

    def _shut(self) -> None:
        self._closed = True
        self._die(ConnectionLost("connection closed"))

    async def _discard_unread(self) -> None:
        """Inline reading, on close: read and drop the bytes that already arrived (at most
        ``_DISCARD_BYTES``). Closing a TCP socket with unread data resets the connection,
        and the reset can destroy our last frames (an ERROR) before the peer reads them; a
        reader task would have read those bytes already. Never waits for more bytes: a
        read that has to wait is cancelled by a task started alongside it, which runs one
        scheduling round later (no clock involved, so a mock clock that stands still is
        fine)."""
        nursery = self._nursery
        if nursery is None:
            return
        discarded = 0
        while discarded < _DISCARD_BYTES:
            with trio.CancelScope() as scope:
                nursery.start_soon(_cancel, scope)
                data = await self._stream.receive_some(RECEIVE_SIZE)
            if scope.cancelled_caught or not data:
                return
            discarded += len(data)

    async def aclose(self) -> None:
        """Flush what is queued, then close the stream. Idempotent.

        The flush waits for the stream to accept the bytes: bound it with the caller's cancel
        scope (if cancelled, the stream is closed forcefully). Never raises
        :class:`ConnectionLost` (a broken connection is simply closed).
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        flushed = False
        try:
            try:
                await self.flush()
                flushed = True
            except ConnectionLost:
                pass
        finally:
            self._shut()
            if flushed:
                try:
                    try:
                        if self._batches_out is None:
                            await self._discard_unread()
                    finally:
                        await self._stream.aclose()
                except _STREAM_ERRORS:
                    pass
            else:
                await trio.aclose_forcefully(self._stream)


class _EndOfRound(trio.abc.Instrument):
    """Write-through: at the end of each scheduling round (trio's ``before_io_wait``), write
    what each listed peer queued during the round (see "Write-through")."""

    __slots__ = ("_token", "peers")

    def __init__(self) -> None:
        #: Peers with bytes queued this round; each listed at most once, cleared each round.
        self.peers: list[Peer] = []
        self._token = trio.lowlevel.current_trio_token()

    def write(self) -> bool:
        """Write every listed peer's queued bytes; True if that woke a task."""
        woke = False
        for peer in self.peers:
            if peer._write_through():
                woke = True
        self.peers.clear()
        return woke

    def before_io_wait(self, timeout: float) -> None:
        if self.peers and self.write() and timeout > 0:
            # A task we woke is runnable, but trio computed this wait's timeout before us:
            # make the wait return at once.
            self._token.run_sync_soon(_nothing)


def _nothing() -> None:
    pass


_END_OF_ROUND: trio.lowlevel.RunVar[_EndOfRound] = trio.lowlevel.RunVar("trio_stomp_end_of_round")


def _end_of_round() -> _EndOfRound:
    try:
        return _END_OF_ROUND.get()
    except LookupError:
        instrument = _EndOfRound()
        trio.lowlevel.add_instrument(instrument)
        _END_OF_ROUND.set(instrument)
        return instrument


async def _cancel(scope: trio.CancelScope) -> None:
    scope.cancel()


def _lost(exc: BaseException) -> ConnectionLost:
    if isinstance(exc, trio.ClosedResourceError):
        return ConnectionLost("connection closed")
    return ConnectionLost(f"connection broken: {exc!r}")


def _reraise(error: StompError) -> NoReturn:
    # A fresh copy per raise, so tracebacks do not pile up on one shared instance; the
    # original (with its own cause and traceback) is chained for the reader.
    raise copy.copy(error) from error


@asynccontextmanager
async def open_peer(
    stream: trio.abc.Stream,
    *,
    version: str = "1.2",
    max_receive_batches: int = 4,
    max_send_buffer: int = 1 << 20,
    heart_beat_tolerance: float = 2.0,
    run_heart_beat_timer: bool = True,
    reader_task: bool = True,
    **parser_limits: Any,
) -> AsyncIterator[Peer]:
    """Run a :class:`Peer` over ``stream`` for the duration of the block.

    Args:
      stream: any ``trio.abc.Stream`` (TCP, TLS, a memory stream, a WebSocket adapter).
        The peer owns it from now on and closes it on exit.
      version: the protocol version for escaping in both directions; set
        :attr:`Peer.version` after negotiation.
      max_receive_batches: capacity of the inbound channel, in batches (one batch = the
        frames of one received chunk of at most 64 KiB).
      max_send_buffer: bound of the outbound buffer, in bytes.
      heart_beat_tolerance: the watchdog fires after ``expect_every_ms`` times this.
      run_heart_beat_timer: run a heart-beat task for this peer (default); pass ``False`` to
        drive :meth:`Peer.check_heart_beat` from a shared ticker.
      reader_task: run a reader task (default). ``False``: inline reading, for a single
        receiving task that applies frames synchronously (the broker); fewer tasks and no
        channel per connection. Needs ``run_heart_beat_timer=False``; ``max_receive_batches``
        is then unused (see the module docstring, "Inline reading").
      **parser_limits: ``max_line_length``, ``max_headers``, ``max_body_size``,
        ``max_frame_size`` for :class:`FrameParser`.

    Resource handling: on normal exit the peer flushes what is queued (bounded by the
    caller's cancel scope) and closes the stream; on exit by exception the stream is closed
    forcefully. The reader, writer and timer tasks never outlive the block.

    Error handling: connection failures are reported by :meth:`Peer.receive` /
    :meth:`Peer.send` as trio_stomp exceptions, never raised out of the block by themselves.
    An exception raised in the block propagates as itself (not wrapped in an
    ``ExceptionGroup``).
    """
    with unwrap_lone_exception():
        async with trio.open_nursery() as nursery:
            peer = Peer(
                stream,
                version=version,
                max_receive_batches=max_receive_batches,
                max_send_buffer=max_send_buffer,
                heart_beat_tolerance=heart_beat_tolerance,
                run_heart_beat_timer=run_heart_beat_timer,
                parser_limits=parser_limits,
                reader_task=reader_task,
            )
            if reader_task:
                await nursery.start(peer._run_io)
            else:
                peer._attach(nursery)
            try:
                yield peer
            except BaseException:
                peer._shut()
                await trio.aclose_forcefully(stream)
                raise
            await peer.aclose()


def start_inline_peer(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    *,
    version: str = "1.2",
    max_send_buffer: int = 1 << 20,
    heart_beat_tolerance: float = 2.0,
    **parser_limits: Any,
) -> Peer:
    """Make an inline-reading :class:`Peer` over ``stream`` whose tasks run in ``nursery``.

    :func:`open_peer` with ``reader_task=False``, for a server that already has a task and a
    nursery per connection: no nursery and no context manager of the peer's own, which is
    memory per connection. The writer task runs in ``nursery``: for the peer's life over a
    stream that is not written through, and over a TCP socket only while the socket
    refuses bytes (see "Write-through"). Heart-beats come from a shared ticker
    (:meth:`Peer.check_heart_beat`). Arguments as :func:`open_peer`. Never blocks.

    Resource handling: the caller owns the peer's end and must close it while ``nursery``
    is open: ``await peer.aclose()`` (flush, bounded by the caller's cancel scope, then
    close) or, on an exception, ``await trio.aclose_forcefully(peer)``. Either stops the
    peer's tasks. A peer that is never closed keeps ``nursery`` open.

    Error handling: as :func:`open_peer`; the peer's tasks never raise into ``nursery``.
    """
    peer = Peer(
        stream,
        version=version,
        max_receive_batches=1,  # unused: no channel with inline reading
        max_send_buffer=max_send_buffer,
        heart_beat_tolerance=heart_beat_tolerance,
        run_heart_beat_timer=False,
        parser_limits=parser_limits,
        reader_task=False,
    )
    peer._attach(nursery)
    return peer
