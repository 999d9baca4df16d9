"""Every chapter's exercises follow the book's conventions (see ``/STYLE`` in the README).

* Each exercise's title starts with its difficulty, one to three stars.
* A coding exercise's solution is executed: its code cells sit between ``solution-start`` and
  ``solution-end`` (so nbval runs them in ``make test``), are tagged ``solution``, and are
  followed by a code cell tagged ``check`` whose ``assert`` tests a name the solution defines.
  The check cell is what a student's own answer must pass.
* No solution hides unexecuted Python in a fenced block.
"""

import ast
import re
from pathlib import Path

import jupytext
import pytest

CHAPTERS = Path(__file__).resolve().parents[1] / "chapters"
SOURCES = sorted(CHAPTERS.glob("*.md"))
EXERCISE = re.compile(r"^`{3,}\{exercise(?:-start)?\}(.*)$", re.M)
LABEL = re.compile(r"^:label:\s*(\S+)", re.M)
STARS = re.compile(r"^\s*(★{1,3})(?!★)\s+\S")


def tags(cell):
    return set(cell.metadata.get("tags", []))


def assigned_names(code: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def used_names(code: str) -> set[str]:
    return {n.id for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def gated_solutions(source):
    """``(label, solution cells, check cell or None)`` for each gated solution of a chapter."""
    cells = jupytext.read(source).cells
    found, current = [], None
    for i, cell in enumerate(cells):
        text = cell.source
        if cell.cell_type == "markdown" and "{solution-start}" in text:
            label = re.search(r"\{solution-start\}\s*(\S+)", text).group(1)
            current = (label, [])
        if cell.cell_type == "code" and current is not None:
            current[1].append(cell)
        if cell.cell_type == "markdown" and "{solution-end}" in text:
            assert current is not None, f"{source.name}: solution-end without solution-start"
            following = next((c for c in cells[i + 1:] if c.cell_type == "code"), None)
            found.append((current[0], current[1], following))
            current = None
    assert current is None, f"{source.name}: solution-start {current and current[0]} is never ended"
    return found


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_every_exercise_states_its_difficulty_in_stars(source):
    titles = EXERCISE.findall(source.read_text())
    missing = [t.strip() for t in titles if not STARS.match(t)]
    assert not missing, f"{source.name}: exercises without one to three stars first in the title: {missing}"


def test_exercise_labels_are_unique_across_the_book():
    labels = []
    for source in SOURCES:
        text = source.read_text()
        for match in EXERCISE.finditer(text):
            label = LABEL.search(text, match.end())
            labels.append(label.group(1))
    duplicates = {label for label in labels if labels.count(label) > 1}
    assert not duplicates


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_coding_solutions_are_executed_and_followed_by_a_check_of_the_answer(source):
    for label, cells, check in gated_solutions(source):
        if not cells:
            continue
        untagged = [c.source[:40] for c in cells if "solution" not in tags(c)]
        assert not untagged, f"{source.name} {label}: solution code cells not tagged 'solution': {untagged}"
        assert check is not None and "check" in tags(check), (
            f"{source.name} {label}: the first code cell after solution-end must be tagged 'check'"
        )
        assert re.search(r"^\s*assert\b", check.source, re.M), f"{source.name} {label}: the check has no assert"
        defined = set().union(*(assigned_names(c.source) for c in cells))
        assert used_names(check.source) & defined, (
            f"{source.name} {label}: the check tests none of the names the solution defines ({sorted(defined)})"
        )


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_solution_tags_appear_only_inside_gated_solutions(source):
    inside = {c.source for _, cells, _ in gated_solutions(source) for c in cells}
    stray = [c.source[:40] for c in jupytext.read(source).cells if "solution" in tags(c) and c.source not in inside]
    assert not stray, f"{source.name}: cells tagged 'solution' outside solution-start/end: {stray}"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_no_solution_hides_unexecuted_python(source):
    text = source.read_text()
    for block in re.finditer(r"^(`{4,})\{solution\}.*?^\1\s*$", text, re.M | re.S):
        assert not re.search(r"^`{3}(python|ipython3?)\s*$", block.group(0), re.M), (
            f"{source.name}: a solution holds a fenced Python block; make it an executed solution "
            "(solution-start / code cells tagged 'solution' / solution-end / a 'check' cell)"
        )


def test_the_checks_can_fail():
    # a check cell refers to the answer: run without the solution, every check fails
    checks = [check for s in SOURCES for _, cells, check in gated_solutions(s) if cells]
    for check in checks:
        with pytest.raises((NameError, AssertionError, AttributeError, TypeError)):
            exec(compile(check.source, "<check>", "exec"), {})
