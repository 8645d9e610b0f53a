"""Drawing a compiled machine as Mermaid or Graphviz dot."""

from __future__ import annotations

from .blocks import branch_lists, failure_route, list_label
from .model import COMPLETED, FAILED, WAIT_KINDS, Machine, State

__all__ = ["render_graph"]


def _edges(machine: Machine) -> list[tuple[str, str, str]]:
    edges = [("[*]", machine.start, "")]
    for s in machine.states:
        lists = branch_lists(machine, s.id)
        for branch, first in lists:  # a block opens its lists (a catch: see below)
            if branch != "catch":
                edges.append((s.id, first, list_label(machine, s, branch)))
        lists = [(b, f) for b, f in lists if b != "catch"]
        if lists and s.kind == "repeat":
            if s.config.get("delay"):
                edges.append((s.id, s.id, "delay"))
            edges.append((s.id, s.next, "until holds" if s.config.get("until") else "max rounds"))
        elif lists and s.kind == "switch":
            edges.append((s.id, s.next, "case done"))
        elif lists and s.kind == "parallel":  # its branches run at once, as child runs
            edges.append((s.id, s.next, "all branches done"))
        else:
            edges.append((s.id, s.next, "skip / ok" if s.when else "ok"))
        if s.retry and s.retry.max_attempts > 1:
            edges.append((s.id, s.id, f"retry x{s.retry.max_attempts - 1}"))
        if s.kind in WAIT_KINDS:
            edges.append((s.id, s.id, "wait"))
        can_fail = s.retry is not None  # the compiler gives a retry policy to what can fail
        can_fail = can_fail or (s.kind == "repeat" and s.config.get("until") is not None)
        can_fail = can_fail or s.kind == "parallel"  # a failing branch fails it
        if not (can_fail or s.handler):
            continue
        target, _, caught = failure_route(machine, s, (), any_error=True)
        if caught:
            edges.append((s.id, target, "failed: caught"))
        if (not caught or _filtered(machine, target)) and s.on_error != s.next:
            edges.append((s.id, s.on_error, "failed"))
    return edges


def _filtered(machine: Machine, catch_first: str) -> bool:
    """The catch starting at `catch_first` takes only some errors (`on:`)."""
    return any(s.catch == catch_first and s.catch_on for s in machine.states)


def _name(node: str) -> str:
    return {COMPLETED: "completed", FAILED: "failed"}.get(node, node)


def _describe(s: State) -> str:
    return f"{s.id}: {s.label}"


def _dot(text: str) -> str:
    """A dot string literal: quotes, backslashes and line breaks escaped, so no label or
    name can close its string and add nodes."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\r", "").replace("\n", "\\n") + '"'


def _mermaid(text: str) -> str:
    """Mermaid text on one line, without the characters that end a label or a statement."""
    return " ".join(text.split()).replace(";", ",").replace("%%", "%")


def _mermaid_quoted(text: str) -> str:
    """Mermaid text for inside `"..."` (a composite state's name): no `"` to close it."""
    return '"' + _mermaid(text).replace('"', "'") + '"'


def render_graph(machine: Machine, fmt: str = "mermaid") -> str:
    """The machine as text: `mermaid` (stateDiagram-v2) or `dot`."""
    edges = _edges(machine)
    if fmt == "dot":
        lines = [f"digraph {_dot(machine.workflow_id)} {{", "  rankdir=TB;"]
        lines.append('  "[*]" [shape=point];')
        lines += _dot_nodes(machine, None, None, "  ")
        lines.append('  "completed" [shape=doublecircle];')
        lines.append('  "failed" [shape=doublecircle, color=red];')
        for a, b, label in edges:
            lines.append(
                f"  {_dot(_name(a))} -> {_dot(_name(b))}"
                + (f" [label={_dot(label)}];" if label else ";")
            )
        lines.append("}")
        return "\n".join(lines) + "\n"
    if fmt != "mermaid":
        raise ValueError(f"unknown graph format {fmt!r}; use mermaid or dot")
    lines = ["stateDiagram-v2"]
    lines += _mermaid_nodes(machine, None, None, "  ")
    for a, b, label in edges:
        end = "[*]" if b in (COMPLETED,) else _name(b)
        # a label may be a user's expression (a case's `when`): on one line, or a line
        # break in it would start statements of its own
        lines.append(f"  {_name(a)} --> {end}" + (f" : {_mermaid(label)}" if label else ""))
    lines.append("  failed --> [*]")
    return "\n".join(lines) + "\n"


def _in_list(machine: Machine, parent: str | None, branch: str | None) -> list[State]:
    return [s for s in machine.states if s.parent == parent and s.branch == branch]


def _dot_nodes(machine: Machine, parent: str | None, branch: str | None, pad: str) -> list[str]:
    """The states of one list as boxes; each nested list a dashed cluster inside."""
    lines = []
    for s in _in_list(machine, parent, branch):
        style = ", style=dashed" if s.handler else ""
        lines.append(f"{pad}{_dot(s.id)} [shape=box, label={_dot(_describe(s))}{style}];")
        for inner, _ in branch_lists(machine, s.id):
            name = _dot(f"cluster_{s.id}__{inner}")
            lines.append(f"{pad}subgraph {name} {{")
            lines.append(f"{pad}  label={_dot(list_label(machine, s, inner))}; style=dashed;")
            lines += _dot_nodes(machine, s.id, inner, pad + "  ")
            lines.append(f"{pad}}}")
    return lines


def _mermaid_nodes(machine: Machine, parent: str | None, branch: str | None, pad: str) -> list[str]:
    """The states of one list; each nested list a composite state `<block>__<branch>`."""
    lines = []
    for s in _in_list(machine, parent, branch):
        lines.append(f"{pad}{s.id} : {_mermaid(_describe(s))}")
        for inner, _ in branch_lists(machine, s.id):
            box = f"{s.id}__{_mermaid_id(inner)}"
            lines.append(f"{pad}state {_mermaid_quoted(list_label(machine, s, inner))} as {box}")
            lines.append(f"{pad}state {box} {{")
            lines += _mermaid_nodes(machine, s.id, inner, pad + "  ")
            lines.append(f"{pad}}}")
    return lines


def _mermaid_id(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in text)
