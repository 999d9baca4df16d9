"""Each chapter's MyST source and its notebook are a pair: same cells, no outputs committed."""

from pathlib import Path

import jupytext
import nbformat
import pytest

CHAPTERS = Path(__file__).resolve().parents[1] / "chapters"
SOURCES = sorted(CHAPTERS.glob("*.md"))


def cells(notebook):
    return [(c.cell_type, c.source.strip()) for c in notebook.cells]


def test_there_are_chapters():
    assert SOURCES


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_is_paired_with_its_source(source):
    pair = source.with_suffix(".ipynb")
    assert pair.exists(), f"{pair.name} is missing: run jupytext --to ipynb {source}"
    want = jupytext.read(source)
    got = nbformat.read(pair, as_version=4)
    assert cells(got) == cells(want), f"{pair.name} differs from {source.name}: run jupytext --to ipynb --update"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_has_no_outputs(source):
    notebook = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    executed = [i for i, c in enumerate(notebook.cells) if c.get("outputs") or c.get("execution_count")]
    assert not executed, f"cells {executed} of {source.stem}.ipynb carry outputs: commit it without them"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_chapter_installs_the_library_on_colab_first(source):
    first = next(c for c in jupytext.read(source).cells if c.cell_type == "code")
    assert "colab" in first.metadata.get("tags", []), f"{source.name}: the first code cell must be tagged 'colab'"
    assert '"google.colab" in sys.modules' in first.source and "MMTL_REPO_URL" in first.source


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_chapter_sets_threads_first(source):
    code = [c for c in jupytext.read(source).cells if c.cell_type == "code"]
    first = next(c.source for c in code if "colab" not in c.metadata.get("tags", []))
    assert "set_threads(" in first, f"{source.name}: the first code cell after the Colab one must call set_threads()"
