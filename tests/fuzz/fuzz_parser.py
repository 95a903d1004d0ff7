"""atheris harness: the frame parser on arbitrary bytes, in arbitrary splits.

Not collected by pytest (no ``test_`` prefix) and not run in CI. Run by hand::

    pip install atheris
    python tests/fuzz/fuzz_parser.py -atheris_runs=200000          # or -max_total_time=600
    python tests/fuzz/fuzz_parser.py tests/fuzz/corpus/             # keep a corpus

A crash is any exception other than ``RemoteProtocolError`` (or a frame-size bound broken).
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

with atheris.instrument_imports():
    from trio_stomp import Frame, FrameParser, RemoteProtocolError

MAX_FRAME = 4096


def one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    version = ("1.0", "1.1", "1.2")[provider.ConsumeIntInRange(0, 2)]
    parser = FrameParser(version, max_frame_size=MAX_FRAME, max_body_size=2048, max_headers=16)
    try:
        while provider.remaining_bytes():
            chunk = provider.ConsumeBytes(provider.ConsumeIntInRange(1, 512))
            for event in parser.feed(chunk):
                if isinstance(event, Frame):
                    event.headers.raw  # noqa: B018 - headers decode lazily
                    event.headers.get("content-length")
            assert parser.buffered <= MAX_FRAME + 65536, parser.buffered
        parser.feed(b"")
    except RemoteProtocolError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
