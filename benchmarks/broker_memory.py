"""Where an idle connection's memory goes: the broker under tracemalloc.

This script owns one measurement: it runs the broker in this process with ``tracemalloc``
on, opens N idle STOMP connections to it from a child process (raw sockets, heart-beats
10 s both ways, as the benchmark's idle scenario), and prints the Python heap that the
connections added, per connection, by source line and by file. Unlike RSS this figure is
deterministic, so a change to the per-connection structures (tasks, scopes, events, the
Peer and the Session) can be measured exactly, before and after.

It never listens on anything but 127.0.0.1, and every wait in it is bounded.

    python benchmarks/broker_memory.py --connections 1000 --top 25
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import multiprocessing.connection
import socket
import sys
import tracemalloc
from collections.abc import Sequence

import trio

from trio_stomp.broker import serve_broker
from trio_stomp.broker._config import config_from_mapping

CONNECT = b"CONNECT\naccept-version:1.2\nhost:/\nheart-beat:10000,10000\n\n\0"


def _hold(port: int, count: int, pipe: multiprocessing.connection.Connection) -> None:
    """Child: open ``count`` connections, wait for every CONNECTED, report, hold, close."""
    socks = []
    try:
        for start in range(0, count, 100):
            batch = []
            for _ in range(min(100, count - start)):
                s = socket.create_connection(("127.0.0.1", port), timeout=30)
                s.sendall(CONNECT)
                batch.append(s)
            for s in batch:
                data = b""
                while b"\0" not in data:
                    chunk = s.recv(4096)
                    if not chunk:
                        raise ConnectionError("closed during CONNECT")
                    data += chunk
                if not data.startswith(b"CONNECTED"):
                    raise ConnectionError(data[:200].decode(errors="replace"))
            socks.extend(batch)
        pipe.send("opened")
        pipe.poll(120)  # until the parent has its snapshot
    except Exception as exc:
        pipe.send(f"error: {exc}")
    finally:
        for s in socks:
            s.close()


def _short(path: str) -> str:
    for marker in ("site-packages/", "/trio_stomp/"):
        if marker in path:
            return ("trio_stomp/" if marker == "/trio_stomp/" else "") + path.split(marker)[-1]
    return path


async def measure(count: int, top: int) -> None:
    config = config_from_mapping(
        {},
        listen=["tcp://127.0.0.1:0"],
        max_connections=count + 100,
        max_connections_per_address=count + 100,
        log_level="WARNING",
    )
    tracemalloc.start(1)
    async with trio.open_nursery() as nursery:
        broker = await nursery.start(serve_broker, config)
        port = int(broker.addresses[0].rsplit(":", 1)[1])
        gc.collect()
        before = tracemalloc.take_snapshot()
        parent, child = multiprocessing.get_context("fork").Pipe()
        proc = multiprocessing.get_context("fork").Process(
            target=_hold, args=(port, count, child), daemon=True
        )
        proc.start()
        with trio.fail_after(300):
            await trio.lowlevel.wait_readable(parent.fileno())
        message = parent.recv()
        if message != "opened":
            raise RuntimeError(message)
        await trio.sleep(1)  # let every session settle after CONNECTED
        gc.collect()
        after = tracemalloc.take_snapshot()
        parent.send("done")
        skip = [tracemalloc.Filter(False, tracemalloc.__file__)]
        after = after.filter_traces(skip)
        before = before.filter_traces(skip)
        by_line = after.compare_to(before, "lineno")
        total = sum(stat.size_diff for stat in by_line)
        print(f"{count} idle connections: {total / count / 1024:.2f} KiB of Python heap each")
        print(f"\ntop {top} source lines (bytes per connection, allocations per connection):")
        for stat in by_line[:top]:
            frame = stat.traceback[0]
            print(
                f"{stat.size_diff / count:9.0f} B {stat.count_diff / count:6.1f}  "
                f"{_short(frame.filename)}:{frame.lineno}"
            )
        print("\nby file:")
        for stat in after.compare_to(before, "filename")[:top]:
            print(
                f"{stat.size_diff / count:9.0f} B {stat.count_diff / count:6.1f}  "
                f"{_short(stat.traceback[0].filename)}"
            )
        proc.join(30)
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    trio.run(measure, args.connections, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
