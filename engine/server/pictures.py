"""Pictures for the dashboard, drawn as SVG on the server: a run's step timeline and a
workflow's state machine."""

from __future__ import annotations

import math
import time
from datetime import datetime
from html import escape
from typing import Any

from dsl import COMPLETED, FAILED, WAIT_KINDS, Machine, State
from dsl.blocks import ancestors, branch_lists, descendants, list_label

__all__ = ["machine_svg", "timeline_svg"]

COLORS = {
    "completed": "#2e9d57",
    "failed": "#d64545",
    "crashed": "#e08a1e",
    "timed_out": "#c2571a",
    "skipped": "#9aa4af",
    "wait": "#4a7fd1",
    "backoff": "#c9ced6",
    "running": "#7d5fd3",
}


def _ts(value: str | None) -> float | None:
    return None if value is None else datetime.fromisoformat(value).timestamp()


# the machine's boxes: sized to their labels, waits and retries drawn --------------------
CHAR_W = 7.2  # a generous average width of a 12 px sans-serif character
BOX_MIN, BOX_MAX = 250, 520


def _duration(seconds: float) -> str:
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m"), (1, "s")):
        if seconds >= size:
            amount = seconds / size
            return f"{amount:g}{unit}" if amount == int(amount) else f"{amount:.1f}{unit}"
    return f"{seconds:g}s"


def _box_label(state: State) -> str:
    """What a box says: the step, its kind and detail, a wait's length and a timeout."""
    label = f"{state.id}: {state.label}"
    if state.kind == "wait" and state.config.get("seconds") is not None:
        label += f" {_duration(float(state.config['seconds']))}"
    if state.timeout:
        label += f" · timeout {_duration(state.timeout)}"
    return label


def _box_width(labels: list[str]) -> int:
    """Wide enough for the longest label (and a wait's clock), within BOX_MIN..BOX_MAX."""
    longest = max((len(label) for label in labels), default=0)
    return min(BOX_MAX, max(BOX_MIN, math.ceil(longest * CHAR_W) + 46))


def _fit(label: str, width: float) -> str:
    room = math.floor((width - 44) / CHAR_W)
    return label if len(label) <= room else label[: max(room - 1, 1)] + "…"


def _state_box(state: State, x: float, y: float, w: float, h: float, fill: str) -> str:
    """A step's box: its label (cut to fit, whole in the tooltip); a wait dashed blue with a
    clock; a retried step with a loop back to itself and its attempts (x N)."""
    label = _box_label(state)
    waits = state.kind in WAIT_KINDS
    stroke = ' stroke="#4a7fd1" stroke-dasharray="5,3"' if waits else ' stroke="#7a8ca5"'
    kind = "state wait" if waits else "state"
    out = [
        f'<g class="{kind}" data-step="{escape(state.id)}"><title>{escape(label)}</title>'
        f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="6" fill="{fill}"{stroke}/>'
        f'<text class="label" x="{x + 10}" y="{y + 21}" font-size="12">'
        f"{escape(_fit(label, w))}</text>"
    ]
    if waits:
        cx, cy = x + w - 16, y + h / 2
        out.append(
            f'<circle class="clock" cx="{cx}" cy="{cy}" r="7" fill="#fff" stroke="#4a7fd1"/>'
            f'<path d="M{cx},{cy - 4} L{cx},{cy} L{cx + 3},{cy + 2}" stroke="#4a7fd1" '
            'fill="none"/>'
        )
    retry = state.retry
    if retry is not None and retry.max_attempts > 1:
        # a loop over the box's top edge, right of the arrow coming in at its middle
        x1, x2, top = x + w - 18, x + w - 46, y - 15
        out.append(
            f'<path class="retry-loop" d="M{x1},{y} C{x1},{top} {x2},{top} {x2},{y - 2}" '
            'fill="none" stroke="#e08a1e" marker-end="url(#arrow)">'
            f"<title>retried: up to {retry.max_attempts} attempts</title></path>"
            f'<text class="retry-count" x="{x1 + 4}" y="{y - 5}" font-size="11" '
            f'fill="#b26a00">&#215;{retry.max_attempts}</text>'
        )
    out.append("</g>")
    return "".join(out)


def _segments(step: dict[str, Any], now: float) -> list[tuple[float, float, str, str]]:
    """(start, end, kind, tooltip) of each attempt, back-off and wait of one step."""
    out: list[tuple[float, float, str, str]] = []
    previous_end = None
    for a in step["attempt_history"]:
        start, end = _ts(a["started_at"]), _ts(a["finished_at"]) or now
        if start is None:
            continue
        if previous_end is not None and start > previous_end:
            out.append((previous_end, start, "backoff", f"back-off {start - previous_end:.1f}s"))
        tip = f"attempt {a['attempt']}: {a['status']} in {end - start:.2f}s"
        if a.get("error"):
            tip += f" - {a['error']}"
        out.append((start, end, a["status"], tip))
        previous_end = end
    started, finished = _ts(step["started_at"]), _ts(step["finished_at"])
    waited = step["kind"] in WAIT_KINDS
    if waited and started is not None:
        end = finished or now
        out.append((started, end, "wait", f"{step['kind']}: waited {end - started:.1f}s"))
    elif step["status"] == "running" and not out:
        out.append((started or now, now, "running", "running"))
    return out


def timeline_svg(detail: dict[str, Any], width: int = 900) -> str:
    """One row per step that ran: attempts (by outcome), back-offs and waits, to scale."""
    now = time.time()
    rows = [(s, _segments(s, now)) for s in detail["steps"] if s["status"] != "pending"]
    start = _ts(detail["created_at"]) or now
    end = max(
        [start + 0.001]
        + [e for _, segs in rows for _, e, _, _ in segs]
        + [_ts(detail["finished_at"]) or start]
    )
    label_w, row_h = 170, 26
    scale = (width - label_w - 20) / (end - start)
    height = row_h * len(rows) + 30
    parts = [
        f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" role="img" aria-label="step timeline">'
    ]
    for i, (step, segments) in enumerate(rows):
        y = 10 + i * row_h
        parts.append(f'<text x="4" y="{y + 15}" font-size="12">{escape(step["id"])}</text>')
        for s, e, kind, tip in segments:
            x = label_w + (s - start) * scale
            w = max(2.0, (e - s) * scale)
            dash = ' stroke-dasharray="3,2" stroke="#8a939e"' if kind == "backoff" else ""
            parts.append(
                f'<rect class="seg seg-{kind}" x="{x:.1f}" y="{y + 3}" width="{w:.1f}" '
                f'height="16" rx="3" fill="{COLORS.get(kind, "#888")}"{dash}>'
                f"<title>{escape(tip)}</title></rect>"
            )
    total = end - start
    parts.append(f'<text x="{label_w}" y="{height - 4}" font-size="11" fill="#666">0s</text>')
    parts.append(
        f'<text x="{width - 60}" y="{height - 4}" font-size="11" fill="#666">'
        f"{total:.1f}s</text></svg>"
    )
    return "".join(parts)


INDENT = 26  # a nested list's boxes stand this far right of their block's


def machine_svg(machine: Machine) -> str:
    """Main states top to bottom; failure handlers in a column beside them. A nested list
    (a switch case, a catch, a repeat's round, a parallel branch) is indented under its
    block in a dashed frame naming it; the block's arrows to its lists and back run along
    the left and right margins."""
    main, handlers = machine.main_states(), [s for s in machine.states if s.handler]
    box_w, box_h, gap = _box_width([_box_label(s) for s in machine.states]), 34, 22
    depth = {s.id: len(ancestors(machine, s.id)) for s in machine.states}
    deepest = max(depth.values(), default=0)
    col2 = box_w + 80 + deepest * INDENT
    rows = max(len(main), len(handlers)) + 1
    height = rows * (box_h + gap) + 40
    width = col2 + box_w + 20 + deepest * INDENT
    parts = [
        f'<svg class="machine" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height + 12}" viewBox="0 -12 {width} {height + 12}"><defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="7" '
        'refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker></defs>'
    ]
    pos: dict[str, tuple[float, float]] = {}
    for col, states in ((10, main), (col2, handlers)):
        for i, s in enumerate(states):
            pos[s.id] = (float(col + depth[s.id] * INDENT), float(10 + i * (box_h + gap)))
    parts += _list_frames(machine, pos, box_w, box_h)
    for s in machine.states:
        x, y = pos[s.id]
        fill = "#fff4e5" if s.handler else "#eef3fb"
        parts.append(_state_box(s, x, y, box_w, box_h, fill))
    end_y = 10 + len(main) * (box_h + gap)
    pos[COMPLETED] = (10, end_y)
    pos[FAILED] = (col2, 10 + len(handlers) * (box_h + gap))
    for node, color in ((COMPLETED, "#2e9d57"), (FAILED, "#d64545")):
        x, y = pos[node]
        parts.append(
            f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="17" fill="none" '
            f'stroke="{color}" stroke-width="2"/><text x="{x + 10}" y="{y + 21}" '
            f'font-size="12" fill="{color}">{node.lstrip("$")}</text>'
        )
    right = 10 + deepest * INDENT + box_w  # the margin right of the main column
    for s in machine.states:
        x, y = pos[s.id]
        targets = [(s.next, "#555")]
        if s.on_error != s.next:
            targets.append((s.on_error, "#d64545"))
        targets += [(first, "#555") for b, first in branch_lists(machine, s.id) if b != "catch"]
        if s.catch is not None:
            targets.append((s.catch, "#e08a1e"))
        for target, color in targets:
            parts.append(_arrow((x, y), pos[target], box_w, box_h, color, right, col2))
    parts.append("</svg>")
    return "".join(parts)


def _list_frames(
    machine: Machine, pos: dict[str, tuple[float, float]], box_w: float, box_h: float
) -> list[str]:
    """A dashed frame around each nested list, named as `graph` names it."""
    out = []
    for block in machine.states:
        for branch, _ in branch_lists(machine, block.id):
            inside = [pos[s.id] for s in descendants(machine, block.id, branch)]
            x = min(p[0] for p in inside) - 6
            top, bottom = min(p[1] for p in inside) - 4, max(p[1] for p in inside) + box_h + 4
            right = max(p[0] for p in inside) + box_w + 6
            label = list_label(machine, block, branch)
            out.append(
                f'<g class="list" data-block="{escape(block.id)}" data-branch="{escape(branch)}">'
                f'<rect x="{x}" y="{top}" width="{right - x}" height="{bottom - top}" rx="8" '
                'fill="none" stroke="#9aa4af" stroke-dasharray="4,3"/>'
                f'<text x="{right - 6}" y="{top + 12}" font-size="10" fill="#66707a" '
                f'text-anchor="end">{escape(_fit(label, right - x))}</text></g>'
            )
    return out


def _arrow(
    src: tuple[float, float],
    dst: tuple[float, float],
    box_w: float,
    box_h: float,
    color: str,
    right: float,
    col2: float,
) -> str:
    (x, y), (tx, ty) = src, dst
    line = f'stroke="{color}" marker-end="url(#arrow)"'
    if tx >= col2 > x:  # across to the handler column
        x1, y1, x2, y2 = x + box_w, y + box_h / 2, tx, ty + box_h / 2
        return f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" {line}/>'
    if 0 < ty - y <= box_h + 22 + 1:  # the next row: straight down
        x1, y1, x2, y2 = x + box_w / 2, y + box_h, tx + box_w / 2, ty
        return f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" {line}/>'
    if ty > y:  # further down (into a later list): along the left margin
        lx = min(x, tx) - 12
        d = f"M{x},{y + box_h / 2} H{lx} V{ty + box_h / 2} H{tx}"
    else:  # back up (a list ends at its block, a round starts again): along the right
        rx = right + 14
        d = f"M{x + box_w},{y + box_h / 2 + 4} H{rx} V{ty + box_h / 2 - 4} H{tx + box_w}"
    return f'<path d="{d}" fill="none" {line}/>'
