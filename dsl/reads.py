"""What a workflow reads from one step's output, found in its templates: the fields a human
answer (an event payload, a token's data) must carry for the run to go on.

`steps.review.output.approved` in a `when` means the answer needs `approved`; the example
answer puts a placeholder there whose type fits how the field is used (true where it is
tested, the compared constant where it is compared, "..." otherwise). Pure: no engine, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from jinja2 import TemplateSyntaxError, nodes

from .model import Machine
from .templates import _parsed, _parsed_expression, _single_expression, is_template

__all__ = ["PLACEHOLDER", "example_answer", "output_reads"]

PLACEHOLDER = "..."
_Path = tuple[str, ...]


def output_reads(machine: Machine, step_id: str, under: _Path = ()) -> dict[str, Any]:
    """A nested example value with every field the workflow reads below
    `steps.<step_id>.output` (then below `under`, e.g. `("data",)` for a wait_for_any),
    each a placeholder. `{}` when nothing reads a field of it."""
    found: dict[_Path, Any] = {}
    for text, bare in _machine_strings(machine):
        for path, value in _reads_in(text, bare, step_id):
            if path[: len(under)] != under or len(path) == len(under):
                continue
            rest = path[len(under) :]
            if rest not in found or found[rest] == PLACEHOLDER:
                found[rest] = value
    return _nest(found)


def example_answer(
    machine: Machine, step_id: str, given: Mapping[str, Any], under: _Path = ()
) -> dict[str, Any]:
    """`given` (e.g. a wait's match values, which must be sent as they are) over the fields
    the workflow reads from the step's output (below `under`: see `output_reads`)."""
    answer = output_reads(machine, step_id, under)
    answer.update(given)
    return answer


def _machine_strings(machine: Machine) -> Iterator[tuple[str, bool]]:
    """Every template string of the machine, with whether it is a bare expression (`when`)."""
    for state in machine.states:
        if state.when:
            yield state.when, True
        yield from ((s, False) for s in _strings(state.config))
    yield from ((s, False) for s in _strings(machine.output))
    if machine.concurrency_key:
        yield machine.concurrency_key, False


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def _parse(text: str, bare: bool) -> nodes.Template | None:
    try:
        if bare and not is_template(text):
            return _parsed_expression(text)
        if not is_template(text):
            return None
        expr = _single_expression(text)
        return _parsed(text) if expr is None else _parsed_expression(expr)
    except (TemplateSyntaxError, ValueError, TypeError):  # validate reports it, not this
        return None


def _reads_in(text: str, bare: bool, step_id: str) -> Iterator[tuple[_Path, Any]]:
    tree = _parse(text, bare)
    if tree is None:
        return
    for node, parents in _walk(tree, ()):
        parent = parents[-1] if parents else None
        if not isinstance(node, nodes.Getattr | nodes.Getitem):
            continue
        if isinstance(parent, nodes.Getattr | nodes.Getitem) and parent.node is node:
            continue  # not the whole chain
        chain = _chain(node)
        if chain is None or len(chain) < 3 or chain[:3] != ("steps", step_id, "output"):
            continue
        tested = bare and isinstance(parent, nodes.Output | nodes.Template | None)
        if isinstance(parent, nodes.Operand):  # `x == 1` puts `1` in an Operand of a Compare
            node, parent = parent, parents[-2]
        yield chain[3:], _placeholder(node, parent, tested)


def _walk(
    node: nodes.Node, parents: tuple[nodes.Node, ...]
) -> Iterator[tuple[nodes.Node, tuple[nodes.Node, ...]]]:
    yield node, parents
    for child in node.iter_child_nodes():
        yield from _walk(child, (*parents, node))


def _chain(node: nodes.Node) -> _Path | None:
    """`steps.a.output["b"].c` as ("steps", "a", "output", "b", "c"); None for anything else."""
    keys: list[str] = []
    while isinstance(node, nodes.Getattr | nodes.Getitem):
        if isinstance(node, nodes.Getattr):
            keys.append(node.attr)
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            keys.append(node.arg.value)
        else:
            return None
        node = node.node
    if not isinstance(node, nodes.Name) or node.ctx != "load":
        return None
    return (node.name, *reversed(keys))


def _placeholder(node: nodes.Node, parent: nodes.Node | None, tested: bool) -> Any:
    if tested or isinstance(parent, nodes.Not | nodes.And | nodes.Or):
        return True
    if isinstance(parent, nodes.CondExpr | nodes.If) and parent.test is node:
        return True
    if isinstance(parent, nodes.Compare):
        others = [parent.expr, *(op.expr for op in parent.ops)]
        for other in others:
            if isinstance(other, nodes.Const):
                value = other.value
                return (
                    0 if isinstance(value, int | float) and not isinstance(value, bool) else value
                )
    if isinstance(parent, nodes.For) and parent.iter is node:
        return []
    return PLACEHOLDER


def _nest(found: Mapping[_Path, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in sorted(found, key=len):  # parents first: a deeper read turns a leaf into a dict
        target = out
        for key in path[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        if not isinstance(target.get(path[-1]), dict):
            target[path[-1]] = found[path]
    return out
