"""Nested step lists: compiling them into the one flat machine, and reading its structure.

A workflow compiles to one `Machine` whose `states` hold every step of the file in document
order, nested ones included. A nested state names the block step directly enclosing it
(`parent`) and the list of that block it is in (`branch`: a switch case "0", "1"... or
"default"; "catch"; "body" for repeat; a parallel branch's name). Control flow stays
explicit transitions: a list's last state's `next` is the `continue_to` its block chose
(the block itself, to end a case or a round; the owner's `next` for a catch handler).

While one list is compiled, the `next` and `on_error` of its steps are not known yet; a
nested list refers to them as `next_of(owner)` / `error_of(owner)`, and the list
enclosing the owner puts the real targets in when it links its steps.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .durations import DurationError, parse_duration
from .errors import TemplateError
from .loader import Path, field_name
from .model import Machine, State
from .templates import when_expression

if TYPE_CHECKING:
    from .compiler import _Checker

__all__ = [
    "NESTED_LISTS",
    "ancestors",
    "branch_lists",
    "branch_states",
    "compile_steps",
    "descendants",
    "error_of",
    "failure_route",
    "list_label",
    "nested_ids",
    "nested_lists",
    "next_of",
]

# kind key -> the nested lists of a raw step of that kind: (path below the step, branch, list)
NestedLists = Callable[[dict[str, Any]], list[tuple[Path, str, Any]]]


def _switch_lists(raw: dict[str, Any]) -> list[tuple[Path, str, Any]]:
    out: list[tuple[Path, str, Any]] = []
    cases = raw.get("switch")
    for i, case in enumerate(cases if isinstance(cases, list) else []):
        if not isinstance(case, dict):
            continue
        if "default" in case:
            out.append((("switch", i, "default"), "default", case["default"]))
        elif "steps" in case:
            out.append((("switch", i, "steps"), str(i), case["steps"]))
    return out


def _repeat_lists(raw: dict[str, Any]) -> list[tuple[Path, str, Any]]:
    spec = raw.get("repeat")
    if not isinstance(spec, dict) or "steps" not in spec:
        return []
    return [(("repeat", "steps"), "body", spec["steps"])]


def _catch_lists(raw: dict[str, Any]) -> list[tuple[Path, str, Any]]:
    spec = raw.get("catch")
    if not isinstance(spec, dict) or "steps" not in spec:
        return []
    return [(("catch", "steps"), "catch", spec["steps"])]


# Other modules add their kinds here (dsl/fanout.py: parallel).
NestedCompiler = Callable[
    ["_Checker", Path, dict[str, Any], State, Collection[str], bool], tuple[State, list[State]]
]
NESTED_COMPILERS: dict[str, NestedCompiler] = {}
NESTED_LISTS: dict[str, NestedLists] = {
    "switch": _switch_lists,
    "repeat": _repeat_lists,
    "catch": _catch_lists,
}


def nested_lists(raw: dict[str, Any]) -> list[tuple[Path, str, Any]]:
    """Every step list directly inside the raw step `raw` (its kind's lists, then `catch`)."""
    out: list[tuple[Path, str, Any]] = []
    for key, lists in NESTED_LISTS.items():
        if key in raw:
            out.extend(lists(raw))
    return out


def _raw_steps(value: Any) -> Iterator[dict[str, Any]]:
    for raw in value if isinstance(value, list) else []:
        if isinstance(raw, dict):
            yield raw
            for _, _, inner in nested_lists(raw):
                yield from _raw_steps(inner)


def nested_ids(raw: dict[str, Any]) -> list[str]:
    """The ids of every step nested inside the raw step `raw`, at any depth, in order."""
    return [
        s["id"]
        for _, _, inner in nested_lists(raw)
        for s in _raw_steps(inner)
        if isinstance(s.get("id"), str)
    ]


def all_raw_steps(value: Any) -> Iterator[dict[str, Any]]:
    """Every raw step of a list and of the lists nested in it, in document order."""
    return _raw_steps(value)


def next_of(owner: str) -> str:
    """Stands for the owner's `next` until the list holding the owner is linked."""
    return f"$next:{owner}"


def error_of(owner: str) -> str:
    """Stands for the owner's `on_error` until the list holding the owner is linked."""
    return f"$error:{owner}"


def compile_steps(
    c: _Checker,
    raw_steps: Any,
    where: Path,
    *,
    parent: str | None,
    branch: str | None,
    continue_to: str,
    on_error: str | None,
    earlier: Collection[str],
    handler: bool,
) -> list[State]:
    """Compile a list of raw steps (and everything nested in them) into linked states.

    Each step goes on to the next; the last one to `continue_to`. A step that has failed
    for good goes to `on_error` (None: to its `next`, as on_failure handlers do). Nested
    states follow their block's state. Step ids are checked unique across the whole file
    (`c.seen`); a step's templates may read the steps in `earlier` and the ones before it in
    this list, with everything nested in them.
    """
    groups: list[list[State]] = []
    visible = set(earlier)
    for i, raw in enumerate(raw_steps if isinstance(raw_steps, list) else []):
        at: Path = (*where, i)
        if not isinstance(raw, dict):
            continue
        step_id = raw.get("id")
        if isinstance(step_id, str):
            if step_id in c.seen:
                first = c.positions.of_value((*c.seen[step_id], "id"))[0]
                c.problem(
                    (*at, "id"), f"duplicate step id `{step_id}` (first used on line {first})"
                )
            else:
                c.seen[step_id] = at
        group = c.compile_step(at, raw, visible, handler)
        if group:
            groups.append([replace(group[0], parent=parent, branch=branch), *group[1:]])
        if isinstance(step_id, str):
            visible.add(step_id)
        visible.update(nested_ids(raw))
    out: list[State] = []
    for i, group in enumerate(groups):
        own = group[0]
        nxt = groups[i + 1][0].id if i + 1 < len(groups) else continue_to
        err = on_error if on_error is not None else nxt
        targets = {next_of(own.id): nxt, error_of(own.id): err}
        out.append(replace(own, next=nxt, on_error=err))
        out.extend(
            replace(
                s, next=targets.get(s.next, s.next), on_error=targets.get(s.on_error, s.on_error)
            )
            for s in group[1:]
        )
    return out


# reading the structure of a compiled machine ----------------------------------------------


def branch_states(machine: Machine, block: str, branch: str) -> list[State]:
    """The states directly in list `branch` of `block`, in order."""
    return [s for s in machine.states if s.parent == block and s.branch == branch]


def descendants(machine: Machine, block: str, branch: str | None = None) -> list[State]:
    """Every state nested (at any depth) in `block`, or in its list `branch` only."""
    inside = {block}
    out: list[State] = []
    for s in machine.states:  # document order: a parent comes before what it holds
        if s.parent in inside and (s.parent != block or branch is None or s.branch == branch):
            inside.add(s.id)
            out.append(s)
    return out


def branch_lists(machine: Machine, block: str) -> list[tuple[str, str]]:
    """(branch, its first state's id) of each list directly in `block`, in document order."""
    out: dict[str, str] = {}
    for s in machine.states:
        if s.parent == block and s.branch is not None and s.branch not in out:
            out[s.branch] = s.id
    return list(out.items())


def list_label(machine: Machine, block: State, branch: str) -> str:
    """How `graph` and the dashboard name a list: `when <expr>`, `default`, `round`,
    `caught`, or a parallel branch's name."""
    if branch == "catch":
        return "caught" + (f" ({', '.join(block.catch_on)})" if block.catch_on else "")
    if block.kind == "switch":
        for case in block.config.get("cases", []):
            if case["branch"] == branch:
                return "default" if case["when"] is None else f"when {case['when']}"
    if block.kind == "repeat":
        return "round"
    return branch


def ancestors(machine: Machine, state_id: str) -> list[tuple[str, str]]:
    """(block id, branch) from the state's own parent outwards."""
    out: list[tuple[str, str]] = []
    s = machine.state(state_id)
    while s.parent is not None:
        out.append((s.parent, s.branch or ""))
        s = machine.state(s.parent)
    return out


# the blocks of this module ------------------------------------------------------------------


def compile_nested(
    c: _Checker,
    where: Path,
    raw: dict[str, Any],
    own: State,
    earlier: Collection[str],
    handler: bool,
) -> list[State]:
    """The raw step's own state (completed with what its blocks add), then its nested states."""
    nested: list[State] = []
    if own.kind in NESTED_COMPILERS:  # another module's block kind (dsl/fanout.py: parallel)
        own, inside = NESTED_COMPILERS[own.kind](c, where, raw, own, earlier, handler)
        nested.extend(inside)
    elif own.kind == "switch":
        own, cases = _compile_switch(c, where, raw.get("switch"), own, earlier, handler)
        nested.extend(cases)
    elif own.kind == "repeat":
        own, body = _compile_repeat(c, where, raw.get("repeat"), own, earlier, handler)
        nested.extend(body)
    if isinstance(raw.get("catch"), dict):
        # a handler runs after a step inside the block failed: it may read any of them
        inner_ids = [
            s["id"]
            for key, lists in NESTED_LISTS.items()
            if key != "catch" and key in raw
            for _, _, steps in lists(raw)
            for s in _raw_steps(steps)
            if isinstance(s.get("id"), str)
        ]
        own, handlers = _compile_catch(c, where, raw["catch"], own, [*earlier, *inner_ids], handler)
        nested.extend(handlers)
    return [own, *nested]


def _compile_catch(
    c: _Checker,
    where: Path,
    spec: dict[str, Any],
    own: State,
    earlier: Collection[str],
    handler: bool,
) -> tuple[State, list[State]]:
    """`catch:` — once `own` has failed for good with an error it takes, its steps run, then
    the run goes on after `own`. A handler step that fails fails like `own` would have.
    `earlier` holds what its steps may read: with `own`, every step inside `own`'s block."""
    steps = compile_steps(
        c,
        spec.get("steps"),
        (*where, "catch", "steps"),
        parent=own.id,
        branch="catch",
        continue_to=next_of(own.id),
        on_error=error_of(own.id),
        earlier=[*earlier, own.id],
        handler=handler,
    )
    on = spec.get("on", [])
    names = tuple(str(n) for n in on) if isinstance(on, list) else (str(on),)
    own = replace(own, catch=steps[0].id if steps else None, catch_on=names)
    return own, steps


def _expression(c: _Checker, where: Path, value: Any, earlier: Collection[str]) -> str | None:
    """A bare expression (`when`, `until`): compiled, its names checked; None if it is wrong."""
    if not isinstance(value, str | bool):
        return None  # the schema reports its type
    try:
        expression = when_expression(value, field_name(where)).expression
    except TemplateError as exc:
        c.problem(where, exc.message)
        return None
    if isinstance(value, str):
        c.scope(where, expression or "", earlier, ())
    return expression


def _compile_switch(
    c: _Checker,
    where: Path,
    cases: Any,
    own: State,
    earlier: Collection[str],
    handler: bool,
) -> tuple[State, list[State]]:
    """`switch:` — the first case whose `when` holds runs its steps, else `default`'s; then
    the run comes back to the switch, which ends with the case's last step's output."""
    config: list[dict[str, Any]] = []
    states: list[State] = []
    cases = cases if isinstance(cases, list) else []
    for i, case in enumerate(cases):
        at: Path = (*where, "switch", i)
        if not isinstance(case, dict):
            continue
        if "default" in case:
            extra = [k for k in ("when", "steps") if k in case]
            if extra:
                c.problem(
                    (*at, extra[0]),
                    f"a `default` case has no `{extra[0]}`: write `- default: [steps]`",
                    key=True,
                )
            if i != len(cases) - 1:
                c.problem(at, "`default` must be the last case: the cases after it never run")
            branch, steps_key, when = "default", "default", None
        else:
            missing = [k for k in ("when", "steps") if k not in case]
            if missing:
                c.problem(
                    at,
                    f"a case needs `{missing[0]}`: write `- when: <expression>` with "
                    "`steps: [...]`, or `- default: [steps]`",
                )
                continue
            branch, steps_key = str(i), "steps"
            when = _expression(c, (*at, "when"), case["when"], earlier)
        listed = compile_steps(
            c,
            case.get(steps_key),
            (*at, steps_key),
            parent=own.id,
            branch=branch,
            continue_to=own.id,
            on_error=error_of(own.id),
            earlier=earlier,
            handler=handler,
        )
        if listed:
            config.append({"branch": branch, "when": when})
        states.extend(listed)
    return replace(own, config={"cases": config}), states


def _compile_repeat(
    c: _Checker,
    where: Path,
    spec: Any,
    own: State,
    earlier: Collection[str],
    handler: bool,
) -> tuple[State, list[State]]:
    """`repeat:` — run the body, then check `until` (it may read the body's steps); if it
    does not hold, sleep `delay` (durably) and run another round, at most `max` in all."""
    spec = spec if isinstance(spec, dict) else {}
    at: Path = (*where, "repeat")
    body = compile_steps(
        c,
        spec.get("steps"),
        (*at, "steps"),
        parent=own.id,
        branch="body",
        continue_to=own.id,
        on_error=error_of(own.id),
        earlier=earlier,
        handler=handler,
    )
    _check_repeat_body(c, spec.get("steps"), (*at, "steps"))
    inside = [*earlier, *(s.id for s in body)]
    until = _expression(c, (*at, "until"), spec["until"], inside) if "until" in spec else None
    if "until" not in spec and "max" not in spec:
        c.problem(at, "a `repeat` needs `until` (when to stop) or `max` (how many rounds)")
    delay: float | None = None
    if "delay" in spec:
        try:
            delay = parse_duration(spec["delay"])
        except DurationError as exc:
            c.problem((*at, "delay"), str(exc))
    limit = spec.get("max")
    config = {
        "until": until,
        "delay": delay,
        "max": limit if isinstance(limit, int) and not isinstance(limit, bool) else None,
    }
    return replace(own, config=config), body


def failure_route(
    machine: Machine, state: State, error_kinds: Collection[str], any_error: bool = False
) -> tuple[str, list[str], bool]:
    """Where a step that has failed for good goes, and the blocks that fail with it.

    The first `catch` from the step outwards that takes one of `error_kinds` (the error's
    class name and its bases) gets it; a catch's own handler steps are not caught by it.
    Every block left on the way (a switch, a repeat, a parallel) fails with the step.
    With `any_error`, every catch takes it (what `graph` draws). Returns (target, blocks
    left, caught).
    """
    left: list[str] = []
    s = state
    in_handler = False
    while True:
        if (
            not in_handler
            and s.catch is not None
            and (any_error or not s.catch_on or set(s.catch_on) & set(error_kinds))
        ):
            return s.catch, left, True
        if s.parent is None:
            return state.on_error, left, False
        in_handler = s.branch == "catch"
        s = machine.state(s.parent)
        if not in_handler:
            left.append(s.id)


# what a template may read -------------------------------------------------------------------

_NOT_IN_REPEAT = {
    "wait_for_event": "a later round could take an earlier round's event",
    "wait_for_token": "a later round could take an earlier round's token",
    "run_workflow": "a later round could take an earlier round's child run",
    "for_each": "a later round would take the earlier round's items as done",
    "wait_for_any": "a later round could take an earlier round's answer",
    "parallel": "a later round could take an earlier round's branch runs",
}


def raw_step_paths(value: Any, where: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(path, raw step) of every step of a list and of the lists nested in it, in order."""
    for i, raw in enumerate(value if isinstance(value, list) else []):
        if isinstance(raw, dict):
            yield (*where, i), raw
            for below, _, inner in nested_lists(raw):
                yield from raw_step_paths(inner, (*where, i, *below))


def _check_repeat_body(c: _Checker, body: Any, where: Path) -> None:
    for at, raw in raw_step_paths(body, where):
        for kind, why in _NOT_IN_REPEAT.items():
            if kind in raw:
                c.problem(
                    (*at, kind),
                    f"a `{kind}` step cannot be inside a `repeat` body yet ({why}); "
                    "poll with a `call` step",
                    key=True,
                )


def unreadable_reason(data: dict[str, Any], step_id: str, where: Path) -> str:
    """Why the template at `where` cannot read `steps.<step_id>`, a step of this file that
    cannot have run before it on any path."""
    paths = {
        raw["id"]: at
        for section in ("steps", "on_failure")
        for at, raw in raw_step_paths(data.get(section), (section,))
        if isinstance(raw.get("id"), str)
    }
    target = paths.get(step_id, ())
    n = 0
    while n < min(len(target), len(where)) and target[n] == where[n]:
        n += 1
    if n == len(target) and len(where) > n and where[n] in NESTED_KEYS:
        return (
            f"`steps.{step_id}` is the block this step is in; "
            "its output exists once the block has ended"
        )
    if 0 < n < len(target) and n < len(where):
        block = _lookup(data, target[: n - 1])
        name = block.get("id") if isinstance(block, dict) else None
        if target[n - 1] == "switch" and name:
            return (
                f"`steps.{step_id}` is in another case of switch `{name}`; one case runs, "
                "so it cannot have run before this step"
            )
        if target[n - 1] == "parallel" and name:
            return (
                f"`steps.{step_id}` is in another branch of parallel `{name}`, which runs at "
                f"the same time; read it after `{name}`"
            )
    return f"`steps.{step_id}` runs later; only earlier steps can be read"


# the keys of a step under which nested lists stand (dsl/fanout.py adds "parallel")
NESTED_KEYS = {"switch", "repeat", "catch"}


def _lookup(data: Any, path: Path) -> Any:
    for part in path:
        if isinstance(data, dict) and isinstance(part, str):
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return None
    return data
