from __future__ import annotations

import pytest

from dsl import TemplateError, compile_expression, parse_duration, render_value, when_expression
from dsl.durations import DurationError
from dsl.templates import references


def test_single_expression_keeps_native_values() -> None:
    scope = {"payload": {"code": "007", "n": 7, "xs": [1, 2], "d": {"a": None}, "ok": False}}
    assert render_value("{{ payload.code }}", scope, "f") == "007"
    assert render_value("{{ payload.n }}", scope, "f") == 7
    assert render_value(" {{ payload.xs }} ", scope, "f") == [1, 2]
    assert render_value("{{ payload.d }}", scope, "f") == {"a": None}
    assert render_value("{{ payload.ok }}", scope, "f") is False
    assert render_value("n={{ payload.n }}", scope, "f") == "n=7"
    assert render_value({"a": ["{{ payload.n }}", "x"]}, scope, "f") == {"a": [7, "x"]}


def test_undefined_is_an_error_naming_the_field() -> None:
    with pytest.raises(TemplateError) as err:
        render_value("{{ payload.missing }}", {"payload": {}}, "steps.a.with.url")
    assert err.value.field == "steps.a.with.url"
    assert "missing" in err.value.message
    with pytest.raises(TemplateError):
        render_value("x {{ nothing }}", {}, "f")


def test_sandbox_blocks_unsafe_access() -> None:
    with pytest.raises(TemplateError, match="unsafe"):
        render_value("{{ payload.__class__.__mro__ }}", {"payload": {}}, "f")


def test_when_rules() -> None:
    assert when_expression("payload.n > 3", "w").evaluate({"payload": {"n": 4}}, "w") is True
    assert when_expression("{{ payload.n > 3 }}", "w").evaluate({"payload": {"n": 1}}, "w") is False
    with pytest.raises(TemplateError, match="bare expression"):
        when_expression("yes {{ payload.n }}", "w")


def test_references() -> None:
    refs = references("{{ steps.a.output }} {{ steps['b'].status }} {{ env.API }} {{ item }}")
    assert refs.steps == {"a", "b"} and refs.env == {"API"} and "item" in refs.names


def test_syntax_error() -> None:
    with pytest.raises(TemplateError, match="syntax"):
        compile_expression("{{ a b }}", "f")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("3s", 3),
        ("5m", 300),
        ("2h", 7200),
        ("1d", 86400),
        ("3 seconds", 3),
        ("PT3S", 3),
        ("PT1H30M", 5400),
        ("P1D", 86400),
        (10, 10),
        (1.5, 1.5),
        ("2 minutes", 120),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "3 fortnights", "-1", -1, "PT", True, "", None])
def test_bad_durations(text: object) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


@pytest.mark.parametrize(
    "value", [10**400, 10**5000, -(10**400), 10**9, float("inf")], ids=lambda v: f"v{hash(v)}"
)
def test_huge_numbers_are_duration_errors(value: float) -> None:
    with pytest.raises(DurationError, match=r"longest duration|finite|negative"):
        parse_duration(value)


def test_mapping_keys_win_over_dict_methods() -> None:
    scope = {"payload": {"items": [1, 2], "keys": "k", "get": 3}}
    assert render_value("{{ payload.items }}", scope, "f") == [1, 2]
    assert render_value("{{ payload.keys }}/{{ payload.get }}", scope, "f") == "k/3"
    assert render_value("{{ payload.values() | list }}", {"payload": {"a": 1}}, "f") == [1]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('{{ "hello world"|truncate(5) }}', "he..."),
        ('{{ "hello world"|wordwrap(5) }}', "hello\nworld"),
        ('{{ "a\nb"|indent(2) }}', "a\n  b"),
        ('{{ ["a", "b"]|join("-") }}', "a-b"),
        ('{{ "aXa"|replace("a", "b") }}', "bXb"),
        ('{{ "%s-%s"|format(1, 2) }}', "1-2"),
        ('{{ {"b": 1, "a": [2]}|tojson }}', '{"a": [2], "b": 1}'),
        ("{{ [1, 2, 3]|sum }}", 6),
        ("{{ [[1], [2]]|sum(start=[]) }}", [1, 2]),
        ('{{ [1, 2]|map("string")|list }}', ["1", "2"]),
        ('{{ "see https://example.com"|urlize }}', None),
        ('{{ "x"|center(5) }}', "  x  "),
        ("{{ [1, 2, 3]|batch(2)|list }}", [[1, 2], [3]]),
        ("{{ [1, 2, 3]|slice(2)|list }}", [[1, 2], [3]]),
        ('{{ "ab"|upper }}', "AB"),
        ('{{ "a b"|title }}', "A B"),
        ('{{ "a"|escape }}', "a"),
        ("{{ [3, 1]|sort|first }}", 1),
        ('{{ [{"k": 1}]|map(attribute="k")|list }}', [1]),
        ('{{ "x"|default("y") }}', "x"),
        ("{{ 3.14159|round(2) }}", 3.14),
        ('{{ "1"|int + 1 }}', 2),
        ('{{ "a b c"|wordcount }}', 3),
        ('{{ "<b>x</b>"|striptags }}', "x"),
        ('{{ {"a": 1}|dictsort }}', [["a", 1]]),
        ('{{ "a"|string|length }}', 1),
        ("{{ [1, 1, 2]|unique|list }}", [1, 2]),
        ('{{ "hello world"|truncate(5) }} and {{ "a b"|wordwrap(1) }}', "he... and a\nb"),
    ],
)
def test_builtin_filters_work(source: str, expected: object) -> None:
    value = compile_expression(source, "f").evaluate({}, "f")
    if expected is None:
        assert isinstance(value, str) and '<a href="https://example.com"' in value
    else:
        assert value == expected


def test_value_size_counts_shared_objects() -> None:
    with pytest.raises(TemplateError, match="value is larger than 1,048,576"):
        render_value('{{ ({"a": "x" * 1000000}|items|list) * 1000 }}', {}, "f")
    assert render_value('{{ ["x" * 1000] * 1000 }}', {}, "f") == ["x" * 1000] * 1000


def test_bounded_methods_and_filters_still_work() -> None:
    assert render_value('{{ "{:>{}}".format("a", 3) }}', {}, "f") == "  a"
    assert render_value('{{ "{0}-{x:.2f}".format(1, x=2) }}', {}, "f") == "1-2.00"
    assert render_value('{{ "{a}".format_map({"a": 1}) }}', {}, "f") == "1"
    assert render_value('{{ "%3s|%.1f" % ("a", 2) }}', {}, "f") == "  a|2.0"
    assert render_value('{{ "%*d"|format(3, 1) }}', {}, "f") == "  1"
    assert render_value('{{ "-".join(["a", "b"]) }}', {}, "f") == "a-b"
    assert render_value("{{ range(3)|join(',') }}", {}, "f") == "0,1,2"
    assert render_value('{{ [{"k": 1}, {"k": 2}]|join(",", attribute="k") }}', {}, "f") == "1,2"
    assert render_value('{{ "a b"|wordwrap(1, wrapstring="|") }}', {}, "f") == "a|b"
    assert render_value("{% for i in range(3) %}{{ i }}{% endfor %}", {}, "f") == "012"


def test_sum_of_lists_is_linear() -> None:
    assert render_value("{{ ([[1]] * 100000)|sum(start=[])|length }}", {}, "f") == 100000
    assert render_value('{{ [{"a": [1]}, {"a": [2]}]|sum(attribute="a", start=[]) }}', {}, "f") == [
        1,
        2,
    ]
    assert render_value("{{ [(1,), (2,)]|sum(start=()) }}", {}, "f") == [1, 2]


def test_concat_and_printing_still_work() -> None:
    assert render_value('{{ 1 ~ "a" ~ [2] }}', {}, "f") == "1a[2]"
    assert render_value('a {{ [1, {"b": 2}] }} {{ none }}', {}, "f") == "a [1, {'b': 2}] None"
