"""A STOMP load generator that shares no code with trio_stomp.

This module owns the benchmark *clients*: raw-socket STOMP 1.2 speaking code (pre-encoded
frames, many frames per ``sendall``, a content-length splitter for receiving), the
scenarios of issue 8 (queues with auto and client-individual acks, topics, request/reply
through ``reply-to``, idle connections with heart-beats, and the scaling curves), the
exactly-once / in-order check of every delivery, and the CPU and memory accounting of both
sides (its own worker processes via ``os.times``, the broker via ``/proc/PID``).

It never imports trio_stomp (it must not share our bugs), never talks to anything but
loopback, and every loop in it is bounded in count and in time. Producers and consumers run
in separate processes (``fork``) so that one Python process is not the bottleneck.

Wire format of the benchmark messages: the body starts with 16 ASCII digits, 4 for the
producer number and 12 for its sequence number, then padding up to the body size. Each
subscription keeps one byte per (producer, sequence) so a duplicate is seen at once, and the
main process merges them to count losses (for queues, across all consumers).

Run it alone against a running broker::

    python benchmarks/loadgen.py --port 61613 --pid BROKER_PID --flavour trio_stomp \\
        --scenario queue_auto --count 50000

or let it start ``python -m trio_stomp.broker`` itself (``--start-broker``). The full
side-by-side run with RabbitMQ is ``benchmarks/run_all.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import multiprocessing.queues
import multiprocessing.synchronize
import os
import queue
import re
import resource
import select
import selectors
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SCENARIOS",
    "Target",
    "raise_nofile_limit",
    "read_cpu_seconds",
    "read_rss_kib",
    "run_idle",
    "run_request_reply",
    "run_throughput",
    "self_test",
    "start_trio_stomp_broker",
]

#: One ``recv`` reads at most this much.
RECV_SIZE = 256 * 1024
#: Width of the producer / sequence number fields at the start of every body.
TAG_SIZE = 16
#: Nothing a worker waits for (connect, subscribe, go) may take longer than this.
SETUP_TIMEOUT = 60.0
#: How long one blocking ``recv`` waits before a reader looks at its deadline again. It is
#: set once on the socket (``SO_RCVTIMEO``), so a read is a single ``recv`` system call: a
#: Python socket timeout would add a ``poll`` and two mode switches to every read, latency
#: that the broker under test does not cause (a request/reply round trip reads twice).
READ_SLICE_US = 100_000
#: How often the main process looks at the workers' progress.
POLL_INTERVAL = 0.005

_CTX = multiprocessing.get_context("fork")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


class StompFailure(RuntimeError):
    """The broker answered with an ERROR frame, closed, or did not answer in time."""


# -- the broker we talk to ----------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A broker under test.

    ``flavour`` decides the few places where brokers differ: RabbitMQ takes
    ``prefetch-count`` and subscribes a ``reply-to: /temp-queue/...`` sender by itself;
    trio_stomp takes ``prefetch`` and wants an explicit SUBSCRIBE to the temp queue.
    """

    label: str
    flavour: str  # "trio_stomp" or "rabbitmq"
    port: int
    pid: int
    host: str = "127.0.0.1"
    login: str = "guest"
    passcode: str = "guest"

    def prefetch_header(self, prefetch: int) -> bytes:
        name = b"prefetch-count" if self.flavour == "rabbitmq" else b"prefetch"
        return b"%s:%d\n" % (name, prefetch)

    @property
    def subscribes_temp_queue(self) -> bool:
        return self.flavour != "rabbitmq"


def read_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def read_run_queue_wait(pid: int) -> float:
    """Seconds the threads of process ``pid`` spent runnable but waiting for a core (from
    /proc/PID/task/*/schedstat): CPU time plus this wait close to the wall time means the
    process was the limit, even when other programs took its cores."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[1])
    return total / 1e9


def read_rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB, from /proc/PID/statm."""
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE_KIB


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's open-files soft limit to the hard limit; return (old, new)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return soft, hard
    return soft, soft


# -- raw STOMP ----------------------------------------------------------------------------


class Splitter:
    """Cuts a byte stream into ``(head, body)`` pairs; ``head`` is the command line and the
    headers (no trailing blank line). Frames with ``content-length`` are cut by length,
    others at the first NUL; EOL heart-beats between frames are skipped. Brokers under test
    write LF line endings; CRLF inside a frame head is not supported."""

    __slots__ = ("_chunks", "_have", "_need")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._have = 0
        self._need = 0  # bytes the incomplete frame at the start of _chunks needs, if known

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []  # a big body still arriving: join once, when it is complete
            buf = b"".join(self._chunks)
            self._chunks.clear()
        else:
            buf = data
        out: list[tuple[bytes, bytes]] = []
        find = buf.find
        n = len(buf)
        pos = 0
        need = 0
        while pos < n:
            c = buf[pos]
            if c == 10:  # heart-beat
                pos += 1
                continue
            if c == 13:
                if pos + 1 < n:
                    pos += 2
                    continue
                break
            end = find(b"\n\n", pos)
            if end < 0:
                break
            cl = find(b"\ncontent-length:", pos, end)
            if cl >= 0:
                eol = find(b"\n", cl + 16, end + 1)
                start = end + 2
                stop = start + int(buf[cl + 16 : eol])
                if stop >= n:
                    need = stop + 1 - pos
                    break
                if buf[stop] != 0:
                    raise StompFailure("frame body not followed by NUL")
            else:
                start = end + 2
                stop = find(b"\0", start)
                if stop < 0:
                    break
            out.append((buf[pos:end], buf[start:stop]))
            pos = stop + 1
        if pos < n:
            rest = buf[pos:]
            self._chunks.append(rest)
            self._have = len(rest)
            self._need = need
        else:
            self._have = self._need = 0
        return out


def self_test() -> None:
    """Check the splitter on every split of a stream of awkward frames (heart-beats between
    frames, a body holding NUL and LF, a frame without content-length, a body larger than a
    chunk); raises AssertionError on a mismatch. Runs in well under a second."""
    frames = [
        (b"MESSAGE\nsubscription:1\ncontent-length:5", b"a\0b\nc"),
        (b"RECEIPT\nreceipt-id:7", b""),
        (b"MESSAGE\ncontent-length:0", b""),
        (b"ERROR\nmessage:x", b"no length"),
        (b"MESSAGE\nack:9\ncontent-length:3000", bytes(range(256)) * 11 + b"z" * 184),
    ]
    stream = b"\n".join(head + b"\n\n" + body + b"\0" for head, body in frames) + b"\r\n"
    # Two pieces cut at every offset; byte by byte and in 7-byte pieces from every 97th.
    cases = [(cut, len(stream)) for cut in range(len(stream) + 1)]
    cases += [(cut, step) for cut in range(0, len(stream), 97) for step in (1, 7)]
    for cut, step in cases:
        splitter = Splitter()
        got = splitter.feed(stream[:cut]) if cut else []
        for i in range(cut, len(stream), step):
            got += splitter.feed(stream[i : i + step])
        assert got == frames, (cut, step, got[:2])


def _header(head: bytes, name: bytes) -> bytes | None:
    """Value of the first ``name`` header in a frame head (no unescaping)."""
    i = head.find(b"\n" + name + b":")
    if i < 0:
        return None
    i += len(name) + 2
    j = head.find(b"\n", i)
    return head[i:] if j < 0 else head[i:j]


class RawConnection:
    """One blocking STOMP 1.2 connection (no trio_stomp code)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.splitter = Splitter()
        self.pending: list[tuple[bytes, bytes]] = []  # frames read past what expect() wanted
        self.connected_head = b""

    @classmethod
    def open(
        cls,
        target: Target,
        *,
        heart_beat: tuple[int, int] = (0, 0),
        timeout: float = SETUP_TIMEOUT,
    ) -> RawConnection:
        sock = socket.create_connection((target.host, target.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        sock.setsockopt(
            socket.SOL_SOCKET,
            socket.SO_RCVTIMEO,
            struct.pack("ll", READ_SLICE_US // 1_000_000, READ_SLICE_US % 1_000_000),
        )
        conn = cls(sock)
        conn.send(conn.connect_frame(target, heart_beat))
        conn.connected_head = conn.expect(b"CONNECTED", time.monotonic() + timeout)[0]
        return conn

    @staticmethod
    def connect_frame(target: Target, heart_beat: tuple[int, int]) -> bytes:
        return (
            b"CONNECT\naccept-version:1.2\nhost:/\nlogin:%s\npasscode:%s\nheart-beat:%d,%d\n\n\0"
            % (target.login.encode(), target.passcode.encode(), *heart_beat)
        )

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, deadline: float) -> list[tuple[bytes, bytes]]:
        """Frames from the next chunk (blocking until ``deadline``, at most one
        ``READ_SLICE_US`` later)."""
        if self.pending:
            frames, self.pending = self.pending, []
            return frames
        if time.monotonic() >= deadline:
            raise StompFailure("timed out waiting for the broker")
        while True:
            try:
                data = self.sock.recv(RECV_SIZE)
                break
            except BlockingIOError:  # READ_SLICE_US passed without a byte
                if time.monotonic() >= deadline:
                    raise StompFailure("timed out waiting for the broker") from None
        if not data:
            raise StompFailure("the broker closed the connection")
        return self.splitter.feed(data)

    def expect(self, command: bytes, deadline: float) -> tuple[bytes, bytes]:
        """Read until a ``command`` frame arrives; keep later frames in ``pending``."""
        while True:
            frames = self.read(deadline)
            for i, (head, body) in enumerate(frames):
                if head.startswith(b"ERROR"):
                    raise StompFailure(f"ERROR from broker: {head!r} {body[:500]!r}")
                if head.startswith(command):
                    self.pending = frames[i + 1 :] + self.pending
                    return head, body

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"DISCONNECT\n\n\0")
        self.sock.close()


def subscribe_frame(
    target: Target, destination: bytes, sub_id: int, ack: str, prefetch: int, receipt: bytes
) -> bytes:
    extra = target.prefetch_header(prefetch) if ack != "auto" else b""
    return b"SUBSCRIBE\nid:%d\ndestination:%s\nack:%s\n%sreceipt:%s\n\n\0" % (
        sub_id,
        destination,
        ack.encode(),
        extra,
        receipt,
    )


# -- workers ------------------------------------------------------------------------------


@dataclass
class _Shared:
    """What the main process and the workers of one run share."""

    ready: multiprocessing.queues.Queue[Any]
    results: multiprocessing.queues.Queue[Any]
    go: multiprocessing.synchronize.Event
    stop: multiprocessing.synchronize.Event
    progress: Any  # RawArray('q'): MESSAGE frames received per subscription
    t_go: Any  # RawArray('d', 1): time.monotonic() of the start


def _worker(role: str, shared: _Shared, fn: Any, *args: Any) -> None:
    """Run ``fn`` in a child; always put exactly one result (or error) on the queue."""
    try:
        result = fn(shared, *args)
        result["role"] = role
        shared.results.put(result)
    except BaseException as exc:
        shared.results.put({"role": role, "error": f"{type(exc).__name__}: {exc}"})
        with contextlib.suppress(BaseException):
            shared.ready.put(("failed", role))


def _wait_go(shared: _Shared) -> None:
    if not shared.go.wait(SETUP_TIMEOUT):
        raise StompFailure("the start signal never came")


def _producer(
    shared: _Shared,
    target: Target,
    destination: bytes,
    producer: int,
    count: int,
    body_size: int,
    batch: int,
    window: int,
    window_subs: Sequence[int],
    deadline_s: float,
) -> dict[str, Any]:
    conn = RawConnection.open(target)
    head = b"SEND\ndestination:%s\ncontent-length:%d\n\n" % (destination, body_size)
    tag = b"%04d" % producer
    tail = b"x" * (body_size - TAG_SIZE) + b"\0"
    progress = shared.progress
    shared.ready.put(("ready", "producer"))
    _wait_go(shared)
    cpu0 = _own_cpu()
    deadline = time.monotonic() + deadline_s
    sendall = conn.sock.sendall
    sent = 0
    waits = 0
    while sent < count:
        if window:
            # Topics: stay at most `window` messages ahead of the slowest subscriber, so
            # the loadgen's own consumers, not the broker, are never the ones dropped.
            while sent - min(progress[i] for i in window_subs) >= window:
                if time.monotonic() > deadline or shared.stop.is_set():
                    raise StompFailure(f"window never opened (sent {sent})")
                waits += 1
                # Not shorter: a polling producer would steal the CPU the broker needs.
                time.sleep(0.001)
        n = min(batch, count - sent)
        sendall(b"".join([head + tag + b"%012d" % s + tail for s in range(sent, sent + n)]))
        sent += n
        if time.monotonic() > deadline:
            raise StompFailure(f"producer ran out of time after {sent} messages")
    t_sent = time.monotonic()
    conn.send(b"DISCONNECT\nreceipt:bye\n\n\0")
    conn.expect(b"RECEIPT", deadline + 10)
    t_confirmed = time.monotonic()
    conn.sock.close()
    return {
        "sent": sent,
        "t_sent": t_sent,
        "t_confirmed": t_confirmed,
        "cpu": _own_cpu() - cpu0,
        "window_waits": waits,
    }


class _SubState:
    __slots__ = ("dups", "errors", "last", "received", "reorders", "seen", "t_first", "t_last")

    def __init__(self, producers: int, count: int) -> None:
        self.seen = [bytearray(count) for _ in range(producers)]
        self.last = [-1] * producers
        self.received = 0
        self.dups = 0
        self.reorders = 0
        self.errors: list[str] = []
        self.t_first = 0.0
        self.t_last = 0.0


def _consumer(
    shared: _Shared,
    target: Target,
    destination: bytes,
    subs: Sequence[int],
    ack: str,
    prefetch: int,
    producers: int,
    count: int,
    expected: int | None,
    deadline_s: float,
) -> dict[str, Any]:
    """Receive on one connection per subscription index in ``subs``.

    ``expected`` is the number of messages each subscription must get (topics); None for a
    queue, where the main process sets ``stop`` when all consumers together have them all.
    """
    conns: list[RawConnection] = []
    for idx in subs:
        conn = RawConnection.open(target)
        conn.send(subscribe_frame(target, destination, idx, ack, prefetch, b"s%d" % idx))
        conn.expect(b"RECEIPT", time.monotonic() + SETUP_TIMEOUT)
        conns.append(conn)
    states = [_SubState(producers, count) for _ in subs]
    sel = selectors.DefaultSelector()
    for i, conn in enumerate(conns):
        sel.register(conn.sock, selectors.EVENT_READ, i)
    progress = shared.progress
    stop = shared.stop
    individual = ack != "auto"
    shared.ready.put(("ready", "consumer"))
    _wait_go(shared)
    cpu0 = _own_cpu()
    deadline = time.monotonic() + deadline_s
    remaining = len(subs) if expected is not None else -1
    timed_out = False
    monotonic = time.monotonic
    while remaining != 0:
        if stop.is_set():
            break
        now = monotonic()
        if now > deadline:
            timed_out = True
            break
        for key, _ in sel.select(0.05):
            i = key.data
            conn = conns[i]
            st = states[i]
            if conn.pending:
                frames, conn.pending = conn.pending, []
            else:
                data = conn.sock.recv(RECV_SIZE)
                if not data:
                    st.errors.append("connection closed by the broker")
                    sel.unregister(conn.sock)
                    remaining -= 1
                    continue
                frames = conn.splitter.feed(data)
            acks: list[bytes] = []
            seen = st.seen
            last = st.last
            for head, body in frames:
                if not head.startswith(b"MESSAGE"):
                    if head.startswith(b"ERROR"):
                        st.errors.append(f"ERROR {head[:300]!r} {body[:300]!r}")
                    continue
                p = int(body[:4])
                s = int(body[4:16])
                row = seen[p]
                if row[s]:
                    st.dups += 1
                else:
                    row[s] = 1
                if s < last[p]:
                    st.reorders += 1
                last[p] = s
                if individual:
                    a = head.find(b"\nack:") + 5
                    e = head.find(b"\n", a)
                    acks.append(b"ACK\nid:" + (head[a:e] if e > 0 else head[a:]) + b"\n\n\0")
            n = len(frames)
            if n:
                now = monotonic()
                if not st.received:
                    st.t_first = now
                st.t_last = now
                st.received += n
                progress[subs[i]] = st.received
                if acks:
                    conn.sock.sendall(b"".join(acks))
                if expected is not None and st.received >= expected:
                    # Topic subscription complete (duplicates would push it past; the
                    # bitmaps tell the main process which).
                    sel.unregister(conn.sock)
                    remaining -= 1
    cpu = _own_cpu() - cpu0
    sel.close()
    for conn in conns:
        conn.close()
    return {
        "timed_out": timed_out,
        "cpu": cpu,
        "subs": [
            {
                "index": idx,
                "received": st.received,
                "dups": st.dups,
                "reorders": st.reorders,
                "errors": st.errors,
                "t_first": st.t_first,
                "t_last": st.t_last,
                "seen": [bytes(row) for row in st.seen],
            }
            for idx, st in zip(subs, states, strict=True)
        ],
    }


# -- running a scenario --------------------------------------------------------------------


@dataclass
class Result:
    """One measured run of one scenario on one broker."""

    scenario: str
    broker: str
    value: float  # the headline figure (msgs/s, deliveries/s, ms, KiB)
    unit: str
    wall_s: float = 0.0
    broker_cpu_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    broker_peak_rss_kib: int = 0
    broker_wait_s: float = 0.0  # runnable but waiting for a core (other programs)
    expected: int = 0
    delivered: int = 0
    lost: int = 0
    duplicates: int = 0
    reordered: int = 0
    errors: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.reordered or self.errors)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["ok"] = self.ok
        d["broker_us_per_message"] = self.broker_us_per_message
        return d

    def summary(self) -> str:
        check = (
            "exactly-once in-order OK"
            if self.ok
            else (
                f"lost={self.lost} dup={self.duplicates} reordered={self.reordered} "
                f"errors={self.errors[:3]}"
            )
        )
        return (
            f"{self.broker:>10} {self.scenario:<22} {self.value:>12,.2f} {self.unit:<14}"
            f" wall {self.wall_s:6.2f}s  broker cpu {self.broker_cpu_s:6.2f}s"
            f" ({self._pct(self.broker_cpu_s)}, waited {self._pct(self.broker_wait_s)})"
            f"  loadgen cpu {self.loadgen_cpu_s:6.2f}s"
            f" ({self._pct(self.loadgen_cpu_s)})  broker {self.broker_us_per_message:.1f} us/msg"
            f"  {check}"
        )

    @property
    def broker_us_per_message(self) -> float:
        """Broker CPU microseconds per delivered message: a figure that, unlike the
        throughput, hardly moves when other processes compete for the cores."""
        return 1e6 * self.broker_cpu_s / self.delivered if self.delivered else float("nan")

    def _pct(self, cpu: float) -> str:
        return f"{100 * cpu / self.wall_s:.0f}%" if self.wall_s > 0 else "-"


def _new_shared(slots: int) -> _Shared:
    return _Shared(
        ready=_CTX.Queue(),
        results=_CTX.Queue(),
        go=_CTX.Event(),
        stop=_CTX.Event(),
        progress=_CTX.RawArray("q", max(slots, 1)),
        t_go=_CTX.RawArray("d", 1),
    )


def _start(shared: _Shared, role: str, fn: Any, *args: Any) -> multiprocessing.process.BaseProcess:
    proc = _CTX.Process(target=_worker, args=(role, shared, fn, *args), daemon=True)
    proc.start()
    return proc


def _await_ready(shared: _Shared, n: int) -> list[str]:
    """Wait for ``n`` ready signals; return error strings of workers that failed."""
    failed = []
    deadline = time.monotonic() + SETUP_TIMEOUT
    for _ in range(n):
        try:
            status, role = shared.ready.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            failed.append("workers not ready in time")
            break
        if status != "ready":
            failed.append(f"{role} failed during setup")
    return failed


def _collect(
    shared: _Shared, procs: list[multiprocessing.process.BaseProcess], timeout: float
) -> list[dict[str, Any]]:
    results = []
    deadline = time.monotonic() + timeout
    for _ in procs:
        try:
            results.append(shared.results.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            results.append({"role": "?", "error": "worker gave no result in time"})
            break
    for proc in procs:
        proc.join(timeout=max(0.1, deadline - time.monotonic()))
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
    return results


class _Meter:
    """Broker CPU and peak RSS between start() and stop(), loadgen main-process CPU."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss = 0
        self._next_rss = 0.0

    def start(self) -> None:
        self.wait0 = read_run_queue_wait(self.pid)
        self.cpu0 = read_cpu_seconds(self.pid)
        self.own0 = _own_cpu()
        self.t0 = time.monotonic()
        self.peak_rss = read_rss_kib(self.pid)

    def sample(self) -> None:
        now = time.monotonic()
        if now >= self._next_rss:
            self._next_rss = now + 0.05
            self.peak_rss = max(self.peak_rss, read_rss_kib(self.pid))

    def stop(self) -> tuple[float, float]:
        self.sample()
        self.wait = read_run_queue_wait(self.pid) - self.wait0
        return read_cpu_seconds(self.pid) - self.cpu0, _own_cpu() - self.own0


def run_throughput(
    target: Target,
    scenario: str,
    *,
    kind: str,
    producers: int = 1,
    subscriptions: int = 1,
    consumer_procs: int | None = None,
    count: int = 10_000,
    body_size: int = 100,
    ack: str = "auto",
    prefetch: int = 1000,
    window: int = 0,
    batch: int | None = None,
    timeout: float = 120.0,
) -> Result:
    """Producers publish ``count`` messages each to one queue or topic; ``subscriptions``
    connections receive them (spread over ``consumer_procs`` processes) and check them.

    The figure is messages (queue) or deliveries (topic) per second from the start signal
    to the last delivery.
    """
    if body_size < TAG_SIZE:
        raise ValueError(f"body_size must be at least {TAG_SIZE}")
    if kind not in ("queue", "topic"):
        raise ValueError(kind)
    run_id = f"{scenario}-{os.getpid()}-{time.monotonic_ns()}"
    destination = f"/{kind}/bench-{run_id}".encode()
    procs_n = consumer_procs or min(subscriptions, 4)
    groups = [list(range(i, subscriptions, procs_n)) for i in range(procs_n)]
    if batch is None:
        batch = max(1, min(512, (256 * 1024) // (body_size + 100)))
    shared = _new_shared(subscriptions)
    expected = producers * count if kind == "topic" else None
    procs = [
        _start(
            shared,
            "consumer",
            _consumer,
            target,
            destination,
            group,
            ack,
            prefetch,
            producers,
            count,
            expected,
            timeout,
        )
        for group in groups
    ]
    failed = _await_ready(shared, len(procs))
    window_subs = list(range(subscriptions)) if window else []
    if not failed:
        procs += [
            _start(
                shared,
                "producer",
                _producer,
                target,
                destination,
                p,
                count,
                body_size,
                batch,
                window,
                window_subs,
                timeout,
            )
            for p in range(producers)
        ]
        failed = _await_ready(shared, producers)
    meter = _Meter(target.pid)
    meter.start()
    shared.t_go[0] = meter.t0
    shared.go.set()
    total = producers * count * (subscriptions if kind == "topic" else 1)
    deadline = meter.t0 + timeout
    progress = shared.progress
    while not failed:
        meter.sample()
        if sum(progress[:subscriptions]) >= total or time.monotonic() > deadline:
            break
        if not any(p.is_alive() for p in procs[: len(groups)]):
            break
        time.sleep(POLL_INTERVAL)
    broker_cpu, main_cpu = meter.stop()
    shared.stop.set()
    results = _collect(shared, procs, timeout=30.0)
    return _verify(
        target,
        scenario,
        kind,
        results,
        meter,
        broker_cpu,
        main_cpu,
        producers,
        count,
        subscriptions,
        failed,
        body_size,
    )


def _verify(
    target: Target,
    scenario: str,
    kind: str,
    results: list[dict[str, Any]],
    meter: _Meter,
    broker_cpu: float,
    main_cpu: float,
    producers: int,
    count: int,
    subscriptions: int,
    failed: list[str],
    body_size: int,
) -> Result:
    errors = list(failed)
    subs: list[dict[str, Any]] = []
    loadgen_cpu = main_cpu
    t_sent = 0.0
    for r in results:
        if "error" in r:
            errors.append(f"{r['role']}: {r['error']}")
            continue
        loadgen_cpu += r["cpu"]
        if r["role"] == "consumer":
            subs.extend(r["subs"])
            if r["timed_out"]:
                errors.append("consumer timed out")
        else:
            t_sent = max(t_sent, r["t_sent"])
    received = sum(s["received"] for s in subs)
    dups = sum(s["dups"] for s in subs)
    reorders = sum(s["reorders"] for s in subs)
    for s in subs:
        errors.extend(s["errors"])
    if kind == "topic":
        expected = producers * count * subscriptions
        unique = sum(sum(row.count(1) for row in s["seen"]) for s in subs)
    else:
        expected = producers * count
        unique = 0
        for p in range(producers):
            merged = 0
            total_set = 0
            for s in subs:
                row = s["seen"][p]
                total_set += row.count(1)
                merged |= int.from_bytes(row, "little")
            n_unique = merged.to_bytes(count, "little").count(1) if count else 0
            dups += total_set - n_unique  # the same message at two consumers
            unique += n_unique
    t_last = max((s["t_last"] for s in subs), default=meter.t0)
    wall = max(t_last - meter.t0, 1e-9)
    unit = "deliveries/s" if kind == "topic" else "msgs/s"
    return Result(
        scenario=scenario,
        broker=target.label,
        value=unique / wall,
        unit=unit,
        wall_s=wall,
        broker_cpu_s=broker_cpu,
        loadgen_cpu_s=loadgen_cpu,
        broker_peak_rss_kib=meter.peak_rss,
        broker_wait_s=meter.wait,
        expected=expected,
        delivered=received,
        lost=expected - unique,
        duplicates=dups,
        reordered=reorders,
        errors=errors,
        extra={
            "mb_per_s": unique * body_size / wall / 1e6,
            "producers_done_s": max(t_sent - meter.t0, 0.0),
            "subscriptions": subscriptions,
            "producers": producers,
            "count_per_producer": count,
            "body_size": body_size,
        },
    )


# -- request / reply -----------------------------------------------------------------------


def _responder(
    shared: _Shared, target: Target, destination: bytes, total: int, deadline_s: float
) -> dict[str, Any]:
    conn = RawConnection.open(target)
    conn.send(subscribe_frame(target, destination, 0, "auto", 0, b"r0"))
    conn.expect(b"RECEIPT", time.monotonic() + SETUP_TIMEOUT)
    shared.ready.put(("ready", "responder"))
    _wait_go(shared)
    cpu0 = _own_cpu()
    deadline = time.monotonic() + deadline_s
    answered = 0
    errors: list[str] = []
    while answered < total and not shared.stop.is_set():
        try:
            frames = conn.read(min(deadline, time.monotonic() + 0.2))
        except StompFailure as exc:
            if "timed out" in str(exc) and time.monotonic() < deadline:
                continue
            errors.append(str(exc))
            break
        out = []
        for head, body in frames:
            if not head.startswith(b"MESSAGE"):
                continue
            reply_to = _header(head, b"reply-to")
            if reply_to is None:
                errors.append("request without reply-to")
                continue
            out.append(
                b"SEND\ndestination:%s\ncontent-length:%d\n\n%s\0" % (reply_to, len(body), body)
            )
        if out:
            conn.send(b"".join(out))
            answered += len(out)
    cpu = _own_cpu() - cpu0
    conn.close()
    return {"answered": answered, "cpu": cpu, "errors": errors}


def _requester(
    shared: _Shared,
    target: Target,
    destination: bytes,
    warmup: int,
    count: int,
    body_size: int,
    deadline_s: float,
) -> dict[str, Any]:
    conn = RawConnection.open(target)
    temp = b"/temp-queue/rr"
    if target.subscribes_temp_queue:
        conn.send(subscribe_frame(target, temp, 0, "auto", 0, b"t0"))
        conn.expect(b"RECEIPT", time.monotonic() + SETUP_TIMEOUT)
    pad = b"x" * (body_size - TAG_SIZE)
    head = b"SEND\ndestination:%s\nreply-to:%s\ncontent-length:%d\n\n" % (
        destination,
        temp,
        body_size,
    )
    shared.ready.put(("ready", "requester"))
    _wait_go(shared)
    deadline = time.monotonic() + deadline_s
    rtts: list[int] = []
    lost = dups = reorders = 0
    errors: list[str] = []
    cpu0 = _own_cpu()
    perf = time.perf_counter_ns
    for i in range(warmup + count):
        tag = b"0000%012d" % i
        t = perf()
        conn.send(head + tag + pad + b"\0")
        got = False
        while not got:
            try:
                frames = conn.read(deadline)
            except StompFailure as exc:
                errors.append(f"request {i}: {exc}")
                lost = warmup + count - i
                break
            for fhead, body in frames:
                if not fhead.startswith(b"MESSAGE"):
                    if fhead.startswith(b"ERROR"):
                        errors.append(f"ERROR {fhead[:300]!r}")
                    continue
                seq = int(body[4:16])
                if seq == i and not got:
                    got = True
                elif seq < i:
                    dups += 1
                else:
                    reorders += 1
        if not got:
            break
        if i >= warmup:
            rtts.append(perf() - t)
    cpu = _own_cpu() - cpu0
    conn.close()
    return {
        "rtts_ns": rtts,
        "cpu": cpu,
        "lost": lost,
        "dups": dups,
        "reorders": reorders,
        "errors": errors,
    }


def _percentile(sorted_values: Sequence[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[k])


def run_request_reply(
    target: Target, *, count: int = 5000, warmup: int = 200, body_size: int = 100
) -> Result:
    """One requester sends a request with ``reply-to: /temp-queue/rr`` to a queue and waits
    for the reply before the next; one responder answers each to its ``reply-to``. The
    figure is the median round trip in ms (p99 and the mean in ``extra``)."""
    destination = f"/queue/bench-rr-{os.getpid()}-{time.monotonic_ns()}".encode()
    shared = _new_shared(1)
    timeout = 60.0 + count * 0.01
    procs = [_start(shared, "responder", _responder, target, destination, warmup + count, timeout)]
    failed = _await_ready(shared, 1)
    if not failed:
        procs.append(
            _start(
                shared,
                "requester",
                _requester,
                target,
                destination,
                warmup,
                count,
                body_size,
                timeout,
            )
        )
        failed = _await_ready(shared, 1)
    meter = _Meter(target.pid)
    meter.start()
    shared.go.set()
    # Every worker's result is read before any worker is joined: a requester's result (its
    # round-trip times) is larger than a pipe holds, so it cannot exit until it is read,
    # and terminating it half-written would leave the queue unreadable.
    results = _collect(shared, procs, timeout=timeout + 10)
    broker_cpu, main_cpu = meter.stop()
    shared.stop.set()
    errors = list(failed)
    rtts: list[int] = []
    lost = dups = reorders = 0
    loadgen_cpu = main_cpu
    for r in results:
        if "error" in r:
            errors.append(f"{r['role']}: {r['error']}")
            continue
        loadgen_cpu += r["cpu"]
        errors.extend(r["errors"])
        if r["role"] == "requester":
            rtts = sorted(r["rtts_ns"])
            lost, dups, reorders = r["lost"], r["dups"], r["reorders"]
    wall = time.monotonic() - meter.t0
    p50 = _percentile(rtts, 0.50) / 1e6
    return Result(
        scenario="request_reply",
        broker=target.label,
        value=p50,
        unit="ms p50",
        wall_s=wall,
        broker_cpu_s=broker_cpu,
        loadgen_cpu_s=loadgen_cpu,
        broker_peak_rss_kib=meter.peak_rss,
        broker_wait_s=meter.wait,
        expected=count,
        delivered=len(rtts),
        lost=lost,
        duplicates=dups,
        reordered=reorders,
        errors=errors,
        extra={
            "p50_ms": p50,
            "p90_ms": _percentile(rtts, 0.90) / 1e6,
            "p99_ms": _percentile(rtts, 0.99) / 1e6,
            "mean_ms": (sum(rtts) / len(rtts) / 1e6) if rtts else float("nan"),
            "round_trips": len(rtts),
        },
    )


# -- idle connections ----------------------------------------------------------------------


def _idle_holder(
    pipe: multiprocessing.connection.Connection,
    target: Target,
    steps: Sequence[int],
    heart_beat_ms: int,
) -> None:
    """Open connections up to each step, tell the main process, keep them alive with
    heart-beats while it measures; then hold for the time it asks and report who is alive."""
    raise_nofile_limit()
    socks: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    beats_in = 0
    dead = 0
    connected_head = b""
    beat_every = heart_beat_ms / 2000.0
    next_beat = time.monotonic() + beat_every
    connect = RawConnection.connect_frame(target, (heart_beat_ms, heart_beat_ms))

    def service(until: float) -> None:
        nonlocal beats_in, dead, next_beat
        while True:
            now = time.monotonic()
            if now >= next_beat:
                for s in socks:
                    with contextlib.suppress(OSError):
                        s.send(b"\n")
                next_beat = now + beat_every
            if now >= until or pipe.poll():
                return
            for key, _ in sel.select(min(0.1, until - now, next_beat - now)):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    dead += 1
                    sel.unregister(sock)
                else:
                    beats_in += data.count(b"\n")

    try:
        for step in steps:
            while len(socks) < step:
                batch: list[socket.socket] = []
                for _ in range(min(256, step - len(socks))):
                    s = socket.create_connection((target.host, target.port), timeout=30)
                    s.sendall(connect)
                    batch.append(s)
                for s in batch:
                    data = b""
                    while b"\0" not in data:
                        chunk = s.recv(4096)
                        if not chunk:
                            raise StompFailure("connection closed during CONNECT")
                        data += chunk
                    if not data.startswith(b"CONNECTED"):
                        raise StompFailure(f"CONNECT refused: {data[:300]!r}")
                    connected_head = connected_head or data.split(b"\n\n", 1)[0]
                    s.setblocking(False)
                    sel.register(s, selectors.EVENT_READ)
                    socks.append(s)
                service(time.monotonic())  # keep the earlier ones beating
            pipe.send(("opened", len(socks)))
            while not pipe.poll():
                service(time.monotonic() + 3600)
            command, arg = pipe.recv()
            if command == "hold":
                service(time.monotonic() + float(arg))
                pipe.send(
                    (
                        "held",
                        {
                            "alive": len(socks) - dead,
                            "dead": dead,
                            "beats_in": beats_in,
                            "connected": connected_head.decode(errors="replace"),
                        },
                    )
                )
                pipe.recv()
    except BaseException as exc:
        pipe.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        for s in socks:
            s.close()


def run_idle(
    target: Target,
    *,
    steps: Sequence[int] = (100, 1000, 3000, 10_000),
    hold_s: float = 12.0,
    settle_s: float = 1.0,
    heart_beat_ms: int = 10_000,
) -> tuple[Result, list[dict[str, float]]]:
    """Hold idle connections that heart-beat every ``heart_beat_ms`` both ways and measure
    the broker's RSS at each step (``(rss - baseline) / connections``). The last step is
    held ``hold_s`` seconds (longer than a heart-beat period): every connection must still
    be alive. Returns the row (KiB per connection at the last step) and the curve."""
    parent, child = _CTX.Pipe()
    meter = _Meter(target.pid)
    time.sleep(settle_s)
    baseline = read_rss_kib(target.pid)
    meter.start()
    proc = _CTX.Process(
        target=_idle_holder, args=(child, target, list(steps), heart_beat_ms), daemon=True
    )
    proc.start()
    curve: list[dict[str, float]] = []
    errors: list[str] = []
    held: dict[str, Any] = {}
    t_open = time.monotonic()
    deadline = time.monotonic() + 600
    for i, step in enumerate(steps):
        if not parent.poll(max(0.1, deadline - time.monotonic())):
            errors.append(f"timed out opening {step} connections")
            break
        message, arg = parent.recv()
        if message == "error":
            errors.append(arg)
            break
        opened_s = time.monotonic() - t_open
        time.sleep(settle_s)
        rss = read_rss_kib(target.pid)
        curve.append(
            {
                "connections": arg,
                "rss_kib": rss,
                "kib_per_connection": (rss - baseline) / arg,
                "open_s": opened_s,
            }
        )
        if i < len(steps) - 1:
            parent.send(("next", 0))
        else:
            parent.send(("hold", hold_s))
            if parent.poll(hold_s + 60):
                message, arg = parent.recv()
                if message == "error":
                    errors.append(arg)
                else:
                    held = arg
                    rss = read_rss_kib(target.pid)
                    curve[-1]["rss_kib_after_hold"] = rss
                    curve[-1]["kib_per_connection"] = (rss - baseline) / steps[-1]
                    if held["dead"]:
                        errors.append(f"{held['dead']} connections died while idle")
            else:
                errors.append("hold did not finish")
            with contextlib.suppress(OSError):
                parent.send(("close", 0))
    broker_cpu, main_cpu = meter.stop()
    proc.join(30)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    wall = time.monotonic() - meter.t0
    last = curve[-1] if curve else {"kib_per_connection": float("nan"), "connections": 0}
    result = Result(
        scenario="idle_connections",
        broker=target.label,
        value=float(last["kib_per_connection"]),
        unit="KiB/connection",
        wall_s=wall,
        broker_cpu_s=broker_cpu,
        loadgen_cpu_s=main_cpu,
        broker_peak_rss_kib=meter.peak_rss,
        broker_wait_s=meter.wait,
        expected=int(steps[-1]),
        delivered=int(held.get("alive", 0)),
        lost=int(steps[-1]) - int(held.get("alive", 0)),
        errors=errors,
        extra={"baseline_rss_kib": baseline, "curve": curve, "hold_s": hold_s, **held},
    )
    return result, curve


# -- our broker as a subprocess ------------------------------------------------------------


#: Settings the benchmark needs from the broker: it opens 10,000 idle connections (and
#: 1,000 subscribers plus a producer) from 127.0.0.1, past the default per-address and
#: total connection limits. Logging stays at WARNING: a line per connection is not what
#: we measure. Everything else is the broker's default.
BENCH_BROKER_ARGS = (
    "--max-connections",
    "20000",
    "--max-connections-per-address",
    "20000",
)


@contextlib.contextmanager
def start_trio_stomp_broker(*extra_args: str, log_path: str | None = None) -> Iterator[Target]:
    """Run ``python -m trio_stomp.broker --listen tcp://127.0.0.1:0`` (open-files soft
    limit raised to the hard limit) and yield it as a Target; SIGTERM it on exit."""
    cmd = [
        sys.executable,
        "-m",
        "trio_stomp.broker",
        "--listen",
        "tcp://127.0.0.1:0",
        "--log-level",
        "WARNING",
        *BENCH_BROKER_ARGS,
        *extra_args,
    ]
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(log_path or os.devnull, "ab"))
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            preexec_fn=raise_nofile_limit,
        )
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            line = proc.stdout.readline().decode() if ready else ""
            match = re.search(r"listening on tcp://127\.0\.0\.1:(\d+)", line)
            if match is None:
                raise RuntimeError(f"the broker did not start (first line {line!r}; {cmd})")
            yield Target("trio_stomp", "trio_stomp", int(match.group(1)), proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


# -- command line ---------------------------------------------------------------------------

SCENARIOS = (
    "queue_auto",
    "queue_ack",
    "queue_ack_4x4",
    "topic_1x10",
    "request_reply",
    "idle",
)


def run_named(target: Target, name: str, count: int) -> Result:
    """Run one of the six rows with ``count`` messages (round trips, connections)."""
    if name == "queue_auto":
        return run_throughput(target, name, kind="queue", count=count)
    if name == "queue_ack":
        return run_throughput(target, name, kind="queue", count=count, ack="client-individual")
    if name == "queue_ack_4x4":
        return run_throughput(
            target,
            name,
            kind="queue",
            producers=4,
            subscriptions=4,
            count=max(1, count // 4),
            ack="client-individual",
        )
    if name == "topic_1x10":
        return run_throughput(
            target, name, kind="topic", subscriptions=10, count=max(1, count // 10), window=2000
        )
    if name == "request_reply":
        return run_request_reply(target, count=count)
    if name == "idle":
        return run_idle(target, steps=(count,), hold_s=12.0)[0]
    raise ValueError(f"unknown scenario {name!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=SCENARIOS, action="append")
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--port", type=int)
    parser.add_argument("--pid", type=int, help="broker process id (for CPU and RSS)")
    parser.add_argument("--flavour", choices=("trio_stomp", "rabbitmq"), default="trio_stomp")
    parser.add_argument("--start-broker", action="store_true")
    parser.add_argument("--json", action="store_true", help="print results as JSON lines")
    args = parser.parse_args(argv)
    self_test()
    raise_nofile_limit()
    with contextlib.ExitStack() as stack:
        if args.start_broker:
            target = stack.enter_context(start_trio_stomp_broker())
        else:
            if args.port is None or args.pid is None:
                parser.error("give --port and --pid, or --start-broker")
            target = Target(args.flavour, args.flavour, args.port, args.pid)
        for name in args.scenario or SCENARIOS:
            result = run_named(target, name, args.count)
            print(json.dumps(result.as_dict()) if args.json else result.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
