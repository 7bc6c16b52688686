"""Workers import the very package files the client imported, whatever the cwd and PYTHONPATH hold."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pipelines import chain_pipeline

import federation as fed

T = 30


def _where_pipeline() -> fed.Pipeline:
    pipeline = fed.Pipeline("where")

    @pipeline.step(site="a")
    def where():
        import sys

        import cwd_helper  # imported by the client from its current directory

        return sys.modules["federation"].__file__, cwd_helper.double(21)

    pipeline.output(where)
    return pipeline


def _decoy(folder: Path) -> None:
    """A ``federation`` package in ``folder`` that fails on import."""
    package = folder / "federation"
    package.mkdir(parents=True)
    for name in ("__init__.py", "_worker.py"):
        (package / name).write_text(f"raise ImportError('the decoy federation/{name} was imported')\n")


@pytest.mark.parametrize("backend", ["process"])
@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
@pytest.mark.parametrize("decoy_in", ["cwd", "PYTHONPATH", "site env"])
def test_a_decoy_federation_package_is_never_imported_by_workers(
    make_federation, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, start_method: str, decoy_in: str
) -> None:
    cwd, elsewhere = tmp_path / "cwd", tmp_path / "elsewhere"
    _decoy(cwd if decoy_in == "cwd" else elsewhere)
    cwd.mkdir(exist_ok=True)
    (cwd / "cwd_helper.py").write_text("def double(x):\n    return 2 * x\n")
    # The client finds modules in its current directory, as in a REPL or a notebook
    # (sys.path starts with ''); the worker must still find those it names by reference.
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "path", ["", *sys.path])
    monkeypatch.delitem(sys.modules, "cwd_helper", raising=False)
    import cwd_helper  # noqa: F401 - pickled by reference from now on

    sites: list[object] = ["a", "b"]
    if decoy_in == "PYTHONPATH":
        monkeypatch.setenv("PYTHONPATH", str(elsewhere))
    elif decoy_in == "site env":
        sites = [fed.Site("a", env={"PYTHONPATH": str(elsewhere)}), "b"]
    else:
        monkeypatch.delenv("PYTHONPATH", raising=False)
    try:
        federation = make_federation(sites, start_method=start_method)
        # Modules the client imported by reference (tests/pipelines.py) are found as before.
        assert federation.submit(chain_pipeline(), x=4).result(timeout=T) == 9
        worker_file, doubled = federation.submit(_where_pipeline()).result(timeout=T)
    finally:
        sys.modules.pop("cwd_helper", None)
    assert Path(worker_file).resolve() == Path(fed.__file__).resolve()
    assert doubled == 42
