"""The course kit: student notebooks without solutions, an autograder, and the answer key.

    python -m mmtl_lib.course student --out course/build               # every chapter with exercises
    python -m mmtl_lib.course student --out course/build reptile mtl   # some chapters
    python -m mmtl_lib.course student --out course/build --force       # replace an earlier kit

Each chapter (``chapters/<name>.md``, the MyST source) becomes a master notebook in the assign
format of `otter-grader <https://otter-grader.readthedocs.io>`_ (its v1 notebook format), and
otter's own ``otter assign`` turns that into the three parts of the kit:

``student/<chapter>.ipynb``
    the whole chapter, with every exercise an otter question: a written exercise gets an answer
    cell, a coding exercise a code cell to fill in (names the check needs set to ``...``) followed
    by ``grader.check("<label>")``, which runs the chapter's public check cell (the tests travel in
    the notebook's metadata). No solution reaches it: neither the executed solution code and its
    prose, nor the written ``{solution}`` blocks. ``student/mmtl_lib`` is the book's library.
``autograder/<chapter>-autograder.zip``
    otter's autograder bundle: grade a submission with ``otter run -a ZIP NOTEBOOK`` (no
    container) or ``otter grade -a ZIP -p SUBMISSIONS/`` (Docker), or upload it to Gradescope.
``key/<chapter>.ipynb``
    the answer key: the same notebook with every solution, for the teacher only.

Every test otter runs is the exercise's check cell from the chapter (the one nbval runs after the
solution in ``make test``), preceded by a guard: each name the solution defines and the check uses
must exist and not be ``...``, or the student reads, e.g., "ex-reptile-direction: define
`my_direction` in the exercise's code cell first". Nothing is executed while building the kit.

otter-grader and jupytext are imported inside the functions (``pip install -e '.[course]'``), so the
library never needs them.
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import symtable
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

CHAPTERS = Path(__file__).resolve().parents[1] / "chapters"
"""The book's chapters, next to the library in the repository."""

KIT_PARTS = ("student", "autograder", "key", "README.md")
"""What ``build`` writes into its output folder."""

DIRECTIVE = re.compile(r"^(?P<fence>`{3,})\{(?P<kind>exercise|solution|solution-start|solution-end)\}"
                       r"[ \t]*(?P<arg>.*?)\s*$")
OTHER_EXERCISE_DIRECTIVE = re.compile(r"^`{3,}\{(exercise-start|exercise-end)\}")
OPTION = re.compile(r"^:(?P<key>[\w-]+):[ \t]*(?P<value>.*)$")
OTTER_MARKERS = re.compile(r"#\s*(BEGIN|END)\s+(SOLUTION|PROMPT|IGNORE|QUESTION|TESTS)\b|# ?SOLUTION\b"
                           r"|#\s*IGNORE\s*$|#\s*SEED\s*$", re.I)
"""Comments with a meaning to otter assign; a chapter's own code must not contain them."""


@dataclass
class Exercise:
    """One exercise of a chapter, as the kit sees it."""

    label: str
    title: str  # "★★ The meta-gradient by hand"
    coding: bool
    solution_cells: list[str] = field(default_factory=list)  # executed solution code (coding)
    check: str | None = None  # the check cell's source (coding)
    names: list[str] = field(default_factory=list)  # what the guard requires (coding)

    @property
    def stars(self) -> int:
        return len(self.title) - len(self.title.lstrip("★"))


# ---------------------------------------------------------------------------------- names


def bound_names(source: str) -> set[str]:
    """Names a cell binds in the notebook's namespace (its module scope): assignments, loop and
    ``with`` targets, ``def``, ``class`` and imports, wherever they stand at the top level."""
    table = symtable.symtable(source, "<cell>", "exec")
    return {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}


def free_names(source: str) -> set[str]:
    """Names a cell reads from the notebook's namespace and does not bind itself (also inside its
    comprehensions and functions)."""
    top = symtable.symtable(source, "<cell>", "exec")
    used = {s.get_name() for s in top.get_symbols() if s.is_referenced()}

    def walk(table):
        for child in table.get_children():
            used.update(s.get_name() for s in child.get_symbols() if s.is_global() and s.is_referenced())
            walk(child)

    walk(top)
    return used - bound_names(source)


def guard_names(solution_cells: list[str], check: str) -> list[str]:
    """The names the solution defines and the check reads: what a student's answer must define."""
    defined = set().union(*(bound_names(c) for c in solution_cells))
    return sorted(free_names(check) & defined)


def test_function_name(label: str) -> str:
    """The Python name of an exercise's test function, e.g. ``test_ex_reptile_direction``."""
    return "test_" + re.sub(r"\W", "_", label)


def check_filename(label: str) -> str:
    """The file name the check's code runs under, so a failure can point at its line."""
    return f"<check of {label}>"


def otter_test(exercise: Exercise) -> str:
    """The otter test of a coding exercise: the guard, then the chapter's check cell, run in the
    notebook's namespace (``env``); a failure names the exercise and the line that failed."""
    label, name = exercise.label, test_function_name(exercise.label)
    return f'''\
def {name}(env):
    for name in {tuple(exercise.names)!r}:
        assert env.get(name, ...) is not ..., (
            f"{label}: define `{{name}}` in the exercise's code cell first")
    check = {exercise.check!r}
    try:
        exec(compile(check, {check_filename(label)!r}, "exec"), env)
    except Exception as error:
        tb, line = error.__traceback__, "?"
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == {check_filename(label)!r}:
                line = check.splitlines()[tb.tb_lineno - 1].strip()
            tb = tb.tb_next
        raise AssertionError(
            f"{label}: the check failed at `{{line}}`: {{type(error).__name__}}: {{error}}") from None


{name}(globals())
'''


def student_stub(exercise: Exercise, cell: str, part: int) -> str:
    """What the student sees in place of one solution cell: which names to define, the variables
    set to ``...`` (the guard refuses them), the functions and classes as a commented signature."""
    names = [n for n in exercise.names if n in bound_names(cell)]
    lines = [f"# Your answer to {exercise.label}"
             + (f" (part {part + 1} of {len(exercise.solution_cells)})" if len(exercise.solution_cells) > 1 else "")
             + (f"; the check uses {', '.join(f'`{n}`' for n in names)}." if names else ".")]
    definitions = {node.name: node for node in ast.parse(cell).body
                   if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    for name in names:
        node = definitions.get(name)
        if isinstance(node, ast.FunctionDef):
            lines.append(f"# def {name}({ast.unparse(node.args)}): ...")
        elif isinstance(node, ast.ClassDef):
            bases = ", ".join(ast.unparse(b) for b in node.bases)
            lines.append(f"# class {name}{f'({bases})' if bases else ''}: ...")
        else:
            lines.append(f"{name} = ...")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- parsing


def _segments(markdown: str, where: str) -> list[tuple]:
    """Split a markdown cell into ``("text", str)`` and ``("directive", kind, arg, options, body)``
    pieces at the exercise and solution directives."""
    lines, pieces, text = markdown.split("\n"), [], []
    i = 0
    while i < len(lines):
        if OTHER_EXERCISE_DIRECTIVE.match(lines[i]):
            raise ConfigError(f"{where}: {lines[i].strip()!r} is not supported; write the exercise as "
                              "one {exercise} directive")
        match = DIRECTIVE.match(lines[i])
        if not match:
            text.append(lines[i])
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == match["fence"]), None)
        if end is None:
            raise ConfigError(f"{where}: the {{{match['kind']}}} directive {match['arg']!r} is never closed")
        body, options = lines[i + 1:end], {}
        while body and OPTION.match(body[0]):
            option = OPTION.match(body.pop(0))
            options[option["key"]] = option["value"]
        if "\n".join(text).strip():
            pieces.append(("text", "\n".join(text).strip("\n")))
        pieces.append(("directive", match["kind"], match["arg"], options, "\n".join(body).strip("\n")))
        text, i = [], end + 1
    if "\n".join(text).strip():
        pieces.append(("text", "\n".join(text).strip("\n")))
    return pieces


def read_chapter(path: Path):
    """The chapter's notebook (read with jupytext) as a flat list of pieces: markdown split at the
    exercise and solution directives, and code cells."""
    import jupytext

    notebook = jupytext.read(path)
    pieces = []
    for index, cell in enumerate(notebook.cells):
        where = f"{path.name}, cell {index + 1}"
        if cell.cell_type == "markdown":
            pieces.extend(_segments(cell.source, where))
        elif cell.cell_type == "code":
            for number, line in enumerate(cell.source.split("\n"), 1):
                if OTTER_MARKERS.search(line):
                    raise ConfigError(f"{where}, line {number}: {line.strip()!r} is an otter assign "
                                      "marker; reword the comment")
            pieces.append(("code", cell))
        else:
            raise ConfigError(f"{where}: a {cell.cell_type} cell; chapters hold markdown and code cells")
    return notebook, pieces


def _tags(cell) -> set[str]:
    return set(cell.metadata.get("tags", []))


def _exercise_markdown(title: str, label: str, body: str) -> str:
    return f"**Exercise {title}** (`{label}`)\n\n{body}".rstrip()


def master_notebook(path: Path):
    """The otter assign master notebook of one chapter and its exercises, in the chapter's order.

    Raises :class:`~mmtl_lib.errors.ConfigError` naming the chapter, cell and label where the
    chapter does not follow the book's exercise conventions (see ``tests/test_exercises.py``).
    """
    import nbformat

    chapter, pieces = read_chapter(path)
    md, code, raw = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell, nbformat.v4.new_raw_cell
    config = "\n".join([
        "# ASSIGNMENT CONFIG",
        f"name: {path.stem}",
        "requirements: requirements.txt",
        "files:",
        "  - mmtl_lib",
        "init_cell: true",
        "check_all_cell: false",
        "export_cell: false",
        "run_tests: false",
        "tests:",
        "  files: false",
        "  ok_format: false",
        "generate:",
        "  pdf: false",
        "  show_stdout: true",
    ])
    cells, exercises = [raw(config)], []
    coding = {p[2] for p in pieces if p[0] == "directive" and p[1] == "solution-start"}
    i = 0

    def where(label):
        return f"{path.name}, exercise {label}"

    while i < len(pieces):
        piece = pieces[i]
        i += 1
        if piece[0] == "text":
            cells.append(md(piece[1]))
            continue
        if piece[0] == "code":
            if _tags(piece[1]) & {"solution", "check"}:
                raise ConfigError(f"{path.name}: a code cell tagged {sorted(_tags(piece[1]))} outside an "
                                  f"exercise's solution: {piece[1].source[:60]!r}")
            cells.append(code(piece[1].source, metadata=dict(piece[1].metadata)))
            continue
        _, kind, arg, options, body = piece
        if kind != "exercise":
            raise ConfigError(f"{path.name}: a {{{kind}}} {arg} directive that follows no exercise")
        label = options.get("label")
        if not label:
            raise ConfigError(f"{path.name}: the exercise {arg!r} has no :label:")
        exercise = Exercise(label, arg, coding=label in coding)
        exercises.append(exercise)
        prompt = md(_exercise_markdown(arg, label, body))
        if not exercise.coding:  # a written answer, graded by hand
            cells += [raw(f"# BEGIN QUESTION\nname: {label}\nmanual: true"), prompt]
            if i < len(pieces) and pieces[i][:3] == ("directive", "solution", label):
                cells += [raw("# BEGIN SOLUTION"), md(f"**Solution** (`{label}`)\n\n{pieces[i][4]}"),
                          raw("# END SOLUTION")]
                i += 1
            cells.append(raw("# END QUESTION"))
            continue
        # a coding exercise: prompt, [more of the question], solution (prose and code), check
        cells += [raw(f"# BEGIN QUESTION\nname: {label}"), prompt]
        while i < len(pieces) and pieces[i][:3] != ("directive", "solution-start", label):
            if pieces[i][0] == "directive":
                raise ConfigError(f"{where(label)}: a {{{pieces[i][1]}}} directive before its solution-start")
            if pieces[i][0] == "code":
                cells.append(code(pieces[i][1].source, metadata=dict(pieces[i][1].metadata)))
            else:
                cells.append(md(pieces[i][1]))
            i += 1
        i += 1  # solution-start
        cells.append(raw("# BEGIN SOLUTION"))
        solution = []
        while i < len(pieces) and pieces[i][:2] != ("directive", "solution-end"):
            if pieces[i][0] == "directive":
                raise ConfigError(f"{where(label)}: a {{{pieces[i][1]}}} directive inside the solution")
            if pieces[i][0] == "code":
                if "solution" not in _tags(pieces[i][1]):
                    raise ConfigError(f"{where(label)}: a solution code cell not tagged 'solution'")
                solution.append(pieces[i][1].source)
                cells.append(None)  # the answer cell, written once the guard's names are known
            else:
                cells.append(md(pieces[i][1]))
            i += 1
        if i == len(pieces):
            raise ConfigError(f"{where(label)}: the solution-start is never ended")
        i += 1  # solution-end
        cells.append(raw("# END SOLUTION"))
        after = []
        while i < len(pieces) and pieces[i][0] == "text":
            after.append(md(pieces[i][1]))
            i += 1
        if i == len(pieces) or pieces[i][0] != "code" or "check" not in _tags(pieces[i][1]):
            raise ConfigError(f"{where(label)}: the first code cell after solution-end must be tagged 'check'")
        if not solution:
            raise ConfigError(f"{where(label)}: the solution has no code cell")
        exercise.solution_cells, exercise.check = solution, pieces[i][1].source
        i += 1
        try:
            exercise.names = guard_names(solution, exercise.check)
        except SyntaxError as error:
            raise ConfigError(f"{where(label)}: the solution or check is not plain Python ({error})") from error
        if not exercise.names:
            raise ConfigError(f"{where(label)}: the check reads none of the names the solution defines "
                              f"({sorted(set().union(*map(bound_names, solution)))})")
        parts = iter(range(len(solution)))
        for index, cell in enumerate(cells):
            if cell is None:
                part = next(parts)
                source = solution[part]
                cells[index] = code("\n".join([
                    '""" # BEGIN PROMPT', student_stub(exercise, source, part), '""" # END PROMPT',
                    "# BEGIN SOLUTION NO PROMPT", source, "# END SOLUTION"]))
        cells += [raw("# BEGIN TESTS"), code(otter_test(exercise)), raw("# END TESTS"),
                  raw("# END QUESTION")] + after
    metadata = {k: v for k, v in chapter.metadata.items() if k != "jupytext"}
    metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    metadata["kernelspec"].setdefault("language", "python")
    return nbformat.v4.new_notebook(cells=cells, metadata=metadata), exercises


# ---------------------------------------------------------------------------------- building


def chapters_with_exercises(source: Path = CHAPTERS) -> list[str]:
    """The chapters (file stems, sorted) that have at least one exercise."""
    return sorted(p.stem for p in Path(source).glob("*.md") if "{exercise}" in p.read_text(encoding="utf-8"))


def _requirements() -> list[str]:
    """The library's own dependencies (those of its installed distribution, without extras)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        found = requires("mmtl_lib") or []
    except PackageNotFoundError:
        found = []
    return [r for r in found if "extra ==" not in r] or ["torch>=2.4", "torchvision>=0.19", "numpy",
                                                         "matplotlib", "tqdm"]


def _copy_library(target: Path) -> None:
    shutil.copytree(Path(__file__).resolve().parent, target,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def assign_chapter(path: Path, work: Path):
    """Run otter assign on the chapter's master notebook in the folder ``work``; return otter's
    result folder (``autograder/`` and ``student/``) and the chapter's exercises."""
    import logging

    import nbformat
    from otter.assign import main as otter_assign

    work.mkdir(parents=True)
    notebook, exercises = master_notebook(path)
    master = work / f"{path.stem}.ipynb"
    nbformat.write(notebook, master)
    (work / "requirements.txt").write_text("\n".join(_requirements()) + "\n")
    _copy_library(work / "mmtl_lib")
    quiet = logging.getLogger("otter")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        otter_assign(str(master), str(work / "dist"), no_run_tests=True, no_pdfs=True)
    finally:
        quiet.setLevel(level)
    return work / "dist", exercises


README = """\
# Course kit: {chapters}

Built by `python -m mmtl_lib.course student` from the chapters' sources with otter-grader's
`otter assign`. See the book's page "Using this book in a course".

- `student/`: give this folder to students: one notebook per chapter, without solutions, its
  public checks in the notebook (run `grader.check("<label>")` cells), and `mmtl_lib/`, the book's
  library. Students need the packages in `student/requirements.txt` and `otter-grader`.
- `autograder/`: one otter autograder bundle per chapter. Grade a submission without a container:
  `otter run -a autograder/<chapter>-autograder.zip submission.ipynb`; grade a folder of them in
  Docker: `otter grade -a autograder/<chapter>-autograder.zip -p submissions/ --ext ipynb`; or
  upload the bundle to Gradescope. Written exercises are manual questions: grade them by hand.
- `key/`: the answer key (every solution). Keep it apart from what students get.

Exercises: {count} ({coding} autograded, {manual} written).
"""


def build(out, chapters=None, *, force: bool = False, source: Path = CHAPTERS) -> dict:
    """Write the course kit of ``chapters`` (default: every chapter with exercises) into ``out``.

    Returns ``{chapter: [exercise labels]}``. Raises :class:`~mmtl_lib.errors.ConfigError` for an
    unknown chapter or one without exercises, or an ``out`` that already holds files and no
    ``force``.
    """
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise ConfigError(f"source = '{source}' is not a folder of chapters (chapters/*.md); "
                          "build the kit from a checkout of the book")
    available = chapters_with_exercises(source)
    chapters = list(chapters) if chapters else available
    for chapter in chapters:
        if chapter not in available:
            known = sorted(p.stem for p in source.glob("*.md"))
            what = "has no exercises" if chapter in known else "is not a chapter"
            raise ConfigError(f"chapter {chapter!r} {what}: it must be one of {available}")
    if len(set(chapters)) != len(chapters):
        raise ConfigError(f"chapters = {chapters} names a chapter twice")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file: it must be a folder (new, empty, or with --force)")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out '{out}' already holds files ({', '.join(sorted(p.name for p in out.iterdir()))}); "
                          "pass --force to replace its kit, or choose a new folder")
    with tempfile.TemporaryDirectory(prefix="mmtl-course-") as tmp:
        results = {}
        for chapter in chapters:
            results[chapter] = assign_chapter(source / f"{chapter}.md", Path(tmp) / chapter)
        for part in KIT_PARTS:  # replace the earlier kit only once the new one is built
            target = out / part
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        for folder in ("student", "autograder", "key"):
            (out / folder).mkdir(parents=True)
        shutil.copy(Path(tmp) / chapters[0] / "requirements.txt", out / "student" / "requirements.txt")
        _copy_library(out / "student" / "mmtl_lib")
        for chapter, (dist, _) in results.items():
            shutil.copy(dist / "student" / f"{chapter}.ipynb", out / "student")
            shutil.copy(dist / "autograder" / f"{chapter}.ipynb", out / "key")
            (bundle,) = (dist / "autograder").glob(f"{chapter}-autograder_*.zip")
            shutil.copy(bundle, out / "autograder" / f"{chapter}-autograder.zip")
    exercises = [e for _, found in results.values() for e in found]
    coding = sum(e.coding for e in exercises)
    (out / "README.md").write_text(README.format(
        chapters=", ".join(chapters), count=len(exercises), coding=coding, manual=len(exercises) - coding))
    return {chapter: [e.label for e in found] for chapter, (_, found) in results.items()}


# ---------------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmtl_lib.course", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("student", help="write student notebooks, the autograder bundles and the answer key")
    s.add_argument("chapters", nargs="*", metavar="CHAPTER",
                   help="chapter names, e.g. reptile (default: every chapter with exercises)")
    s.add_argument("--out", required=True, help="output folder (new or empty, or any with --force)")
    s.add_argument("--force", action="store_true", help="replace the kit already in --out")
    s.add_argument("--source", default=str(CHAPTERS), help="folder of the chapters' .md sources")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        built = build(args.out, args.chapters, force=args.force, source=Path(args.source))
    except ConfigError as error:
        print("error:", " ".join(str(error).split()), file=sys.stderr)
        return 2
    for chapter, labels in built.items():
        print(f"{chapter}: {len(labels)} exercises")
    out = Path(args.out)
    print(f"students: {out / 'student'}   autograder: {out / 'autograder'}   answer key: {out / 'key'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
