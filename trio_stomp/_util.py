"""Small helpers shared by the Trio layers (peer, client, broker).

This module owns the library's single policy for exception groups (house rule 6): every public
async context manager that runs an internal, strict nursery wraps it in
:func:`unwrap_lone_exception`, so that a caller sees ``ConnectionLost`` (or their own
``KeyError``) rather than an ``ExceptionGroup`` holding just that one exception.

It must never swallow an exception: a group holding more than one exception is re-raised
unchanged, and ``trio.Cancelled`` is unwrapped and re-raised like any other exception. It
imports nothing from the rest of trio_stomp.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["lone_exception", "unwrap_lone_exception"]


def lone_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """Return the only exception ``group`` holds, or ``None`` if it holds several.

    Only one level is looked through: a nursery wraps whatever its tasks and its body
    raised in a fresh group, so one level is exactly what *our* nursery added. A group the
    application raised itself (nested one level down) is left intact.
    """
    if len(group.exceptions) == 1:
        return group.exceptions[0]
    return None


@contextmanager
def unwrap_lone_exception() -> Iterator[None]:
    """Re-raise a lone exception out of the exception group raised in the block.

    Use it around the internal nursery of a public context manager::

        @asynccontextmanager
        async def open_thing(...):
            with unwrap_lone_exception():
                async with trio.open_nursery() as nursery:
                    ...
                    yield thing

    A group with exactly one member is replaced by that member (its traceback, ``__cause__``
    and ``__context__`` are kept as they were); any other group propagates unchanged. Nothing
    is ever swallowed, ``trio.Cancelled`` included.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        exc = lone_exception(group)
        if exc is None:
            raise
        # Raising inside ``except`` would set exc.__context__ to the group (a noisy
        # traceback that shows the same exception twice); restore what it had instead.
        cause, context, suppress = exc.__cause__, exc.__context__, exc.__suppress_context__
        try:
            raise exc  # the chain is restored in ``finally`` below
        finally:
            exc.__cause__ = cause
            exc.__context__ = context
            exc.__suppress_context__ = suppress
            del exc, group
