"""The sans-I/O modules never import trio, directly or through each other (house rule 1).

Each module is imported in a fresh interpreter where importing trio is made to fail, so
an indirect import through another module is caught too."""

from __future__ import annotations

import subprocess
import sys

import pytest

SANS_IO = [
    "trio_stomp._errors",
    "trio_stomp._frames",
    "trio_stomp._codec",
    "trio_stomp._negotiation",
]

PROBE = """
import importlib.abc, importlib.util, sys, types

class NoTrio(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "trio" or name.startswith("trio."):
            raise ImportError(f"sans-I/O module imported {name}")
        return None

sys.meta_path.insert(0, NoTrio())
# Load the module by file, without running trio_stomp/__init__.py (which may import trio).
pkg = types.ModuleType("trio_stomp")
pkg.__path__ = [PKGDIR]
sys.modules["trio_stomp"] = pkg
importlib.import_module(MODULE)
"""


@pytest.mark.parametrize("module", SANS_IO)
def test_sans_io_module_does_not_import_trio(module: str) -> None:
    import trio_stomp

    pkgdir = trio_stomp.__path__[0]
    code = PROBE.replace("PKGDIR", repr(pkgdir)).replace("MODULE", repr(module))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_probe_catches_a_trio_import() -> None:
    # The probe itself must be able to fail: a module that imports trio is refused.
    code = PROBE.replace("PKGDIR", repr("/nonexistent")).replace("MODULE", repr("trio"))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "sans-I/O module imported trio" in result.stderr
