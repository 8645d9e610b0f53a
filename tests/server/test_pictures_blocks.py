"""The dashboard's workflow picture shows nested lists: indented boxes in named frames."""

from __future__ import annotations

import re
from pathlib import Path

from dsl import check_file
from engine.server.pictures import INDENT, machine_svg

FLOW = Path(__file__).resolve().parents[1] / "engine" / "blockflows" / "blocky.yaml"


def test_nested_lists_are_framed_and_indented_under_their_block() -> None:
    machine, problems = check_file(FLOW)
    assert machine is not None, problems
    svg = machine_svg(machine)
    frames = re.findall(r'<g class="list" data-block="(\w+)" data-branch="(\w+)">', svg)
    assert frames == [("route", "0"), ("route", "default"), ("charge", "catch"), ("poll", "body")]
    for label in ("when true", "default", "caught (ConnectionError)", "round"):
        assert f">{label}</text>" in svg
    x = {
        step: float(left)
        for step, left in re.findall(
            r'data-step="(\w+)"><title>[^<]*</title><rect x="([\d.]+)"', svg
        )
    }
    assert x["one"] == x["never"] == x["three"] == x["tick"] == x["route"] + INDENT
    assert x["route"] == x["charge"] == x["poll"]
    # every box is drawn once, and the arrows back to a block run along the right margin
    assert sorted(x) == sorted(s.id for s in machine.states)
    assert svg.count('<path d="M') >= 4
