"""What the docs say the batch job writes, for the tests that run it to hold its records to."""

from __future__ import annotations

import re
from collections.abc import Mapping

from tests.conftest import REPO

OUTPUTS_PAGE = REPO / "docs" / "reference" / "outputs.md"


def documented_record_fields() -> set[str]:
    """The fields the record table of ``docs/reference/outputs.md`` names (a row may name several)."""
    text = OUTPUTS_PAGE.read_text()
    table = text[text.index("## Record fields"):text.index("## The run's report")]
    fields: set[str] = set()
    for row in table.splitlines():
        if row.startswith("| `"):
            fields.update(re.findall(r"`([a-z_]+)`", row.split("|")[1]))
    return fields


def assert_record_documented(record: Mapping) -> None:
    """Every top-level field of ``record`` has its row in the docs' record table."""
    missing = set(record) - documented_record_fields()
    assert not missing, f"record fields missing from {OUTPUTS_PAGE.relative_to(REPO)}: {sorted(missing)}"
