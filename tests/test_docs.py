"""The documentation runs as written: every Python code block in the README and the guides
(each file's blocks in order, in one namespace, in an empty directory, as a reader pastes
them), and every ``xpnet`` command in their shell blocks parses with today's flags."""

from __future__ import annotations

import re
import shlex
import textwrap
from pathlib import Path

import pytest

import xpnet
from xpnet.cli import build_parser
from xpnet.datasets import find_dataset

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# A fenced block, possibly indented under a list item: its language and its code.
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)\n(?P<code>.*?)^(?P=indent)```",
                   re.MULTILINE | re.DOTALL)


def blocks(path: Path, langs: tuple) -> list:
    return [textwrap.dedent(m["code"]) for m in FENCE.finditer(path.read_text())
            if m["lang"] in langs]


def _has_fashion_mnist() -> bool:
    return find_dataset("fashion-mnist") is not None


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, ("python",))], ids=_name)
def test_every_python_block_runs_as_written(page, tmp_path, monkeypatch, capsys):
    code = blocks(page, ("python",))
    if any("fashion-mnist" in c for c in code) and not _has_fashion_mnist():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    for i, block in enumerate(code, 1):
        try:
            exec(compile(block, f"{_name(page)}, Python block {i}", "exec"), namespace)
        except xpnet.BackendUnavailableError as exc:  # (JAX, torch: where not installed)
            pytest.skip(f"{_name(page)}, Python block {i}: {exc}")
    capsys.readouterr()


def _commands(page: Path) -> list:
    """The ``xpnet ...`` commands of a page's shell blocks (continued lines joined, comments
    and what precedes ``xpnet`` on the line, such as mpiexec, left out)."""
    found = []
    for block in blocks(page, ("bash", "sh", "console")):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "xpnet" in words:
                found.append(words[words.index("xpnet") + 1:])
    return found


@pytest.mark.parametrize("page", [p for p in PAGES if _commands(p)], ids=_name)
def test_every_command_shown_parses(page):
    parser = build_parser()
    for args in _commands(page):
        if args and args[0] in ("--version", "--help"):
            continue
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{_name(page)}: `xpnet {shlex.join(args)}` does not parse")


def test_the_readme_is_short_and_points_to_the_guides():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).is_file(), link
    assert "../shared" not in text and "seeds" not in text
