"""#28: the manual. The docs site builds with `mkdocs build --strict` (a broken link or a page missing from the
nav fails), the configuration reference and README's table of parts are what docs/gen_config_reference.py
writes from conf/ today, every conf option opens with a header comment, README stays a short manual, and the
results page links every study."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", DOCS / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nav_pages(nav) -> list[str]:
    """Every page a mkdocs nav names, however deep."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in _nav_pages(v)]
    return [p for item in nav for p in _nav_pages(item)]


def _mkdocs_config() -> dict:
    class Loader(yaml.SafeLoader):  # mkdocs.yml may hold !ENV / !!python tags: read them as plain values
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    return yaml.load((REPO / "mkdocs.yml").read_text(), Loader=Loader)


def test_mkdocs_build_strict_passes(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    assert (site / "index.html").is_file() and (site / "reference" / "configuration" / "index.html").is_file()
    # the studies' READMEs are pages of the site (docs/hooks.py), so results.md's links resolve
    assert (site / "experiments" / "ddpm_digits" / "index.html").is_file()


def test_nav_lists_every_page():
    nav = _nav_pages(_mkdocs_config()["nav"])
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert sorted(set(pages) - set(nav)) == [], "pages in docs/ that mkdocs.yml's nav does not list"
    assert sorted(set(nav) - set(pages)) == [], "nav entries with no page in docs/"


def test_configuration_reference_is_current():
    gen = _generator()
    page = DOCS / "reference" / "configuration.md"
    assert page.read_text() == gen.render(), "docs/reference/configuration.md is stale: run python docs/gen_config_reference.py"
    readme = (REPO / "README.md").read_text()
    assert readme == gen.render_readme(readme), "README.md's table of parts is stale: run python docs/gen_config_reference.py"


def test_reference_lists_every_group_and_option():
    gen = _generator()
    page = (DOCS / "reference" / "configuration.md").read_text()
    conf = REPO / "conf"
    for path in conf.rglob("*.yaml"):
        rel = path.relative_to(conf)
        if len(rel.parts) == 1 or any(part.startswith("_") for part in rel.parts[:-1]):
            continue
        group = "/".join(rel.parts[:-1])
        assert f"## `{group}`" in page and f"| `{group}={path.stem}` |" in page, f"{rel} is not in the reference"
        assert group in gen.GROUPS, f"conf/{group}/ has no one-line description in docs/gen_config_reference.py: GROUPS"


def test_every_conf_option_has_a_header_comment():
    missing = _generator().missing_headers()
    assert missing == [], f"conf files that open with no comment (add a one-line `# what this option is`): {missing}"


def test_header_check_fails_on_an_option_without_a_comment(tmp_path, monkeypatch):
    gen = _generator()
    (tmp_path / "process").mkdir()
    (tmp_path / "process" / "plain.yaml").write_text("_target_: x.Y\n# a comment after the content is not a header\n")
    (tmp_path / "process" / "told.yaml").write_text("# @package _global_\n# Told. More words.\n_target_: x.Y\n")
    monkeypatch.setattr(gen, "CONF", tmp_path)
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    assert gen.missing_headers() == ["process/plain.yaml"]
    assert gen.header(tmp_path / "process" / "told.yaml") == "Told."
    assert "| `process=plain` | (no header comment) |" in gen.render()


def test_readme_is_a_short_manual():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300, "README.md is a short manual (~250 lines): move details to docs/"
    assert "make demo" in readme and "make test" in readme
    # no lab-notebook measurements: results live in experiments/<study>/README.md
    for dated in ("today", "measured 20", "on a faster day", "no GPU was lent", "none was lent"):
        assert dated not in readme, f"README says {dated!r}: link the study's results instead"
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (REPO / link).is_file(), f"README links {link}, which does not exist"


def test_results_page_links_every_study():
    results = (DOCS / "results.md").read_text()
    studies = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "experiments").rglob("README.md")
                     if subprocess.run(["git", "ls-files", "--error-unmatch", str(p)], cwd=REPO, capture_output=True).returncode == 0)
    assert studies, "no experiments/<study>/README.md found"
    missing = [s for s in studies if f"]({s})" not in results]
    assert missing == [], f"docs/results.md does not link {missing}"


@pytest.mark.parametrize("page", sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")))
def test_no_lab_notebook_numbers_in_the_manual(page):
    text = (DOCS / page).read_text()
    for dated in ("2 steps/s today", "on a faster day", "no GPU was lent", "none was lent", "no GPU was available",
                  "measured 2026", "Measured here"):
        assert dated not in text, f"docs/{page} says {dated!r}: link the study's results instead"
