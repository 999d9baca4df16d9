"""Sphinx configuration of the book: Sphinx + myst-nb + sphinx-book-theme, built offline.

Run from the repository root as ``sphinx-build -c book . book/_build/html`` (``make book``): the
source directory is the repository, so a chapter's ``literalinclude`` of ``../mmtl_lib/...``
resolves the same way in the book as it reads in the chapter file.
"""

import os
import sys

sys.path.insert(0, os.path.abspath("_ext"))

# The one repository setting. The repository button, the source links and the Colab/Binder launch
# buttons read it; unset, they are hidden rather than pointing at a made-up address. The
# publishing workflow sets it from GitHub's own context (.github/workflows/book.yml).
REPOSITORY_URL = os.environ.get("MMTL_REPO_URL", "").rstrip("/")
REPOSITORY_BRANCH = os.environ.get("MMTL_REPO_BRANCH", "main")

project = "Meta Multi-Task Learning"
author = "The MMTL book authors"
copyright = "2026, the MMTL book authors"
release = version = "0.2.0"

extensions = [
    "myst_nb",
    "sphinx_exercise",
    "sphinx_togglebutton",
    "sphinx.ext.mathjax",
    # MathJax 3 served from the site itself (a PyPI package ships it): no CDN, so the math
    # renders offline, on an air-gapped course machine and in the browser tests.
    "sphinx-mathjax-offline",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx_copybutton",
    "sphinxcontrib.bibtex",
    "notebook_download",
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
    "path_to_docs": ".",
    "show_toc_level": 2,
    "use_download_button": True,
    "footer_content_items": ["copyright", "licence"],
}
if REPOSITORY_URL:
    html_theme_options |= {
        "repository_url": REPOSITORY_URL,
        "repository_branch": REPOSITORY_BRANCH,
        "use_repository_button": True,
        "use_source_button": True,
        "use_issues_button": True,
        "launch_buttons": {
            "colab_url": "https://colab.research.google.com",
            "binderhub_url": "https://mybinder.org",
            "notebook_interface": "jupyterlab",
        },
    }
# pydata-sphinx-theme reads the colour mode from the context; unset, the page logs
# "Got invalid theme mode" on the console.
html_context = {"default_mode": "auto"}
templates_path = ["_templates"]
html_static_path = []
# The site root redirects to the landing page (root_doc is book/index).
html_extra_path = ["_extra"]
suppress_warnings = ["myst.header"]

# One bibliography for the whole book; chapters cite with {cite:p}`key` / {cite:t}`key`.
bibtex_bibfiles = ["references.bib"]  # relative to this folder
bibtex_default_style = "plain"
bibtex_reference_style = "author_year"

# The API reference (book/api.md) is generated from mmtl_lib's docstrings (Google style).
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Attributes as a field list of the class, not as separate entries that collide with autodoc's.
napoleon_use_ivar = True

# Copy code without the prompts and outputs myst-nb renders.
copybutton_exclude = ".linenos, .gp, .go"
