"""Every ```python block of README.md and docs/*.md runs as written.

The blocks of one page run in order, in one fresh namespace (a later block may use what an
earlier one defined, as a reader would), with a fresh temporary directory as the working
directory. A failure names the page and the line of the failing statement.

A block that cannot run here is marked by an HTML comment on the line just before its
fence (invisible on GitHub and in the docs site):

* ``<!-- docs-test: requires torch, jax -->``: run where these modules import, skipped
  with the reason elsewhere. ``cuda`` means CuPy with a CUDA device. In the ``docs`` nox
  session (``XPOPTIM_DOCS_ALL=1``) a missing module other than ``cuda`` is a failure: that
  session installs what the pages use, so those blocks cannot drift unnoticed.
* ``<!-- docs-test: skip REASON -->``: an excerpt that does not run on its own (say, a
  fragment of the user's own training loop); the reason is required.

Only ``python`` blocks run; shell and text blocks are left alone.

This module runs in the ``docs`` session and in ``tests(numpy)`` (or a plain ``pytest``);
the other backend sessions skip it, as the pages do not depend on their backend.
"""

from __future__ import annotations

import importlib.util
import os
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

if os.environ.get("XPOPTIM_BACKENDS", "numpy") != "numpy":
    pytest.skip(
        "the docs examples run in the docs session and tests(numpy)", allow_module_level=True
    )

FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<info>[^`]*)$")
MARKER = re.compile(r"^<!--\s*docs-test:\s*(?P<what>\S+)\s*(?P<arg>.*?)\s*-->\s*$")
PYTHON = {"python", "py", "python3", "pycon"}


@dataclass
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int  # the line of the block's first code line, from 1
    language: str
    code: str
    marker: tuple[str, str] | None  # ("requires", "torch, jax") or ("skip", reason)

    @property
    def where(self) -> str:
        return f"{self.page.name}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, with the marker just before each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i].strip())
        if opening is None:
            i += 1
            continue
        fence = opening["fence"]
        language = (opening["info"].split() or [""])[0].lower()
        previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        found = MARKER.match(previous)
        marker = (found["what"], found["arg"]) if found else None
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{page.name}:{i + 1}: code block is never closed")
        # Indented fences (inside list items) are dedented as a reader would copy them.
        indent = len(lines[i]) - len(lines[i].lstrip())
        code = "\n".join(line[indent:] for line in lines[i + 1 : end])
        blocks.append(Block(page, i + 2, language, code, marker))
        i = end + 1
    return blocks


def _available(requirement: str) -> str | None:
    """Why ``requirement`` cannot run here, or None if it can."""
    if requirement == "cuda":
        if importlib.util.find_spec("cupy") is None:
            return "needs CuPy and a CUDA device: cupy is not installed"
        import cupy

        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                return "needs a CUDA device: there is none"
        except Exception as exc:  # CUDARuntimeError, a missing driver
            return f"needs a CUDA device: {exc}"
        return None
    try:
        found = importlib.util.find_spec(requirement)
    except ModuleNotFoundError:  # a parent package is missing
        found = None
    return None if found is not None else f"needs {requirement}, which is not installed"


def why_not_run(block: Block, *, strict: bool) -> str | None:
    """Why a block is not run (None: it runs). Raises on a malformed or unmet marker."""
    if block.language not in PYTHON:
        return f"a {block.language or 'plain'} block"
    if block.marker is None:
        return None
    what, arg = block.marker
    if what == "skip":
        if not arg:
            raise AssertionError(f"{block.where}: a docs-test skip marker needs a reason")
        return f"marked as an excerpt: {arg}"
    if what == "requires":
        requirements = [r.strip() for r in arg.split(",") if r.strip()]
        if not requirements:
            raise AssertionError(f"{block.where}: docs-test requires names no module")
        for requirement in requirements:
            reason = _available(requirement)
            if reason is None:
                continue
            if strict and requirement != "cuda":
                raise AssertionError(
                    f"{block.where}: {reason}; the docs session must install it "
                    "(noxfile.py, session docs)"
                )
            return reason
        return None
    raise AssertionError(f"{block.where}: unknown docs-test marker {what!r}")


def run_page(page: Path, workdir: Path, *, strict: bool) -> list[str]:
    """Run the python blocks of ``page`` in order in one namespace, in ``workdir``.

    Returns the reasons of the python blocks that were not run.

    Raises:
        AssertionError: a block failed; the message names the page and line.
    """
    namespace: dict[str, object] = {"__name__": "__docs__"}
    not_run = []
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        for block in blocks_of(page):
            reason = why_not_run(block, strict=strict)
            if reason is not None:
                if block.language in PYTHON:
                    not_run.append(f"{block.where}: {reason}")
                continue
            # Padding with blank lines makes tracebacks show the page's own line numbers.
            source = "\n" * (block.line - 1) + block.code
            try:
                exec(compile(source, str(page), "exec"), namespace)
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt):
                    raise
                frames = [
                    f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(page)
                ]
                line = frames[-1].lineno if frames else block.line
                detail = "".join(traceback.format_exception(exc)).rstrip()
                raise AssertionError(
                    f"{page.name}:{line}: the block at line {block.line} failed with "
                    f"{type(exc).__name__}: {exc}\n{detail}"
                ) from None
    finally:
        os.chdir(cwd)
    return not_run


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_page_examples_run(page, tmp_path, capsys):
    strict = os.environ.get("XPOPTIM_DOCS_ALL") == "1"
    try:
        not_run = run_page(page, tmp_path, strict=strict)
    except AssertionError as exc:
        pytest.fail(str(exc), pytrace=False)
    with capsys.disabled():
        for reason in not_run:
            print(f"\n  not run: {reason}", end="")


# -- the runner itself ---------------------------------------------------------------------

PAGE = """# A page

```python
x = 1
```

Some text.

<!-- docs-test: skip a fragment of the user's loop -->
```python
model.fit()
```

```bash
rm -rf /
```

<!-- docs-test: requires surely_not_a_module_xpoptim -->
```python
import surely_not_a_module_xpoptim
```

```python
y = x + 1
assert y == 2
open("made-here.txt", "w").close()
z = 1 / (y - 2)
```
"""


def test_the_runner_names_the_page_and_line_of_a_failure(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    work = tmp_path / "work"
    work.mkdir()
    # Blocks share one namespace (y uses x), skip and requires markers are honoured,
    # and the failure points at the failing statement: line 27 of the page.
    with pytest.raises(AssertionError, match=r"page\.md:27: the block at line 24 failed") as info:
        run_page(page, work, strict=False)
    assert "ZeroDivisionError" in str(info.value)
    assert (work / "made-here.txt").exists()  # it ran in the given directory


def test_the_runner_reports_what_it_did_not_run(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE.replace("z = 1 / (y - 2)", ""))
    not_run = run_page(page, tmp_path, strict=False)
    assert not_run == [
        "page.md:11: marked as an excerpt: a fragment of the user's loop",
        "page.md:20: needs surely_not_a_module_xpoptim, which is not installed",
    ]
    # In the docs session an uninstalled requirement is an error, not a skip.
    with pytest.raises(AssertionError, match=r"page\.md:20: needs surely_not.*docs session"):
        run_page(page, tmp_path, strict=True)


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("<!-- docs-test: skip -->", "skip marker needs a reason"),
        ("<!-- docs-test: requires -->", "requires names no module"),
        ("<!-- docs-test: maybe later -->", "unknown docs-test marker 'maybe'"),
    ],
)
def test_malformed_markers_are_errors(tmp_path, marker, message):
    page = tmp_path / "page.md"
    page.write_text(f"{marker}\n```python\nx = 1\n```\n")
    with pytest.raises(AssertionError, match=message):
        run_page(page, tmp_path, strict=False)
