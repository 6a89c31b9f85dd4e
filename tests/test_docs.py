"""The docs in docs/ stay reachable and in step with the code.

- Code, configs, docker files, README.md and docs/ point only into the repository: no notes
  outside it (``../shared/...``, ``shared/docs``, the old names ``methods.md`` / ``torchrec.md`` /
  ``design-notes`` without ``docs/``). ``../shared/data`` is the one exception: the optional real
  logs beside the checkout that tests/test_real_data.py and the benchmark commands read.
- Every ``docs/<name>.md`` reference, and every relative Markdown link in README.md and docs/,
  names a file that exists and, with ``#anchor``, a heading of that file.
- docs/methods.md has a section per registered method, naming its file and default layout,
  listing every key of its config section, with "Deviations" and "Budget" subsections.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
from pathlib import Path

import pytest

from embdim.embedding_methods import METHOD_NAMES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
METHODS_DOC = DOCS / "methods.md"
SOURCE_SUFFIXES = {".py", ".sh", ".toml", ".yaml", ".yml", ".txt", ".cfg"}
SKIP_DIRS = {".git", ".venv", "__pycache__", "build", "dist", "runs"}

DOC_REF = re.compile(r"(?<![\w./-])docs/([\w./-]+?\.md)(#[\w-]+)?")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
OUTSIDE = [
    (re.compile(r"\.\./shared(?!/data\b)"), "../shared (outside the repository)"),
    (re.compile(r"shared/docs"), "shared/docs (outside the repository)"),
    (re.compile(r"(?<![\w-])(methods\.md|torchrec\.md|design-notes|style-anchors)"),
     "a note outside the repository (the repository's docs are docs/<name>.md)"),
]


def source_files() -> list[Path]:
    """Tracked code, config and docker files, README.md and docs/*.md (a tree walk without git)."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        paths = [ROOT / line for line in out.splitlines()]
        paths += [p for p in DOCS.glob("*.md") if p not in paths]  # new docs not committed yet
    except (OSError, subprocess.CalledProcessError):  # e.g. a copy of the tree without .git
        paths = []
        for folder, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            paths += [Path(folder) / name for name in names]
    keep = []
    for p in paths:
        rel = p.relative_to(ROOT)
        if not p.is_file() or SKIP_DIRS & set(rel.parts) or any(s.endswith(".egg-info") for s in rel.parts):
            continue
        if p.suffix in SOURCE_SUFFIXES or p.name.startswith("Dockerfile") or p.parent == ROOT / ".ci" \
                or rel == Path("README.md") or (rel.parent == Path("docs") and p.suffix == ".md"):
            keep.append(p)
    return sorted(keep)


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of every heading in a Markdown file (repeated slugs get -1, -2, ...)."""
    seen: dict[str, int] = {}
    result = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        m = re.match(r"#{1,6} (.+)", line)
        if m and not in_code:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            result.add(base if n == 0 else f"{base}-{n}")
    return result


def check_target(path: Path, anchor: str | None, where: str) -> str | None:
    """None when ``path`` (and ``#anchor``) exists, else the problem."""
    if not path.is_file():
        return f"{where}: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} does not exist"
    if anchor and anchor not in anchors(path):
        return f"{where}: {path.name} has no heading with anchor #{anchor}"
    return None


def test_sources_point_only_into_the_repository() -> None:
    files = source_files()
    assert METHODS_DOC in files and ROOT / "embedding_methods" / "pme.py" in files
    problems = []
    for p in files:
        rel = p.relative_to(ROOT)
        if rel == Path("tests/test_docs.py"):
            continue  # the patterns themselves
        for number, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            where = f"{rel}:{number}"
            scrubbed = DOC_REF.sub("", line)  # docs/methods.md is the allowed form
            for pattern, what in OUTSIDE:
                if pattern.search(scrubbed):
                    problems.append(f"{where}: points to {what}: {line.strip()}")
            for m in DOC_REF.finditer(line):
                problem = check_target(DOCS / m.group(1), (m.group(2) or "#")[1:] or None, where)
                if problem:
                    problems.append(problem)
            if p.suffix == ".md":
                for m in MD_LINK.finditer(line):
                    target = m.group(1)
                    if re.match(r"[a-z]+:", target):
                        continue  # http(s), mailto
                    file_part, _, anchor = target.partition("#")
                    dest = p if not file_part else (p.parent / file_part).resolve()
                    problem = check_target(dest, anchor or None, where)
                    if problem:
                        problems.append(problem)
    assert not problems, "\n".join(problems)


def method_sections() -> dict[str, str]:
    """``{anchor: text}`` of every level-2 section of docs/methods.md."""
    sections: dict[str, str] = {}
    current = None
    for line in METHODS_DOC.read_text().splitlines():
        if line.startswith("## "):
            current = slug(line[3:])
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


def test_methods_doc_has_a_section_per_method() -> None:
    from embdim.embedding_methods import METHODS

    sections = method_sections()
    for anchor in ("layouts", "budgets", "retrain"):
        assert anchor in sections, f"docs/methods.md: no section '## {anchor.title()}'"
    for name in METHOD_NAMES:
        assert name in sections, f"docs/methods.md: no section for method {name!r} (a '## ' heading with anchor #{name})"
        text = sections[name]
        subsections = {slug(h) for h in re.findall(r"^### (.+)$", text, flags=re.M)}
        for needed in ("paper", "code", "deviations", "budget"):
            assert needed in subsections, f"docs/methods.md#{name}: no '### {needed.title()}' subsection"
        cls = METHODS[name]
        source = f"embedding_methods/{Path(inspect.getfile(cls)).name}"
        assert (ROOT / source).is_file() and f"`{source}`" in text, f"docs/methods.md#{name}: does not name `{source}`"
        assert f"Default layout `{cls.default_layout}`" in text, \
            f"docs/methods.md#{name}: does not state the default layout `{cls.default_layout}`"
        missing = [f.name for f in dataclasses.fields(cls.Config) if f"`{f.name}" not in text]
        assert not missing, f"docs/methods.md#{name}: config key(s) {missing} of [{name}] are not described"


@pytest.mark.parametrize("text, expected", [
    ("see ../shared/docs/methods.md section 2", 3),
    ("(torchrec.md §0.2)", 1),
    ("(design-notes.md, \"Budgets\")", 1),
    ("docs/methods.md#pme and ../shared/data/criteo", 0),
])
def test_outside_patterns(text: str, expected: int) -> None:
    scrubbed = DOC_REF.sub("", text)
    assert sum(bool(p.search(scrubbed)) for p, _ in OUTSIDE) == expected


def test_doc_refs_and_anchors_are_checked(tmp_path: Path) -> None:
    assert anchors(METHODS_DOC) >= {"layouts", "pme"}
    assert check_target(DOCS / "methods.md", "pme", "x") is None
    assert "no heading" in check_target(DOCS / "methods.md", "no-such-section", "x")
    assert "does not exist" in check_target(DOCS / "no-such-doc.md", None, "x")
    assert slug("`fixed`: one width (w = D)") == "fixed-one-width-w--d"
