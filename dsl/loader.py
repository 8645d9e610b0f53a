"""YAML loading that remembers where every node came from.

The result is plain Python data plus a `Positions` map from a path of keys and indexes
(`("steps", 1, "call")`) to the 1-based line and column of that value, and of its key.
The resolver follows YAML 1.2 for scalars: `on`, `yes`, `no` stay strings and timestamps
stay text, so a workflow means what it looks like it means.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import Problem

__all__ = ["Loaded", "Path", "Positions", "load_yaml"]

Path = tuple[str | int, ...]


class _Resolver(yaml.resolver.BaseResolver):
    """YAML 1.2 core schema: only true/false are booleans; no implicit timestamps."""


_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"),
)
_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)
_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]
)


class _Loader(
    yaml.reader.Reader,
    yaml.scanner.Scanner,
    yaml.parser.Parser,
    yaml.composer.Composer,
    yaml.constructor.SafeConstructor,
    _Resolver,
):
    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        _Resolver.__init__(self)


@dataclass
class Positions:
    """Where each value (and each mapping key) of a loaded document stands in its file."""

    values: dict[Path, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def of_value(self, path: Path) -> tuple[int, int]:
        """Line/col of the value at `path`, or of its nearest existing ancestor."""
        while path not in self.values and path:
            path = path[:-1]
        return self.values.get(path, (1, 1))

    def of_key(self, path: Path) -> tuple[int, int]:
        """Line/col of the key naming `path` (falls back to the value)."""
        return self.keys.get(path) or self.of_value(path)


@dataclass
class Loaded:
    data: Any
    positions: Positions


def load_yaml(text: str, path: str) -> tuple[Loaded | None, list[Problem]]:
    """Parse one YAML document; on a syntax error return the problem instead."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = f"YAML syntax error: {exc.problem or exc.context}"
        return None, [Problem(path, line, col, "", message)]
    except yaml.YAMLError as exc:
        return None, [Problem(path, 1, 1, "", f"YAML syntax error: {exc}")]
    finally:
        loader.dispose()
    if node is None:
        return None, [Problem(path, 1, 1, "", "the file is empty; a workflow is a YAML mapping")]
    positions = Positions()
    problems: list[Problem] = []
    data = _convert(node, (), positions, problems, path, _Loader(""))
    return Loaded(data, positions), problems


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _convert(
    node: yaml.Node,
    where: Path,
    positions: Positions,
    problems: list[Problem],
    path: str,
    constructor: _Loader,
) -> Any:
    positions.values[where] = _mark(node)
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = constructor.construct_object(key_node)
            if not isinstance(key, (str, int, float, bool)) or key is None:
                line, col = _mark(key_node)
                problems.append(
                    Problem(path, line, col, _field(where), "a key must be a plain value")
                )
                continue
            key = str(key) if not isinstance(key, str) else key
            if key in result:
                line, col = _mark(key_node)
                problems.append(
                    Problem(path, line, col, _field((*where, key)), f"duplicate key `{key}`")
                )
            positions.keys[(*where, key)] = _mark(key_node)
            result[key] = _convert(
                value_node, (*where, key), positions, problems, path, constructor
            )
        return result
    if isinstance(node, yaml.SequenceNode):
        return [
            _convert(item, (*where, i), positions, problems, path, constructor)
            for i, item in enumerate(node.value)
        ]
    value = constructor.construct_object(node)
    if isinstance(value, bytes | set):
        line, col = _mark(node)
        problems.append(Problem(path, line, col, _field(where), "unsupported YAML type"))
        return None
    return value


def _field(where: Path) -> str:
    """`("steps", 1, "call")` -> `steps[1].call`."""
    out = ""
    for part in where:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


field_name = _field
