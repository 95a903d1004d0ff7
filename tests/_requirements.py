"""Gatekeeping for tests that need something outside this repository.

This module owns one policy: a test that needs an external program or module
(RabbitMQ, stomp.py, ...) is *skipped* on a developer's machine that lacks it,
but *fails* under continuous integration (``CI=true`` or ``CI=1``), where a
missing peer means the interop suite silently stopped testing anything.

It must never install, start or probe anything itself: callers compute the
condition and this module only decides between skip and fail.
"""

from __future__ import annotations

import importlib
import os
import types

import pytest

__all__ = ["in_ci", "require", "require_module"]


def in_ci() -> bool:
    """Return True when running under CI (env ``CI`` is "true" or "1", any case).

    Never blocks, never raises.
    """
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


def require(condition: bool, reason: str) -> None:
    """Stop the current test unless *condition* holds.

    Raises ``pytest.fail.Exception`` (the test FAILS) under CI, otherwise
    ``pytest.skip.Exception`` (the test is skipped), both carrying *reason*.
    Returns normally when *condition* is true. Never blocks.
    """
    if condition:
        return
    if in_ci():
        pytest.fail(f"required under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require_module(name: str) -> types.ModuleType:
    """Import and return the module *name*, or stop the test as ``require`` does.

    Only ``ImportError`` counts as "missing"; any other error raised while
    importing the module propagates, because it is a real bug, not an absent
    dependency. Blocks only for the duration of the import.
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        require(False, f"Python module {name!r} is not importable ({exc}): pip install it")
        raise AssertionError("unreachable: require(False, ...) always raises") from exc
