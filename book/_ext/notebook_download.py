"""Offer each chapter's notebook in the page's download menu.

sphinx-book-theme lists a page's ``.ipynb`` for download only when launch buttons are configured
(it copies the executed notebook then). The book's chapters are MyST ``.md`` files paired with an
``.ipynb`` without outputs, the file a student runs: this copies that paired notebook next to the
page's source and tells the theme, so the download exists whether or not a repository is set.
"""

from pathlib import Path
from shutil import copy2


def offer_paired_notebook(app, pagename, templatename, context, doctree):
    source = Path(app.env.doc2path(pagename))
    notebook = source.with_suffix(".ipynb")
    if source.suffix != ".md" or not notebook.exists():
        return
    target = Path(app.outdir, "_sources", pagename).with_suffix(".ipynb")
    target.parent.mkdir(parents=True, exist_ok=True)
    copy2(notebook, target)
    context["ipynb_source"] = pagename + ".ipynb"


def setup(app):
    # Before the theme's header buttons (priority 501) read ``ipynb_source``.
    app.connect("html-page-context", offer_paired_notebook, priority=500)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
