"""The docs stand alone and match the code.

* No tracked file cites a document that is not in the repository (team notes kept
  outside it): the facts the code relies on belong in docs/design.md.
* Every pointer to docs/design.md (its path, a comma and a section title in single
  quotes; or a Markdown link with an anchor) names a section that exists.
* Every code location docs/design.md names (``tiedlora.module.function``,
  ``tiedlora/path.py``, ``tests/test_x.py::test_name``) exists, so a rename or a move
  that leaves the design doc behind fails here.
"""

import ast
import re
import subprocess
from pathlib import Path

import pytest

from helpers import ROOT

DESIGN = ROOT / "docs" / "design.md"

# Built from pieces so that this file does not match itself.
OUTSIDE = re.compile("|".join([
    r"\bDESIGN" + r"\.md\b",
    r"\bNOTES" + r"\.md\b",
    r"(?<![\w.-])shared" + r"/",
]))
# the path, a comma, then the section title in single quotes (possibly wrapped, in a comment)
NAMED_POINTER = re.compile(r"design\.md,\s*(?:#\s*)?'([^'\n]+)'")
# a Markdown link to an anchor of design.md, and local links inside design.md itself
ANCHOR_POINTER = re.compile(r"design\.md#([\w-]+)")
LOCAL_ANCHOR = re.compile(r"\]\(#([\w-]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
DOTTED = re.compile(r"^tiedlora(\.[A-Za-z_]\w*)+$")
PATH = re.compile(r"^(tiedlora|tests|conf|bench|docs|recipes|launch|\.ci)/[\w./-]*(::\w+)?$")


def tracked_files():
    """Text files git tracks (the working-tree copy), relative to the repository root."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout ({e}); nothing to compare")
    files = []
    for name in out.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:  # binary
            continue
        files.append((name, data.decode("utf-8", errors="replace")))
    assert files, "git ls-files listed nothing"
    return files


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def design_headings():
    headings = [m.group(2).strip() for m in re.finditer(r"^(#+)\s+(.+)$", DESIGN.read_text(), re.M)]
    assert headings, f"{DESIGN}: no headings"
    return headings


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def test_no_citation_of_documents_outside_the_repository():
    bad = [f"{name}:{line_of(text, m.start())}: {m.group(0)!r}"
           for name, text in tracked_files() for m in OUTSIDE.finditer(text)]
    assert not bad, ("these files cite documents that are not in the repository; write the "
                     "fact into docs/design.md and point there instead:\n" + "\n".join(bad))


def test_pointers_to_the_design_doc_name_existing_sections():
    headings = design_headings()
    anchors = {github_anchor(h) for h in headings}
    bad, seen = [], 0
    for name, text in tracked_files():
        for m in NAMED_POINTER.finditer(text):
            seen += 1
            if m.group(1) not in headings:
                bad.append(f"{name}:{line_of(text, m.start())}: section {m.group(1)!r}")
        found = list(ANCHOR_POINTER.finditer(text))
        if Path(name) == DESIGN.relative_to(ROOT):
            found += list(LOCAL_ANCHOR.finditer(text))
        for m in found:
            seen += 1
            if m.group(1) not in anchors:
                bad.append(f"{name}:{line_of(text, m.start())}: anchor #{m.group(1)}")
    assert seen, "no pointers to docs/design.md found at all"
    assert not bad, (f"pointers to sections that {DESIGN.relative_to(ROOT)} does not have "
                     f"(its headings: {headings}):\n" + "\n".join(bad))


def _names_in(body) -> dict:
    """Top-level names of a module or class body -> their AST node."""
    out = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            out.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return out


def _resolve_dotted(ref: str) -> str | None:
    """None when ``tiedlora.a.b.Name.attr`` exists in the source, else what is missing."""
    parts = ref.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:cut])
        for module in (base.with_suffix(".py"), base / "__init__.py"):
            if module.is_file():
                node_body = ast.parse(module.read_text(), str(module)).body
                for name in parts[cut:]:
                    names = _names_in(node_body)
                    if name not in names:
                        return f"{module.relative_to(ROOT)} has no {name!r}"
                    node_body = getattr(names[name], "body", [])
                return None
    return "no such module"


def test_code_locations_named_in_the_design_doc_exist():
    text = DESIGN.read_text()
    bad, checked = [], 0
    for m in CODE_SPAN.finditer(text):
        ref = m.group(1)
        where = f"docs/design.md:{line_of(text, m.start())}: `{ref}`"
        if DOTTED.match(ref):
            checked += 1
            problem = _resolve_dotted(ref)
            if problem:
                bad.append(f"{where}: {problem}")
        elif PATH.match(ref):
            checked += 1
            path, _, test = ref.partition("::")
            if not (ROOT / path).exists():
                bad.append(f"{where}: no such file")
            elif test and test not in _names_in(ast.parse((ROOT / path).read_text()).body):
                bad.append(f"{where}: {path} has no {test}")
    assert checked > 50, f"only {checked} code references found in docs/design.md"
    assert not bad, "docs/design.md names code that does not exist:\n" + "\n".join(bad)


def test_readme_links_the_design_doc():
    assert "(docs/design.md" in (ROOT / "README.md").read_text()


def test_readme_exit_status_table_is_the_code_table():
    from tiedlora.errors import EXIT_STATUSES

    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Errors and exit statuses"):]
    rows = re.findall(r"^\| (\d+) \| (.+) \|$", section[:section.index("\n\n", section.index("| status |"))], re.M)
    assert {int(code): meaning for code, meaning in rows} == EXIT_STATUSES
