"""The documentation cannot rot: every code block in README.md and docs/*.md runs, and every
relative link points at a file that exists.

Which blocks run:

- a ```python block runs, unless the line before it is ``<!-- not-tested: REASON -->``;
- a ```bash block runs only when the line before it is ``<!-- run -->``: each of its commands
  must be ``fisherlora ...`` and is run through ``fisherlora.cli.main`` (exit code 0 expected);
- a block of any language preceded by ``<!-- file: NAME -->`` is written to NAME first (e.g. the
  TOML of a suite that a later ``<!-- run -->`` block reads);
- any other block is text.

A page's blocks run in order, in one namespace, in a fresh temporary working directory, so a
snippet may use what an earlier one on the same page defined or wrote.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*(not-tested|run|file)\s*:?\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the first line of code
    lang: str
    code: str
    marker: str | None  # "not-tested", "run", "file" or None
    argument: str  # the not-tested reason or the file name

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def executed(self) -> bool:
        if self.marker == "not-tested":
            return False
        return self.lang == "python" or self.marker == "run"


def code_blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(previous.strip())
        blocks.append(
            Block(
                page,
                i + 2,
                fence.group(1),
                "\n".join(lines[i + 1 : end]) + "\n",
                marker.group(1) if marker else None,
                marker.group(2) if marker else "",
            )
        )
        i = end + 1
    return blocks


def cli_commands(code: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    commands = []
    for command in code.replace("\\\n", " ").splitlines():
        argv = shlex.split(command, comments=True)
        if argv:
            commands.append(argv)
    return commands


def run_block(block: Block, namespace: dict) -> None:
    if block.marker == "file":
        Path(block.argument).write_text(block.code, encoding="utf-8")
    if not block.executed:
        return
    if block.lang == "python":
        # pad with blank lines so a traceback's line numbers are the page's
        code = compile("\n" * (block.line - 1) + block.code, str(block.page), "exec")
        exec(code, namespace)
        return
    from fisherlora.cli import main

    for argv in cli_commands(block.code):
        assert argv[0] == "fisherlora", f"{block.where}: a run block holds fisherlora commands only"
        assert main(argv[1:]) == 0, f"{block.where}: {shlex.join(argv)} failed"


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_page_snippets_run(page, tmp_path, monkeypatch):
    blocks = code_blocks(page)
    assert any(b.executed for b in blocks), f"{page_id(page)} has no executed snippet"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FISHERLORA_CACHE", str(tmp_path / "cache"))
    namespace = {"__name__": "__docs__"}
    for block in blocks:
        try:
            run_block(block, namespace)
        except Exception as err:
            raise AssertionError(f"snippet at {block.where} failed: {err!r}") from err


def test_markers_are_well_formed():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for line in text.splitlines():
            if line.strip().startswith("<!--") and re.search(r"not-tested|run|file", line):
                marker = MARKER.match(line.strip())
                assert marker, f"{page_id(page)}: malformed marker {line!r}"
                if marker.group(1) in ("not-tested", "file"):
                    assert marker.group(2), f"{page_id(page)}: {line!r} needs a reason / name"
        for block in code_blocks(page):
            if block.marker == "run":
                assert block.lang == "bash", f"{block.where}: <!-- run --> marks bash blocks"


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    in_code, found = False, set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


@pytest.mark.parametrize("page", [*PAGES, ROOT / "benchmarks" / "README.md"], ids=page_id)
def test_links_point_at_existing_files(page):
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code blocks are code
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{page_id(page)}: broken links: {broken}"


def test_readme_starts_with_the_three_commands():
    first = code_blocks(ROOT / "README.md")[0].code
    assert "bash scripts/setup.sh" in first
    assert "fisherlora compare --task rotten-tomatoes --model minilm --quick" in first
    assert "python -m pytest -q" in first


def test_every_docs_page_is_linked_from_the_index():
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    for page in (ROOT / "docs").glob("*.md"):
        if page.name != "README.md":
            assert f"({page.name}" in index, f"docs/README.md does not link {page.name}"


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_examples_import_what_they_use(example):
    """An example's ``--help`` runs its imports: a name the package no longer has fails here,
    not on the user's first run (the examples train for minutes, so they are run by hand)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(example), "--help"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:")
