"""Codec throughput: parse and serialize, small frames and 1 MiB bodies.

Run: ``python benchmarks/bench_codec.py`` (or ``nox -s bench``). Prints a table; it
asserts nothing: figures are for people and for the regression guard, not for CI.

Small frames: a SEND with five headers and a 100-byte body, fed in 64 KiB chunks (as
the peer's reader does). "+ broker headers" also reads the headers a broker needs
(destination, receipt, transaction, id) with ``Headers.get``, which scans the undecoded
head per name; "+ headers.first" reads them as the broker's SEND path does, from one
decode into a dict.

``--callgrind`` counts CPU instructions per frame instead (reproducible to about 0.5%,
where wall clock on a shared VM varies by +-30%): a 100-byte SEND with two headers
(destination, content-length) fed in 64 KiB chunks, run under valgrind's callgrind for
N and 2N frames and differenced, so start-up cancels out. Three rows: framing only, plus
``headers.first`` (the broker's one decode of a SEND), plus ``headers.raw`` too (the
broker's passthrough). It takes about a minute and a half.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _callgrind import instructions_per_item  # beside this script

from trio_stomp import Frame, FrameParser, serialize

SMALL = Frame(
    "SEND",
    [
        ("destination", "/queue/bench"),
        ("content-type", "text/plain"),
        ("receipt", "r-1"),
        ("persistent", "true"),
        ("x-custom", "some value"),
    ],
    b"x" * 100,
)
LARGE = Frame("SEND", [("destination", "/queue/bench")], bytes(range(256)) * 4096)


def best_of(repeat: int, fn: Callable[[], int]) -> tuple[float, int]:
    best = float("inf")
    count = 0
    for _ in range(repeat):
        start = time.perf_counter()
        count = fn()
        best = min(best, time.perf_counter() - start)
    return best, count


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


CALLGRIND_MODES = ("parse", "first", "first+raw")
CALLGRIND_FRAME = b"SEND\ndestination:/queue/q\ncontent-length:100\n\n" + b"x" * 100 + b"\0"


def callgrind_child(mode: str, count: int) -> None:
    """The measured run: parse ``count`` frames (and read their headers, per ``mode``)."""
    data = CALLGRIND_FRAME * count
    stream = chunks(data, 65536)
    p = FrameParser()
    n = 0
    for chunk in stream:
        for frame in p.feed(chunk):
            if mode != "parse":
                frame.headers.first  # type: ignore[union-attr]  # noqa: B018
                if mode == "first+raw":
                    frame.headers.raw  # type: ignore[union-attr]  # noqa: B018
            n += 1
    assert n == count, n


def callgrind_per_frame(mode: str, count: int) -> float:
    """Instructions per frame: callgrind totals for ``2 * count`` and ``count`` frames,
    differenced (each run in a fresh interpreter under valgrind)."""
    return instructions_per_item(
        lambda n: [__file__, "--callgrind-child", mode, "--frames", str(n)], count
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--large", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="count instructions per small frame under valgrind (--frames defaults to 10,000)",
    )
    parser.add_argument("--callgrind-child", choices=CALLGRIND_MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.callgrind_child:
        callgrind_child(args.callgrind_child, args.frames)
        return
    if args.callgrind:
        count = args.frames if args.frames != 200_000 else 10_000
        for mode in CALLGRIND_MODES:
            per = callgrind_per_frame(mode, count)
            print(f"{mode:10} {per:8,.0f} instructions per frame")
        return

    small_wire = serialize(SMALL)
    stream = chunks(small_wire * args.frames, 65536)
    large_wire = serialize(LARGE)
    large_stream = chunks(large_wire * args.large, 65536)

    def parse_small() -> int:
        p = FrameParser()
        n = 0
        for chunk in stream:
            n += len(p.feed(chunk))
        return n

    def parse_small_headers() -> int:
        p = FrameParser()
        n = 0
        for chunk in stream:
            for frame in p.feed(chunk):
                h = frame.headers  # type: ignore[union-attr]
                h.get("destination"), h.get("receipt"), h.get("transaction"), h.get("id")
                n += 1
        return n

    def parse_small_first() -> int:
        p = FrameParser()
        n = 0
        for chunk in stream:
            for frame in p.feed(chunk):
                first = frame.headers.first  # type: ignore[union-attr]
                first.get("destination"), first.get("receipt"), first.get("transaction")
                first.get("id")
                n += 1
        return n

    def serialize_small() -> int:
        for _ in range(args.frames):
            serialize(SMALL)
        return int(args.frames)

    def parse_large() -> int:
        p = FrameParser()
        n = 0
        for chunk in large_stream:
            n += len(p.feed(chunk))
        return n

    def parse_large_whole() -> int:
        p = FrameParser()
        n = 0
        for _ in range(args.large):
            n += len(p.feed(large_wire))
        return n

    def serialize_large() -> int:
        for _ in range(args.large):
            serialize(LARGE)
        return int(args.large)

    rows: list[tuple[str, str]] = []
    for name, fn in [
        ("parse small (framing)", parse_small),
        ("parse small + broker headers", parse_small_headers),
        ("parse small + headers.first", parse_small_first),
        ("serialize small", serialize_small),
    ]:
        seconds, count = best_of(args.repeat, fn)
        assert count == args.frames, (name, count)
        rows.append((name, f"{count / seconds:,.0f} frames/s"))
    mib = len(LARGE.body) / 1e6
    for name, fn in [
        ("parse 1 MiB body, 64 KiB chunks", parse_large),
        ("parse 1 MiB body, whole frame", parse_large_whole),
        ("serialize 1 MiB body", serialize_large),
    ]:
        seconds, count = best_of(args.repeat, fn)
        assert count == args.large, (name, count)
        rows.append((name, f"{count * mib / seconds / 1000:,.2f} GB/s"))

    width = max(len(name) for name, _ in rows)
    print(f"{'codec benchmark':<{width}}  result")
    print(f"{'-' * width}  {'-' * 20}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
