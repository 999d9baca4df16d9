"""The terms and the publishing of the book: licences, citation, and the Pages workflow."""

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_code_and_text_licences_are_in_the_repository():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    text = (ROOT / "LICENSE-text").read_text()
    assert "Creative Commons Attribution 4.0 International Public License" in text
    assert "Section 8 -- Interpretation." in text, "the CC BY 4.0 legal code is incomplete"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == {"text": "MIT"}


def test_citation_file_matches_the_package():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert citation["cff-version"] == "1.2.0"
    assert citation["version"] == pyproject["project"]["version"]
    assert set(citation["license"]) == {"MIT", "CC-BY-4.0"}
    assert citation["title"] and citation["authors"]


def test_the_footer_names_both_licences():
    footer = (ROOT / "book" / "_templates" / "licence.html").read_text()
    assert "CC BY 4.0" in footer and "MIT" in footer
    conf = (ROOT / "book" / "conf.py").read_text()
    assert '"licence"' in conf, "the licence template is not in the footer"


def test_publishing_workflow_builds_what_make_book_builds():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "book.yml").read_text())
    build = workflow["jobs"]["build"]
    runs = [step["run"] for step in build["steps"] if "run" in step]
    assert runs == ["make book"]
    makefile = (ROOT / "Makefile").read_text()
    output = re.search(r"^book: .*\n\t.*sphinx .* (\S+)$", makefile, re.M).group(1)
    upload = next(s for s in build["steps"] if s.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == output
    assert "github.repository" in build["env"]["MMTL_REPO_URL"], "the repository URL must come from GitHub"
    deploy = workflow["jobs"]["deploy"]
    assert deploy["needs"] == "build"
    assert any(s.get("uses", "").startswith("actions/deploy-pages") for s in deploy["steps"])


def test_the_repository_url_is_one_setting():
    """No made-up address: the site and the chapters read the URL from ``MMTL_REPO_URL`` only."""
    conf = (ROOT / "book" / "conf.py").read_text()
    assert "https://github.com/" not in conf
    assert conf.count('os.environ.get("MMTL_REPO_URL"') == 1
    # Only the placeholder of the Colab cell's message, and sources the chapters cite.
    allowed = re.compile(r"github\.com/(OWNER/REPO|brendenlake/omniglot)")
    for chapter in (ROOT / "chapters").glob("*.md"):
        text = allowed.sub("", chapter.read_text())
        assert "github.com/" not in text, chapter.name


def test_the_api_reference_documents_every_public_name():
    import mmtl_lib

    api = (ROOT / "book" / "api.md").read_text()
    documented = set(re.findall(r"^\.\. auto(?:function|class):: (\w+)$", api, re.M))
    assert documented == set(mmtl_lib.__all__), (
        f"missing from book/api.md: {sorted(set(mmtl_lib.__all__) - documented)}; "
        f"not public: {sorted(documented - set(mmtl_lib.__all__))}"
    )
