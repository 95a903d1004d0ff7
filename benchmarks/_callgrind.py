"""Count CPU instructions with valgrind's callgrind: the benchmarks' reproducible measure.

Wall-clock time on a shared machine drifts by tens of percent; the number of instructions
a piece of Python executes does not (about 1% between runs). A script's cost per item is
measured as the difference between two runs of ``count`` and ``2 * count`` items, so the
interpreter's start-up and imports cancel out.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Sequence


def instructions_per_item(arguments: Callable[[int], Sequence[str]], count: int) -> float:
    """Instructions per item of ``python ARGUMENTS(n)`` (this interpreter under
    callgrind), from runs with ``n = count`` and ``n = 2 * count``.

    Raises:
      RuntimeError: valgrind printed no total (not installed, or the run failed).
    """
    totals = []
    for n in (count, 2 * count):
        result = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--callgrind-out-file=/dev/null",
                sys.executable,
                *arguments(n),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        match = re.search(r"Collected : (\d+)", result.stderr)
        if match is None:
            raise RuntimeError(f"no callgrind total in:\n{result.stderr[-2000:]}")
        totals.append(int(match.group(1)))
    return (totals[1] - totals[0]) / count
