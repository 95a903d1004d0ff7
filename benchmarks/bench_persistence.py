"""Persistent-message throughput: the broker on SQLite beside the in-memory store.

Runs ``python -m trio_stomp.broker`` as a subprocess (one per store) and drives it with
raw sockets (not our client, so the figure is the broker's): a producer sends N
100-byte ``persistent:true`` messages to a queue and the clock stops when the RECEIPT of
the last one is in. Scenarios:

* ``receipt/100``: a receipt on every 100th SEND (pipelined; a receipt covers the
  messages before it, since the broker applies a connection's frames in order).
* ``receipt/1``: a receipt on every SEND, pipelined (all in flight at once).
* ``receipt/1 sync``: a receipt on every SEND, and the next SEND waits for it (one
  message per commit: this is the latency of a durable commit).
* ``end to end``: ``receipt/100`` with an auto-ack consumer draining the queue at the
  same time; the clock stops when the consumer has every message and the producer its
  last receipt (messages consumed before their batch commits never reach the disk).

Usage: ``python benchmarks/bench_persistence.py [-n 50000] [--sync full|normal]``.
Bounded: every loop runs N times; each scenario has a 120 s timeout.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

BODY = b"x" * 100
TIMEOUT = 120.0


@contextmanager
def broker(store: str, sync: str) -> Iterator[tuple[tuple[str, int], int]]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trio_stomp.broker",
            "--listen",
            "tcp://127.0.0.1:0",
            "--store",
            store,
            "--store-sync",
            sync,
            "--heart-beat",
            "0,0",
            "--log-level",
            "WARNING",
            "--prefetch",
            "10000",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("listening on tcp://"), line
        host, _, port = line.removeprefix("listening on tcp://").rpartition(":")
        yield (host, int(port)), process.pid
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (Linux ``/proc``; 0.0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(TIMEOUT)
    sock.sendall(b"CONNECT\naccept-version:1.2\nhost:localhost\nheart-beat:0,0\n\n\x00")
    data = b""
    while b"\x00" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed during CONNECT"
        data += chunk
    assert data.startswith(b"CONNECTED"), data[:200]
    return sock


def count_frames(sock: socket.socket, frames: int) -> None:
    """Read until ``frames`` NUL-terminated frames arrived (bodies hold no NUL)."""
    seen = 0
    while seen < frames:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        seen += chunk.count(b"\x00")


def send_frames(n: int, receipt_every: int, queue: str) -> bytes:
    head = b"SEND\ndestination:%s\npersistent:true\ncontent-length:100\n" % queue.encode()
    parts = []
    for i in range(n):
        if (i + 1) % receipt_every == 0 or i == n - 1:
            parts.append(head + b"receipt:%d\n\n" % i + BODY + b"\x00")
        else:
            parts.append(head + b"\n" + BODY + b"\x00")
    return b"".join(parts)


def pipelined(address: tuple[str, int], n: int, receipt_every: int, queue: str) -> float:
    sock = connect(address)
    data = send_frames(n, receipt_every, queue)
    receipts = len(range(receipt_every - 1, n, receipt_every)) + (
        0 if n % receipt_every == 0 else 1
    )
    start = time.perf_counter()
    reader = threading.Thread(target=count_frames, args=(sock, receipts))
    reader.start()
    sock.sendall(data)
    reader.join(TIMEOUT)
    elapsed = time.perf_counter() - start
    sock.close()
    return n / elapsed


def synchronous(address: tuple[str, int], n: int, queue: str) -> float:
    sock = connect(address)
    frames = [send_frames(1, 1, queue) for _ in range(n)]
    start = time.perf_counter()
    for frame in frames:
        sock.sendall(frame)
        count_frames(sock, 1)
    elapsed = time.perf_counter() - start
    sock.close()
    return n / elapsed


def end_to_end(address: tuple[str, int], n: int, queue: str) -> float:
    consumer = connect(address)
    consumer.sendall(b"SUBSCRIBE\ndestination:%s\nid:1\nreceipt:s\n\n\x00" % queue.encode())
    count_frames(consumer, 1)
    producer = connect(address)
    data = send_frames(n, 100, queue)
    start = time.perf_counter()
    threads = [
        threading.Thread(target=count_frames, args=(consumer, n)),
        threading.Thread(target=count_frames, args=(producer, (n + 99) // 100)),
    ]
    for thread in threads:
        thread.start()
    producer.sendall(data)
    for thread in threads:
        thread.join(TIMEOUT)
    elapsed = time.perf_counter() - start
    consumer.close()
    producer.close()
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=50_000, help="messages per scenario")
    parser.add_argument("--sync", choices=("full", "normal"), default="full")
    parser.add_argument("--sync-n", type=int, default=500, help="messages, sync scenario")
    args = parser.parse_args()
    n = args.n
    results: dict[str, dict[str, float]] = {}
    cpu: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as directory:
        stores = {
            "memory": "memory",
            f"sqlite ({args.sync})": f"sqlite:{os.path.join(directory, 'bench.db')}",
        }
        for label, store in stores.items():
            with broker(store, args.sync) as (address, pid):
                pipelined(address, 2000, 100, "/queue/warmup")  # warm up, then measure
                end_to_end(address, 2000, "/queue/warmup")
                scenarios: dict[str, tuple[int, Callable[[], float]]] = {
                    "receipt/100": (n, lambda: pipelined(address, n, 100, "/queue/r100")),
                    "receipt/1": (n, lambda: pipelined(address, n, 1, "/queue/r1")),
                    "receipt/1 sync": (
                        args.sync_n,
                        lambda: synchronous(address, args.sync_n, "/queue/sync"),
                    ),
                    "end to end": (n, lambda: end_to_end(address, n, "/queue/e2e")),
                }
                results[label] = {}
                cpu[label] = {}
                for scenario, (count, run) in scenarios.items():
                    before = cpu_seconds(pid)
                    results[label][scenario] = run()
                    used = cpu_seconds(pid) - before
                    cpu[label][scenario] = count / used if used > 0 else float("nan")
    print(f"persistent 100-byte messages/s, N={n} (sync scenario: {args.sync_n})")
    labels = list(results)
    print(f"{'scenario':<16}" + "".join(f"{label:>18}" for label in labels))
    for scenario in next(iter(results.values())):
        print(
            f"{scenario:<16}" + "".join(f"{results[label][scenario]:>18,.0f}" for label in labels)
        )
    print()
    print("messages per second of broker CPU time (the figure on an idle core)")
    for scenario in next(iter(cpu.values())):
        print(f"{scenario:<16}" + "".join(f"{cpu[label][scenario]:>18,.0f}" for label in labels))
    print(f"load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
