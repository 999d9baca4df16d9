"""Sphinx configuration of the book: Sphinx + myst-nb + sphinx-book-theme, built offline.

Run from the repository root as ``sphinx-build -c book . book/_build/html`` (``make book``): the
source directory is the repository, so a chapter's ``literalinclude`` of ``../mmtl_lib/...``
resolves the same way in the book as it reads in the chapter file.
"""

import os

project = "Meta Multi-Task Learning"
author = "The MMTL book authors"
copyright = "2026, the MMTL book authors"

extensions = [
    "myst_nb",
    "sphinx_exercise",
    "sphinx_togglebutton",
    "sphinx.ext.mathjax",
    "sphinxcontrib.bibtex",
]
root_doc = "book/index"
include_patterns = ["book/**", "chapters/*.md"]
exclude_patterns = ["book/_build/**", "**/.ipynb_checkpoints/**"]

myst_enable_extensions = ["amsmath", "dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
numfig = True
math_numfig = True
math_eqref_format = "({number})"

nb_execution_mode = os.environ.get("MMTL_BOOK_EXECUTE", "cache")
nb_execution_timeout = 1800
nb_execution_raise_on_error = True
nb_execution_cache_path = "book/_build/.jupyter_cache"
nb_merge_streams = True

html_theme = "sphinx_book_theme"
html_title = "Meta Multi-Task Learning"
html_theme_options = {
    "repository_url": "https://github.com/mmtl-book/mmtl",
    "path_to_docs": ".",
    "use_repository_button": False,
    "show_toc_level": 2,
}
html_static_path = []
suppress_warnings = ["myst.header"]

# One bibliography for the whole book; chapters cite with {cite:p}`key` / {cite:t}`key`.
bibtex_bibfiles = ["references.bib"]  # relative to this folder
bibtex_default_style = "plain"
bibtex_reference_style = "author_year"
