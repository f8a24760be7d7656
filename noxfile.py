"""nox sessions: tests, tests_long, lint, typecheck, demo, bench."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite (Redis tests use BACKGROUNDER_REDIS_URL or fakeredis)."""
    session.install("-e", ".[dev]")
    session.run("pytest", "-q", "-m", "not slow", *session.posargs)


@nox.session(python=PYTHON)
def tests_long(session: nox.Session) -> None:
    """Run the long-running variants of the reliability suites."""
    session.install("-e", ".[dev]")
    session.run("pytest", "-q", "-m", "slow", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Check formatting and lint rules."""
    session.install("ruff")
    session.run("ruff", "format", "--check", ".")
    session.run("ruff", "check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """Run mypy --strict on the three packages."""
    session.install("-e", ".[dev]", "types-psutil")
    session.run("mypy")
