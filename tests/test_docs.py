"""The documentation: the README is a front door whose links resolve, the reference pages say what
the code does (config ids, metadata keys, exit codes, command-line options), and the site builds
with the generated pages. `make docs` (run by `make test`) builds it with --strict as well."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import pytest

from pipelines import cli
from pipelines.batch.bundle import OPTIONAL_IDS, REQUIRED_IDS
from tests.conftest import REPO

DOCS = REPO / "docs"
SCHEMA = REPO / "bundles" / "metadata.schema.json"


def _links(markdown: str) -> list[str]:
    return re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", markdown)


def test_the_readme_is_a_front_door_whose_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "make demo" in text and "make test" in text
    local = [link for link in _links(text) if not link.startswith(("http://", "https://"))]
    assert len(local) > 20  # it links into the docs rather than holding them
    missing = [link for link in local if not (REPO / link).exists()]
    assert not missing, missing


def test_the_bundle_contract_page_names_every_config_id_the_code_takes():
    page = (DOCS / "reference" / "bundle-contract.md").read_text()
    rows = {m.group(1): m.group(2).strip() for m in re.finditer(r"^\| `(\w+)` \| ([^|]+) \|", page, re.MULTILINE)}
    assert set(rows) == set(REQUIRED_IDS) | set(OPTIONAL_IDS)
    assert {name for name, required in rows.items() if required == "yes"} == set(REQUIRED_IDS)


def test_the_metadata_schema_describes_every_key_the_bundles_hold_and_the_code_reads():
    properties = json.loads(SCHEMA.read_text())["properties"]
    undescribed = [key for key, prop in properties.items() if not prop.get("description")]
    assert not undescribed, undescribed
    held = {key for path in REPO.glob("bundles/*/configs/metadata.json") for key in json.loads(path.read_text())}
    code = "\n".join(p.read_text() for p in (REPO / "pipelines").rglob("*.py"))
    configs = "\n".join(p.read_text() for p in REPO.glob("bundles/*/configs/*.json"))
    read = set(re.findall(r"metadata\.get\(\"(\w+)\"", code)) | set(re.findall(r"_meta_#(\w+)", configs))
    assert read, "the scan of the code found no metadata key: the pattern is out of date"
    assert not (held | read) - set(properties), sorted((held | read) - set(properties))


def test_the_exit_codes_are_the_ones_the_batch_command_returns():
    """The table the docs and --help print from is the one the code returns codes by."""
    assert set(cli.BATCH_EXIT_CODES) == {0, 1, 2, 3, 130, 143}
    parser = cli._parser()
    batch = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["batch"]
    assert all(f"{code} " in batch.epilog for code in cli.BATCH_EXIT_CODES)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "DISABLE_MKDOCS_2_WARNING": "true", "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], check=False,
                            cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of ``parser`` and of its subcommands, at any depth."""
    flags = {flag for action in parser._actions for flag in action.option_strings}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _flags(sub)
    return flags


def _text(html_file) -> str:
    return re.sub(r"<[^>]+>", " ", html_file.read_text())


def test_the_command_line_page_holds_every_option_of_every_command(site):
    page = _text(site / "reference" / "cli" / "index.html")
    flags = _flags(cli._parser())
    assert {"--retries", "--push", "--wait", "--study-date", "--description", "--layout"} <= flags
    assert not [flag for flag in flags if flag not in page]
    for code, why in cli.BATCH_EXIT_CODES.items():
        assert re.search(rf"\b{code}\s+{re.escape(why.split('`')[0][:30])}", page), code


def test_the_metadata_page_and_the_bundle_pages_are_built_from_their_sources(site):
    metadata = _text(site / "reference" / "metadata" / "index.html")
    properties = json.loads(SCHEMA.read_text())["properties"]
    assert all(key in metadata for key in properties)
    brain = _text(site / "bundles" / "unet3d_brain_tumor" / "index.html")
    assert "Finding the sequences in a study" in brain  # the bundle's own docs/README.md
    api = _text(site / "reference" / "api" / "inference" / "index.html")
    assert "BlendedSlidingWindowInferer" in api and "OverlapTileInferer" in api  # from the docstrings


def test_no_page_loads_anything_from_the_internet(site):
    loaded = re.compile(r"<(?:script|link|img)[^>]+(?:src|href)=\"(https?:)?//", re.IGNORECASE)
    offenders = [str(p.relative_to(site)) for p in site.rglob("*.html") if loaded.search(p.read_text())]
    assert not offenders, offenders
