"""The documentation holds together: every relative link resolves inside the repository, user docs do not point at
the team's development data (`../shared`, not part of what a user clones), and the README stays short."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300
# Inline links and images: [text](target) / ![alt](target); the target ends at whitespace or ')'.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# Reference-style definitions: [label]: target
_REF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")


def _markdown_files() -> list[Path]:
    """Every tracked *.md file (git ls-files), or every *.md outside hidden/virtual-env folders without git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "*.md"],
                             cwd=ROOT, capture_output=True, check=True, text=True).stdout
        files = [ROOT / p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in ROOT.rglob("*.md") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    return sorted(p for p in files if p.is_file())


def _user_docs() -> list[Path]:
    """README.md, docs/* except development.md, results/*: what a user reads."""
    docs = [ROOT / "README.md"]
    docs += [p for p in sorted((ROOT / "docs").glob("**/*.md")) if p.name != "development.md"]
    docs += sorted((ROOT / "results").glob("**/*.md"))
    return [p for p in docs if p.is_file()]


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans, where link syntax is not a link."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _links(text: str) -> list[str]:
    prose = _prose(text)
    return _LINK.findall(prose) + _REF.findall(prose)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*|_(?=\w)|(?<=\w)_", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def _broken_links(path: Path) -> list[str]:
    problems = []
    for target in _links(path.read_text(encoding="utf-8")):
        if _is_external(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path.resolve()
        where = f"{path.relative_to(ROOT)}: link '{target}'"
        try:
            dest.relative_to(ROOT)
        except ValueError:
            problems.append(f"{where} leaves the repository")
            continue
        if not dest.exists():
            problems.append(f"{where} points at nothing ({dest.relative_to(ROOT)} does not exist)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            problems.append(f"{where}: no heading with anchor '#{anchor}' in {dest.relative_to(ROOT)}")
    return problems


def test_every_relative_link_resolves_inside_the_repository():
    files = _markdown_files()
    assert ROOT / "README.md" in files
    problems = [p for f in files for p in _broken_links(f)]
    assert not problems, "\n".join(problems)


def test_user_docs_do_not_mention_the_development_data_folder():
    hits = []
    for path in _user_docs():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if "../shared" in line:
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "user docs must not point at ../shared (development data, not in a user's clone):\n" + \
        "\n".join(hits)


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; keep it at most {README_MAX_LINES} (move detail to docs/)"


def test_docs_the_code_cites_exist():
    """Docstrings cite docs/methods.md and its sections; the README index names these pages."""
    for page in ("docs/methods.md", "docs/data.md", "docs/evaluation.md", "docs/runs.md", "docs/scaling.md",
                 "docs/benchmarks.md", "docs/development.md", "results/README.md"):
        assert (ROOT / page).is_file(), page
    anchors = _anchors(ROOT / "docs/methods.md")
    for section in ("Token-level divergences", "DPKD as released", "ULD: token-level KD across tokenizers"):
        assert _slug(section) in anchors, f"docs/methods.md lacks the section '{section}' that losses/*.py cite"


@pytest.mark.parametrize("text, expected", [
    ("see [methods](docs/methods.md#dpkd) and ![plot](a.png)", ["docs/methods.md#dpkd", "a.png"]),
    ("`[not](a link)` and\n```\n[nor](this)\n```\n", []),
    ("[label]: results/README.md\n", ["results/README.md"]),
])
def test_link_extraction(text, expected):
    assert sorted(_links(text)) == sorted(expected)


def test_broken_link_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "a.md").write_text("# Title\n[ok](a.md#title) [bad](missing.md) [anchor](a.md#nope) "
                                   "[out](../x.md) [web](https://example.org)\n")
    (tmp_path / "x.md").write_text("")
    problems = _broken_links(tmp_path / "a.md")
    assert len(problems) == 3, problems
    assert any("missing.md" in p for p in problems)
    assert any("#nope" in p for p in problems)
    assert any("leaves the repository" in p for p in problems)


def test_configuration_reference_is_current():
    """docs/configuration.md is generated from the config dataclasses; regenerate it after changing a config."""
    from prefkd.config_reference import render

    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == render(), "stale: run `python -m prefkd.config_reference > docs/configuration.md`"
