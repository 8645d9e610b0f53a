"""The README stands on its own in a clone: it names what a user must install, and every file
it links to is in the repository (no ../shared/SPEC.md)."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def test_the_readme_names_the_extras_and_links_only_files_of_the_repository() -> None:
    text = (ROOT / "README.md").read_text("utf-8")
    assert "pip install -e '.[postgres]'" in text  # else a PostgreSQL URL cannot work
    assert "Chromium" in text and "chromium" in text  # the browser tests skip without it
    docs = [text] + [p.read_text("utf-8") for p in (ROOT / "docs").rglob("*.md")]
    for doc in docs:
        assert "SPEC.md" not in doc and "../shared" not in doc
        for target in re.findall(r"\]\(([^)#\s]+)\)", doc):
            if not re.match(r"[a-z]+://", target):
                assert (ROOT / target).exists(), f"the README links to {target}, not in the repo"
