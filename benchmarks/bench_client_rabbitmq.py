"""Client throughput: trio_stomp's client publishing to and consuming from RabbitMQ.

Run: ``python benchmarks/bench_client_rabbitmq.py`` starts a private RabbitMQ node (the test
suite's ``tests/_rabbitmq.py``: own node name, own ports on 127.0.0.1, data under a temp dir),
runs the scenarios and stops it. ``--port PORT`` uses an already running broker instead
(RabbitMQ, or ``python -m trio_stomp.broker``; pass ``--vhost`` to suit it).

Scenarios, each with ``--count`` messages of ``--body`` bytes (100 by default) on a fresh
queue, printed as messages per second:

- publish: one client sends N messages without receipts, the last one with a receipt (so
  the clock stops when the broker has processed all of them);
- consume auto: N messages are waiting; one ``ack:auto`` subscription receives them all;
- consume client-individual: the same, with one ACK per message (``prefetch-count`` 1000);
- publish+consume: one client publishes while another consumes (auto), end to end.

``--stomppy`` adds the publish and consume-auto scenarios run with stomp.py (threaded,
blocking sockets) against the same broker, for comparison.

Besides messages per second, each row shows how busy our (single-threaded) client process
was (its CPU seconds over the wall-clock seconds) and the messages per CPU-second of the
client, which depends much less on what else the machine is doing. Low CPU with a low load
average means the broker set the pace; the load average before and after is printed because
on a shared 2-core machine other processes can starve both sides.

It asserts nothing: the figures are for people. Every loop is bounded by ``--count``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Iterator
from typing import Any

import trio

from trio_stomp import Client, open_client

TESTS = pathlib.Path(__file__).resolve().parent.parent / "tests"


@contextlib.contextmanager
def broker_port(args: argparse.Namespace) -> Iterator[int]:
    if args.port:
        yield args.port
        return
    sys.path.insert(0, str(TESTS))
    from _rabbitmq import find_rabbitmq_server, run_rabbitmq

    if find_rabbitmq_server() is None:
        # A benchmark never fails for want of a broker: say so and stop.
        print("skipped: RabbitMQ is not installed (apt-get install rabbitmq-server); or --port")
        raise SystemExit(0)
    with tempfile.TemporaryDirectory(prefix="bench-rabbitmq-") as base:
        print("starting a private RabbitMQ node...", flush=True)
        with run_rabbitmq(pathlib.Path(base)) as node:
            yield node.stomp_port


def client(args: argparse.Namespace, port: int) -> contextlib.AbstractAsyncContextManager[Client]:
    options: dict[str, Any] = {
        "login": args.login,
        "passcode": args.passcode,
        "vhost": args.vhost,
        "heart_beat": (0, 0),
    }
    return open_client(f"stomp://127.0.0.1:{port}", **options)


async def publish(c: Client, queue: str, count: int, body: bytes) -> None:
    for _ in range(count - 1):
        await c.send(queue, body)
    await c.send(queue, body, receipt=True)


async def bench_publish(args: argparse.Namespace, port: int, queue: str) -> float:
    body = b"x" * args.body
    async with client(args, port) as c:
        start = time.perf_counter()
        await publish(c, queue, args.count, body)
        return time.perf_counter() - start


async def bench_consume(args: argparse.Namespace, port: int, queue: str, ack: str) -> float:
    headers = {"prefetch-count": "1000"} if ack != "auto" else None
    async with client(args, port) as c:
        start = time.perf_counter()
        async with c.subscribe(queue, ack=ack, headers=headers) as sub:  # type: ignore[arg-type]
            for _ in range(args.count):
                message = await sub.receive()
                if ack != "auto":
                    await message.ack()
            elapsed = time.perf_counter() - start
            if ack != "auto":
                await c.send(queue + "-sync", b"", receipt=True)  # all ACKs processed
        return elapsed


async def bench_pipeline(args: argparse.Namespace, port: int, queue: str) -> float:
    body = b"x" * args.body
    async with (
        client(args, port) as consumer,
        client(args, port) as producer,
        consumer.subscribe(queue, receipt=True) as sub,
    ):
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish, producer, queue, args.count, body)
            for _ in range(args.count):
                await sub.receive()
        return time.perf_counter() - start


async def measured(scenario: Awaitable[float]) -> tuple[float, float]:
    """(wall seconds the scenario reports, our CPU seconds over the whole call)."""
    cpu = time.process_time()
    elapsed = await scenario
    return elapsed, time.process_time() - cpu


async def run(args: argparse.Namespace, port: int) -> None:
    rows: list[tuple[str, float, float]] = []
    for round_ in range(args.repeat):
        queue = f"/queue/bench-client-{uuid.uuid4().hex[:8]}"
        results = {
            "publish": await measured(bench_publish(args, port, queue)),
            "consume auto": await measured(bench_consume(args, port, queue, "auto")),
        }
        await bench_publish(args, port, queue)
        results["consume client-individual (ACK each)"] = await measured(
            bench_consume(args, port, queue, "client-individual")
        )
        results["publish+consume (2 clients)"] = await measured(
            bench_pipeline(args, port, f"/queue/bench-pipe-{uuid.uuid4().hex[:8]}")
        )
        for label, (elapsed, cpu) in results.items():
            rows.append((label, elapsed, cpu))
        print(f"round {round_ + 1}/{args.repeat} done", flush=True)
    print(f"\n{args.count} messages of {args.body} bytes, best of {args.repeat}:")
    print(f"{'scenario':40} {'msgs/s':>8} {'seconds':>8} {'client CPU':>10} {'msgs/CPU-s':>10}")
    for label in dict.fromkeys(label for label, _, _ in rows):
        best, cpu = min((e, c) for name, e, c in rows if name == label)
        print(
            f"{label:40} {args.count / best:8.0f} {best:8.3f} {100 * cpu / best:9.0f}% "
            f"{args.count / cpu:10.0f}"
        )


def bench_stomppy(args: argparse.Namespace, port: int) -> dict[str, tuple[float, float]]:
    """stomp.py doing publish and consume auto: {scenario: (wall s, CPU s of all threads)}."""
    import threading

    import stomp

    queue = f"/queue/bench-stomppy-{uuid.uuid4().hex[:8]}"
    body = b"x" * args.body
    receipt = threading.Event()
    received = threading.Event()

    class Listener(stomp.ConnectionListener):  # type: ignore[misc]
        count = 0

        def on_receipt(self, frame: Any) -> None:
            receipt.set()

        def on_message(self, frame: Any) -> None:
            Listener.count += 1
            if Listener.count == args.count:
                received.set()

    conn = stomp.Connection12([("127.0.0.1", port)], vhost=args.vhost, heartbeats=(0, 0))
    conn.set_listener("bench", Listener())
    conn.connect(args.login, args.passcode, wait=True)
    try:
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.count - 1):
            conn.send(queue, body)
        conn.send(queue, body, receipt="done")
        if not receipt.wait(600):
            raise RuntimeError("stomp.py: no receipt")
        results = {"stomp.py publish": (time.perf_counter() - start, time.process_time() - cpu)}
        start, cpu = time.perf_counter(), time.process_time()
        conn.subscribe(queue, id="1", ack="auto")
        if not received.wait(600):
            raise RuntimeError("stomp.py: messages missing")
        results["stomp.py consume auto"] = (time.perf_counter() - start, time.process_time() - cpu)
    finally:
        conn.disconnect()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="use a running broker's STOMP port")
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--body", type=int, default=100, help="body size in bytes")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--login", default="guest")
    parser.add_argument("--passcode", default="guest")
    parser.add_argument("--vhost", default="/")
    parser.add_argument("--stomppy", action="store_true", help="also time stomp.py")
    args = parser.parse_args()
    if not 0 < args.count <= 10_000_000:
        parser.error("--count must be between 1 and 10,000,000")
    with broker_port(args) as port:
        before = os.getloadavg()[0]
        trio.run(run, args, port)
        if args.stomppy:
            rows = [bench_stomppy(args, port) for _ in range(args.repeat)]
            for label in rows[0]:
                best, cpu = min(row[label] for row in rows)
                print(
                    f"{label:40} {args.count / best:8.0f} {best:8.3f} {100 * cpu / best:9.0f}% "
                    f"{args.count / cpu:10.0f}"
                )
        print(f"load average (1 min): {before:.1f} before, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
