"""Drawing a compiled machine as Mermaid or Graphviz dot."""

from __future__ import annotations

from .model import COMPLETED, FAILED, WAIT_KINDS, Machine, State

__all__ = ["render_graph"]


def _edges(machine: Machine) -> list[tuple[str, str, str]]:
    edges = [("[*]", machine.start, "")]
    for s in machine.states:
        edges.append((s.id, s.next, "skip / ok" if s.when else "ok"))
        if s.retry and s.retry.max_attempts > 1:
            edges.append((s.id, s.id, f"retry x{s.retry.max_attempts - 1}"))
        if s.kind in WAIT_KINDS:
            edges.append((s.id, s.id, "wait"))
        can_fail = s.retry is not None  # the compiler gives a retry policy to what can fail
        if (can_fail or s.handler) and s.on_error != s.next:
            edges.append((s.id, s.on_error, "failed"))
    return edges


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


def render_graph(machine: Machine, fmt: str = "mermaid") -> str:
    """The machine as text: `mermaid` (stateDiagram-v2) or `dot`."""
    edges = _edges(machine)
    if fmt == "dot":
        lines = [f"digraph {_dot(machine.workflow_id)} {{", "  rankdir=TB;"]
        lines.append('  "[*]" [shape=point];')
        for s in machine.states:
            style = ", style=dashed" if s.handler else ""
            lines.append(f"  {_dot(s.id)} [shape=box, label={_dot(_describe(s))}{style}];")
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
    for s in machine.states:
        lines.append(f"  {s.id} : {_mermaid(_describe(s))}")
    for a, b, label in edges:
        end = "[*]" if b in (COMPLETED,) else _name(b)
        lines.append(f"  {_name(a)} --> {end}" + (f" : {label}" if label else ""))
    lines.append("  failed --> [*]")
    return "\n".join(lines) + "\n"
