"""The public surface and the architecture's rules, checked."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import federation as fed

PACKAGE = Path(fed.__file__).parent

#: Lowest first: a module may import (at its top level) only modules before it.
ORDER = [
    "_exceptions",
    "_service_address",
    "_supervisor",
    "_messages",
    "_fault_plan",
    "_channel",
    "_serialization",
    "_gather",
    "_store",
    "_context",
    "_faults",
    "_fault_runtime",
    "_runs",
    "_site_logging",
    "_steps",
    "_worker",
    "_ray_values",
    "_ray_links",
    "_ray_site",
    "backends",
    "_log",
    "_service_checks",
    "_field_checks",
    "_config",
    "_services",
    "_bindings",
    "_pipeline",
    "_metrics",
    "_callbacks",
    "_oom",
    "_timeline_events",
    "_timeline_layout",
    "_timeline_html",
    "_timeline_png",
    "_timeline",
    "_handle",
    "_execution",
    "_jobs",
    "_fault_control",
    "_slot_policy",
    "_pool",
    "_router",
    "_ray_cluster",
    "_ray_services",
    "_ray_pool",
    "_ray_events",
    "_ray_router",
    "_stats",
    "_batch",
    "_federation",
    "_demo",
    "_doctor",
    "_cli",
    "faults",
    "__init__",
    "__main__",
]
#: Upward imports allowed inside ``if TYPE_CHECKING:`` only, each with its reason.
TYPE_ONLY_UPWARD = {
    ("backends", "_config"),  # get_backend's parameter is annotated with the config it reads
    ("_bindings", "_pipeline"),  # a Step is annotated with the pipeline it belongs to
    ("_fault_control", "_slot_policy"),  # its hooks are annotated with the slots the policy keeps
}
#: What a worker process runs: it must never reach the client's side.
WORKER_SIDE = {
    "_exceptions",
    "_service_address",
    "_messages",
    "_fault_plan",
    "_faults",
    "_fault_runtime",
    "_channel",
    "_serialization",
    "_gather",
    "_store",
    "_context",
    "_runs",
    "_site_logging",
    "_steps",
    "_worker",
    "_ray_values",
    "_ray_links",
    "_ray_site",
}


def _module_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _federation_imports(tree: ast.AST, path: Path, top_level_only: bool) -> set[str]:
    found: set[str] = set()
    nodes = tree.body if top_level_only and isinstance(tree, ast.Module) else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = (node.module or "").split(".")[0]
            if node.level == 2 or (path.parent.name == "backends" and node.level == 1 and base == ""):
                base = base if node.level == 2 else "backends"
            if base:
                found.add(base)
            else:
                found.update(alias.name for alias in node.names)
    return found


def test_all_is_sorted_and_every_name_resolves_with_a_docstring() -> None:
    assert fed.__all__ == sorted(fed.__all__)
    for name in fed.__all__:
        value = getattr(fed, name)
        if name == "__version__":
            assert isinstance(value, str)
            continue
        assert inspect.getdoc(value), f"fed.{name} has no docstring"
    assert set(dir(fed)) >= set(fed.__all__)


def test_modules_import_only_lower_modules_at_their_top_level() -> None:
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_of(path)
        if module not in ORDER:
            raise AssertionError(f"{path.name} is not placed in the test's ORDER list")
        rank = ORDER.index(module)
        for imported in _federation_imports(ast.parse(path.read_text()), path, top_level_only=True):
            if imported in ("", module) or imported not in ORDER:
                continue
            assert ORDER.index(imported) < rank, (
                f"{path.relative_to(PACKAGE)} imports {imported} from above it"
            )


def _type_checking_imports(tree: ast.AST, path: Path) -> set[str]:
    """What ``tree`` imports inside ``if TYPE_CHECKING:`` blocks."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            block = ast.Module(body=node.body, type_ignores=[])
            found |= _federation_imports(block, path, top_level_only=True)
    return found


def test_no_import_goes_upward_at_any_level() -> None:
    """Not in a function either: a function-level import that goes upward only hides a cycle."""
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_of(path)
        rank = ORDER.index(module)
        tree = ast.parse(path.read_text())
        type_only = _type_checking_imports(tree, path)
        for imported in _federation_imports(tree, path, top_level_only=False):
            if imported in ("", module) or imported not in ORDER or ORDER.index(imported) < rank:
                continue
            assert imported in type_only and (module, imported) in TYPE_ONLY_UPWARD, (
                f"{path.relative_to(PACKAGE)} imports {imported} from above it"
            )


def test_the_timeline_and_batch_cycles_stay_gone() -> None:
    """The timeline takes plain data, not a Job; a batch takes a submitter, not a Federation."""
    for path in sorted(PACKAGE.glob("_timeline*.py")):
        imported = _federation_imports(ast.parse(path.read_text()), path, top_level_only=False)
        assert "_handle" not in imported, f"{path.name} imports _handle"
    path = PACKAGE / "_batch.py"
    assert "_federation" not in _federation_imports(ast.parse(path.read_text()), path, top_level_only=False)


def test_worker_side_never_imports_the_client_side() -> None:
    for module in WORKER_SIDE:
        path = PACKAGE / f"{module}.py"
        imported = _federation_imports(ast.parse(path.read_text()), path, top_level_only=False)
        assert imported <= WORKER_SIDE | {""}, f"{module} imports {imported - WORKER_SIDE}"


def test_a_worker_starts_without_heavy_imports() -> None:
    """A spawned worker pays for every import; these would cost ~0.1 s each per worker.

    The fault plan's classes and what they use (about 15 ms of a 55 ms worker
    start) wait until a job with faults reaches the worker.
    """
    code = (
        "import sys; import federation._worker; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'pydantic', 'structlog', 'psutil', 'asyncio', 'cloudpickle', 'numpy', "
        "'hashlib', 'json', 'random', 'pathlib', 'difflib'}), "
        "sorted({'federation._fault_plan', 'federation._faults'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[] []"
