"""The README for users: at most 250 lines, every relative link and anchor in it resolves, every docs page linked."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from urllib.parse import unquote, urlparse

from markdown_it import MarkdownIt

from helpers import cli
from helpers.infra.storage import REPO_ROOT

README = REPO_ROOT / "README.md"
MAX_LINES = 250


def _inline_tokens(markdown: str):
    for token in MarkdownIt("commonmark").parse(markdown):
        yield from token.children or []


def link_targets(markdown: str) -> list[str]:
    """Every link and image target of a Markdown text (code blocks and code spans hold none)."""
    targets = []
    for token in _inline_tokens(markdown):
        if token.type == "link_open":
            targets.append(token.attrs["href"])
        elif token.type == "image":
            targets.append(token.attrs["src"])
    return targets


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation other than - and _ dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (fenced code, such as a shell comment, is not a heading)."""
    tokens = MarkdownIt("commonmark").parse(path.read_text())
    return {github_anchor(tokens[i + 1].content) for i, t in enumerate(tokens) if t.type == "heading_open"}


def broken_links(page: Path) -> list[str]:
    """Relative targets of Markdown file `page` whose file is missing or whose anchor names no heading there."""
    broken = []
    for target in link_targets(page.read_text()):
        url = urlparse(target)
        if url.scheme or url.netloc:  # http(s), mailto: not checked offline
            continue
        path = page.parent / unquote(url.path) if url.path else page
        missing_anchor = path.exists() and url.fragment and path.suffix == ".md" and url.fragment not in anchors(path)
        if not path.exists() or missing_anchor:
            broken.append(target)
    return broken


def test_the_checker_finds_missing_files_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Speed, in short\n\n```bash\n# not a heading\n```\n")
    markdown = (
        "[ok](docs/page.md) [ok](docs/page.md#speed-in-short) [ok](#two-commands) [ok](docs/) "
        "![ok](docs/page.md) [web](https://example.org/x) `[code](missing.md)`\n\n"
        "```\n[fenced](missing.md)\n```\n\n"
        "[gone](docs/missing.md) ![gone](fig.png) [bad](docs/page.md#not-a-heading) [bad](#nowhere)\n\n"
        "## Two commands\n"
    )
    (tmp_path / "README.md").write_text(markdown)
    expected = ["docs/missing.md", "fig.png", "docs/page.md#not-a-heading", "#nowhere"]
    assert broken_links(tmp_path / "README.md") == expected


def test_readme_is_at_most_250_lines():
    lines = README.read_bytes().count(b"\n")  # what `wc -l README.md` prints
    assert lines <= MAX_LINES, f"README.md has {lines} lines; move measurements to docs/ (at most {MAX_LINES})"


def test_every_readme_link_resolves():
    assert not broken_links(README)


def test_readme_links_every_docs_page():
    linked = {Path(urlparse(t).path) for t in link_targets(README.read_text())}
    pages = {path.relative_to(REPO_ROOT) for path in (REPO_ROOT / "docs").glob("*.md")}
    assert pages and not pages - linked, f"docs pages the README does not link: {sorted(map(str, pages - linked))}"


def readme_commands(markdown: str) -> list[list[str]]:
    """The `python -m helpers ...` lines of the README's shell blocks, split into arguments."""
    lines = []
    for token in MarkdownIt("commonmark").parse(markdown):
        if token.type == "fence" and token.info.strip() == "bash":
            lines += [shlex.split(line, comments=True) for line in token.content.splitlines()]
    return [words[3:] for words in lines if words[:3] == ["python", "-m", "helpers"]]


def test_readme_has_one_parsing_example_per_command():
    """Every command of `python -m helpers` has an example in the README, and every example parses."""
    examples = readme_commands(README.read_text())
    assert sorted(argv[0] for argv in examples) == sorted(cli.COMMANDS)
    for argv in examples:
        args = cli.build_parser(argv).parse_args(argv)  # a bad option raises UsageError
        assert args.func is cli.COMMANDS[argv[0]][1]
