"""JSON Schema validation of a workflow document, with messages a user can act on.

jsonschema's raw messages ("is not valid under any of the given schemas") are turned into
one line per mistake, placed at the offending key or value, with the closest valid word for
a typo.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError

from schemas import workflow_schema

from .errors import Problem
from .loader import Path, Positions, field_name
from .model import STEP_KINDS

__all__ = ["closest", "schema_problems"]

_VALIDATOR: jsonschema.Draft202012Validator | None = None
_JSON_TYPES = {
    dict: "a mapping", list: "a list", str: "a string", bool: "true/false",
    int: "a number", float: "a number", type(None): "null",
}  # fmt: skip
_TYPE_WORDS = {
    "object": "a mapping", "array": "a list", "string": "a string", "boolean": "true/false",
    "integer": "a whole number", "number": "a number", "null": "null",
}  # fmt: skip


def closest(word: str, candidates: Iterable[str]) -> str:
    """`; did you mean `x`?` for the closest candidate, or an empty string."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean `{match[0]}`?" if match else ""


def _validator() -> jsonschema.Draft202012Validator:
    global _VALIDATOR
    if _VALIDATOR is None:
        _VALIDATOR = jsonschema.Draft202012Validator(workflow_schema())
    return _VALIDATOR


def _yaml(value: Any) -> str:
    """A scalar as YAML writes it (true, false, null); anything else, a list too, as repr."""
    if value is True or value is False or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value)


def _what(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _pattern_hint(field: str) -> str:
    leaf = field.rsplit(".", 1)[-1]
    if leaf == "id" and field.startswith(("steps", "on_failure")):
        return "lowercase letters, digits and _, starting with a letter"
    if leaf in ("id", "name", "queue", "run_workflow"):
        return "lowercase letters, digits, '.', '_' and '-', starting with a letter"
    if field.startswith("env["):
        return "an environment variable name (letters, digits and _)"
    if leaf == "as":
        return "lowercase letters, digits and _"
    return "a registered step name (letters, digits, '.', '_', ':', '-')"


def schema_problems(data: Any, positions: Positions, path: str) -> list[Problem]:
    problems: set[Problem] = set()
    for error in _validator().iter_errors(data):
        problems.update(_explain(error, data, positions, path))
    return sorted(problems)


def _explain(error: ValidationError, root: Any, positions: Positions, path: str) -> list[Problem]:
    where: Path = tuple(error.absolute_path)
    field = field_name(where)
    kind = error.validator
    instance = error.instance

    def at_value(message: str, at: Path = where) -> Problem:
        line, col = positions.of_value(at)
        return Problem(path, line, col, field_name(at), message)

    def at_key(message: str, at: Path) -> Problem:
        line, col = positions.of_key(at)
        return Problem(path, line, col, field_name(at), message)

    if kind == "additionalProperties" and isinstance(instance, dict):
        allowed = list(error.schema.get("properties", {}))
        extras = [k for k in instance if k not in allowed]
        where_text = f" in {field}" if field else ""
        return [
            at_key(f"unknown key `{k}`{where_text}{closest(k, allowed)}", (*where, k))
            for k in extras
        ]
    if kind == "required" and isinstance(instance, dict):
        return [
            at_value(f"missing required key `{k}`")
            for k in error.validator_value
            if k not in instance
        ]
    if "propertyNames" in error.schema_path:
        parent = _lookup(root, where)
        present = [k for k in STEP_KINDS if isinstance(parent, dict) and k in parent]
        if len(present) != 1:  # "one kind per step" is reported once, by the compiler
            return []
        key = str(instance)
        allowed = [str(v) for v in error.validator_value if v not in parent]
        return [
            at_key(
                f"`{key}` does not belong in a `{present[0]}` step{closest(key, allowed)}",
                (*where, key),
            )
        ]
    if kind == "type":
        wanted = error.validator_value
        wanted_list = wanted if isinstance(wanted, list) else [wanted]
        words = " or ".join(_TYPE_WORDS.get(str(w), str(w)) for w in wanted_list)
        hint = ""
        if where == ("version",) and isinstance(instance, int | float):
            hint = f'; quote it: version: "{instance}"'
        return [at_value(f"must be {words}, not {_what(instance)}{hint}")]
    if kind == "enum":
        options = [str(v) for v in error.validator_value]
        return [
            at_value(
                f"must be one of {', '.join(options)}; got {instance!r}{closest(str(instance), options)}"
            )
        ]
    if kind == "const":
        return [at_value(f"must be {_yaml(error.validator_value)}; got {_yaml(instance)}")]
    if kind == "pattern":
        return [at_value(f"{instance!r} is not valid here: use {_pattern_hint(field)}")]
    if kind in ("minimum", "maximum"):
        word = "at least" if kind == "minimum" else "at most"
        return [at_value(f"must be {word} {error.validator_value}; got {instance!r}")]
    if kind == "maxLength":
        return [
            at_value(
                f"is {len(instance)} characters long; at most {error.validator_value} are allowed"
            )
        ]
    if kind in ("minItems", "minLength", "minProperties"):
        return [at_value("must not be empty")]
    if kind == "uniqueItems":
        return [at_value("has repeated items")]
    return [at_value(error.message)]


def _lookup(root: Any, where: Path) -> Any:
    node = root
    for part in where:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node
