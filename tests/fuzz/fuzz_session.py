"""atheris harness: a whole broker session on arbitrary bytes.

Each input runs a fresh in-memory broker (users, ACL rules and tight limits configured),
sends a CONNECT (valid or not, decided by the input) and then the input's bytes, reads
every answer until the broker closes, and checks the invariants of
``tests/test_fuzz_broker.py``: at most one ERROR and only last, no crash logged, and a
well-behaved client on the same broker still gets its message intact.

Not collected by pytest and not run in CI. Run by hand (slow: ~100 inputs/s)::

    pip install atheris
    python tests/fuzz/fuzz_session.py -atheris_runs=20000
"""

from __future__ import annotations

import logging
import sys

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

with atheris.instrument_imports():
    import trio
    import trio.testing

    from trio_stomp import Frame, FrameParser, serialize
    from trio_stomp.broker import Config, open_broker
    from trio_stomp.broker._auth import Credentials, Principal


class _Crashes(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


CRASHES = _Crashes()
logging.getLogger("trio_stomp.broker").addHandler(CRASHES)
logging.getLogger("trio_stomp.broker").propagate = False


class _Fixed:
    async def authenticate(self, credentials: Credentials) -> Principal | None:
        await trio.lowlevel.checkpoint()
        if credentials.login == "u" and credentials.passcode == "p":
            return Principal("u", frozenset({"g"}))
        return None


CONFIG = Config(
    listen=[],
    authenticator=_Fixed(),
    allow_anonymous=True,
    connect_timeout=5,
    shutdown_grace=0.5,
    heart_beat=(0, 0),
    max_body_size=1024,
    max_frame_size=4096,
    max_subscriptions=4,
    max_transactions=2,
    max_transaction_frames=4,
    max_queue_depth=8,
    max_destinations=16,
)
CONNECTS = (
    b"",
    b"CONNECT\naccept-version:1.2\n\n\x00",
    b"CONNECT\naccept-version:1.2\nlogin:u\npasscode:p\n\n\x00",
    b"STOMP\naccept-version:1.0,1.1\nlogin:u\npasscode:wrong\n\n\x00",
)


async def session(prefix: bytes, data: bytes) -> None:
    async with open_broker(CONFIG) as broker:
        consumer, producer = broker.connect_in_memory(), broker.connect_in_memory()
        for stream in (consumer, producer):
            await stream.send_all(b"CONNECT\naccept-version:1.2\nlogin:u\npasscode:p\n\n\x00")
        await consumer.send_all(b"SUBSCRIBE\ndestination:/queue/good\nid:g\n\n\x00")
        attacker = broker.connect_in_memory()
        assert isinstance(attacker, trio.StapledStream)
        await attacker.send_all(prefix + data)
        await attacker.send_stream.aclose()
        parser, answers = FrameParser("1.0"), list[Frame]()
        with trio.fail_after(60):
            while chunk := await attacker.receive_some(65536):
                answers.extend(e for e in parser.feed(bytes(chunk)) if isinstance(e, Frame))
        errors = [i for i, f in enumerate(answers) if f.command == "ERROR"]
        assert errors in ([], [len(answers) - 1]), answers
        body = bytes(range(256))
        await producer.send_all(serialize(Frame("SEND", [("destination", "/queue/good")], body)))
        parser, seen = FrameParser("1.2"), list[Frame]()
        with trio.fail_after(60):
            while not any(f.command == "MESSAGE" for f in seen):
                chunk = await consumer.receive_some(65536)
                assert chunk, "the good consumer was disconnected"
                seen.extend(e for e in parser.feed(bytes(chunk)) if isinstance(e, Frame))
        assert next(f for f in seen if f.command == "MESSAGE").body == body


def one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    prefix = CONNECTS[provider.ConsumeIntInRange(0, len(CONNECTS) - 1)]
    rest = provider.ConsumeBytes(provider.remaining_bytes())
    CRASHES.records.clear()
    trio.run(session, prefix, rest, clock=trio.testing.MockClock(autojump_threshold=0))
    assert not CRASHES.records, [r.getMessage() for r in CRASHES.records]


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
