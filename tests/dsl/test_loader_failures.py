"""A failure of the YAML scanner that is not a YAML error is a problem with a place, never a
traceback."""

from __future__ import annotations

from typing import Any

import pytest

from dsl import loader


def test_any_scanner_failure_is_a_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: Any, *args: Any) -> Any:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(loader, "_fast_node", lambda text: loader._SLOW)
    monkeypatch.setattr(loader._Loader, "scan_plain", boom)
    loaded, problems = loader.load_yaml("id: a\n", "wf.yaml")
    assert loaded is None
    assert [str(p) for p in problems] == [
        "wf.yaml:1:1: YAML syntax error: cannot read this (RuntimeError: boom)"
    ]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('log: "\\UFFFFFFFF"\n', "1:7"),
        ('a:\n  log: "x\\U00110000"\n', "2:10"),
        ('log: "\\uD800"\n', None),  # a lone surrogate: the converter's own problem
    ],
)
def test_escapes_naming_no_character(text: str, where: str | None) -> None:
    loaded, problems = loader.load_yaml(text, "wf.yaml")
    if where is None:
        assert problems and "lone surrogate" in str(problems[0])
        return
    assert loaded is None
    assert str(problems[0]).startswith(f"wf.yaml:{where}: YAML syntax error: the escape `\\U")


def test_an_alias_inside_its_own_mapping() -> None:
    loaded, problems = loader.load_yaml("a: &m {b: {c: *m}}\n", "wf.yaml")
    assert loaded is None
    assert [str(p) for p in problems] == [
        "wf.yaml:1:15: a.b.c: the alias `*m` stands inside the value it names"
        " (a value cannot contain itself)"
    ]


def test_an_alias_after_its_value_is_fine() -> None:
    loaded, problems = loader.load_yaml("a: &m [1]\nb: [*m, *m]\n", "wf.yaml")
    assert loaded is not None and not problems
    assert loaded.data == {"a": [1], "b": [[1], [1]]}
