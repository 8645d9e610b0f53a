"""Nested step lists (dsl/blocks.py): one flat machine, parent/branch, links, unique ids."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dsl import FAILED, Machine, check_file
from dsl.blocks import ancestors, branch_states, descendants

ROOT = Path(__file__).resolve().parents[2]

# the hashes these definitions had before nesting existed: runs pinned to them stay valid
PINNED = {
    "workflows/ai-pipeline.yaml": "568670ff1d86cdf6d5d549e03657f2bdfc09d80585dda3f99a0f6ceb61d3d8d3",
    "workflows/health-check.yaml": "4e9dba9ee8e21511793440ee38ae21144e8db1c133d7bb60d121ffab5d63d040",
    "workflows/hourly-report.yaml": "a4bcbfda3c41bbd9646bffcce5bffaedea06a09d8fee01836fbcb0e0e83c1008",
    "workflows/process-image.yaml": "a3e971a5c3a057192f1ca0d5e7963258372effb1169abc4049dd51c9172d95b2",
    "bench/flows/noop1.yaml": "6624e59af2f14afc11623ed43f04021809424bc1a489f64b68f013689e3845c6",
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_definitions_without_blocks_keep_their_hash(name: str) -> None:
    machine, problems = check_file(ROOT / name)
    assert machine is not None, problems
    assert machine.content_hash == PINNED[name]


def compile_text(tmp_path: Path, body: str) -> tuple[Machine | None, list[str]]:
    path = tmp_path / "flow.yaml"
    path.write_text("id: flow\nversion: '1'\ntrigger: {manual: true}\n" + body)
    machine, problems = check_file(path)
    return machine, [str(p).split("flow.yaml:", 1)[1] for p in problems]


NESTED = """\
steps:
  - id: charge
    call: billing.charge
    catch:
      on: [CardDeclined]
      steps:
        - id: refund
          call: billing.refund
          catch:
            steps:
              - {id: page, log: "refund failed"}
        - {id: note, log: "refunded {{ steps.charge.status }}"}
  - {id: done, log: "done"}
on_failure:
  - {id: alert, log: "{{ run.error }}"}
"""


def test_nested_states_are_flat_in_document_order_and_linked(tmp_path: Path) -> None:
    m, problems = compile_text(tmp_path, NESTED)
    assert m is not None, problems
    assert [s.id for s in m.states] == ["charge", "refund", "page", "note", "done", "alert"]
    charge, refund, page, note = (m.state(i) for i in ("charge", "refund", "page", "note"))
    assert (charge.parent, charge.branch, charge.catch, charge.catch_on) == (
        None,
        None,
        "refund",
        ("CardDeclined",),
    )
    assert (refund.parent, refund.branch, refund.catch) == ("charge", "catch", "page")
    assert (page.parent, page.branch) == ("refund", "catch")
    # a handler list goes on after its owner; its failures fail like the owner would
    assert (charge.next, charge.on_error) == ("done", "alert")
    assert (refund.next, refund.on_error) == ("note", "alert")
    assert (page.next, page.on_error) == ("note", "alert")
    assert (note.next, note.on_error) == ("done", "alert")
    assert (m.state("alert").next, m.state("alert").on_error) == (FAILED, FAILED)
    assert [s.id for s in branch_states(m, "charge", "catch")] == ["refund", "note"]
    assert [s.id for s in descendants(m, "charge")] == ["refund", "page", "note"]
    assert ancestors(m, "page") == [("refund", "catch"), ("charge", "catch")]


def test_nested_machine_round_trips_and_hashes_its_structure(tmp_path: Path) -> None:
    m, problems = compile_text(tmp_path, NESTED)
    assert m is not None, problems
    assert Machine.from_json(m.to_json()) == m
    assert Machine.from_json(m.to_json()).content_hash == m.content_hash
    other, _ = compile_text(tmp_path, NESTED.replace("[CardDeclined]", "[Declined]"))
    assert other is not None and other.content_hash != m.content_hash


def test_step_ids_are_unique_across_nested_lists(tmp_path: Path) -> None:
    body = NESTED.replace("{id: page,", "{id: charge,")
    m, problems = compile_text(tmp_path, body)
    assert m is None
    assert problems == [
        "14:22: steps[0].catch.steps[0].catch.steps[0].id: "
        "duplicate step id `charge` (first used on line 5)"
    ]


def test_nested_steps_are_seen_by_later_steps_and_the_output(tmp_path: Path) -> None:
    body = NESTED.replace('log: "done"', 'log: "{{ steps.page.status }}"') + (
        "output: '{{ steps.note.output }}'\n"
    )
    m, problems = compile_text(tmp_path, body)
    assert m is not None, problems


def test_a_blocks_catch_handler_reads_the_steps_inside_the_block(tmp_path: Path) -> None:
    """The handler runs after a step inside the switch or the repeat failed, so each of those
    steps can have run before it (it was refused as "runs later"); a later handler step and
    the handler's own block stay unreadable from inside."""
    body = """\
steps:
  - id: route
    switch:
      - when: payload.big
        steps: [{id: big, log: big}]
      - default:
          - id: poll
            repeat:
              steps: [{id: check, log: "{{ steps.big.status }}"}]
              max: 2
    catch:
      steps:
        - {id: why, log: "{{ steps.big.error }} {{ steps.check.error }} {{ steps.poll.output }}"}
        - {id: then, log: "{{ steps.route.error }} {{ steps.why.output }}"}
"""
    _, problems = compile_text(tmp_path, body)
    assert problems == [
        "12:40: steps[0].switch[1].default[0].repeat.steps[0].log: `steps.big` is in another "
        "case of switch `route`; one case runs, so it cannot have run before this step"
    ]
    later = body.replace("{{ steps.big.error }}", "{{ steps.then.output }}").replace(
        "{{ steps.big.status }}", "x"
    )
    _, problems = compile_text(tmp_path, later)
    assert len(problems) == 1 and "`steps.then` runs later" in problems[0], problems


def test_a_wrong_until_is_named_until(tmp_path: Path) -> None:
    body = "steps:\n  - id: poll\n    repeat:\n      steps: [{id: a, log: x}]\n      until: UNTIL\n"
    _, problems = compile_text(tmp_path, body.replace("UNTIL", "'{{ steps.a.output }} x'"))
    assert problems == [
        "8:14: steps[0].repeat.until: `until` holds one bare expression; `{{ }}` may wrap it "
        "but no other text"
    ]
    _, problems = compile_text(tmp_path, body.replace("UNTIL", "' '"))
    assert problems == ["8:14: steps[0].repeat.until: `until` is empty"]


def test_schema_checks_nested_steps(tmp_path: Path) -> None:
    body = NESTED.replace("call: billing.refund", "cal: billing.refund")
    _, problems = compile_text(tmp_path, body)
    assert problems == [
        "11:11: steps[0].catch.steps[0].cal: unknown key `cal` in steps[0].catch.steps[0]; "
        "did you mean `call`?"
    ]


GRAPHED = """\
steps:
  - id: route
    switch:
      - when: payload.big
        steps: [{id: shrink, log: shrink}]
      - default: [{id: keep, log: keep}]
  - id: charge
    call: billing.charge
    retry: {max_attempts: 1}
    catch:
      on: [CardDeclined]
      steps: [{id: refund, log: refund}]
  - id: poll
    repeat:
      steps: [{id: check, log: check}]
      until: steps.check.output
      delay: 5s
"""


def test_mermaid_graph_nests_lists_in_composite_states(tmp_path: Path) -> None:
    from dsl import render_graph

    m, problems = compile_text(tmp_path, GRAPHED)
    assert m is not None, problems
    assert render_graph(m) == (
        "stateDiagram-v2\n"
        "  route : route: switch\n"
        '  state "when payload.big" as route__0\n'
        "  state route__0 {\n"
        "    shrink : shrink: log\n"
        "  }\n"
        '  state "default" as route__default\n'
        "  state route__default {\n"
        "    keep : keep: log\n"
        "  }\n"
        "  charge : charge: call billing.charge\n"
        '  state "caught (CardDeclined)" as charge__catch\n'
        "  state charge__catch {\n"
        "    refund : refund: log\n"
        "  }\n"
        "  poll : poll: repeat\n"
        '  state "round" as poll__body\n'
        "  state poll__body {\n"
        "    check : check: log\n"
        "  }\n"
        "  [*] --> route\n"
        "  route --> shrink : when payload.big\n"
        "  route --> keep : default\n"
        "  route --> charge : case done\n"
        "  shrink --> route : ok\n"
        "  keep --> route : ok\n"
        "  charge --> poll : ok\n"
        "  charge --> refund : failed: caught\n"
        "  charge --> failed : failed\n"
        "  refund --> poll : ok\n"
        "  poll --> check : round\n"
        "  poll --> poll : delay\n"
        "  poll --> [*] : until holds\n"
        "  poll --> failed : failed\n"
        "  check --> poll : ok\n"
        "  failed --> [*]\n"
    )


def test_mermaid_keeps_a_users_case_expression_on_its_own_line(tmp_path: Path) -> None:
    """A `when` written over two lines (a YAML block) with quotes in it: its edge label broke
    onto a line of its own (a statement of the user's making) and its composite state's
    quoted name was closed by the expression's own quotes."""
    from dsl.graph import render_graph

    body = """\
steps:
  - id: route
    switch:
      - when: |
          payload.x == 1
          or payload.y == "a]b; --> completed"
        steps: [{id: big, log: x}]
      - default: [{id: small, log: y}]
    catch:
      on: ['Odd"Name']
      steps: [{id: h, log: z}]
"""
    m, problems = compile_text(tmp_path, body)
    assert m is not None, problems
    shapes = re.compile(
        r'stateDiagram-v2|\w+ : [^"]*|state "[^"]*" as \w+|state \w+ \{|\}'
        r"|(\[\*\]|\w+) --> (\[\*\]|\w+)( : .*)?"
    )
    lines = render_graph(m, "mermaid").splitlines()
    assert [line for line in lines if not shapes.fullmatch(line.strip())] == []
    assert '  route --> big : when payload.x == 1 or payload.y == "a]b, --> completed"' in lines


def test_dot_graph_draws_each_list_as_a_cluster(tmp_path: Path) -> None:
    from dsl import render_graph

    m, problems = compile_text(tmp_path, GRAPHED)
    assert m is not None, problems
    dot = render_graph(m, "dot")
    assert (
        '  subgraph "cluster_route__0" {\n'
        '    label="when payload.big"; style=dashed;\n'
        '    "shrink" [shape=box, label="shrink: log"];\n'
        "  }\n"
    ) in dot
    assert '  subgraph "cluster_charge__catch" {\n    label="caught (CardDeclined)"' in dot
    assert '  "charge" -> "refund" [label="failed: caught"];\n' in dot
    assert '  "poll" -> "completed" [label="until holds"];\n' in dot
    assert '  "check" -> "poll" [label="ok"];\n' in dot


def test_a_failure_inside_a_block_is_drawn_to_the_blocks_catch(tmp_path: Path) -> None:
    from dsl import render_graph

    text = """\
steps:
  - id: route
    switch:
      - default: [{id: inner, call: x.y}]
    catch:
      steps: [{id: handled, log: handled}]
"""
    m, problems = compile_text(tmp_path, text)
    assert m is not None, problems
    graph = render_graph(m)
    assert "  inner --> handled : failed: caught\n" in graph
    assert "inner --> failed" not in graph  # a catch without `on:` takes every error
