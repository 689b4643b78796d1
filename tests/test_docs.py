"""The documentation says what the repository holds: the knob reference is generated from the property files,
every design-note citation names a section that exists, every relative link resolves, and the README stays a guide."""

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from helpers import REPO

ROOT = Path(REPO)
_spec = importlib.util.spec_from_file_location("knob_reference", ROOT / "scripts" / "knob_reference.py")
knob_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(knob_reference)

_CITATION = re.compile(r"docs/([A-Z_]+\.md) (§[\d.]+(?:\s*(?:-|–|,|and)\s*§[\d.]+)*)")
_LINK = re.compile(r"\[[^\]]*\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_knob_reference_is_what_the_property_files_generate():
    assert (ROOT / "docs" / "KNOBS.md").read_text(encoding="utf-8") == knob_reference.render(), "docs/KNOBS.md is stale: run python scripts/knob_reference.py"


@pytest.mark.parametrize("model", knob_reference.MODEL_FILES)
def test_every_knob_of_a_model_has_a_row_with_its_type_and_meaning(model):
    text = (ROOT / "properties" / "model" / f"{model}.yaml").read_text(encoding="utf-8")
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| `[^`]*` \| (\w*) \| .+ \|$", "\n".join(knob_reference.knob_tables(text)), re.M)}
    knobs = yaml.safe_load(text)
    assert set(rows) == set(knobs)
    assert [key for key, kind in rows.items() if not kind] == []  # every line says "(type) meaning"


def test_a_property_line_without_a_default_is_refused_by_name():
    with pytest.raises(ValueError, match="'  - nested'"):
        knob_reference.knob_tables("key: 1  # (int) one\n  - nested\n")


def _sections(note):
    return set(re.findall(r"^#+ (§[\d.]+) ", (ROOT / "docs" / note).read_text(encoding="utf-8"), re.M))


def _cited_files():
    folders = ("recbole_t2diff", "benchmarks", "tests", "scripts", "properties", "docs")
    files = [ROOT / "README.md", ROOT / "run_recbole.py", ROOT / "run_hyper.py"]
    for folder in folders:
        files += [f for f in (ROOT / folder).rglob("*") if f.suffix in (".py", ".md", ".yaml", ".sh", ".hyper") and f.name != "CITATIONS.txt"]
    return files


def test_every_design_note_citation_names_a_section_that_exists():
    missing = []
    for file in _cited_files():
        for note, refs in _CITATION.findall(file.read_text(encoding="utf-8", errors="replace")):
            sections = _sections(note) if (ROOT / "docs" / note).exists() else set()
            for ref in re.findall(r"§[\d.]+", refs):
                if ref.rstrip(".") not in sections:
                    missing.append(f"{file.relative_to(ROOT)}: docs/{note} {ref}")
    assert missing == []


def test_every_relative_link_in_the_readme_and_docs_resolves():
    broken = []
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in _LINK.findall(page.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


def test_the_readme_is_a_guide_that_links_the_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 250
    for page in ("docs/KNOBS.md", "docs/T2DIFF.md", "docs/SPARCODE.md"):
        assert f"]({page})" in readme
