"""Sessions: tests (then tests_oldest), lint, typecheck, examples, stress, bench, docs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "examples"]
nox.options.reuse_existing_virtualenvs = True


OLDEST = "constraints/oldest.txt"
# What tests_oldest runs: the behaviour of jobs, faults, payloads, pipelines, both
# start methods, logs (structlog), timelines (matplotlib) and property tests
# (hypothesis), services (mirakuru), on every backend: the ray backend's tests run
# on the oldest Ray (its session cluster adds a few seconds); about three minutes.
OLDEST_SUITE = [
    "tests/test_federation.py",
    "tests/test_reliability.py",
    "tests/test_payloads.py",
    "tests/test_pipeline.py",
    "tests/test_forkserver.py",
    "tests/test_worker_imports.py",
    "tests/test_api.py",
    "tests/test_stats.py",
    "tests/test_logs.py",
    "tests/test_timeline.py",
    "tests/test_properties.py",
    "tests/test_services.py",
]


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, on every backend, with the newest releases; then tests_oldest.

    ``nox -s tests`` (the README's command, which CI runs) proves both ends of
    every dependency range: tests_oldest runs after this session, on the same
    tests when some are named (``nox -s tests -- tests/test_api.py``).
    """
    session.install(".[test]")
    session.run("pytest", "-m", "not stress", *session.posargs)
    session.notify("tests_oldest", session.posargs)


@nox.session
def tests_oldest(session: nox.Session) -> None:
    """The behaviour suite on the oldest versions pyproject.toml allows (constraints/oldest.txt)."""
    _check_oldest_are_lower_bounds(session)
    if sys.version_info >= (3, 12):  # the session's Python is nox's own
        session.skip("the oldest versions have no wheels for Python 3.12+: run nox with Python 3.10 or 3.11")
    session.install("-c", OLDEST, ".[test]")
    session.run("pytest", "-m", "not stress", *(session.posargs or OLDEST_SUITE))


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _release(version: str) -> tuple[int, ...]:
    parts = [int(part) for part in version.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _check_oldest_are_lower_bounds(session: nox.Session) -> None:
    """Fail unless constraints/oldest.txt pins every runtime and test dependency at its lower bound."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: pip still refuses pins below the bounds
        session.warn("no tomllib: constraints/oldest.txt not compared with pyproject.toml")
        return
    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    bounds = {}
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^]]*\])?>=([0-9.]+)", requirement.replace(" ", ""))
        if match is None:
            session.error(f"pyproject.toml: {requirement!r} has no plain lower bound to test")
        bounds[_canonical(match[1])] = match[3]
    pins = {}
    for text in Path(OLDEST).read_text().splitlines():
        line = text.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_canonical(name)] = version
    wrong = [
        f"{name}: pyproject.toml says >={bound}, {OLDEST} pins {pins.get(name)}"
        for name, bound in sorted(bounds.items())
        if name not in pins or _release(pins[name]) != _release(bound)
    ]
    if wrong:
        session.error("the oldest set is not the lower bounds:\n  " + "\n  ".join(wrong))


@nox.session
def stress(session: nox.Session) -> None:
    """Long load tests: 10,000 jobs, hundreds of streaming jobs, a 90 s kill soak and a kill storm."""
    session.install(".[test]")
    env = {"FEDERATION_STRESS": "1"}
    session.run("pytest", "-m", "stress", "-v", *session.posargs, env=env)
    # The kill soak and storm run short with the tests; here at full length, with their figures.
    session.run("pytest", "tests/test_kill_soak.py", "-v", "--timeout", "900", *session.posargs, env=env)


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

    # fedavg.py and fault_drill.py train on scikit-learn's digits; the drill draws a PNG.
    session.install(".[viz]", "numpy", "scikit-learn")
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
