"""The STOMP wire format: an incremental parser and a serializer.

This module owns the bytes: :class:`FrameParser` turns any split of a byte stream into
:class:`~trio_stomp.Frame` and :class:`~trio_stomp.Heartbeat` values, and :func:`serialize`
turns a frame back into bytes. It is sans-I/O: it never imports trio, never blocks and never
reads a clock, so it can be tested, fuzzed and benchmarked on its own.

Parsing strategy
----------------
The parser keeps at most one partial frame. Each call to :meth:`FrameParser.feed` joins
that leftover with the new chunk once, then walks the buffer by slicing:

1. bare EOLs (LF or CRLF) between frames are heart-beats;
2. the *head* (command line and header lines) ends at the first blank line: one ``find``
   for ``\\n\\n`` (and ``\\n\\r\\n`` when the chunk holds a CR at all); a head
   byte-identical to the last plain one (a producer repeats its head) reuses what was
   derived from it (command, head text, content-length) instead of decoding it again; a
   whole 1.2 ``ACK``/``NACK`` frame of the common shape (``ACK\\nid:N``, no body) is
   matched at once and its one header decoded there (its head is unique: the id);
3. the body is exactly ``content-length`` octets followed by a NUL when that header is
   present (NULs inside are data), otherwise everything up to the first NUL.

Once a head is parsed, a body that has not fully arrived is collected as a list of chunks
and joined once, so a 1 MiB body fed in 64 KiB pieces costs one copy, not sixteen.

Limits
------
Every limit is checked before memory is committed to it: ``content-length`` is validated
(decimal, at most ``max_body_size``) before the body is awaited; a head that grows past
``max_line_length`` per line, ``max_headers`` lines or ``max_frame_size`` bytes, a command
line that is not a command, and a NUL-terminated body past ``max_body_size`` raise
:class:`~trio_stomp.RemoteProtocolError` as soon as the offending byte arrives. After an
error the parser is unusable: the stream is out of sync and the connection must close.

Escaping
--------
Header names and values are escaped in 1.1 (``\\n \\c \\\\``) and 1.2 (also ``\\r``); 1.0 has
no escaping, and CONNECT, STOMP and CONNECTED frames are never escaped in any version (a
passcode may hold ``:`` and ``\\``). An undefined escape is an error. Spaces are data: names
and values are never trimmed.
"""

from __future__ import annotations

import re
from typing import Final, Union

from ._errors import LocalProtocolError, RemoteProtocolError
from ._frames import (
    _DECODED,
    CLIENT_COMMANDS,
    HEARTBEAT,
    SERVER_COMMANDS,
    Frame,
    Headers,
    Heartbeat,
)

__all__ = ["FrameParser", "serialize"]

Event = Union[Frame, Heartbeat]

#: Frames whose headers are never escaped, whatever the version (spec: "Value Encoding").
NO_ESCAPE_COMMANDS: Final = frozenset({"CONNECT", "STOMP", "CONNECTED"})
_KNOWN_COMMANDS: Final = CLIENT_COMMANDS | SERVER_COMMANDS
_COMMAND_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")
MAX_COMMAND_LENGTH: Final = 64
_VERSIONS: Final = ("1.0", "1.1", "1.2")

_UNESCAPE_11: Final = {"n": "\n", "c": ":", "\\": "\\"}
_UNESCAPE_12: Final = {"r": "\r", "n": "\n", "c": ":", "\\": "\\"}
_ESCAPE_SEQUENCE_RE: Final = re.compile(r"\\(.?)", re.DOTALL)

_ESCAPE_11: Final = str.maketrans({"\\": "\\\\", "\n": "\\n", ":": "\\c"})
_ESCAPE_12: Final = str.maketrans({"\\": "\\\\", "\n": "\\n", ":": "\\c", "\r": "\\r"})
_SPECIAL_RE: Final = re.compile(r"[\\:\n\r]")

DEFAULT_MAX_LINE_LENGTH: Final = 16 * 1024
DEFAULT_MAX_HEADERS: Final = 128
DEFAULT_MAX_BODY_SIZE: Final = 16 * 1024 * 1024


def _check_version(version: str) -> str:
    if version not in _VERSIONS:
        raise ValueError(f"unknown STOMP version {version!r}; expected one of {_VERSIONS}")
    return version


def _unescape(text: str, table: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        try:
            return table[match.group(1)]
        except KeyError:
            raise RemoteProtocolError(
                f"undefined escape sequence '\\{match.group(1)}' in header {text!r}"
            ) from None

    return _ESCAPE_SEQUENCE_RE.sub(replace, text)


class FrameParser:
    """An incremental STOMP frame parser.

    Feed it bytes as they arrive, in any split (one byte at a time works); it returns the
    frames and heart-beats completed so far, in order::

        parser = FrameParser()
        for event in parser.feed(data):
            ...

    Args:
      version: the negotiated protocol version, which decides header escaping. Set
        :attr:`version` again once negotiation is done.
      max_line_length: longest command or header line, in bytes (EOL excluded).
      max_headers: most header lines in one frame (repeats count).
      max_body_size: largest body, in bytes, with or without ``content-length``.
      max_frame_size: most bytes one frame (head and body) may occupy while incomplete.
        Defaults to ``max_body_size`` plus 64 KiB of head.

    Raises (from :meth:`feed`):
      RemoteProtocolError: the input is not STOMP or exceeds a limit. The message says which.
    """

    def __init__(
        self,
        version: str = "1.2",
        *,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        max_headers: int = DEFAULT_MAX_HEADERS,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        max_frame_size: int | None = None,
    ) -> None:
        for name, value in (
            ("max_line_length", max_line_length),
            ("max_headers", max_headers),
            ("max_body_size", max_body_size),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, not {value}")
        self._version = _check_version(version)
        self.max_line_length = max_line_length
        self.max_headers = max_headers
        self.max_body_size = max_body_size
        self.max_frame_size = (
            max_body_size + 64 * 1024 if max_frame_size is None else max_frame_size
        )
        # Unconsumed bytes while we look for the next head.
        self._buffer = b""
        # Once a head is parsed and its body is incomplete: the frame so far.
        self._pending: tuple[str, Headers] | None = None
        self._body_parts: list[bytes] = []
        self._body_have = 0
        self._body_need = -1  # content-length + 1 (the NUL), or -1: up to the first NUL
        # A head no longer than this cannot break the line or header-count limits (each
        # header line takes at least two characters), so the fast path skips those checks.
        self._small_head = min(max_line_length, 2 * max_headers)
        # The last head the fast path took: its raw bytes (command line to the blank line,
        # exclusive), and what was derived from them: the head text, the command and the
        # content-length (-1: none). A producer repeats its head frame after frame; one
        # bytes comparison then replaces decoding, partitioning and validating it again.
        # Only fast-path heads are remembered: they hold no backslash, so nothing derived
        # depends on the version, and they are known to be within the line and header
        # limits (which are fixed at construction).
        self._last_head = b""
        self._last_text = ""
        self._last_command = ""
        self._last_size = -1
        self._broken: str | None = None
        self._eof = False

    @property
    def version(self) -> str:
        """The protocol version used to unescape headers (``"1.0"``, ``"1.1"``, ``"1.2"``)."""
        return self._version

    @version.setter
    def version(self, version: str) -> None:
        self._version = _check_version(version)

    @property
    def buffered(self) -> int:
        """Bytes held for a frame that has not fully arrived yet."""
        return len(self._buffer) + self._body_have

    def _fail(self, message: str) -> RemoteProtocolError:
        self._broken = message
        self._buffer = b""
        self._body_parts = []
        self._pending = None
        return RemoteProtocolError(message)

    def feed(self, data: bytes) -> list[Event]:
        """Add ``data`` and return every frame and heart-beat it completed, in order.

        ``feed(b"")`` signals the end of the stream: it raises if a frame was cut short.

        Raises:
          RemoteProtocolError: malformed input or a limit exceeded. The parser is then
            broken and every later call raises the same error.
        """
        if self._broken is not None:
            raise RemoteProtocolError(self._broken)
        if not data:
            self._eof = True
            if self._pending is not None or self._buffer.strip(b"\r\n"):
                raise self._fail("connection closed in the middle of a frame")
            return []
        if self._eof:
            raise RuntimeError("feed() called after end of stream (feed(b''))")
        events: list[Event] = []
        if self._pending is not None:
            buffer = self._continue_body(data, events)
            if buffer is None:
                return events
        elif self._buffer:
            buffer = self._buffer + data
        else:
            buffer = data
        try:
            self._buffer = self._parse_frames(buffer, events)
        except UnicodeDecodeError as exc:
            raise self._fail(f"frame headers are not valid UTF-8: {exc}") from None
        except RemoteProtocolError as exc:
            raise self._fail(str(exc)) from None
        return events

    def _continue_body(self, data: bytes, events: list[Event]) -> bytes | None:
        """Add ``data`` to the pending body; return what follows the frame, or ``None``."""
        assert self._pending is not None
        need = self._body_need
        if need >= 0:
            missing = need - self._body_have
            if len(data) < missing:
                self._body_parts.append(data)
                self._body_have += len(data)
                return None
            self._body_parts.append(data[:missing])
            whole = b"".join(self._body_parts)
            rest = data[missing:]
            if whole[-1] != 0:
                raise self._fail(
                    f"frame body is not followed by a NUL octet after content-length "
                    f"({need - 1}) octets"
                )
            body = whole[:-1]
        else:
            nul = data.find(b"\0")
            if nul < 0:
                self._body_have += len(data)
                if self._body_have > self.max_body_size:
                    raise self._fail(
                        f"frame body exceeds the maximum size of {self.max_body_size} bytes"
                    )
                self._body_parts.append(data)
                return None
            if self._body_have + nul > self.max_body_size:
                raise self._fail(
                    f"frame body exceeds the maximum size of {self.max_body_size} bytes"
                )
            self._body_parts.append(data[:nul])
            body = b"".join(self._body_parts)
            rest = data[nul + 1 :]
        command, headers = self._pending
        events.append(Frame._trusted(command, headers, body))
        self._pending = None
        self._body_parts = []
        self._body_have = 0
        return rest

    def _parse_frames(self, buffer: bytes, events: list[Event]) -> bytes:
        """Parse complete frames out of ``buffer``; return the unconsumed tail. (A head
        that is not UTF-8 raises UnicodeDecodeError: :meth:`feed` reports it.)"""
        # The per-frame hot path: everything a common frame needs is inline, and anything
        # unusual (an unknown command, an escape, a head large enough to break a limit)
        # goes through _parse_head.
        end_of_buffer = len(buffer)
        has_cr = buffer.find(b"\r") >= 0  # (`in` tries an int first: an error, dearer)
        pos = 0
        append = events.append
        known = _KNOWN_COMMANDS
        small_head = self._small_head
        max_body_size = self.max_body_size
        sizes = _CONTENT_LENGTHS
        last_head = self._last_head
        last_text = self._last_text
        last_command = self._last_command
        last_size = self._last_size
        # What the last head decoded to, if a frame with it was decoded before this chunk
        # (the decode cache's entry): frames repeating it need not decode it again.
        last_decoded = _DECODED.get(last_text)
        while pos < end_of_buffer:
            # Heart-beats: bare EOLs between frames.
            byte = buffer[pos]
            if byte == 10:  # LF
                append(HEARTBEAT)
                pos += 1
                continue
            if byte == 13:  # CR, must start CRLF
                if pos + 1 == end_of_buffer:
                    break
                if buffer[pos + 1] != 10:
                    raise RemoteProtocolError("a CR between frames must be followed by LF")
                append(HEARTBEAT)
                pos += 2
                continue
            if byte == 65 or byte == 78:  # "A", "N"
                # STOMP 1.2's ACK or NACK of one message, "ACK\nid:N\n\n\0". Its id makes
                # each head unique: the repeated-head path below never takes it, and the
                # general path would cost as much as the SEND it settles. One match finds
                # the whole frame and its one header is decoded here, into what the
                # general path gives. Anything else (an escape, a CR or non-ASCII byte, a
                # second header, a body, a head past the size that needs limit checks, a
                # frame cut short) goes the general way.
                match = (_ACK_FRAME if byte == 65 else _NACK_FRAME)(buffer, pos)
                if match is not None and (end := match.end()) - pos <= small_head + 3:
                    headers = _new_headers(Headers)
                    headers._raw = None
                    headers._first = {"id": match[1].decode()}
                    headers._block = None
                    frame = _FrameBuilder()
                    frame.command = "ACK" if byte == 65 else "NACK"
                    frame.headers = headers
                    frame.body = b""
                    frame.__class__ = Frame  # type: ignore[assignment]
                    append(frame)  # type: ignore[arg-type]
                    pos = end
                    continue

            # The head ends at the first blank line.
            head_end = buffer.find(b"\n\n", pos)
            separator = 2
            if has_cr:
                # Only a CRLF blank line before the LF one can end the head sooner: never
                # scan a body for it (a 1 MiB body made this search cost a whole pass).
                crlf_end = buffer.find(
                    b"\n\r\n", pos, head_end + 2 if head_end >= 0 else end_of_buffer
                )
                if crlf_end >= 0 and (head_end < 0 or crlf_end < head_end):
                    head_end = crlf_end
                    separator = 3
            if head_end < 0:
                self._check_incomplete_head(buffer, pos)
                break
            head = buffer[pos:head_end]
            if head == last_head and last_size <= max_body_size:
                # The same head as the last frame: the same text, command and size, and
                # the same decoded headers once some frame with it was decoded.
                command = last_command
                headers = _new_headers(Headers)
                if last_decoded is None:
                    headers._raw = None
                    headers._first = None
                    headers._block = last_text
                else:
                    headers._raw, headers._first = last_decoded
                    headers._block = None
                size = last_size
            else:
                text = head.decode()
                if has_cr and "\r" in text:
                    text = text.replace("\r\n", "\n")
                    if text.endswith("\r"):
                        text = text[:-1]
                command = text.partition("\n")[0]
                fast = command in known and head_end - pos <= small_head and "\\" not in text
                if fast:
                    headers = _new_headers(Headers)
                    headers._raw = None
                    headers._first = None
                    headers._block = text
                else:
                    headers = self._parse_head(text, command)
                size = -1
                _, found, value = text.partition("\ncontent-length:")
                if found:
                    value = value.partition("\n")[0]
                    size = sizes.get(value, -1)
                    if size < 0:
                        if 0 < len(value) < 10 and value.isdigit() and value.isascii():
                            # Inline fast path of _content_length: a few ASCII digits.
                            size = int(value)
                            if size > max_body_size:
                                self._content_length(value)  # raises, with its message
                            if len(sizes) < _MAX_CACHED_SIZES:
                                sizes[value] = size
                        else:
                            size = self._content_length(value)
                    elif size > max_body_size:
                        self._content_length(value)  # raises, with its message
                if fast:
                    self._last_head = last_head = head
                    self._last_text = last_text = text
                    self._last_command = last_command = command
                    self._last_size = last_size = size
                    last_decoded = _DECODED.get(text)
            body_start = head_end + separator

            if size >= 0:
                body_end = body_start + size
                if body_end < end_of_buffer:
                    if buffer[body_end] != 0:
                        raise RemoteProtocolError(
                            f"frame body is not followed by a NUL octet after "
                            f"content-length ({size}) octets"
                        )
                    # A frame is immutable (Frame.__setattr__ raises): build it as its
                    # mutable twin and then give it its class, three plain slot stores
                    # instead of three descriptor calls.
                    frame = _FrameBuilder()
                    frame.command = command
                    frame.headers = headers
                    frame.body = buffer[body_start:body_end]
                    frame.__class__ = Frame  # type: ignore[assignment]
                    append(frame)  # type: ignore[arg-type]
                    pos = body_end + 1
                    continue
                self._start_body(command, headers, buffer[body_start:], size + 1)
                return b""
            nul = buffer.find(b"\0", body_start)
            if nul < 0:
                rest = buffer[body_start:]
                if len(rest) > self.max_body_size:
                    raise RemoteProtocolError(
                        f"frame body exceeds the maximum size of {self.max_body_size} bytes"
                    )
                self._start_body(command, headers, rest, -1)
                return b""
            if nul - body_start > self.max_body_size:
                raise RemoteProtocolError(
                    f"frame body exceeds the maximum size of {self.max_body_size} bytes"
                )
            frame = _FrameBuilder()
            frame.command = command
            frame.headers = headers
            frame.body = buffer[body_start:nul]
            frame.__class__ = Frame  # type: ignore[assignment]
            append(frame)  # type: ignore[arg-type]
            pos = nul + 1
        if pos == 0:
            return buffer
        return buffer[pos:]

    def _start_body(self, command: str, headers: Headers, first: bytes, need: int) -> None:
        self._pending = (command, headers)
        self._body_parts = [first]
        self._body_have = len(first)
        self._body_need = need

    def _content_length(self, value: str) -> int:
        if not (value.isascii() and value.isdigit()):
            raise RemoteProtocolError(
                f"content-length must be a non-negative decimal integer, not {value[:40]!r}"
            )
        if len(value) > 18 or int(value) > self.max_body_size:
            raise RemoteProtocolError(
                f"content-length {value[:40]} exceeds the maximum body size of "
                f"{self.max_body_size} bytes"
            )
        return int(value)

    def _check_incomplete_head(self, buffer: bytes, pos: int) -> None:
        """The head has not ended yet: fail early if it already breaks a limit."""
        size = len(buffer) - pos
        first_eol = buffer.find(b"\n", pos)
        if first_eol < 0:
            if size > MAX_COMMAND_LENGTH + 1:
                raise RemoteProtocolError(
                    f"expected a command line, got {size} bytes without an end of line: "
                    f"{buffer[pos : pos + 40]!r}..."
                )
            return
        self._check_command(buffer[pos:first_eol].rstrip(b"\r"))
        if size > self.max_frame_size:
            raise RemoteProtocolError(
                f"frame headers exceed the maximum frame size of {self.max_frame_size} bytes"
            )
        last_eol = buffer.rfind(b"\n", pos)
        if len(buffer) - last_eol - 1 > self.max_line_length:
            raise RemoteProtocolError(
                f"header line exceeds the maximum length of {self.max_line_length} bytes"
            )
        if buffer.count(b"\n", pos) - 1 > self.max_headers:
            raise RemoteProtocolError(
                f"frame has more than the maximum of {self.max_headers} headers"
            )

    def _check_command(self, line: bytes) -> str:
        try:
            command = line.decode("ascii")
        except UnicodeDecodeError:
            command = ""
        if command not in _KNOWN_COMMANDS and (
            len(command) > MAX_COMMAND_LENGTH or not _COMMAND_RE.match(command)
        ):
            raise RemoteProtocolError(f"expected a STOMP command, got {line[:40]!r}")
        return command

    def _parse_head(self, text: str, command: str) -> Headers:
        """The careful path for a head the fast path did not take: check the command and
        every limit, and decode escapes eagerly (so a bad escape fails here)."""
        if len(text) > self.max_frame_size:
            raise RemoteProtocolError(
                f"frame headers exceed the maximum frame size of {self.max_frame_size} bytes"
            )
        if command not in _KNOWN_COMMANDS:
            self._check_command(command.encode("utf-8"))
        block = text[len(command) :]
        if block.count("\n") > self.max_headers:
            raise RemoteProtocolError(
                f"frame has more than the maximum of {self.max_headers} headers"
            )
        max_line = self.max_line_length
        if len(text) > max_line and max(map(len, text.split("\n"))) > max_line:
            raise RemoteProtocolError(f"header line exceeds the maximum length of {max_line} bytes")
        if "\\" not in block or self._version == "1.0" or command in NO_ESCAPE_COMMANDS:
            # Nothing to unescape: decode lazily, on first access.
            return Headers._from_block(text)
        table = _UNESCAPE_12 if self._version == "1.2" else _UNESCAPE_11
        raw: list[tuple[str, str]] = []
        first: dict[str, str] = {}
        for line in block[1:].split("\n"):
            name, colon, value = line.partition(":")
            if not colon:
                raise RemoteProtocolError(f"header line without a colon: {line[:80]!r}")
            if "\\" in line:
                name = _unescape(name, table)
                value = _unescape(value, table)
            raw.append((name, value))
            if name not in first:
                first[name] = value
        return Headers._from_pairs(tuple(raw), first)


_new_headers = object.__new__

#: A whole 1.2 ACK / NACK frame of the common shape: one ``id`` header whose value is
#: printable ASCII without a backslash (nothing to unescape), no body. Group 1: the id.
_ACK_FRAME: Final = re.compile(rb"ACK\nid:([\x20-\x5b\x5d-\x7e]*)\n\n\0").match
_NACK_FRAME: Final = re.compile(rb"NACK\nid:([\x20-\x5b\x5d-\x7e]*)\n\n\0").match

#: Valid content-length values seen so far, with their values: a dict lookup instead of
#: validating and converting the same few digits again for every frame. Bounded: once
#: full, other values take the slower path.
_CONTENT_LENGTHS: Final[dict[str, int]] = {}
_MAX_CACHED_SIZES: Final = 1024


class _FrameBuilder:
    # Frame's mutable twin: the same slots in the same order, so that an instance can be
    # given the class Frame once its slots are set (CPython checks the layouts match).
    __slots__ = ("body", "command", "headers")

    command: str
    headers: Headers
    body: bytes


def _check_command_to_send(command: str) -> None:
    if command not in _KNOWN_COMMANDS and (
        len(command) > MAX_COMMAND_LENGTH or not _COMMAND_RE.match(command)
    ):
        raise LocalProtocolError(f"not a valid STOMP command: {command!r}")


def serialize(frame: Frame, version: str = "1.2") -> bytes:
    """Encode ``frame`` for a connection speaking ``version``.

    Header names and values are escaped as the version requires (nothing in 1.0 and on
    CONNECT, STOMP and CONNECTED frames). A ``content-length`` header is written whenever
    the body is non-empty (so bodies holding NULs survive); a caller-supplied
    ``content-length`` is kept if it is right, and never written twice.

    Raises:
      LocalProtocolError: the frame cannot be encoded in this version (a newline in an
        unescaped header, a CR in a 1.1 header, a ``:`` in an unescaped header name, a wrong
        ``content-length``, or an invalid command).
      ValueError: ``version`` is not a STOMP version.
    """
    command = frame.command
    _check_command_to_send(command)
    _check_version(version)
    body = frame.body
    if version == "1.0" or command in NO_ESCAPE_COMMANDS:
        escape = None
    else:
        escape = _ESCAPE_12 if version == "1.2" else _ESCAPE_11
    lines = [command]
    seen_length = False
    special = _SPECIAL_RE.search
    for name, value in frame.headers.raw:
        if name == "content-length":
            if seen_length:
                continue
            seen_length = True
            if value != str(len(body)):
                raise LocalProtocolError(
                    f"content-length header says {value!r} but the body has {len(body)} octets"
                )
        if special(name) or special(value):
            if escape is None:
                if "\n" in name or "\r" in name or ":" in name or "\n" in value or "\r" in value:
                    raise LocalProtocolError(
                        f"header {name!r}: {value!r} cannot be sent on a {command} frame in "
                        f"STOMP {version}: it needs escaping, which this frame does not allow"
                    )
            else:
                if version == "1.1" and ("\r" in name or "\r" in value):
                    raise LocalProtocolError(
                        f"header {name!r}: {value!r} holds a CR, which STOMP 1.1 cannot escape"
                    )
                name = name.translate(escape)
                value = value.translate(escape)
        lines.append(f"{name}:{value}")
    if body and not seen_length:
        lines.append(f"content-length:{len(body)}")
    lines.append("\n")
    try:
        head = "\n".join(lines).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"frame headers cannot be encoded as UTF-8: {exc}") from None
    return b"".join((head, body, b"\0"))
