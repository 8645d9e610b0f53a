"""dsl.reads: the fields a workflow reads from one step's output, with placeholders that fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dsl import load_workflow
from dsl.reads import example_answer, output_reads


def _machine(tmp_path: Path, steps: str, output: str = "") -> Any:
    path = tmp_path / "w.yaml"
    path.write_text(
        'id: w\nversion: "1"\ntrigger: {manual: true}\nsteps:\n'
        "  - {id: ask, wait_for_event: answer.given}\n" + steps + output
    )
    return load_workflow(str(path))


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ("  - {id: a, when: steps.ask.output.ok, log: x}\n", {"ok": True}),
        ("  - {id: a, when: not steps.ask.output.ok, log: x}\n", {"ok": True}),
        ('  - {id: a, when: "steps.ask.output.n > 3", log: x}\n', {"n": 0}),
        ("  - {id: a, when: \"steps.ask.output.s == 'go'\", log: x}\n", {"s": "go"}),
        ("  - {id: a, log: \"{{ steps.ask.output['who'].name }}\"}\n", {"who": {"name": "..."}}),
        (
            '  - {id: a, log: "{{ steps.ask.output.who }} {{ steps.ask.output.who.id }}"}\n',
            {"who": {"id": "..."}},
        ),
        ('  - {id: a, log: "{{ steps.ask.output }}"}\n', {}),
        ('  - {id: a2, log: y}\n  - {id: a, log: "{{ steps.a2.output.x }}"}\n', {}),
    ],
)
def test_fields_read_from_a_step_output(
    tmp_path: Path, steps: str, expected: dict[str, Any]
) -> None:
    assert output_reads(_machine(tmp_path, steps), "ask") == expected


def test_run_output_and_match_values(tmp_path: Path) -> None:
    machine = _machine(tmp_path, "", 'output: {r: "{{ steps.ask.output.reason }}"}\n')
    assert example_answer(machine, "ask", {"id": "e1"}) == {"reason": "...", "id": "e1"}
