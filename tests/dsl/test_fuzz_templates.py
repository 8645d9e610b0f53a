"""Random template expressions — arithmetic on huge numbers, repetition, padding, formatting,
loops — always end within the sandbox's bounds: a plain value or a TemplateError naming the
field, within two seconds, never another exception."""

from __future__ import annotations

import json
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsl import TemplateError
from dsl.limits import TEMPLATE_OUTPUT_MAX
from dsl.templates import render_value

atoms = st.sampled_from(
    [
        "0", "1", "2", "-1", "10**9", "2**62", "1e308", "0.5", "payload.n", "payload.s",
        "payload.l", "'ab'", "'%s'", "'{:>9}'", "[1, 2]", "range(3)", "lipsum(1)", "none",
        "true", "(1, 2)", "{'a': 1}",
    ]
)  # fmt: skip
operators = st.sampled_from(["*", "**", "+", "-", "/", "//", "%", "~"])
calls = st.sampled_from(
    [
        "{} | center({})", "{} | indent({})", "{} | truncate({})", "({}).ljust({})",
        "({}).zfill({})", "({}).format({})", "({}).replace('a', {})", "[{}] * {}",
        "{} | batch({}) | list", "range({}) | sum + {}",
    ]
)  # fmt: skip


@st.composite
def expressions(draw: st.DrawFn, depth: int = 3) -> str:
    if depth == 0 or draw(st.booleans()):
        return draw(atoms)
    left, right = draw(expressions(depth - 1)), draw(expressions(depth - 1))
    if draw(st.booleans()):
        return f"({left} {draw(operators)} {right})"
    return draw(calls).format(left, right)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(expressions(), st.booleans())
def test_templates_stay_in_bounds(expression: str, in_text: bool) -> None:
    source = f"x {{{{ {expression} }}}} y" if in_text else f"{{{{ {expression} }}}}"
    scope = {"payload": {"n": 10**8, "s": "abc", "l": [1, 2, 3]}}
    started = time.monotonic()
    try:
        value = render_value(source, scope, "steps.a.log")
    except TemplateError as exc:
        assert exc.field == "steps.a.log"
    else:
        assert len(json.dumps(value, allow_nan=False)) <= 2 * TEMPLATE_OUTPUT_MAX + 64
    assert time.monotonic() - started < 2
