"""Compiling wait_for_any, for_each with run_workflow and parallel: the machine they make,
and how `graph` (mermaid and dot) and the dashboard's picture draw them."""

from __future__ import annotations

import re
from pathlib import Path

from dsl import Machine, check_file, render_graph
from engine.server.pictures import machine_svg

ENGINE = Path(__file__).resolve().parents[1] / "engine"


def load(path: Path) -> Machine:
    machine, problems = check_file(path)
    assert machine is not None, problems
    return machine


def test_wait_for_any_compiles_its_alternatives_in_order() -> None:
    machine = load(ENGINE / "anyflows" / "decision.yaml")
    state = machine.state("decide")
    assert state.kind == "wait_for_any" and state.retry is None and state.timeout is None
    assert state.config["alternatives"] == [
        {"name": "approved", "kind": "event", "event": "review.approved",
         "match": {"doc": "{{ payload.doc }}"}},
        {"name": "rejected", "kind": "event", "event": "review.rejected",
         "match": {"doc": "{{ payload.doc }}"}},
        {"name": "human", "kind": "token"},
        {"name": "reminder", "kind": "timer", "seconds": 10.0},
    ]  # fmt: skip
    assert state.listens_for == ("review.approved", "review.rejected")
    assert state.label == "wait_for_any approved | rejected | human | reminder"
    assert Machine.from_json(machine.to_json()) == machine
    mermaid = render_graph(machine, "mermaid")
    assert "decide : decide: wait_for_any approved | rejected | human | reminder" in mermaid
    assert "decide --> decide : wait" in mermaid
    dot = render_graph(machine, "dot")
    assert '"decide" [shape=box, label="decide: wait_for_any approved | rejected' in dot


def test_for_each_with_run_workflow_compiles_to_a_child_per_item() -> None:
    machine = load(ENGINE / "fanflows" / "kids.yaml")
    state = machine.state("fan")
    assert state.starts_workflow == "square"
    assert state.config == {
        "items": "{{ payload.items }}",
        "as": "n",
        "concurrency": 3,
        "workflow": "square",
        "payload": {"n": "{{ n }}"},
    }
    assert state.label == "for_each run_workflow square"
    assert "fan : fan: for_each run_workflow square" in render_graph(machine, "mermaid")
    assert '"fan" [shape=box, label="fan: for_each run_workflow square"]' in render_graph(
        machine, "dot"
    )


def test_parallel_is_drawn_with_a_frame_per_branch() -> None:
    machine = load(ENGINE / "parflows" / "checks.yaml")
    mermaid = render_graph(machine, "mermaid")
    for line in (
        'state "thumbs" as checks__thumbs',
        "checks --> thumb : thumbs",
        "checks --> where : text",
        "thumb_size --> checks : ok",
        "checks --> after : all branches done",
        "checks --> failed : failed",
    ):
        assert line in mermaid, line
    dot = render_graph(machine, "dot")
    assert 'subgraph "cluster_checks__text" {' in dot
    assert '"checks" -> "after" [label="all branches done"];' in dot
    svg = machine_svg(machine)
    frames = re.findall(r'<g class="list" data-block="(\w+)" data-branch="(\w+)">', svg)
    assert frames == [("checks", "thumbs"), ("checks", "text"), ("checks", "meta")]
