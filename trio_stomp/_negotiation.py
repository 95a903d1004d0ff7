"""Version and heart-beat negotiation: the spec's arithmetic, nothing else.

This module owns the choice of a protocol version from ``accept-version`` and the
heart-beat intervals both sides must keep. It is sans-I/O: it never imports trio and never
looks at a clock; the peer turns the numbers it returns into timers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from ._errors import RemoteProtocolError

__all__ = [
    "SUPPORTED_VERSIONS",
    "choose_version",
    "format_heart_beat",
    "negotiate_heart_beat",
    "parse_heart_beat",
]

SUPPORTED_VERSIONS: Final = ("1.0", "1.1", "1.2")


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def choose_version(
    accept_version: str | None, supported: Sequence[str] = SUPPORTED_VERSIONS
) -> str | None:
    """Return the highest version both sides speak, or ``None`` if there is none.

    ``accept_version`` is the raw header value (``"1.0,1.1,1.2"``); a missing header means
    the client speaks 1.0 only (spec: "Protocol Negotiation"). Unknown or malformed entries
    are ignored, so a client offering ``"1.2,2.0"`` still gets 1.2.
    """
    if accept_version is None:
        offered = {"1.0"}
    else:
        offered = {part.strip() for part in accept_version.split(",")}
    common = [version for version in supported if version in offered]
    if not common:
        return None
    return max(common, key=_version_key)


def parse_heart_beat(value: str | None) -> tuple[int, int]:
    """Parse a ``heart-beat`` header into ``(cx, cy)`` milliseconds.

    A missing header means ``(0, 0)``: no heart-beats either way.

    Raises:
      RemoteProtocolError: the value is not two non-negative decimal integers ``"a,b"``.
    """
    if value is None:
        return (0, 0)
    first, comma, second = value.partition(",")
    if (
        not comma
        or not first.strip().isdigit()
        or not second.strip().isdigit()
        or not first.strip().isascii()
        or not second.strip().isascii()
    ):
        raise RemoteProtocolError(
            f"malformed heart-beat header {value!r}: expected two non-negative integers 'cx,cy'"
        )
    return (int(first), int(second))


def format_heart_beat(value: tuple[int, int]) -> str:
    """The header value for ``(cx, cy)``: ``"cx,cy"``."""
    return f"{value[0]},{value[1]}"


def negotiate_heart_beat(local: tuple[int, int], remote: tuple[int, int]) -> tuple[int, int]:
    """Apply the spec's heart-beat arithmetic from one side's point of view.

    ``local`` is what we announced: ``(can_send_every, want_to_receive_every)``;
    ``remote`` is what the peer announced in the same form. Returns
    ``(send_every_ms, expect_every_ms)``, where 0 means "off":

    - we send every ``max(local[0], remote[1])`` ms unless either is 0;
    - we expect something every ``max(local[1], remote[0])`` ms unless either is 0.
    """
    send = 0 if local[0] == 0 or remote[1] == 0 else max(local[0], remote[1])
    expect = 0 if local[1] == 0 or remote[0] == 0 else max(local[1], remote[0])
    return (send, expect)
