"""Templates: one sandboxed Jinja2 environment with strict undefined names and native values.

A string that is exactly one `{{ expr }}` evaluates to the expression's own value (dict, list,
number, bool, null): the expression is compiled and evaluated, never re-parsed from rendered
text, so the string "007" stays a string. Any other string renders to a string.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import re
import string
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from types import FrameType
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TemplateError
from .limits import INT_BITS_MAX, TEMPLATE_OUTPUT_MAX, TEMPLATE_SECONDS

__all__ = [
    "Expression",
    "compile_expression",
    "compile_value",
    "is_template",
    "references",
    "render_value",
    "when_expression",
]


class _TooBig(Exception):
    """An operation would build a value beyond the sandbox's bounds."""


class _TooSlow(Exception):
    """Evaluation ran past `TEMPLATE_SECONDS`."""


class _Environment(ImmutableSandboxedEnvironment):
    """Keys of a mapping win over its methods: `payload.items` is the payload's `items`
    field, never `dict.items`.

    Bounded: arithmetic, repetition and concatenation refuse to build an integer beyond
    `INT_BITS_MAX` bits or a text or list beyond `TEMPLATE_OUTPUT_MAX`; padding methods and
    filters refuse widths beyond it; nothing is folded at compile time (`optimized=False`),
    so user arithmetic runs only under these checks and the time budget of `_budget`."""

    intercepted_binops = frozenset({"*", "**", "+", "%", "//", "/"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, Mapping) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        try:
            return super().call_binop(context, operator, left, right)
        except OverflowError:
            raise _TooBig(f"`{operator}` overflows: the result is too large a number") from None

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_time()
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        text = getattr(method, "__self__", None)
        if isinstance(text, str):
            args = _check_str_method(text, getattr(method, "__name__", ""), args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)


_PADDING = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
_WIDTH = re.compile(r"[%:][-+#0 <>=^,_]*(\d{7,})|\.(\d{7,})")


def _check_length(size: int, what: str) -> None:
    if size > TEMPLATE_OUTPUT_MAX:
        raise _TooBig(
            f"`{what}` would make {size:,} items or characters; at most {TEMPLATE_OUTPUT_MAX:,}"
        )


def _check_width(what: str, args: list[Any]) -> None:
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > TEMPLATE_OUTPUT_MAX:
            raise _TooBig(f"`{what}` width {arg:,} is larger than {TEMPLATE_OUTPUT_MAX:,}")


def _check_format_widths(fmt: Any) -> None:
    if isinstance(fmt, str) and _WIDTH.search(fmt):
        raise _TooBig(f"a width in {fmt[:40]!r} is larger than {TEMPLATE_OUTPUT_MAX:,}")


def _check_str_method(text: str, name: str, args: Any, kwargs: Any) -> tuple[Any, ...]:
    """Check a call of a method of `text`; return its arguments (an iterable to join is
    read once into a list)."""
    if name in _PADDING:
        _check_width(name, [*args, *kwargs.values()])
    elif name == "format":
        _check_format_widths(text)
        _check_length(_format_size(text, args, kwargs), "format")
    elif name == "format_map" and args and isinstance(args[0], Mapping):
        _check_length(_format_size(text, (), args[0]), "format_map")
    elif name == "replace" and len(args) >= 2:
        _check_replace(text, str(args[0]), str(args[1]))
    elif name == "join" and len(args) == 1:
        items = list(args[0])
        size = len(text) * max(0, len(items) - 1) + sum(_text_len(i) for i in items)
        _check_length(size, "join")
        return (items,)
    return tuple(args)


def _check_replace(text: str, old: str, new: str) -> None:
    growth = (text.count(old) if old else len(text) + 1) * max(0, len(new) - len(old))
    _check_length(len(text) + growth, "replace")


_DIGITS = re.compile(r"\d+")
_FORMATTER = string.Formatter()


def _spec_size(spec: str) -> int:
    """At most how many characters a format spec's width and precision produce."""
    return sum(int(d) if len(d) < 12 else 10**12 for d in _DIGITS.findall(spec))


def _format_size(fmt: str, args: Any, kwargs: Any) -> int:
    """About how long `fmt.format(*args, **kwargs)` is at most, counting every field's width
    and precision, nested `{}` arguments included, once per field (so repetition counts)."""
    size, auto = len(fmt), 0

    def lookup(field: str) -> Any:
        nonlocal auto
        key = field.split(".", 1)[0].split("[", 1)[0]
        if key == "":
            key, auto = str(auto), auto + 1
        try:
            return args[int(key)] if key.isdigit() else kwargs[key]
        except (IndexError, KeyError, TypeError):
            return ""

    try:
        for _literal, field, spec, _conversion in _FORMATTER.parse(fmt):
            if field is None:
                continue
            value = lookup(field)
            size += _text_len(value)
            if spec and "{" in spec:
                spec = "".join(
                    lit + (str(lookup(f)) if f is not None else "")
                    for lit, f, _s, _c in _FORMATTER.parse(spec)
                )
            if spec:
                size += _spec_size(spec)
    except ValueError:
        return len(fmt)  # malformed: `format` itself says so
    return size


_PERCENT = re.compile(r"%[-+#0 ]*(\d+|\*)?(?:\.(\d+|\*))?")


def _percent_size(fmt: str, args: Any) -> int:
    """About how long `fmt % args` is at most: every field's width and precision (a `*`
    width counts as the largest number among the arguments)."""
    values = args if isinstance(args, tuple | list) else (args,)
    star = max((abs(v) for v in values if _is_int(v)), default=0)
    size = len(fmt) + sum(32 if isinstance(v, Mapping) else _text_len(v) for v in values)
    for match in _PERCENT.finditer(fmt):
        for part in match.groups():
            if part == "*":
                size += star
            elif part:
                size += int(part) if len(part) < 12 else 10**12
    return size


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> Any:
    if not all(_is_int(v) and 0 <= v <= 1000 for v in (n, min, max)):
        raise _TooBig("lipsum takes numbers from 0 to 1000")
    return _ENV_LIPSUM(n, html, min, max)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse, before computing it, a result beyond the sandbox's bounds."""
    if operator == "**" and _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
        if right * math.log2(abs(left)) > INT_BITS_MAX:
            raise _TooBig(f"`{left} ** {right}` is larger than {INT_BITS_MAX} bits")
    elif operator == "*":
        if (
            _is_int(left)
            and _is_int(right)
            and left.bit_length() + right.bit_length() > INT_BITS_MAX
        ):
            raise _TooBig(f"the product is larger than {INT_BITS_MAX} bits")
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, str | list | tuple) and _is_int(times):
                _check_length(len(seq) * times, "*")
    elif (
        operator == "+"
        and isinstance(left, str | list | tuple)
        and isinstance(right, str | list | tuple)
    ):
        _check_length(len(left) + len(right), "+")
    elif operator == "%" and isinstance(left, str):
        _check_format_widths(left)
        _check_length(_percent_size(left, right), "%")


def _bounded_filter(name: str, filter_: Any) -> Any:
    """`filter_` behind the size checks; it keeps Jinja's `pass_environment` /
    `pass_context` / `pass_eval_context` marker, so it still receives what it asks for."""
    passed = 1 if hasattr(filter_, "jinja_pass_arg") else 0
    signature = inspect.signature(filter_)

    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_time()
        _check_width(name, [*args[passed + 1 :], *kwargs.values()])
        try:
            call = signature.bind(*args, **kwargs)
        except TypeError:
            return filter_(*args, **kwargs)  # let the filter say what is wrong
        _check_filter(name, call.arguments)
        return filter_(*call.args, **call.kwargs)

    bounded.__name__ = name
    if passed:
        bounded.jinja_pass_arg = filter_.jinja_pass_arg  # type: ignore[attr-defined]
    return bounded


def _text_len(value: Any) -> int:
    """About how long `str(value)` is, at least up to just past `TEMPLATE_OUTPUT_MAX`: a
    walk that counts shared objects each time they appear and stops early (a list that
    repeats one big list stringifies to gigabytes)."""
    size, stack = 0, [value]
    while stack and size <= TEMPLATE_OUTPUT_MAX:
        item = stack.pop()
        if isinstance(item, str):
            size += len(item) + 2
        elif _is_int(item):
            size += item.bit_length() * 3 // 10 + 2
        elif isinstance(item, Mapping):
            size += 2 + 2 * len(item)
            stack.extend(itertools.islice(itertools.chain(item.keys(), item.values()), 4096))
            if len(item) > 2048:
                size += 4 * len(item)
        elif isinstance(item, list | tuple):
            size += 2 + 2 * len(item)
            stack.extend(item[:4096])
            if len(item) > 4096:
                size += 4 * len(item)
        else:
            size += 8
    return size


def _finalize(value: Any) -> Any:
    """What `{{ value }}` prints in a text template: refused if its text would be too long."""
    if not isinstance(value, str):
        _check_length(_text_len(value), "the printed value")
    return value


def _check_filter(name: str, arguments: dict[str, Any]) -> None:
    """Refuse, from the sizes of its inputs, a filter's result beyond the bounds (the
    arguments may be replaced: an iterable to join is read once into a list)."""
    if name == "format":
        fmt = arguments.get("value")
        if isinstance(fmt, str):
            _check_format_widths(fmt)
            values = (*arguments.get("args", ()), *arguments.get("kwargs", {}).values())
            _check_length(_percent_size(fmt, values), "format")
    elif name == "join":
        items = arguments["value"] = list(arguments["value"])
        sep = str(arguments.get("d", ""))
        size = len(sep) * max(0, len(items) - 1) + sum(_text_len(i) for i in items)
        _check_length(size, "join")
    elif name == "replace":
        text, old, new = (str(arguments.get(k, "")) for k in ("s", "old", "new"))
        _check_replace(text, old, new)
    elif name == "indent":
        text, width = str(arguments.get("s", "")), arguments.get("width", 4)
        pad = len(width) if isinstance(width, str) else width if _is_int(width) else 0
        _check_length(len(text) + (text.count("\n") + 1) * max(0, pad), "indent")
    elif name == "wordwrap" and arguments.get("wrapstring") is not None:
        text, wrap = str(arguments.get("s", "")), str(arguments["wrapstring"])
        _check_length(len(text) + (len(text) + 1) * len(wrap), "wordwrap")
    elif name == "sum" and isinstance(arguments.get("start"), list | tuple):
        items = arguments["iterable"] = list(arguments["iterable"])
        attribute = arguments.get("attribute")
        if attribute is not None:
            getter = jinja2.filters.make_attrgetter(_ENV, attribute)
            items = arguments["iterable"] = [getter(i) for i in items]
            arguments["attribute"] = None
        size = len(arguments["start"]) + sum(len(i) if isinstance(i, Sized) else 1 for i in items)
        _check_length(size, "sum")
        if all(type(i) is type(arguments["start"]) for i in items):  # no quadratic `+`
            arguments["iterable"] = [type(arguments["start"])(itertools.chain.from_iterable(items))]
    elif name in ("string", "tojson"):
        value = next((arguments[k] for k in ("s", "value", "v") if k in arguments), "")
        _check_length(_text_len(value), name)
    elif name == "truncate":
        _check_length(len(str(arguments.get("end", ""))), "truncate")


_ENV = _Environment(
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
    optimized=False,
    finalize=_finalize,
)
_ENV.filters["tojson"] = lambda v: json.dumps(v, sort_keys=True)
for _name in (
    "center",
    "indent",
    "wordwrap",
    "format",
    "truncate",
    "batch",
    "slice",
    "join",
    "replace",
    *("sum", "map", "urlize", "select", "reject", "selectattr", "rejectattr", "groupby"),
    *("sort", "unique", "list", "string", "tojson", "wordcount", "striptags", "title"),
    *("xmlattr", "filesizeformat", "dictsort", "items", "min", "max", "reverse", "first"),
    *("last", "random", "trim", "upper", "lower", "capitalize", "escape", "forceescape"),
):
    _ENV.filters[_name] = _bounded_filter(_name, _ENV.filters[_name])
_ENV_LIPSUM: Any = _ENV.globals["lipsum"]
_ENV.globals["lipsum"] = _lipsum


_deadline = threading.local()


def _check_time() -> None:
    """Raise `_TooSlow` once the evaluation running in this thread is past its deadline."""
    deadline = getattr(_deadline, "at", None)
    if deadline is not None and time.monotonic() > deadline:
        raise _TooSlow()


@contextmanager
def _budget(seconds: float) -> Iterator[None]:
    """Raise `_TooSlow` once the evaluation has run `seconds` of wall-clock time: a trace
    function counts the lines every frame executes while evaluating (the template's own
    code, Jinja's runtime, filters written in Python), and the sandbox's `call` hook and
    the bounded filters check the clock too."""
    deadline = time.monotonic() + seconds
    ticks = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal ticks
        ticks += 1
        if ticks % 256 == 0 and time.monotonic() > deadline:
            raise _TooSlow()
        return local

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        return local(frame, event, arg)

    previous, outer = sys.gettrace(), getattr(_deadline, "at", None)
    _deadline.at = deadline if outer is None else min(outer, deadline)
    sys.settrace(trace)
    try:
        yield
    finally:
        sys.settrace(previous)
        _deadline.at = outer


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
                compiled = _compiled_expression(self.expression)  # compiling is not timed
                with _budget(TEMPLATE_SECONDS):
                    value = compiled(**scope)
                return _plain(value, field)  # bounded in size, so in time, untraced
            template = _compiled_template(self.source)
            with _budget(TEMPLATE_SECONDS):
                return _render(template, scope)
        except TemplateError:
            raise
        except _TooBig as exc:
            raise TemplateError(field, f"{exc} in {self.source!r}") from None
        except _TooSlow:
            raise TemplateError(
                field, f"took longer than {TEMPLATE_SECONDS:g}s to evaluate: {self.source!r}"
            ) from None
        except RecursionError:
            raise TemplateError(field, f"nested too deeply: {_shown(self.source)}") from None
        except MemoryError:
            raise TemplateError(field, f"ran out of memory evaluating {self.source!r}") from None
        except jinja2.UndefinedError as exc:
            raise TemplateError(field, f"{exc.message} in {self.source!r}") from None
        except jinja2.TemplateError as exc:
            raise TemplateError(field, f"{exc} in {self.source!r}") from None
        except Exception as exc:  # a template can raise anything its expression does
            raise TemplateError(field, f"{type(exc).__name__}: {exc} in {self.source!r}") from None


def _render(template: jinja2.Template, scope: Mapping[str, Any]) -> str:
    """The template's text, its size counted as it renders: it stops at the first piece
    that takes it past `TEMPLATE_OUTPUT_MAX` (a loop's output is never built whole)."""
    pieces, size = [], 0
    for piece in template.generate(**scope):
        size += len(piece)
        _check_length(size, "the template")
        pieces.append(piece)
    return "".join(pieces)


def _str_join(seq: Any) -> str:
    """`a ~ b`: refused if the text would be too long (Jinja's `str_join` stringifies
    before anything could check it)."""
    items = tuple(seq)
    _check_length(sum(_text_len(i) for i in items), "~")
    return "".join(map(str, items))


def _bounded_concat(template: jinja2.Template) -> jinja2.Template:
    template.root_render_func.__globals__["str_join"] = _str_join
    return template


@lru_cache(maxsize=4096)
def _compiled_expression(expr: str) -> Any:
    compiled = _ENV.compile_expression(expr, undefined_to_none=False)
    _bounded_concat(compiled._template)
    return compiled


@lru_cache(maxsize=4096)
def _compiled_template(source: str) -> jinja2.Template:
    return _bounded_concat(_ENV.from_string(source))


def _plain(value: Any, field: str) -> Any:
    """Turn an expression's value into plain JSON data; undefined anywhere is an error.

    The result's size (about its JSON length) is bounded by `TEMPLATE_OUTPUT_MAX` in all:
    an object shared many times (`[big] * 1000`) counts each time it appears, and the
    conversion stops as soon as the total passes the bound."""
    return _Plain(field).convert(value)


class _Plain:
    def __init__(self, field: str) -> None:
        self.field = field
        self.size = 0

    def count(self, size: int) -> None:
        self.size += size
        if self.size > TEMPLATE_OUTPUT_MAX:
            raise _TooBig(
                f"the expression's value is larger than {TEMPLATE_OUTPUT_MAX:,} characters"
            )

    def convert(self, value: Any) -> Any:
        if isinstance(value, jinja2.Undefined):
            value._fail_with_undefined_error()
        if isinstance(value, float) and not math.isfinite(value):
            raise TemplateError(
                self.field, f"the expression gives {value}, which is not a JSON number"
            )
        if isinstance(value, str):
            _check_length(len(value), "the expression")
            self.count(len(value) + 2)
            return value
        if value is None or isinstance(value, bool | float):
            self.count(5)
            return value
        if isinstance(value, int):
            self.count(value.bit_length() * 3 // 10 + 2)
            return value
        if isinstance(value, Mapping):
            self.count(2)
            plain = {}
            for k, v in value.items():
                key = str(k)
                self.count(len(key) + 4)
                plain[key] = self.convert(v)
            return plain
        if isinstance(value, list | tuple):
            self.count(2)
            return [self.convert(v) for v in value]
        raise TemplateError(
            self.field, f"the expression gives a {type(value).__name__}, which is not JSON data"
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
        tree = _parsed(source) if expr is None else _parsed_expression(expr)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(field, f"template syntax error: {exc.message} in {source!r}") from None
    except RecursionError:
        raise TemplateError(field, f"nested too deeply: {_shown(source)}") from None
    _check_depth(tree, field, source)
    return Expression(source, expr)


TEMPLATE_DEPTH_MAX = 100


def _check_depth(tree: nodes.Node, field: str, source: str) -> None:
    """Refuse a syntax tree deeper than `TEMPLATE_DEPTH_MAX` (walked without recursion):
    compiling or analysing it would exhaust Python's stack."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > TEMPLATE_DEPTH_MAX:
            raise TemplateError(
                field, f"nested more than {TEMPLATE_DEPTH_MAX} levels deep: {_shown(source)}"
            )
        stack.extend((child, depth + 1) for child in node.iter_child_nodes())


def _shown(source: str) -> str:
    return repr(source) if len(source) <= 80 else repr(source[:77] + "...")


def when_expression(source: str | bool, field: str) -> Expression:
    """A `when:` (or `until:`) value: a bare expression, optionally wrapped in one `{{ }}` and
    nothing else."""
    if isinstance(source, bool):
        return Expression(str(source).lower(), "true" if source else "false")
    key = "until" if field.endswith("until") else "when"  # a repeat's `until` is one too
    inner = _single_expression(source)
    if inner is None:
        if "{{" in source or "}}" in source or "{%" in source:
            raise TemplateError(
                field,
                f"`{key}` holds one bare expression; `{{{{ }}}}` may wrap it but no other text",
            )
        inner = source.strip()
    if not inner:
        raise TemplateError(field, f"`{key}` is empty")
    try:
        tree = _parsed_expression(inner)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            field, f"expression syntax error: {exc.message} in {source!r}"
        ) from None
    except RecursionError:
        raise TemplateError(field, f"nested too deeply: {_shown(source)}") from None
    _check_depth(tree, field, inner)
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
