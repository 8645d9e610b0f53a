"""Templates: one sandboxed Jinja2 environment with strict undefined names and native values.

A string that is exactly one `{{ expr }}` evaluates to the expression's own value (dict, list,
number, bool, null): the expression is compiled and evaluated, never re-parsed from rendered
text, so the string "007" stays a string. Any other string renders to a string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TemplateError

__all__ = [
    "Expression",
    "compile_expression",
    "compile_value",
    "is_template",
    "references",
    "render_value",
    "when_expression",
]


class _Environment(ImmutableSandboxedEnvironment):
    """Keys of a mapping win over its methods: `payload.items` is the payload's `items`
    field, never `dict.items`."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, Mapping) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)


_ENV = _Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
_ENV.filters["tojson"] = lambda v: json.dumps(v, sort_keys=True)
_ONE_EXPR = re.compile(r"^\s*\{\{(?P<expr>.*?)\}\}\s*$", re.DOTALL)


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text or "{#" in text


def _single_expression(text: str) -> str | None:
    """The expression of a string that is exactly one `{{ expr }}`, else None."""
    match = _ONE_EXPR.match(text)
    if not match:
        return None
    expr = match.group("expr")
    return None if "{{" in expr or "}}" in expr else expr.strip()


@dataclass(frozen=True)
class Expression:
    """A compiled template string: either a native expression or a text template."""

    source: str
    expression: str | None  # set when the source is exactly one {{ expr }}

    def evaluate(self, scope: Mapping[str, Any], field: str) -> Any:
        try:
            if self.expression is not None:
                value = _compiled_expression(self.expression)(**scope)
                return _plain(value, field)
            return _compiled_template(self.source).render(**scope)
        except TemplateError:
            raise
        except jinja2.UndefinedError as exc:
            raise TemplateError(field, f"{exc.message} in {self.source!r}") from None
        except jinja2.TemplateError as exc:
            raise TemplateError(field, f"{exc} in {self.source!r}") from None
        except Exception as exc:  # a template can raise anything its expression does
            raise TemplateError(field, f"{type(exc).__name__}: {exc} in {self.source!r}") from None


@lru_cache(maxsize=4096)
def _compiled_expression(expr: str) -> Any:
    return _ENV.compile_expression(expr, undefined_to_none=False)


@lru_cache(maxsize=4096)
def _compiled_template(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


def _plain(value: Any, field: str) -> Any:
    """Turn an expression's value into plain JSON data; undefined anywhere is an error."""
    if isinstance(value, jinja2.Undefined):
        value._fail_with_undefined_error()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, field) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, field) for v in value]
    raise TemplateError(
        field, f"the expression gives a {type(value).__name__}, which is not JSON data"
    )


@lru_cache(maxsize=4096)
def _parsed(source: str) -> nodes.Template:
    """The syntax tree of a template: parsing is all a check needs, and it is cheap
    (compiling to Python waits for the first evaluation)."""
    return _ENV.parse(source)


@lru_cache(maxsize=4096)
def _parsed_expression(expr: str) -> nodes.Template:
    """The syntax tree of a bare expression, parsed as `compile_expression` parses it."""
    parser = Parser(_ENV, expr, state="variable")
    body = parser.parse_expression()
    if not parser.stream.eos:
        raise jinja2.TemplateSyntaxError("chunk after expression", parser.stream.current.lineno)
    tree = nodes.Template([nodes.Output([body])], lineno=1)
    tree.set_environment(_ENV)
    return tree


def compile_expression(source: str, field: str) -> Expression:
    """Syntax-check a template string now; raise TemplateError naming `field`."""
    expr = _single_expression(source)
    try:
        _parsed(source) if expr is None else _parsed_expression(expr)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(field, f"template syntax error: {exc.message} in {source!r}") from None
    return Expression(source, expr)


def when_expression(source: str | bool, field: str) -> Expression:
    """A `when:` value: a bare expression, optionally wrapped in one `{{ }}` and nothing else."""
    if isinstance(source, bool):
        return Expression(str(source).lower(), "true" if source else "false")
    inner = _single_expression(source)
    if inner is None:
        if "{{" in source or "}}" in source or "{%" in source:
            raise TemplateError(
                field, "`when` holds one bare expression; `{{ }}` may wrap it but no other text"
            )
        inner = source.strip()
    if not inner:
        raise TemplateError(field, "`when` is empty")
    try:
        _parsed_expression(inner)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            field, f"expression syntax error: {exc.message} in {source!r}"
        ) from None
    return Expression(source if isinstance(source, str) else str(source), inner)


def compile_value(value: Any, field: str) -> None:
    """Syntax-check every template string inside a JSON-like value."""
    for sub_field, text in _strings(value, field):
        if is_template(text):
            compile_expression(text, sub_field)


def render_value(value: Any, scope: Mapping[str, Any], field: str) -> Any:
    """Render every template string inside a JSON-like value; other values pass through."""
    if isinstance(value, str):
        if not is_template(value):
            return value
        return compile_expression(value, field).evaluate(scope, field)
    if isinstance(value, Mapping):
        return {k: render_value(v, scope, f"{field}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [render_value(v, scope, f"{field}[{i}]") for i, v in enumerate(value)]
    return value


def _strings(value: Any, field: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield field, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _strings(v, f"{field}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{field}[{i}]")


def _free_names(ast: nodes.Template) -> frozenset[str]:
    """Names read and never assigned (by `for`, `set`, macros) anywhere in the template;
    a walk of the tree, much cheaper than jinja2.meta's code generation."""
    loaded: set[str] = set()
    stored: set[str] = set()
    for node in ast.find_all(nodes.Name):
        assert isinstance(node, nodes.Name)
        (loaded if node.ctx == "load" else stored).add(node.name)
    return frozenset(loaded - stored)


@dataclass(frozen=True)
class References:
    """What a template reads: free names, `steps.<id>` ids and `env.<NAME>` names."""

    names: frozenset[str]
    steps: frozenset[str]
    env: frozenset[str]


def references(text: str) -> References:
    """Static analysis of one template string (assumed to compile)."""
    expr = _single_expression(text)
    if not is_template(text):  # a bare `when` expression
        expr = text
    ast = _parsed(text) if expr is None else _parsed_expression(expr)
    names = _free_names(ast)
    steps: set[str] = set()
    env: set[str] = set()
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        assert isinstance(node, nodes.Getattr | nodes.Getitem)
        base = node.node
        if not isinstance(base, nodes.Name) or base.ctx != "load":
            continue
        key: object
        if isinstance(node, nodes.Getattr):
            key = node.attr
        elif isinstance(node.arg, nodes.Const):
            key = node.arg.value
        else:
            continue
        if base.name == "steps" and isinstance(key, str):
            steps.add(key)
        elif base.name == "env" and isinstance(key, str):
            env.add(key)
    return References(names, frozenset(steps), frozenset(env))
