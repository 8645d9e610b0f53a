"""Every malformed file in corpus/ reports exactly the reviewed problems of expected.txt."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from dsl import check_file
from tests.conftest import cli

CORPUS = Path(__file__).parent / "corpus"
REGISTERED = {"x.y", "images.process"}


def _expected() -> dict[str, list[str]]:
    by_file: dict[str, list[str]] = defaultdict(list)
    for line in (CORPUS / "expected.txt").read_text().splitlines():
        by_file[line.split(":", 1)[0]].append(line)
    return by_file


EXPECTED = _expected()
FILES = sorted(p.name for p in CORPUS.glob("*.yaml"))


def test_corpus_is_large_and_fully_specified() -> None:
    assert len(FILES) >= 40
    assert set(FILES) == set(EXPECTED), "every corpus file has expectations and vice versa"


@pytest.mark.parametrize("name", FILES)
def test_problems_are_exact(name: str) -> None:
    machine, problems = check_file(CORPUS / name, REGISTERED)
    assert machine is None
    got = [str(p).split("corpus/", 1)[1] for p in problems]
    assert got == EXPECTED[name]


def test_cli_reports_every_file_without_traceback(tmp_path: Path) -> None:
    result = cli("validate", str(CORPUS), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    # the CLI checks without a step registry here, so call names are not judged
    expected = [
        line for lines in EXPECTED.values() for line in lines if "no step is registered" not in line
    ]
    shown = {
        line.split("corpus/", 1)[1] for line in result.stdout.splitlines() if "corpus/" in line
    }
    assert set(expected) <= shown
    assert "file(s) checked" in result.stderr


def test_cli_json_format(tmp_path: Path) -> None:
    result = cli("validate", "--format", "json", str(CORPUS / "step-typo-call.yaml"), cwd=tmp_path)
    assert result.returncode == 1
    import json

    data = json.loads(result.stdout)
    assert data["valid"] is False
    assert data["problems"][0]["line"] == 6 and data["problems"][0]["col"] == 5
    assert data["problems"][0]["field"] == "steps[0].cal"


def test_cli_unknown_path_is_usage_error(tmp_path: Path) -> None:
    result = cli("validate", "nope.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "no such file or folder: nope.yaml" in result.stderr
    assert "Traceback" not in result.stderr


def test_call_names_checked_with_modules(tmp_path: Path) -> None:
    (tmp_path / "mysteps.py").write_text(
        "from engine import step\n@step('images.process')\ndef f(url):\n    return url\n"
    )
    wf = tmp_path / "wf.yaml"
    wf.write_text((CORPUS / "call-unknown-name.yaml").read_text())
    result = cli("validate", "-m", "mysteps", str(wf), cwd=tmp_path)
    assert result.returncode == 1
    assert (
        "wf.yaml:6:11: steps[0].call: no step is registered as `images.proces`; did you mean `images.process`?"
        in result.stdout
    )
