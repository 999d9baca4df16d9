"""The course kit (``make student``, ``python -m mmtl_lib.course student``), for every chapter with
exercises: the student notebook holds no solution; the key holds every solution and otter's tests
are exactly the guard plus the chapter's check cells (which nbval runs after the solutions in
``make test``); a blank student notebook fails every check with a message naming what to define.

The parsing here is the one of ``test_exercises.py``, independent of ``mmtl_lib.course``. One test,
marked ``otter_e2e`` (``pytest -m otter_e2e tests/test_course.py``), grades the ``broken_maml``
key and the blank student notebook end to end with ``otter run`` (no Docker), about a minute.
"""

import ast
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest
from test_exercises import assigned_names, gated_solutions, used_names

from mmtl_lib import course

otter = pytest.importorskip("otter", reason="the course kit needs the course extra: pip install -e '.[course]'")
from otter.nbmeta_config import NBMetadataConfig  # noqa: E402
from otter.test_files import create_test_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHAPTERS = REPO / "chapters"
WITH_EXERCISES = course.chapters_with_exercises(CHAPTERS)
WRITTEN_SOLUTION = re.compile(r"^(`{3,})\{solution\}[ \t]*(\S+)\n(.*?)^\1[ \t]*$", re.M | re.S)
GATED_REGION = re.compile(r"^```\{solution-start\}.*?^```\{solution-end\}[ \t]*\n```[ \t]*$", re.M | re.S)
GUARD = "{label}: define `{name}` in the exercise's code cell first"


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    out = tmp_path_factory.mktemp("kit") / "build"
    built = course.build(out)
    assert sorted(built) == WITH_EXERCISES
    return out


def coded(chapter):
    """``label -> (solution code sources, check source)`` of the chapter's coding exercises."""
    return {label: ([c.source for c in cells], check.source)
            for label, cells, check in gated_solutions(CHAPTERS / f"{chapter}.md") if cells}


def lines(text):
    return {line.strip() for line in text.split("\n") if line.strip()}


def notebook_text(path):
    """Every cell, and the check each test in the metadata runs (the tests' code around it is the
    fixed template, compared exactly in the test of the key)."""
    nb = nbformat.read(path, as_version=4)
    text = [cell.source for cell in nb.cells]
    for test in nb.metadata.get("otter", {}).get("tests", {}).values():
        names, check = guard_and_check(generated_function(test))
        text += [check, *names]
    return "\n".join(text)


def answer_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code" and "otter_answer_cell" in c.metadata.get("tags", [])]


def zip_tests(kit, chapter):
    with zipfile.ZipFile(kit / "autograder" / f"{chapter}-autograder.zip") as bundle:
        return {Path(n).stem: bundle.read(n).decode() for n in bundle.namelist() if n.startswith("tests/")}


def generated_function(source):
    (function,) = [node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)]
    return function


def guard_and_check(function):
    """The names the guard requires and the check source the test executes."""
    loop = function.body[0]
    assert isinstance(loop, ast.For), ast.unparse(loop)
    names = ast.literal_eval(loop.iter)
    check = ast.literal_eval(function.body[1].value)
    return list(names), check


def test_the_kit_has_its_parts_and_every_chapter_with_exercises(kit):
    assert WITH_EXERCISES == ["broken_maml", "learning_to_learn", "maml_omniglot", "maml_sinusoid", "mmtl", "mtl",
                              "reptile", "scaling", "variants"]
    for chapter in WITH_EXERCISES:
        assert (kit / "student" / f"{chapter}.ipynb").is_file()
        assert (kit / "key" / f"{chapter}.ipynb").is_file()
        assert (kit / "autograder" / f"{chapter}-autograder.zip").is_file()
    assert (kit / "student" / "mmtl_lib" / "__init__.py").is_file()
    assert not list((kit / "student").glob("**/*key*")) and not (kit / "student" / "autograder").exists()
    assert sum(len(coded(chapter)) for chapter in WITH_EXERCISES) == 26


@pytest.mark.parametrize("chapter", WITH_EXERCISES)
def test_student_notebook_contains_no_solution(kit, chapter):
    source = (CHAPTERS / f"{chapter}.md").read_text()
    solution_text = [m.group(0) for m in GATED_REGION.finditer(source)]
    solution_text += [m.group(3) for m in WRITTEN_SOLUTION.finditer(source)]
    public = GATED_REGION.sub("", WRITTEN_SOLUTION.sub("", source))
    secret = set().union(*map(lines, solution_text)) - lines(public)  # lines only a solution has
    n_exercises = len(re.findall(r"^`{3,}\{exercise\}", source, re.M))
    assert len(solution_text) == n_exercises, "every exercise has a marked solution"
    assert secret, chapter

    student = kit / "student" / f"{chapter}.ipynb"
    text = notebook_text(student)
    leaked = sorted(secret & lines(text))
    assert not leaked, f"{chapter}: solution lines in the student notebook: {leaked[:5]}"
    for marker in ("{solution", "solution-start", "solution-end", "BEGIN SOLUTION", "otter_assign_solution_cell"):
        assert marker not in student.read_text(), (chapter, marker)

    # each solution code cell became an answer cell of comments and `name = ...` only
    exercises = coded(chapter)
    answers = answer_cells(nbformat.read(student, as_version=4))
    assert len(answers) == sum(len(cells) for cells, _ in exercises.values())
    for cell in answers:
        for line in cell.source.split("\n"):
            assert line.startswith("# ") or re.fullmatch(r"\w+ = \.\.\.", line), (chapter, line)


@pytest.mark.parametrize("chapter", WITH_EXERCISES)
def test_key_holds_every_solution_and_the_tests_are_the_guard_and_the_chapters_checks(kit, chapter):
    source = (CHAPTERS / f"{chapter}.md").read_text()
    exercises = coded(chapter)
    key = nbformat.read(kit / "key" / f"{chapter}.ipynb", as_version=4)
    key_code = [c.source for c in key.cells if c.cell_type == "code"]
    for cells, _ in exercises.values():
        for solution in cells:  # verbatim, between otter's solution markers
            wrapped = f"# BEGIN SOLUTION NO PROMPT\n{solution}\n# END SOLUTION"
            assert any(code.endswith(wrapped) for code in key_code), solution[:60]
    key_markdown = "\n".join(c.source for c in key.cells if c.cell_type == "markdown")
    for written in WRITTEN_SOLUTION.finditer(source):
        body = "\n".join(line for line in written.group(3).split("\n") if not line.startswith(":class:"))
        assert body.strip() in key_markdown, written.group(2)

    # the autograder's tests: one per coding exercise, its guard, then exactly its check cell
    tests = zip_tests(kit, chapter)
    assert sorted(tests) == sorted(exercises)
    student_tests = nbformat.read(kit / "student" / f"{chapter}.ipynb", as_version=4).metadata["otter"]["tests"]
    assert student_tests == tests  # the public checks travel in the student notebook
    for label, (cells, check) in exercises.items():
        function = generated_function(tests[label])
        names, executed = guard_and_check(function)
        assert executed == check, label
        defined = set().union(*map(assigned_names, cells))
        assert names and set(names) <= used_names(check) & defined, (label, names)
        (decorator,) = function.decorator_list
        assert ast.unparse(decorator) == "test_case(points=None, hidden=False)", label  # public, one point
        function.decorator_list = []
        exercise = course.Exercise(label, "", coding=True, solution_cells=cells, check=check, names=names)
        assert ast.dump(function) == ast.dump(generated_function(course.otter_test(exercise))), label


@pytest.mark.parametrize("chapter", WITH_EXERCISES)
def test_blank_student_notebook_fails_every_check_with_a_readable_message(kit, chapter):
    student = kit / "student" / f"{chapter}.ipynb"
    nb = nbformat.read(student, as_version=4)
    env = {}
    for cell in answer_cells(nb):  # the blank answers alone: the guard fires before any chapter state
        exec(compile(cell.source, "<answer>", "exec"), env)
    config = NBMetadataConfig.from_notebook(nb)
    assert sorted(config.tests) == sorted(coded(chapter))
    for label in config.tests:
        test = create_test_file(str(student), config, test_name=label)  # what grader.check runs
        test.run(env)
        assert not test.passed_all and test.score == 0, label
        names, _ = guard_and_check(generated_function(nb.metadata["otter"]["tests"][label]))
        assert GUARD.format(label=label, name=names[0]) in test.summary(), test.summary()


TOY = '''\
---
jupytext:
  formats: ipynb,md:myst
  text_representation: {extension: .md, format_name: myst}
kernelspec: {name: python3, display_name: Python 3, language: python}
---
# Toy

```{exercise} ★ Doubling
:label: ex-toy-double
Write `double(x)` and set `answer` so that `double(answer)` is 84.
```

```{solution-start} ex-toy-double
:class: dropdown
```
Secret prose.
```{code-cell} ipython3
:tags: [solution]

def double(x):
    return 2 * x


answer = 42
```

```{solution-end}
```

```{code-cell} ipython3
:tags: [check]

for value in (answer,):
    assert double(value) == 84, value
```

```{exercise} ★★ Why
:label: ex-toy-why
Why?
```

````{solution} ex-toy-why
:class: dropdown
Secret reason.
````
'''


def test_a_generated_test_passes_a_right_answer_and_names_the_failing_line_of_a_wrong_one(tmp_path):
    (tmp_path / "chapters").mkdir()
    (tmp_path / "chapters" / "toy.md").write_text(TOY)
    course.build(tmp_path / "kit", source=tmp_path / "chapters")
    student = tmp_path / "kit" / "student" / "toy.ipynb"
    assert "Secret" not in student.read_text() and "answer = 42" not in student.read_text()
    assert "Secret prose." in (tmp_path / "kit" / "key" / "toy.ipynb").read_text()
    assert "Secret reason." in (tmp_path / "kit" / "key" / "toy.ipynb").read_text()
    nb = nbformat.read(student, as_version=4)
    (answer,) = answer_cells(nb)
    assert answer.source.split("\n")[1:] == ["answer = ...", "# def double(x): ..."]
    assert any("_Type your answer here" in c.source for c in nb.cells)  # the written exercise

    def run(env):
        test = create_test_file(str(student), NBMetadataConfig.from_notebook(nb), test_name="ex-toy-double")
        test.run(env)
        return test

    assert run({"double": lambda x: 2 * x, "answer": 42}).passed_all
    wrong = run({"double": lambda x: 2 * x, "answer": 41})
    assert not wrong.passed_all
    failed = "ex-toy-double: the check failed at `assert double(value) == 84, value`: AssertionError: 41"
    assert failed in wrong.summary()
    blank = run({"answer": 42})
    assert "ex-toy-double: define `double` in the exercise's code cell first" in blank.summary()


@pytest.mark.parametrize("args, message", [
    (["student", "--out", "{tmp}/out", "reptil"], "chapter 'reptil' is not a chapter: it must be one of ['broken"),
    (["student", "--out", "{tmp}/out", "preface"], "chapter 'preface' has no exercises: it must be one of"),
    (["student", "--out", "{tmp}/full"], "--out '{tmp}/full' already holds files (notes.txt); pass --force"),
    (["student", "--out", "{tmp}/full/notes.txt"], "--out '{tmp}/full/notes.txt' is a file"),
    (["student", "--out", "{tmp}/out", "--source", "{tmp}/none"], "source = '{tmp}/none' is not a folder of chapters"),
    (["student", "--out", "{tmp}/out", "mtl", "mtl"], "chapters = ['mtl', 'mtl'] names a chapter twice"),
])
def test_bad_input_is_one_line_naming_the_argument_its_value_and_what_is_allowed(tmp_path, capsys, args, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    status = course.main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and message.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "out").exists() and (tmp_path / "full" / "notes.txt").read_text() == "mine"


def test_force_replaces_the_kit_and_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    course.build(out, ["reptile"])
    (out / "notes.txt").write_text("mine")
    course.build(out, ["mtl"], force=True)
    assert sorted(p.name for p in (out / "key").iterdir()) == ["mtl.ipynb"]
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.otter_e2e
def test_otter_grades_the_broken_maml_key_full_and_a_blank_notebook_zero(kit, tmp_path):
    chapter = "broken_maml"
    bundle = kit / "autograder" / f"{chapter}-autograder.zip"
    env = {**os.environ, "MMTL_THREADS": os.environ.get("MMTL_THREADS", "1"), "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, notebook in (("key", kit / "key"), ("blank", kit / "student")):
        (tmp_path / name).mkdir()
        command = [sys.executable, "-m", "otter", "run", "--no-logo", "-a", str(bundle), "-o", str(tmp_path / name),
                   str(notebook / f"{chapter}.ipynb")]
        runs[name] = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = {name: run.communicate(timeout=600)[0] for name, run in runs.items()}
    results = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in runs}
    labels = sorted(coded(chapter))
    for name, expected in (("key", "Total Score: 2.000 / 2.000 (100.000%)"), ("blank", "Total Score: 0.000 / 2.000")):
        assert runs[name].returncode == 0 and expected in output[name], output[name][-3000:]
        scored = {t["name"]: t for t in results[name]["tests"] if "max_score" in t}
        assert sorted(scored) == labels
    for label in labels:
        key, blank = (next(t for t in results[n]["tests"] if t["name"] == label) for n in ("key", "blank"))
        assert key["score"] == key["max_score"] == 1, key
        assert blank["score"] == 0, blank
        names, _ = guard_and_check(generated_function(zip_tests(kit, chapter)[label]))
        assert GUARD.format(label=label, name=names[0]) in blank["output"], blank["output"]
