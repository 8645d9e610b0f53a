"""The shipped examples validate, compile, round-trip and draw."""

from __future__ import annotations

from pathlib import Path

from dsl import Machine, check_paths, render_graph
from engine.registry import import_modules, registered_names
from tests.conftest import ROOT, cli

WORKFLOWS = ROOT / "workflows"


def test_every_example_validates_against_its_registered_steps() -> None:
    import_modules(["workflows.steps"], str(ROOT))
    catalog = check_paths([WORKFLOWS], registered_names())
    assert catalog.problems == []
    assert set(catalog.workflows) >= {
        "process-image",
        "health-check",
        "hourly-report",
        "ai-pipeline",
        "order-fulfilment",
    }
    for machine in catalog.workflows.values():
        again = Machine.from_json(machine.to_json())
        assert again == machine
        assert again.content_hash == machine.content_hash


def test_hash_changes_with_meaning_only(tmp_path: Path) -> None:
    text = (WORKFLOWS / "process-image.yaml").read_text()
    (tmp_path / "a.yaml").write_text(text)
    (tmp_path / "b.yaml").write_text("# a comment changes nothing\n" + text)
    (tmp_path / "c.yaml").write_text(text.replace("wait: 3 seconds", "wait: 4 seconds"))
    hashes = {
        p: check_paths([tmp_path / p]).workflows["process-image"].content_hash
        for p in ("a.yaml", "b.yaml", "c.yaml")
    }
    assert hashes["a.yaml"] == hashes["b.yaml"] != hashes["c.yaml"]


def test_mermaid_graph_of_process_image() -> None:
    machine = check_paths([WORKFLOWS / "process-image.yaml"]).workflows["process-image"]
    assert render_graph(machine) == (
        "stateDiagram-v2\n"
        "  start : start: log\n"
        "  pause : pause: wait\n"
        "  call_image_api : call_image_api: call images.process\n"
        "  done : done: log\n"
        "  [*] --> start\n"
        "  start --> pause : ok\n"
        "  pause --> call_image_api : ok\n"
        "  pause --> pause : wait\n"
        "  call_image_api --> done : ok\n"
        "  call_image_api --> call_image_api : retry x3\n"
        "  call_image_api --> failed : failed\n"
        "  done --> [*] : ok\n"
        "  failed --> [*]\n"
    )


def test_graph_cli_dot_with_failure_handlers() -> None:
    result = cli("graph", "hourly-report", "--format", "dot")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith('digraph "hourly-report" {')
    assert '"fetch_analytics" -> "report_failed" [label="failed"];' in out
    assert '"report_failed" [shape=box, label="report_failed: log", style=dashed];' in out
    assert '"report_failed" -> "failed"' in out


def test_graph_of_unknown_workflow_is_clear() -> None:
    result = cli("graph", "no-such-flow")
    assert result.returncode == 2
    assert "no workflow has id `no-such-flow`" in result.stderr
    assert "Traceback" not in result.stderr
