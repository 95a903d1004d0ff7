"""Tests of trio_stomp._peer (and the exception-group helper in trio_stomp._util)."""

from __future__ import annotations

import sys

import pytest
import trio

from trio_stomp._util import unwrap_lone_exception

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup


class Boom(Exception):
    pass


async def test_unwrap_lone_exception_from_nursery() -> None:
    cause = ValueError("root")

    async def fail() -> None:
        raise Boom("x") from cause

    with pytest.raises(Boom) as info, unwrap_lone_exception():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail)
    assert info.value.__cause__ is cause
    assert not isinstance(info.value.__context__, BaseExceptionGroup)


async def test_unwrap_keeps_groups_of_several() -> None:
    async def fail(n: int) -> None:
        raise Boom(n)

    with pytest.raises(BaseExceptionGroup) as info, unwrap_lone_exception():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail, 1)
            nursery.start_soon(fail, 2)
    assert len(info.value.exceptions) == 2


async def test_unwrap_keeps_an_application_group_intact() -> None:
    inner = ExceptionGroup("app", [Boom(1)])
    with pytest.raises(ExceptionGroup) as info, unwrap_lone_exception():
        async with trio.open_nursery():
            raise inner
    assert info.value.message == "app"
    assert [type(e) for e in info.value.exceptions] == [Boom]


async def test_unwrap_reraises_cancelled() -> None:
    with trio.CancelScope() as scope, unwrap_lone_exception():
        async with trio.open_nursery():
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
