"""Random mutations of valid workflows only ever produce the DSL's own outcome: a machine or
problems. No other exception escapes, whatever the mutation."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsl import Problem
from dsl.catalog import check_file
from tests.conftest import ROOT

EXAMPLES = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "workflows").glob("*.yaml"))]
KEYS = [
    "id",
    "version",
    "trigger",
    "steps",
    "call",
    "with",
    "wait",
    "when",
    "retry",
    "timeout",
    "for_each",
    "as",
    "log",
    "cron",
    "event",
    "queue",
    "output",
    "on_failure",
    "match",
    "max_attempts",
    "min_delay",
    "schema",
    "env",
    "payload",
    "wait_for_token",
    "level",
]
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 10**6)
    | st.floats(allow_nan=False)
    | st.sampled_from(
        [
            "",
            "{{",
            "}}",
            "{{ steps.x.output }}",
            "{{ payload.a }}",
            "3 seconds",
            "* * * * *",
            "61 * * *",
            "Europe/Nowhere",
            "x.y",
            "{% for %}",
            "PT",
            "{{ env.X }}",
            "\t",
            "a: b",
            "- [",
            "{{ item }}",
            "2026-01-01T00:00:00Z",
        ]
    )
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn) -> str:
    doc = copy.deepcopy(draw(st.sampled_from(EXAMPLES)))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_paths(doc)))
        action = draw(st.sampled_from(["replace", "delete", "add", "rename"]))
        parent: Any = doc
        for part in path[:-1]:
            parent = parent[part]
        if not path:
            doc = draw(values) if action == "replace" else doc
            continue
        last = path[-1]
        if action == "replace":
            parent[last] = draw(values)
        elif action == "delete":
            del parent[last]
        elif action == "add" and isinstance(parent[last], dict):
            parent[last][draw(st.sampled_from(KEYS))] = draw(values)
        elif action == "add" and isinstance(parent[last], list):
            parent[last].append(draw(values))
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS))] = parent.pop(last)
    text = yaml.safe_dump(doc, sort_keys=False)
    if draw(st.booleans()):  # sometimes break the YAML text itself
        cut = draw(st.integers(0, len(text)))
        text = (
            text[:cut]
            + draw(st.sampled_from(["\t", ": :", "[", "{{", "'", "- x\n  y: z", ""]))
            + text[cut:]
        )
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=mutated())
def test_mutations_only_give_problems_or_machines(text: str, tmp_path_factory: Any) -> None:
    path: Path = tmp_path_factory.mktemp("fuzz") / "wf.yaml"
    path.write_text(text)
    machine, problems = check_file(path, registered={"images.process", "health.ping"})
    assert (machine is None) == bool(problems)
    for p in problems:
        assert isinstance(p, Problem) and p.line >= 1 and p.col >= 1 and p.message
