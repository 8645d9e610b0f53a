"""Every bomb ends with a clear error within 2 s and under 200 MB: each runs in a fresh
Python process whose address space is capped at 200 MB (RLIMIT_AS), timed around the work
alone (imports excluded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT

CORPUS = ROOT / "tests" / "dsl" / "corpus"
LIMIT_BYTES = 200 * 1024 * 1024
SECONDS = 2.0

RUNNER = textwrap.dedent(
    """
    import json, resource, sys, time
    import dsl, engine.inputs, engine.service  # imports are not part of the budget
    from dsl import TemplateError, check_file, render_value
    from engine.inputs import InputInvalid, check_json, parse_json

    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    kind, arg = sys.argv[1], sys.stdin.read()
    started = time.monotonic()
    if kind == "file":
        machine, problems = check_file(arg)
        outcome = [str(p) for p in problems] if machine is None else "valid"
    elif kind == "template":
        source, scope = json.loads(arg)
        try:
            outcome = repr(render_value(source, scope, "steps.bomb.log"))[:200]
        except TemplateError as exc:
            outcome = str(exc)
    elif kind == "json":
        try:
            parse_json(arg, "payload")
            outcome = "accepted"
        except InputInvalid as exc:
            outcome = str(exc)
    elif kind == "deep-output":
        value = []
        for _ in range(int(arg)):
            value = [value]
        try:
            check_json(value, "steps.bomb")
            outcome = "accepted"
        except InputInvalid as exc:
            outcome = str(exc)
    took = time.monotonic() - started
    print(json.dumps({{"outcome": outcome, "seconds": took}}))
    """
).format(limit=LIMIT_BYTES)


def _run(kind: str, arg: str) -> tuple[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, kind],
        input=arg,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    return str(data["outcome"]), float(data["seconds"])


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("yaml-alias-bomb.yaml", "more than 200000 values once aliases are expanded"),
        ("yaml-too-many-aliases.yaml", "more than 100 aliases"),
        ("yaml-deep-flow.yaml", "nested more than 64 levels deep"),
        ("yaml-deep-block.yaml", "nested more than 64 levels deep"),
        ("template-constant-bomb.yaml", "is larger than 4096 bits"),
        ("template-endless-loop.yaml", "took longer than 1s"),
        ("template-huge-width.yaml", "is larger than 1,048,576"),
        ("template-deep-nesting.yaml", "nested too deeply"),
    ],
)
def test_file_bombs(name: str, message: str) -> None:
    outcome, seconds = _run("file", str(CORPUS / name))
    assert message in outcome
    assert seconds < SECONDS


def test_fifo_and_device_files(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.yaml"
    zero.symlink_to("/dev/zero")
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (3 * 1024 * 1024))
    for path, message in (
        (fifo, "not a regular file"),
        (zero, "not a regular file"),
        (huge, "larger than 2 MiB"),
    ):
        outcome, seconds = _run("file", str(path))
        assert message in outcome and seconds < SECONDS


@pytest.mark.parametrize(
    ("source", "scope", "message"),
    [
        ("{{ 'a' * payload.n }}", {"payload": {"n": 200_000_000}}, "would make 200,000,000"),
        ("{{ payload.s * payload.n }}", {"payload": {"s": "ab", "n": 10**8}}, "would make"),
        ("{{ 2 ** payload.n }}", {"payload": {"n": 10**9}}, "larger than 4096 bits"),
        ("{{ '{:>' ~ payload.n ~ '}' }}", {"payload": {"n": 10**9}}, "{:>1000000000}"),
        ("{{ ('{:>' ~ payload.n ~ '}').format(1) }}", {"payload": {"n": 10**9}}, "a width in"),
        ("{{ 'x' | center(payload.n) }}", {"payload": {"n": 10**9}}, "width 1,000,000,000"),
        (
            "{% for i in range(99999) %}{% for j in range(99999) %}{{ '' }}{% endfor %}{% endfor %}",
            {},
            "took longer than 1s",
        ),
        ("{{ [payload.l] * payload.n }}", {"payload": {"l": [1], "n": 10**9}}, "would make"),
        ('{{ ({"a": "x" * 1000000}|items|list) * 1000 }}', {}, "value is larger than"),
        ("{{ [2 ** 4000] * 100000 }}", {}, "value is larger than"),
        ("{{ [[1] * 1000] * 1000 }}", {}, "value is larger than"),
        ('{% for i in range(1000) %}{{ "x" * 1000000 }}{% endfor %}', {}, "`the template` would"),
        ('{{ ("{0:>999999}" * 1000).format("a") }}', {}, "`format` would make"),
        ('{{ "{:{}}".format("a", 500000000) }}', {}, "`format` would make"),
        ('{{ ("%999999s" * 1000) % (("a",) * 1000) }}', {}, "`%` would make"),
        ('{{ "%*s"|format(500000000, "a") }}', {}, "500,000,000"),
        ('{{ (range(300)|list)|join("x" * 1000000) }}', {}, "`join` would make"),
        ('{{ ("x" * 1000000).join(range(300)) }}', {}, "`join` would make"),
        ('{{ ("a" * 300)|replace("a", "x" * 1000000) }}', {}, "`replace` would make"),
        ('{{ ("x\n" * 300)|indent("y" * 1000000) }}', {}, "`indent` would make"),
        ('{{ ("x " * 300)|wordwrap(1, wrapstring="y" * 1000000) }}', {}, "`wordwrap` would"),
        ("{{ ([[1] * 1000] * 10000)|sum(start=[]) }}", {}, "`sum` would make"),
        ('{{ ("a " * 500000)|urlize }}', {}, "took longer than 1s"),
        ('{{ ((range(100000)|list) * 10)|map("string")|join|length }}', {}, "took longer than 1s"),
        ("{{ ([[1] * 1000000] * 1000)|string|length }}", {}, "`string` would make"),
        ("{{ ([[1] * 1000000] * 1000)|tojson|length }}", {}, "`tojson` would make"),
        ('{{ "%s" % ([[1] * 1000000] * 1000,) }}', {}, "`%` would make"),
        ('{{ "{}".format([[1] * 1000000] * 1000) }}', {}, "`format` would make"),
        ("a {{ [[1] * 1000000] * 1000 }}", {}, "`the printed value` would make"),
        ('{{ ("" ~ ([[1] * 1000000] * 1000))|length }}', {}, "`~` would make"),
        ('{{ "%(a)s"|format(a=[[1] * 1000000] * 1000) }}', {}, "`format` would make"),
    ],
)
def test_template_bombs(source: str, scope: dict[str, object], message: str) -> None:
    outcome, seconds = _run("template", json.dumps([source, scope]))
    assert message in outcome
    assert seconds < SECONDS


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested more than 64"),
        ('"' + "a" * 3_000_000 + '"', "larger than 1024 KiB"),
        ("9" * 100_000, "a whole number must fit 64 bits"),
        ("[" + ",".join(["1e999"] * 1000) + "]", "inf is not a JSON number"),
    ],
)
def test_payload_bombs(text: str, message: str) -> None:
    outcome, seconds = _run("json", text)
    assert message in outcome
    assert seconds < SECONDS


def test_a_100000_deep_step_output() -> None:
    outcome, seconds = _run("deep-output", "100000")
    assert "steps.bomb: nested more than 64 levels deep" in outcome
    assert seconds < SECONDS


def test_validation_is_linear_in_steps(tmp_path: Path) -> None:
    """Each step reads the one before it: a quadratic check would take 16 times as long
    for 4 times the steps; a linear one about 4 times."""

    def timed(count: int) -> float:
        lines = ['id: big\nversion: "1"\ntrigger: {manual: true}\nsteps:\n  - {id: s0, log: hi}\n']
        lines += [
            f'  - {{id: s{i}, log: "{{{{ steps.s{i - 1}.output }}}}"}}\n' for i in range(1, count)
        ]
        path = tmp_path / f"big{count}.yaml"
        path.write_text("".join(lines))
        outcome, seconds = _run("file", str(path))
        assert outcome == "valid"
        return seconds

    small, large = timed(1500), timed(6000)
    assert large < 8 * max(small, 0.05), (small, large)
