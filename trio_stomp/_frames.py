"""STOMP frames as immutable values.

This module owns :class:`Frame`, :class:`Headers`, :class:`Heartbeat` and the command
names. It never touches bytes on the wire (that is ``_codec``) and never imports trio.

Headers follow the spec's rule for repeats: ``headers[name]`` is the *first* value sent
under that name; the later ones are kept, in order, in :attr:`Headers.raw` for a peer that
needs the exact list.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Final, Union, final

import attrs

from ._errors import RemoteProtocolError

__all__ = [
    "CLIENT_COMMANDS",
    "SERVER_COMMANDS",
    "Command",
    "Frame",
    "Headers",
    "HeadersLike",
    "Heartbeat",
]


class Command:
    """The STOMP command names, spelled as on the wire (commands are case-sensitive)."""

    # client frames
    CONNECT: Final = "CONNECT"
    STOMP: Final = "STOMP"
    SEND: Final = "SEND"
    SUBSCRIBE: Final = "SUBSCRIBE"
    UNSUBSCRIBE: Final = "UNSUBSCRIBE"
    ACK: Final = "ACK"
    NACK: Final = "NACK"
    BEGIN: Final = "BEGIN"
    COMMIT: Final = "COMMIT"
    ABORT: Final = "ABORT"
    DISCONNECT: Final = "DISCONNECT"
    # server frames
    CONNECTED: Final = "CONNECTED"
    MESSAGE: Final = "MESSAGE"
    RECEIPT: Final = "RECEIPT"
    ERROR: Final = "ERROR"


CLIENT_COMMANDS: Final = frozenset(
    {
        "CONNECT",
        "STOMP",
        "SEND",
        "SUBSCRIBE",
        "UNSUBSCRIBE",
        "ACK",
        "NACK",
        "BEGIN",
        "COMMIT",
        "ABORT",
        "DISCONNECT",
    }
)
SERVER_COMMANDS: Final = frozenset({"CONNECTED", "MESSAGE", "RECEIPT", "ERROR"})


@final
class Headers(Mapping[str, str]):
    """A read-only, ordered view of a frame's headers.

    ``headers[name]`` and ``headers.get(name)`` return the first value sent under ``name``.
    Iteration yields each distinct name once, in order of first appearance.
    :attr:`raw` holds every ``(name, value)`` pair as sent, repeats included.

    Headers that came from the parser are decoded lazily: looking up one name scans the
    received header block for it, and the full list is built only when something asks
    for it (iteration, :attr:`raw`, ``len``, equality). A header line without a colon is
    reported then, as :class:`~trio_stomp.RemoteProtocolError`.
    """

    __slots__ = ("_block", "_first", "_raw")

    # Decoded: _first, and _raw (None when the parser decoded a head with no repeated
    # name into _first alone: raw is then made from it on first use).
    _raw: tuple[tuple[str, str], ...] | None
    _first: dict[str, str] | None
    # The undecoded head: the command line, then each header line preceded by "\n" (CRs
    # of CRLF line ends removed); set only while the headers have not been decoded, and
    # only when no escape occurs.
    _block: str | None

    def __init__(self, headers: HeadersLike = ()) -> None:
        if isinstance(headers, Headers):
            raw = headers.raw
        elif isinstance(headers, Mapping):
            raw = tuple(headers.items())
        else:
            raw = tuple((name, value) for name, value in headers)
        first: dict[str, str] = {}
        for name, value in raw:
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(f"header names and values must be str, not {name!r}: {value!r}")
            first.setdefault(name, value)
        self._raw = raw
        self._first = first
        self._block = None

    @classmethod
    def _from_pairs(cls, raw: tuple[tuple[str, str], ...], first: dict[str, str]) -> Headers:
        # The parser's constructor for decoded headers: the types are known to be right.
        self = object.__new__(cls)
        self._raw = raw
        self._first = first
        self._block = None
        return self

    @classmethod
    def _from_block(cls, block: str) -> Headers:
        # The parser's lazy constructor: ``block`` is the head as received,
        # "COMMAND\nname:value\nname:value...", with no escape sequences in it (the parser
        # decodes those eagerly). The command line holds no "\n", so a lookup for
        # "\nname:" never matches it.
        self = object.__new__(cls)
        self._raw = None
        self._first = None
        self._block = block
        return self

    def _decode(self) -> dict[str, str]:
        block = self._block
        assert block is not None
        decoded = _DECODED.get(block)
        if decoded is not None:
            # The same head as a recent frame (a producer repeats its headers): share the
            # decoded pairs and dict, which are never mutated.
            self._raw, first = decoded
            self._first = first
            self._block = None
            return first
        raw = []
        first = {}
        lines = block.split("\n")
        del lines[0]  # the command line
        for line in lines:
            name, colon, value = line.partition(":")
            if not colon:
                raise RemoteProtocolError(f"header line without a colon: {line[:80]!r}")
            raw.append((name, value))
            if name not in first:
                first[name] = value
        self._raw = pairs = tuple(raw)
        self._first = first
        self._block = None
        if len(block) <= _DECODED_MAX_HEAD:
            if len(_DECODED) >= _DECODED_MAX_ENTRIES:
                _DECODED.clear()  # bounded; heads that never repeat (receipts) churn it
            _DECODED[block] = (pairs, first)
        return first

    @property
    def raw(self) -> tuple[tuple[str, str], ...]:
        """Every ``(name, value)`` pair in the order it was given, repeats included."""
        if self._raw is None:
            if self._block is None:
                # Decoded by the parser into the dict alone (no name repeats).
                assert self._first is not None
                self._raw = tuple(self._first.items())
            else:
                self._decode()
                assert self._raw is not None
        return self._raw

    @property
    def first(self) -> dict[str, str]:
        """The first value of each name, as a dict (decoding the headers if need be).

        Internal: the broker's hot paths read several headers of the same frame; one
        decode and dict lookups beat a scan of the header block per name. Never mutate it.
        The hottest read ``headers._first or headers.first``: the slot holds the dict once
        decoded (the parser fills it for a repeated head whose twin was decoded, and for an
        ACK), and this property call costs as much as several dict lookups.
        """
        first = self._first
        return first if first is not None else self._decode()

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        block = self._block
        if block is None:
            first = self._first
            assert first is not None
            return first.get(name, default)
        # partition, not find: in CPython 3.11 str.find parses its arguments the slow way
        # and costs about twice as much.
        found, rest = block.partition("\n" + name + ":")[1:]
        if not found:
            return default
        if ":" in name or "\n" in name:
            # No undecoded header name holds these (they would have been escaped), so
            # this match straddles a name and its value.
            return default
        return rest.partition("\n")[0]

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return self.get(name) is not None

    def _mapping(self) -> dict[str, str]:
        return self._first if self._first is not None else self._decode()

    def __iter__(self) -> Iterator[str]:
        return iter(self._mapping())

    def __len__(self) -> int:
        return len(self._mapping())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return self.raw == other.raw
        if isinstance(other, Mapping):
            return self._mapping() == dict(other.items())
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"Headers({list(self.raw)!r})"


#: Recently decoded heads -> (pairs, first values): frames with the same head (a producer
#: sending to one destination with the same headers) share one decode. Bounded in entries
#: and in the length of a head worth remembering.
_DECODED: dict[str, tuple[tuple[tuple[str, str], ...], dict[str, str]]] = {}
_DECODED_MAX_ENTRIES: Final = 256
_DECODED_MAX_HEAD: Final = 512

HeadersLike = Union[Headers, Mapping[str, str], Iterable[tuple[str, str]]]


@final
class Frame:
    """One STOMP frame: a command, headers and a body.

    Attributes:
      command (str): the command, e.g. ``"SEND"`` (case-sensitive, as on the wire).
      headers (Headers): the headers; ``headers[name]`` is the first value sent under
        ``name`` and ``headers.raw`` keeps every pair in order.
      body (bytes): the body, which may contain NULs (``serialize`` then writes a
        ``content-length``).

    Frames are immutable and compare equal when command, header pairs and body are equal.
    ``headers`` may be given as a mapping or as an iterable of ``(name, value)`` pairs.
    """

    __slots__ = ("body", "command", "headers")

    command: str
    headers: Headers
    body: bytes

    def __init__(self, command: str, headers: HeadersLike = (), body: bytes = b"") -> None:
        if not isinstance(command, str):
            raise TypeError(f"command must be str, not {type(command).__name__}")
        if not isinstance(body, (bytes, bytearray, memoryview)):
            raise TypeError(f"body must be bytes, not {type(body).__name__}")
        _set = object.__setattr__
        _set(self, "command", command)
        _set(self, "headers", headers if isinstance(headers, Headers) else Headers(headers))
        _set(self, "body", bytes(body))

    @classmethod
    def _trusted(cls, command: str, headers: Headers, body: bytes) -> Frame:
        # The parser's fast constructor: the types are known to be right.
        self = object.__new__(cls)
        _set = object.__setattr__
        _set(self, "command", command)
        _set(self, "headers", headers)
        _set(self, "body", body)
        return self

    def __setattr__(self, name: str, value: object) -> None:
        raise attrs.exceptions.FrozenInstanceError()

    def __delattr__(self, name: str) -> None:
        raise attrs.exceptions.FrozenInstanceError()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (
            self.command == other.command
            and self.headers == other.headers
            and self.body == other.body
        )

    def __hash__(self) -> int:
        return hash((self.command, self.headers, self.body))

    def __repr__(self) -> str:
        body = self.body if len(self.body) <= 64 else self.body[:64] + b"..."
        return f"Frame({self.command!r}, {list(self.headers.raw)!r}, {body!r})"

    def replace(
        self,
        *,
        command: str | None = None,
        headers: HeadersLike | None = None,
        body: bytes | None = None,
    ) -> Frame:
        """Return a copy with the given fields replaced."""
        return Frame(
            self.command if command is None else command,
            self.headers if headers is None else headers,
            self.body if body is None else body,
        )


@final
@attrs.frozen
class Heartbeat:
    """A heart-beat: a bare end-of-line between frames. Carries nothing but liveness."""


HEARTBEAT: Final = Heartbeat()
