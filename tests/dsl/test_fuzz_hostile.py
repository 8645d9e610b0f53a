"""Hostile YAML text — aliases and alias bombs, deep nesting, tags, odd scalars, bad escapes,
template bombs — into `check_file`: always the DSL's own outcome (a machine or problems,
each `path:line:col`), quickly, whatever the document."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsl import Problem
from dsl.catalog import check_file

FOLDER = Path(tempfile.mkdtemp(prefix="dy-yaml-fuzz-"))
ODD = [
    ".nan", ".inf", "-.inf", "1e309", "-1e999", "99999999999999999999999", "0x", "0o9", "~",
    "!!float abc", "!foo x", "!!timestamp 2020-01-01", "!!binary aGk=", "!!set {a: null}",
    "!!python/object/apply:os.system [id]", '"\\ud800"', '"\\udfff x"', '"\\0"', '"\\x00"',
    "'it''s'", '"{{ 2**100000 }}"', "\"{{ 'a' * 10**9 }}\"", '"{{ 1e308*10 }}"',
    '"{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"',
    '"{{ ' + "[" * 2000 + "]" * 2000 + ' }}"', '"{{ 1' + "+1" * 500 + ' }}"',
    '"* * 31 2 *"', '"100000000 days"', '"9999-12-31T23:00:00-05:00"', "*undefined",
    "&dup 1", "{a: &x 1, b: *x}", "[*]", "{", "]", "- -", "? complex\n  : key", "|\n  block",
]  # fmt: skip
FIELDS = ["wait", "log", "wait_until", "timeout", "for_each", "when", "retry", "with"]


def _nested(depth: int, flow: bool) -> str:
    if flow:
        return "[" * depth + "1" + "]" * depth
    return "".join("\n" + "  " * (i + 3) + "k:" for i in range(depth)) + " 1"


def _bomb(levels: int, width: int) -> str:
    lines = ['x0: &a0 ["lol"]']
    for i in range(1, levels):
        lines.append(f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


scalars = st.sampled_from(ODD) | st.text(max_size=30).map(
    lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"'
)
values = scalars | st.builds(_nested, st.integers(0, 120), st.booleans())


@st.composite
def documents(draw: st.DrawFn) -> str:
    field = draw(st.sampled_from(FIELDS))
    value = draw(values)
    head = 'id: fuzz\nversion: "1"\ntrigger: {manual: true}\n'
    step = f"steps:\n  - id: a\n    {field}: {value}\n"
    extra = draw(st.sampled_from(["", "output: " + draw(values) + "\n"]))
    bomb = _bomb(draw(st.integers(1, 12)), draw(st.integers(1, 12))) if draw(st.booleans()) else ""
    return head + step + extra + bomb


@settings(max_examples=80, deadline=3000, suppress_health_check=list(HealthCheck))
@given(documents())
def test_hostile_yaml_gets_problems_never_an_exception(text: str) -> None:
    path = FOLDER / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    machine, problems = check_file(path)
    assert (machine is None) == bool(problems)
    for p in problems:
        assert isinstance(p, Problem) and p.line >= 1 and p.col >= 1 and p.message
        str(p).encode("utf-8")  # printable: no lone surrogate reaches the user
