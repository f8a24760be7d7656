"""nox sessions: tests, tests_long, lint, typecheck, demo, bench.

Sessions run on the Python that runs nox (3.11 or later); pass
``--force-python 3.12`` (or ``-P``) to pick another one.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (Redis tests use BACKGROUNDER_REDIS_URL or fakeredis)."""
    session.install("-e", ".[dev]")
    session.run("pytest", "-q", "-m", "not slow", *session.posargs)


@nox.session
def tests_long(session: nox.Session) -> None:
    """Run the long-running variants of the reliability suites."""
    session.install("-e", ".[dev]")
    session.run("pytest", "-q", "-m", "slow", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check formatting and lint rules."""
    session.install("ruff")
    session.run("ruff", "format", "--check", ".")
    session.run("ruff", "check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Run mypy --strict on the three packages."""
    session.install("-e", ".[dev]", "types-psutil")
    session.run("mypy")


@nox.session
def demo(session: nox.Session) -> None:
    """Serve the example app and run a corpus job on real files, live.

    Options after ``--`` go to ``backgrounder demo``, e.g.
    ``nox -s demo -- --once`` or ``nox -s demo -- --folder ~/notes --pattern '*.md'``.
    """
    session.install("-e", ".")
    # Ctrl-C reaches the demo, which puts a running job back on the queue before
    # it exits: give it time instead of nox's default kill after 0.5 s.
    session.run(
        "backgrounder",
        "demo",
        *session.posargs,
        interrupt_timeout=30,
        terminate_timeout=10,
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Run bench/run.py with arq and SAQ beside it (``-- --quick`` for a short run).

    arq pins redis<6, which the Redis plugin accepts (redis>=5), so one venv holds
    backgrounder and both peers. Needs a Redis server (BACKGROUNDER_REDIS_URL).
    """
    session.install("-e", ".[redis,metrics,bench]")
    session.run(
        "python",
        "bench/run.py",
        "--peers-python",
        f"{session.bin}/python",
        *session.posargs,
    )
