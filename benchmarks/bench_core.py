"""The broker's per-message cost without sockets: parser, session loop, security check,
routing core and delivery, driven in one process.

This module owns the figure the hot-path optimisations of issue 8 are measured by. Two
sessions (a producer and a consumer) run their real ``Session._loop`` over a stand-in peer
that hands over pre-encoded 64 KiB chunks of SEND frames (and, for ``queue_ack``, the
consumer's ACK frames) and counts the MESSAGE bytes written; everything between the
received bytes and the subscriber's outbound buffer is the broker's own code.

Two measures:

* wall-clock microseconds per message (best and median of ``--repeat`` runs): easy, but on
  a shared 2-core VM a pure-Python loop varies by ±30% from run to run;
* ``--callgrind``: CPU instructions per message, counted by valgrind's callgrind for N and
  2N messages and differenced (start-up cancels out). Reproducible to about 0.5%, so a
  change of a few percent is visible; it takes about a minute per scenario.

Run::

    python benchmarks/bench_core.py                       # every scenario, µs per message
    python benchmarks/bench_core.py --callgrind queue_auto

It imports the broker's private modules on purpose (it measures them); it never opens a
socket and never runs longer than its message count.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio
from _callgrind import instructions_per_item  # beside this script

from trio_stomp._codec import FrameParser
from trio_stomp._frames import Frame
from trio_stomp.broker._auth import Principal, load_security
from trio_stomp.broker._broker import _make_broker
from trio_stomp.broker._config import Config
from trio_stomp.broker._session import Session, frame_handlers

SCENARIOS = ("queue_auto", "queue_ack", "topic_1x10")
CHUNK = 64 * 1024
BODY = b"x" * 100


class _End(Exception):
    """The stand-in peer has nothing more to give: the session loop ends."""


class _StandInPeer:
    """What ``Session._loop`` uses of a Peer: batches in, bytes out (counted)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.parser = FrameParser()
        self.chunks = chunks[::-1]
        self.version = "1.2"
        self.bytes_out = 0
        self.frames_out = 0
        self.acker = False  # answer every MESSAGE with an ACK (1.2 ack ids: 1, 2, 3...)
        self.acked = 0
        self.done = False

    async def receive_batch(self) -> list[Frame]:
        await trio.lowlevel.checkpoint()
        if self.acker:
            n = self.frames_out
            if n == self.acked:
                if self.done:
                    raise _End
                return []
            data = b"".join(b"ACK\nid:%d\n\n\0" % i for i in range(self.acked + 1, n + 1))
            self.acked = n
        elif self.chunks:
            data = self.chunks.pop()
        else:
            raise _End
        return [event for event in self.parser.feed(data) if isinstance(event, Frame)]

    def send_bytes_nowait(self, data: bytes, *, frames: int = 1) -> None:
        self.bytes_out += len(data)
        self.frames_out += frames

    def send_nowait(self, frame: Frame) -> None:
        self.frames_out += 1


async def run_once(scenario: str, count: int) -> float:
    """Push ``count`` messages through; returns the wall-clock seconds it took."""
    config = Config(listen=["tcp://127.0.0.1:0"])  # loopback: anonymous, as by default
    router = _make_broker(config).router
    security, _ = await load_security(config)
    handlers = frame_handlers(router)

    def session(peer: _StandInPeer, name: str) -> Session:
        new = Session(
            session_id=name,
            remote="bench",
            config=config,
            router=router,
            register_heart_beat=lambda peer: None,
            on_closed=lambda session, stats: None,
            handlers=handlers,
        )
        new.peer = peer  # type: ignore[assignment]
        new.version = "1.2"
        new.connection = router.connect(name, "1.2", new)
        new.security = security
        new.principal = Principal(name="anonymous", method="anonymous")
        return new

    topic = scenario.startswith("topic")
    destination = "/topic/t" if topic else "/queue/q"
    consumer_peer = _StandInPeer([])
    consumer = session(consumer_peer, "consumer")
    assert consumer.connection is not None
    ack = "client-individual" if scenario == "queue_ack" else "auto"
    for n in range(10 if topic else 1):
        router.subscribe(
            consumer.connection,
            Frame("SUBSCRIBE", [("id", str(n)), ("destination", destination), ("ack", ack)]),
        )
    one = b"SEND\ndestination:%s\ncontent-length:%d\n\n%s\0" % (
        destination.encode(),
        len(BODY),
        BODY,
    )
    data = one * count
    producer_peer = _StandInPeer([data[i : i + CHUNK] for i in range(0, len(data), CHUNK)])
    producer = session(producer_peer, "producer")

    async def serve(who: Session, peer: _StandInPeer, then: _StandInPeer | None) -> None:
        try:
            await who._loop(peer)  # type: ignore[arg-type]
        except _End:
            pass
        if then is not None:
            then.done = True

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, producer, producer_peer, consumer_peer)
        if scenario == "queue_ack":
            consumer_peer.acker = True
            nursery.start_soon(serve, consumer, consumer_peer, None)
    elapsed = time.perf_counter() - start
    expected = count * (10 if topic else 1)
    if consumer_peer.frames_out != expected:
        raise RuntimeError(f"{consumer_peer.frames_out} deliveries, expected {expected}")
    return elapsed


def callgrind_instructions(scenario: str, count: int) -> float:
    """Instructions per message: callgrind totals for ``2 * count`` and ``count``
    messages, differenced."""
    return instructions_per_item(
        lambda n: [__file__, scenario, "--count", str(n), "--repeat", "1"], count
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", nargs="*", help=f"any of {', '.join(SCENARIOS)} (all)")
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="count instructions per message under valgrind (--count defaults to 5,000)",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.scenario) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    scenarios = args.scenario or list(SCENARIOS)
    logging.disable(logging.WARNING)  # the anonymous-access warning, once per run
    for scenario in scenarios:
        if args.callgrind:
            count = args.count if args.count != 100_000 else 5_000
            per = callgrind_instructions(scenario, count)
            print(f"{scenario:12} {per:10,.0f} instructions per message")
            continue
        times = [trio.run(run_once, scenario, args.count) for _ in range(args.repeat)]
        per_message = sorted(t / args.count * 1e6 for t in times)
        print(
            f"{scenario:12} best {per_message[0]:6.2f} µs per message, "
            f"median {per_message[len(per_message) // 2]:6.2f} "
            f"({args.count / min(times):,.0f} msgs/s at best)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
