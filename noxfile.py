"""Sessions: tests, lint, typecheck, examples, stress, bench, docs."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "examples"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, on every backend."""
    session.install(".[test]")
    session.run("pytest", "-m", "not stress", *session.posargs)


@nox.session
def stress(session: nox.Session) -> None:
    """Long load tests: 10,000 jobs, hundreds of streaming jobs at once."""
    session.install(".[test]")
    session.run("pytest", "-m", "stress", "-v", *session.posargs, env={"FEDERATION_STRESS": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package."""
    session.install(".[viz]", "mypy")
    session.run("mypy")


@nox.session
def examples(session: nox.Session) -> None:
    """Run every example; fail if one fails."""
    import pathlib

    session.install(".")
    for path in sorted(pathlib.Path("examples").glob("*.py")):
        session.run("python", str(path))


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark suite beside its baselines (Ray too); ``nox -s bench -- --quick`` for a short run."""
    session.install(".[bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site (mkdocs, API reference from docstrings); any warning fails."""
    session.install(".[docs]", "ruff")  # ruff formats the signatures in the API reference
    session.run("mkdocs", "build", "--strict", "--site-dir", "site", env={"NO_MKDOCS_2_WARNING": "1"})
