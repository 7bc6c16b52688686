"""Install instructions that work: every hint and every page names a command that installs something.

The distribution (``federation-executor``) is not published on PyPI, and an unrelated
PyPI project named ``federation`` installs a package with the same import name, so no
message or page may send a user to PyPI for this project: they install from a checkout
(``pip install .``, ``pip install '.[viz]'``), or the one missing third-party package.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pytest

import federation as fed
from federation import _doctor

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# "pip install federation-executor" and "pip install 'federation-executor[viz]'" install nothing;
# "pip install federation" installs the wrong project (pages may name it only to warn against it).
NOT_PUBLISHED = re.compile(r"pip install\s+['\"]?federation-executor")
WRONG_PROJECT = re.compile(r"pip install\s+['\"]?federation(\[[^\]]*\])?['\"]?(\s|$)")
FENCED = re.compile(r"^```[a-z]*\n(.*?)^```", re.S | re.M)


def _pipeline() -> fed.Pipeline:
    pipeline = fed.Pipeline("one")

    @pipeline.step(site="a")
    def double(x: int) -> int:
        return 2 * x

    pipeline.output(double)
    return pipeline


def test_progress_bar_without_rich_names_an_install_command_that_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Asking for a progress bar without rich names rich itself and the extra from a checkout."""
    monkeypatch.setitem(sys.modules, "rich", None)
    with (
        fed.Federation(["a"], backend="thread", pool_size=1) as federation,
        pytest.raises(ImportError) as caught,
    ):
        federation.map(_pipeline(), [{"x": 1}], progress=True)
    message = str(caught.value)
    assert "federation-executor" not in message
    assert "pip install rich" in message
    assert "pip install '.[viz]'" in message


def test_doctor_from_an_uninstalled_source_tree_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """'federation doctor' run from a checkout that is not installed says how to install it."""
    monkeypatch.setattr(_doctor, "_extras", lambda: None)
    assert _doctor._cmd_doctor(argparse.Namespace(json=False)) == 0
    extras = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("extras:"))
    assert "pip install ." in extras
    assert "federation-executor" not in extras


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_pages_never_install_this_project_from_pypi(page: Path) -> None:
    """No page tells a user to install this project from PyPI."""
    text = page.read_text(encoding="utf-8")
    assert NOT_PUBLISHED.search(text) is None, NOT_PUBLISHED.search(text)
    for block in FENCED.findall(text):
        assert WRONG_PROJECT.search(block) is None, block


def test_install_pages_install_from_a_checkout_and_warn_about_the_namesake() -> None:
    """The install instructions install from a checkout, and warn about PyPI's unrelated 'federation'."""
    for page in (ROOT / "docs" / "index.md", ROOT / "docs" / "tutorial.md", ROOT / "README.md"):
        text = page.read_text(encoding="utf-8")
        assert "pip install ." in text, page.name
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    assert "pip install '.[viz]'" in index
    assert "unrelated" in index and "PyPI" in index
