"""The README and docs/ stay usable: a short README that opens with the two commands, a command
table that matches the CLI, links that resolve, and no result file that no document cites."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import typer

from pipelines.cli import app

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted([README, *(ROOT / "docs").rglob("*.md")])
RESULTS = ROOT / "benchmarks" / "results"

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
# [text](target) and ![alt](target); the text may wrap over lines.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text without its fenced code blocks (code may hold brackets that are not links)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", prose(path.read_text()), re.M)}


def test_readme_is_at_most_200_lines():
    assert len(README.read_text().splitlines()) <= 200


def test_readme_opens_with_install_and_demo_then_install_and_test():
    commands = [line for block in FENCE.findall(README.read_text()) for line in block.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    demo, tests = commands[:2]
    assert demo.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e . &&")
    assert demo.endswith("&& retrack demo --quick")
    assert tests.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e \".[test]\"")
    assert tests.endswith("&& python -m pytest")
    # CI runs the same test command after the same installs.
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "python -m pytest" in ci and "pip install -q --no-deps open_clip_torch" in ci
    assert "quick" in {p.name for p in typer.main.get_command(app).commands["demo"].params}


def test_readme_command_table_matches_the_cli():
    text = README.read_text()
    table = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    listed: dict[str, set[str]] = {}
    for cmd, subs in re.findall(r"^\| `retrack (\w+)(?: ([a-z|\\]+))?", table, re.M):
        listed.setdefault(cmd, set()).update(s for s in subs.split("\\|") if s)
    cli = typer.main.get_command(app).commands
    assert set(listed) == set(cli)
    for name, command in cli.items():
        assert listed[name] == set(getattr(command, "commands", {})), name


def test_every_relative_link_in_readme_and_docs_resolves():
    broken = []
    for doc in DOCS:
        for target in LINK.findall(prose(doc.read_text())):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.is_relative_to(ROOT) or not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file in the repository)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no heading with that anchor)")
    assert not broken, "\n".join(broken)


def expand_braces(name: str) -> list[str]:
    """`a{1,2}_{x,y}.json` -> the four names it stands for, as a shell would expand it."""
    parts = re.split(r"\{([^{}]*)\}", name)
    options = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(choice) for choice in itertools.product(*options)]


def test_every_result_file_is_cited_by_a_document():
    text = "\n".join(doc.read_text() for doc in DOCS)
    cited = {name for token in re.findall(r"[\w.{},-]+\.(?:json|png)", text) for name in expand_braces(token)}
    files = {p.name for p in RESULTS.iterdir() if p.is_file()}
    assert files, "no result files found"
    assert not files - cited, f"cite these in README.md or docs/, or move them to {RESULTS / 'archive'}: {sorted(files - cited)}"
