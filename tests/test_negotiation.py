"""Version choice and heart-beat arithmetic (spec: "Protocol Negotiation", "Heart-beating")."""

from __future__ import annotations

import pytest

from trio_stomp import RemoteProtocolError, choose_version, negotiate_heart_beat
from trio_stomp._negotiation import format_heart_beat, parse_heart_beat


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (None, "1.0"),
        ("1.0", "1.0"),
        ("1.0,1.1", "1.1"),
        ("1.1,1.0", "1.1"),
        ("1.0,1.1,1.2", "1.2"),
        ("1.2,2.0", "1.2"),
        (" 1.1 , 1.2 ", "1.2"),
        ("2.0", None),
        ("", None),
        ("1.10", None),
    ],
)
def test_choose_highest_common_version(offered: str | None, chosen: str | None) -> None:
    assert choose_version(offered) == chosen


def test_choose_version_respects_what_we_support() -> None:
    assert choose_version("1.0,1.1,1.2", supported=("1.0", "1.1")) == "1.1"
    assert choose_version("1.2", supported=("1.0",)) is None


@pytest.mark.parametrize(
    ("local", "remote", "expected"),
    [
        ((0, 0), (0, 0), (0, 0)),
        ((100, 200), (0, 0), (0, 0)),
        ((100, 200), (300, 400), (400, 300)),
        ((500, 0), (0, 100), (500, 0)),
        ((0, 500), (100, 0), (0, 500)),
        ((10000, 10000), (4000, 4000), (10000, 10000)),
    ],
)
def test_heart_beat_arithmetic(
    local: tuple[int, int], remote: tuple[int, int], expected: tuple[int, int]
) -> None:
    assert negotiate_heart_beat(local, remote) == expected


def test_heart_beat_header_parsing() -> None:
    assert parse_heart_beat(None) == (0, 0)
    assert parse_heart_beat("0,0") == (0, 0)
    assert parse_heart_beat("1000,2500") == (1000, 2500)
    assert format_heart_beat((10, 20)) == "10,20"
    for bad in ["", "1", "-1,0", "a,b", "1,2,3", "1.5,2", "\u0661,0"]:
        with pytest.raises(RemoteProtocolError, match="heart-beat"):
            parse_heart_beat(bad)
