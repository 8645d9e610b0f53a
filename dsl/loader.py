"""YAML loading that remembers where every node came from.

The result is plain Python data plus a `Positions` map from a path of keys and indexes
(`("steps", 1, "call")`) to the 1-based line and column of that value, and of its key.
The resolver follows YAML 1.2 for scalars: `on`, `yes`, `no` stay strings and timestamps
stay text, so a workflow means what it looks like it means.

Hostile files end with a problem, never a hang or a traceback: nesting deeper than
`YAML_DEPTH_MAX`, more than `YAML_ALIASES_MAX` aliases or `YAML_NODES_MAX` values once they are
expanded, explicit tags (`!foo`, `!!float`), NUL and lone surrogates in text, non-finite numbers
and whole numbers beyond 64 bits are all refused with the place they stand.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import Problem
from .limits import INT_MAX, YAML_ALIASES_MAX, YAML_DEPTH_MAX, YAML_NODES_MAX

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


class _Composer(yaml.composer.Composer, yaml.constructor.SafeConstructor, _Resolver):
    """Composes nodes from a parser's events with the checks below; the subclasses choose
    the parser."""

    def __init__(self) -> None:
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        _Resolver.__init__(self)
        self.depth = 0
        self.aliases = 0
        self.where: list[str | int] = []  # the path being composed, for messages
        self.open_anchors: list[str] = []  # anchors of the collections being composed

    def compose_node(self, parent: Any, index: Any) -> Any:
        """Compose with a depth limit, an alias limit and no explicit tags."""
        event = self.peek_event()  # type: ignore[attr-defined]  # from the parser
        if isinstance(index, yaml.ScalarNode):
            part: str | int | None = str(index.value)
        else:
            part = index if isinstance(index, int) and not isinstance(index, bool) else None
        if part is not None:
            self.where.append(part)
        try:
            return self._compose_checked(event, parent, index)
        finally:
            if part is not None:
                self.where.pop()

    def _compose_checked(self, event: yaml.Event, parent: Any, index: Any) -> Any:
        if isinstance(event, yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > YAML_ALIASES_MAX:
                raise _Refused(f"more than {YAML_ALIASES_MAX} aliases (`*name`)", event, self.where)
            if event.anchor in self.open_anchors:
                raise _Refused(
                    f"the alias `*{event.anchor}` stands inside the value it names"
                    " (a value cannot contain itself)",
                    event,
                    self.where,
                )
            return super().compose_node(parent, index)
        tag = getattr(event, "tag", None)
        if tag not in (None, "!"):
            shown = tag.replace("tag:yaml.org,2002:", "!!")
            raise _Refused(
                f"tags like `{shown}` are not supported; write the value without a tag",
                event,
                self.where,
            )
        self.depth += 1
        if self.depth > YAML_DEPTH_MAX:
            raise _Refused(f"nested more than {YAML_DEPTH_MAX} levels deep", event, self.where)
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self.open_anchors.append(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1
            if anchor is not None:
                self.open_anchors.pop()


class _Loader(_Composer, yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    """The pure-Python parser: its syntax error messages are the ones users see."""

    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        _Composer.__init__(self)


_CParser: Any = getattr(importlib.import_module("yaml.cyaml"), "CParser", None)


class _FastLoader(_Composer, *((_CParser,) if _CParser else ())):  # type: ignore[misc]
    """libyaml's parser (when PyYAML has it) under the same composer: several times faster
    on a large file. A file it finds wrong is parsed again by `_Loader` for the message."""

    def __init__(self, stream: str) -> None:
        _CParser.__init__(self, stream)
        _Composer.__init__(self)


class _Refused(yaml.MarkedYAMLError):
    """A YAML construct this loader refuses, at the event where it starts."""

    def __init__(self, problem: str, event: yaml.Event, where: list[str | int]) -> None:
        super().__init__(problem=problem, problem_mark=event.start_mark)  # type: ignore[arg-type]
        self.field = _field(tuple(where))


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
    loader: _Loader | None = None
    try:
        node = _fast_node(text)
        if node is _SLOW:
            loader = _Loader(text)
            node = loader.get_single_node()
    except _Refused as exc:
        line, col = _where(exc.problem_mark)
        return None, [Problem(path, line, col, exc.field, str(exc.problem))]
    except yaml.MarkedYAMLError as exc:
        line, col = _where(exc.problem_mark or exc.context_mark)
        message = f"YAML syntax error: {exc.problem or exc.context}"
        return None, [Problem(path, line, col, "", message)]
    except yaml.reader.ReaderError as exc:
        line, col = _position(text, exc.position)
        char = f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
        message = f"the file holds the character {char}, which a workflow file cannot contain"
        return None, [Problem(path, line, col, "", message)]
    except yaml.YAMLError as exc:
        return None, [Problem(path, 1, 1, "", f"YAML syntax error: {exc}")]
    except Exception as exc:  # the pure-Python scanner's own failures, e.g. "\U00110000"
        mark = loader.get_mark() if loader is not None else None
        line, col = _where(mark)
        escape = _escape_problem(text, mark.index if mark is not None else -1)
        if escape is not None:
            col -= 2  # at the backslash
        why = f"YAML syntax error: cannot read this ({type(exc).__name__}: {_first_line(exc)})"
        message = escape or why
        return None, [Problem(path, line, col, "", message)]
    finally:
        if loader is not None:
            loader.dispose()
    if node is None:
        return None, [Problem(path, 1, 1, "", "the file is empty; a workflow is a YAML mapping")]
    converter = _Converter(path)
    try:
        data = converter.convert(node, ())
    except _TooLarge as exc:
        line, col = _mark(exc.node)
        message = f"more than {YAML_NODES_MAX} values once aliases are expanded"
        return None, [Problem(path, line, col, _field(exc.where), message)]
    return Loaded(data, converter.positions), converter.problems


_SLOW: Any = object()


def _fast_node(text: str) -> Any:
    """The document's node through libyaml, or `_SLOW` when it is missing or finds a
    problem (the pure-Python parser then says what the problem is, in its own words)."""
    if _CParser is None:
        return _SLOW
    loader = _FastLoader(text)
    try:
        return loader.get_single_node()
    except _Refused:
        raise
    except yaml.YAMLError:
        return _SLOW
    finally:
        loader.dispose()


def _escape_problem(text: str, index: int) -> str | None:
    """The message for an escape (`\\U00110000`) naming no character, when the scanner
    stopped on its digits."""
    if index < 2 or text[index - 2] != "\\" or text[index - 1] not in "xuU":
        return None
    escape = text[index - 2 : index + {"x": 2, "u": 4, "U": 8}[text[index - 1]]]
    return f"YAML syntax error: the escape `{escape}` names no character (the last is \\U0010FFFF)"


def _where(mark: yaml.Mark | None) -> tuple[int, int]:
    return (mark.line + 1, mark.column + 1) if mark else (1, 1)


def _position(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


_REFUSED = object()
_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")


class _TooLarge(Exception):
    def __init__(self, node: yaml.Node, where: Path) -> None:
        self.node = node
        self.where = where


class _Converter:
    """Nodes to plain data, recording positions and the problems of each scalar."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.positions = Positions()
        self.problems: list[Problem] = []
        self.constructor = _Loader("")
        self.count = 0

    def problem(self, node: yaml.Node, where: Path, message: str) -> None:
        line, col = _mark(node)
        self.problems.append(Problem(self.path, line, col, _field(where), message))

    def convert(self, node: yaml.Node, where: Path) -> Any:
        self.count += 1
        if self.count > YAML_NODES_MAX:
            raise _TooLarge(node, where)
        self.positions.values[where] = _mark(node)
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = (
                    self.scalar(key_node, where) if isinstance(key_node, yaml.ScalarNode) else None
                )
                if key is _REFUSED:
                    continue  # its problem is reported
                if not isinstance(key, (str, int, float, bool)) or key is None:
                    self.problem(key_node, where, "a key must be a plain value")
                    continue
                key = str(key) if not isinstance(key, str) else key
                if key in result:
                    self.problem(key_node, (*where, key), f"duplicate key `{key}`")
                self.positions.keys[(*where, key)] = _mark(key_node)
                result[key] = self.convert(value_node, (*where, key))
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(item, (*where, i)) for i, item in enumerate(node.value)]
        value = self.scalar(node, where)
        return None if value is _REFUSED else value

    def scalar(self, node: yaml.Node, where: Path) -> Any:
        """A scalar's value, or `_REFUSED` and a problem for what a workflow cannot hold."""
        try:
            value = self.constructor.construct_object(node)
        except (ValueError, ArithmeticError, yaml.YAMLError) as exc:
            self.problem(node, where, f"{node.value!r} is not a valid value ({_first_line(exc)})")
            return _REFUSED
        if isinstance(value, bytes | set):
            self.problem(node, where, "unsupported YAML type")
            return _REFUSED
        if isinstance(value, str):
            bad = _NOT_TEXT.search(value)
            if bad is not None:
                name = "NUL" if bad.group() == "\0" else "a lone surrogate"
                code = f"\\u{ord(bad.group()):04x}"
                self.problem(node, where, f"contains {name} ({code}), which is not text")
                return _REFUSED
        elif isinstance(value, float) and not math.isfinite(value):
            self.problem(node, where, f"{node.value} is not a finite number")
            return _REFUSED
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_MAX:
            self.problem(
                node, where, "a whole number must fit 64 bits (at most 9223372036854775807)"
            )
            return _REFUSED
        return value


def _first_line(exc: Exception) -> str:
    text = getattr(exc, "problem", None) or str(exc)
    return str(text).splitlines()[0]


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
