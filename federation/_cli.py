"""The ``federation`` command (also ``python -m federation``).

Commands::

    federation demo                      run the embedded example federation
    federation run MODULE:PIPELINE ...   run a pipeline from a module
    federation bench [ARGS...]           run the benchmark suite of a source checkout
    federation doctor                    describe this machine and installation

Exit codes, for scripts:

====  ======================================================================
0     success
1     the job failed: a step raised, a worker died, the job was cancelled
2     usage error: a bad argument, module, pipeline, input or option
3     federation error: workers could not start, or the federation broke
4     timeout: the job did not end within ``--timeout`` (it was cancelled)
130   interrupted (Ctrl+C)
141   the output was closed early (``federation demo | head``)
====  ======================================================================

Errors are printed as one line on stderr (``federation: error: ...``); the
traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ._doctor import _cmd_doctor

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_FEDERATION_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_JOB_FAILED",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "main",
]

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_FEDERATION_ERROR = 3
EXIT_TIMEOUT = 4
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a process killed by it

_PROG = "federation"


class UsageError(Exception):
    """A problem with the command line: exit code 2."""


class _JobTimeoutError(Exception):
    """The job did not end within ``--timeout``: exit code 4."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr, with exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# -- entry point --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``federation`` command line with ``argv`` (default: ``sys.argv[1:]``); the exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    args.debug = debug = bool(getattr(args, "debug", False))
    args.verbose = int(getattr(args, "verbose", 0))
    _configure_logging(debug, args.verbose)
    try:
        code: int = args.handler(args)
    except KeyboardInterrupt:
        _report("interrupted", debug)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``federation demo | head``): not an error worth a message.
        # Point stdout at /dev/null so the interpreter's final flush does not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # noqa: BLE001 - every error becomes one line and an exit code
        code = _exit_code(exc)
        _report(_describe(exc), debug, hint=code != EXIT_USAGE)
        return code
    return code


def _exit_code(exc: BaseException) -> int:
    from ._exceptions import ConfigError, FederationError, JobError, PipelineError

    if isinstance(exc, _JobTimeoutError):
        return EXIT_TIMEOUT
    if isinstance(exc, (UsageError, ConfigError, PipelineError)):
        return EXIT_USAGE
    if isinstance(exc, JobError):
        return EXIT_JOB_FAILED
    if isinstance(exc, FederationError):
        return EXIT_FEDERATION_ERROR
    return EXIT_FEDERATION_ERROR


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, (UsageError, _JobTimeoutError)):
        return first
    name = type(exc).__name__
    return f"{name}: {first}" if first else name


def _report(message: str, debug: bool, hint: bool = False) -> None:
    if debug:
        traceback.print_exc(file=sys.stderr)
    suffix = " (run with --debug for the traceback)" if hint and not debug else ""
    sys.stderr.write(f"{_PROG}: error: {message}{suffix}\n")
    sys.stderr.flush()


def _configure_logging(debug: bool, verbose: int) -> None:
    """Quiet the library's own log records in the CLI unless asked: errors are reported as one line.

    ``--debug`` (or ``-vv``) shows debug records, ``-v`` info records; the
    ``FEDERATION_LOG_*`` environment variables, when set, decide instead. What
    workers print to stdout and stderr is always shown, prefixed with the worker's name.
    """
    if any(key.startswith("FEDERATION_LOG") for key in os.environ):
        return
    if debug or verbose:
        # Workers read the level from the environment they inherit.
        os.environ["FEDERATION_LOG_LEVEL"] = "debug" if debug or verbose > 1 else "info"
        return
    logger = logging.getLogger("federation")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False


# -- the parser ---------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    common = _Parser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logs"
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="show the federation's logs (-vv: debug)",
    )
    parser = _Parser(
        prog=_PROG,
        description="A pooled, federated job executor: run multi-site pipelines on local worker processes.",
        epilog=(
            "exit codes: 0 ok, 1 job failed, 2 usage error, 3 federation error, 4 timeout, 130 interrupted. "
            "Run 'federation COMMAND --help' for a command's options."
        ),
        parents=[common],
    )
    # No set_defaults for debug/verbose: parents share their actions, and would all lose SUPPRESS.
    parser.add_argument("--version", action="version", version=f"federation-executor {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="run the embedded example federation: a federated mean over three sites",
        description=(
            "Run a federated mean: two clinics keep their data and send only a count and a sum to the "
            "hub. Prints the result, a check against the central mean, the latency of repeated jobs "
            "and the timeline of one job."
        ),
    )
    _add_federation_options(demo, default_pool=2)
    demo.add_argument(
        "--threshold", type=float, default=0.3, help="average the values above this (default 0.3)"
    )
    demo.add_argument(
        "--jobs", type=_non_negative_int, default=20, help="repeat the job this many times (default 20)"
    )
    demo.add_argument(
        "--timeline",
        metavar="PATH",
        type=Path,
        help="write the job's timeline to PATH (.json, .html or .png)",
    )
    demo.set_defaults(handler=_cmd_demo)

    run = commands.add_parser(
        "run",
        parents=[common],
        help="run a pipeline from a module",
        description=(
            "Import MODULE (from the current directory or sys.path), take its pipeline PIPELINE, run it "
            "once on a local federation and print its result."
        ),
        epilog="example: federation run mypkg.flows:pipeline --sites a,b,hub --input threshold=0.5",
    )
    run.add_argument(
        "target", metavar="MODULE:PIPELINE", help="where the pipeline is, e.g. 'mypkg.flows:pipeline'"
    )
    run.add_argument(
        "--sites", type=_site_list, help="comma-separated site names (default: the sites the pipeline names)"
    )
    run.add_argument(
        "--input",
        "-i",
        dest="inputs",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="a job input; VALUE is a Python literal (0.5, [1, 2], 'x') or else a string; repeatable",
    )
    _add_federation_options(run, default_pool=1)
    run.add_argument(
        "--timeout", type=_positive_float, help="cancel the job after this many seconds (exit code 4)"
    )
    run.add_argument(
        "--timeline",
        metavar="PATH",
        type=Path,
        help="write the job's timeline to PATH (.json, .html or .png)",
    )
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.set_defaults(handler=_cmd_run)

    bench = commands.add_parser(
        "bench",
        parents=[common],
        help="run the benchmark suite (from a source checkout)",
        description=(
            "Run 'python -m benchmarks' from the source checkout this package belongs to (or the current "
            "directory). Arguments after the command are passed to it; put them after '--' if they "
            "start with a dash, e.g. 'federation bench -- --help'."
        ),
    )
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark suite")
    bench.set_defaults(handler=_cmd_bench)

    doctor = commands.add_parser(
        "doctor",
        parents=[common],
        help="describe this machine and installation",
        description=(
            "Print what matters to a federation here: Python, platform, start method, CPUs and affinity, "
            "memory, the open-files limit, /dev/shm, and the versions of the optional dependencies."
        ),
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="also list the nodes of the Ray cluster there ('auto': the one running here), with "
        "their federation/site labels and resources",
    )
    doctor.set_defaults(handler=_cmd_doctor)
    return parser


def _add_federation_options(parser: argparse.ArgumentParser, default_pool: int) -> None:
    parser.add_argument(
        "--backend",
        choices=("process", "thread", "ray"),
        default="process",
        help="where sites run (default: process); ray: Ray actors on the nodes labelled for each site",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="with --backend ray: 'auto' (the cluster running here) or host:port; default: a private "
        "local Ray instance",
    )
    parser.add_argument(
        "--start-method",
        choices=("spawn", "forkserver"),
        default="spawn",
        help="how process workers start: a fresh interpreter each, or forked from a forkserver "
        "(default: spawn)",
    )
    parser.add_argument(
        "--pool-size",
        type=_positive_int,
        default=default_pool,
        help=f"job executions to keep ready (default {default_pool})",
    )


def _start_options(args: argparse.Namespace) -> dict[str, Any]:
    # Only when asked: with --backend thread the default is no option at all, not an error.
    options: dict[str, Any] = {"start_method": args.start_method} if args.start_method != "spawn" else {}
    if args.ray_address is not None:
        options["ray_address"] = args.ray_address
    return options


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, not {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, not {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, not {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {text!r}")
    return value


def _site_list(text: str) -> list[str]:
    sites = [part.strip() for part in text.split(",") if part.strip()]
    if not sites:
        raise argparse.ArgumentTypeError(f"expected comma-separated site names, not {text!r}")
    return sites


def parse_input(text: str) -> tuple[str, Any]:
    """Parse ``NAME=VALUE``: the value as a Python literal if it is one, else as a string."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier():
        raise UsageError(f"--input takes NAME=VALUE with NAME a Python identifier, not {text!r}")
    try:
        value: Any = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = raw
    return name, value


# -- demo ---------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import _demo
    from ._federation import Federation
    from ._timeline import to_text

    pipeline = _demo.build_pipeline()
    clinics = ", ".join(_demo.CLINICS)
    print(f"A federated mean: {clinics} keep their data; only counts and sums travel to {_demo.HUB}.")
    started = time.perf_counter()
    with Federation(
        sites=_demo.build_sites(),
        backend=args.backend,
        pool_size=args.pool_size,
        **_start_options(args),
    ) as federation:
        ready = time.perf_counter() - started
        workers = f"{args.pool_size} slot(s) of {len(federation.sites)} {args.backend} workers"
        print(f"Started {workers} in {ready:.2f} s.")
        first = federation.submit(pipeline, threshold=args.threshold)
        result = first.result(timeout=60)
        latencies: list[float] = []
        for _ in range(args.jobs):
            begun = time.perf_counter()
            federation.submit(pipeline, threshold=args.threshold).result(timeout=60)
            latencies.append(time.perf_counter() - begun)
        job = federation.submit(pipeline, threshold=args.threshold)
        job.result(timeout=60)
    per_site = ", ".join(f"{site} {count}" for site, count in result["per_site"].items())
    print()
    mean = result["mean"]
    print(f"mean of the values above {args.threshold}: {mean:.6f} over {result['n']} values ({per_site})")
    print(f"the same, computed with all the data in one place: {_demo.central_mean(args.threshold):.6f}")
    if latencies:
        latencies.sort()
        median = latencies[len(latencies) // 2] * 1000
        print(f"{len(latencies)} more jobs, one at a time: median {median:.2f} ms per job")
    print()
    print("Timeline of the last job (times from its submission):")
    print(to_text(job.timeline()))
    if args.timeline is not None:
        path = job.export_timeline(args.timeline)
        print(f"\ntimeline written to {path}")
    return EXIT_OK


# -- run ----------------------------------------------------------------------------------


def load_pipeline(target: str) -> Any:
    """The pipeline named by ``module:attribute`` (the attribute may be dotted).

    Raises:
        UsageError: a malformed target, a module that cannot be imported, no such
            attribute, or an attribute that is not a pipeline.
    """
    from ._pipeline import Pipeline

    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise UsageError(f"expected MODULE:PIPELINE (e.g. 'mypkg.flows:pipeline'), not {target!r}")
    # Like 'python -m', look in the current directory first (the console script does not).
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise UsageError(f"cannot import module {module_name!r}: no module named {exc.name!r}") from exc
        raise UsageError(f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # the user's module raised while importing
        raise UsageError(f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    value: Any = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(value, Pipeline):
        raise UsageError(f"{target!r} is a {type(value).__name__}, not a federation Pipeline")
    return value


def _cmd_run(args: argparse.Namespace) -> int:
    from ._federation import Federation
    from ._timeline import to_text

    pipeline = load_pipeline(args.target)
    inputs = dict(parse_input(text) for text in args.inputs)
    sites = args.sites
    if sites is None:
        sites = list(dict.fromkeys(site for step in pipeline.steps.values() for site in step.sites))
    with Federation(
        sites=sites, backend=args.backend, pool_size=args.pool_size, **_start_options(args)
    ) as federation:
        job = federation.submit(pipeline, inputs=inputs)
        try:
            result = job.result(timeout=args.timeout)
        except TimeoutError:
            job.cancel(f"it did not end within --timeout {args.timeout} s")
            raise _JobTimeoutError(
                f"job {job.id} ({pipeline.name}) did not end within {args.timeout} s; cancelled"
            ) from None
        finally:
            if args.timeline is not None:
                job.wait(timeout=5.0)
                path = job.export_timeline(args.timeline)
                sys.stderr.write(f"timeline written to {path}\n")
    if args.json:
        print(json.dumps(result, default=repr, indent=2, sort_keys=True))
    else:
        import pprint

        print(pprint.pformat(result, sort_dicts=True))
    if args.verbose:
        sys.stderr.write(to_text(job.timeline()) + "\n")
    return EXIT_OK


# -- bench --------------------------------------------------------------------------------


def find_benchmarks() -> Path | None:
    """The ``benchmarks`` package of a source checkout: in the current directory, or beside this package."""
    package_root = Path(__file__).resolve().parent.parent
    for base in (Path.cwd(), package_root):
        candidate = base / "benchmarks"
        if (candidate / "__main__.py").is_file() or (candidate / "__init__.py").is_file():
            return candidate
    return None


def _cmd_bench(args: argparse.Namespace) -> int:
    suite = find_benchmarks()
    if suite is None:
        raise UsageError(
            "no benchmark suite here: 'federation bench' runs benchmarks/ from a source checkout "
            "(git clone the project and run it from the repository's root)"
        )
    if not (suite / "__main__.py").is_file():
        raise UsageError(f"the benchmark suite at {suite} cannot be run: it has no __main__.py")
    passed = list(args.args)
    if passed[:1] == ["--"]:
        passed = passed[1:]
    root = suite.parent
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(
        dict.fromkeys([str(root), package_root, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    )
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "benchmarks", *passed], cwd=root, env=env, check=False
        )
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return completed.returncode if completed.returncode >= 0 else 128 - completed.returncode


# -- doctor -------------------------------------------------------------------------------
