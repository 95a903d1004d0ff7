"""The test matrix, linters and benchmarks.

``nox`` runs the default sessions: tests (every supported Python that is installed, against
the oldest and the newest trio we support), lint and typecheck. ``nox -s bench`` runs the
benchmarks, which print figures and never fail on speed.
"""

from __future__ import annotations

import nox

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
#: The oldest trio we claim in pyproject.toml (``trio>=...``) and the newest release.
TRIO_OLDEST = "0.25.0"
TRIO_VERSIONS = [TRIO_OLDEST, "latest"]
TEST_DEPS = [
    "pytest>=8",
    "pytest-trio>=0.8",
    "pytest-timeout",
    "hypothesis>=6.100",
    "trustme",
    "stomp-py>=8",
]

nox.options.sessions = ["tests", "lint", "typecheck"]
# Interpreters that are not installed are skipped, not failed, also under CI=true
# (nox's own default turns them into errors on CI).
nox.options.error_on_missing_interpreters = False
nox.options.reuse_existing_virtualenvs = True


@nox.session(python=PYTHONS)
@nox.parametrize("trio", TRIO_VERSIONS)
def tests(session: nox.Session, trio: str) -> None:
    """Run the test suite against one Python and one trio version."""
    session.install("-e", ".[websocket]", *TEST_DEPS)
    if trio == "latest":
        session.install("--upgrade", "trio")
    else:
        session.install(f"trio=={trio}")
    session.run("python", "-c", "import trio; print('trio', trio.__version__)")
    session.run("pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over everything we ship and test."""
    session.install("ruff")
    paths = ["trio_stomp", "tests", "benchmarks", "examples", "noxfile.py"]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the library and its tests."""
    session.install("-e", ".[websocket]", "mypy", *TEST_DEPS)
    session.run("mypy", "--strict", "trio_stomp", "tests")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Print the benchmark figures (not part of the default run).

    Runs the codec benchmark and the broker's in-process per-message cost
    (benchmarks/bench_core.py), then every broker scenario beside a private RabbitMQ
    (benchmarks/run_all.py: writes benchmarks/results/latest.md, latest.json and
    scaling.png, and flags any row more than 20% below the previous run). Arguments after
    ``--`` go to run_all.py, e.g. ``nox -s bench -- --quick``.
    """
    session.install("-e", ".[websocket]", "stomp-py", "matplotlib")
    session.run("python", "benchmarks/bench_codec.py")
    session.run("python", "benchmarks/bench_core.py")
    session.run("python", "benchmarks/run_all.py", *session.posargs)
