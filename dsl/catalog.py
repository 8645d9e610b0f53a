"""Reading workflow files and folders: the entry points of the `dsl` package."""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path as FsPath

from .compiler import compile_document
from .errors import Problem, WorkflowInvalid
from .limits import YAML_BYTES_MAX
from .loader import load_yaml
from .model import Machine, State
from .schema_check import closest, schema_problems

__all__ = [
    "Catalog",
    "check_file",
    "check_paths",
    "find_workflow_files",
    "is_test_file",
    "load_workflow",
]


def check_file(
    path: str | FsPath, registered: Collection[str] | None = None
) -> tuple[Machine | None, list[Problem]]:
    """Load, schema-check and compile one file; return the machine or all its problems."""
    name = str(path)
    text, problem = read_workflow_text(path)
    if text is None:
        return None, [Problem(name, 1, 1, "", problem)]
    loaded, problems = load_yaml(text, name)
    if loaded is None:
        return None, problems
    refused = {(p.line, p.col) for p in problems}  # a refused value reads as null: say it once
    problems += [
        p
        for p in schema_problems(loaded.data, loaded.positions, name)
        if (p.line, p.col) not in refused
    ]
    machine, meaning = compile_document(
        loaded.data, loaded.positions, name, registered, build=not problems
    )
    problems += [p for p in meaning if p not in problems]
    return (None if problems else machine), sorted(problems)


def read_workflow_text(path: str | FsPath) -> tuple[str | None, str]:
    """The text of a regular file of at most `YAML_BYTES_MAX` bytes, or None and why not.

    A FIFO, a device or a symlink to one is refused before it is opened for reading,
    and it is opened without blocking, so neither can hang or exhaust memory."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None, "not a regular file; a workflow is a .yaml file"
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None, "not a regular file; a workflow is a .yaml file"
            data = f.read(YAML_BYTES_MAX + 1)
    except FileNotFoundError:
        return None, "no such file"
    except OSError as exc:
        return None, f"cannot read the file: {exc.strerror or exc}"
    if len(data) > YAML_BYTES_MAX:
        return None, f"the file is larger than {YAML_BYTES_MAX // (1024 * 1024)} MiB"
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text (byte {exc.start}: {data[exc.start]:#04x})"


def load_workflow(path: str | FsPath, registered: Collection[str] | None = None) -> Machine:
    """Like `check_file`, raising `WorkflowInvalid` with every problem."""
    machine, problems = check_file(path, registered)
    if machine is None:
        raise WorkflowInvalid(problems)
    return machine


def is_test_file(path: FsPath) -> bool:
    """`*.test.yaml` files are workflow tests (run by `durable-yaml test`), not workflows."""
    return path.name.endswith((".test.yaml", ".test.yml"))


def find_test_files(paths: Iterable[str | FsPath]) -> list[FsPath]:
    """The `*.test.yaml` files in these folders (sorted), and the files named."""
    found: list[FsPath] = []
    for p in map(FsPath, paths):
        if p.is_dir():
            found += sorted(q for q in p.rglob("*.test.y*ml") if q.is_file())
        elif p.is_file():
            found.append(p)
    return found


def find_workflow_files(paths: Iterable[str | FsPath]) -> list[FsPath]:
    """Files as given, and every *.yaml / *.yml below each folder, sorted."""
    found: list[FsPath] = []
    for p in paths:
        path = FsPath(p)
        if path.is_dir():
            found += sorted(
                q for q in path.rglob("*") if q.suffix in (".yaml", ".yml") and not is_test_file(q)
            )
        else:
            found.append(path)
    return found


@dataclass
class Catalog:
    """The workflows of a folder, by id, with the problems found among them."""

    workflows: dict[str, Machine] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    files: int = 0

    def get(self, workflow_id: str) -> Machine | None:
        return self.workflows.get(workflow_id)


def check_paths(
    paths: Iterable[str | FsPath], registered: Collection[str] | None = None
) -> Catalog:
    """Check many files together: each file, then ids unique and `run_workflow` targets known."""
    catalog = Catalog()
    machines: list[Machine] = []
    for file in find_workflow_files(paths):
        catalog.files += 1
        machine, problems = check_file(file, registered)
        catalog.problems += problems
        if machine is None:
            continue
        first = catalog.workflows.get(machine.workflow_id)
        if first is not None:
            catalog.problems.append(
                Problem(
                    str(file),
                    1,
                    1,
                    "id",
                    f"workflow id `{machine.workflow_id}` is also used by {first.source_path}",
                )
            )
            continue
        catalog.workflows[machine.workflow_id] = machine
        machines.append(machine)
    for machine in machines:
        for state in machine.states:
            target = state.starts_workflow
            if target is not None and target not in catalog.workflows:
                catalog.problems.append(
                    Problem(
                        machine.source_path,
                        state.line,
                        1,
                        f"steps.{state.id}.run_workflow",
                        f"no workflow has id `{target}`{closest(target, catalog.workflows)}",
                    )
                )
    cycles = _cycles(machines)
    for problem in cycles:  # such a workflow must not run: it is left out like an invalid one
        catalog.workflows = {
            k: m for k, m in catalog.workflows.items() if m.source_path != problem.path
        }
    catalog.problems += cycles
    catalog.problems.sort()
    return catalog


def _cycles(machines: list[Machine]) -> list[Problem]:
    """A workflow that starts itself through `run_workflow`, directly or through others,
    would nest runs without end: one problem at each such workflow's first step on the cycle."""
    calls: dict[str, list[tuple[str, State]]] = {
        m.workflow_id: [(s.starts_workflow, s) for s in m.states if s.starts_workflow is not None]
        for m in machines
    }
    problems = []
    for machine in machines:
        start = machine.workflow_id
        for target, state in calls[start]:
            path = _path_to(calls, target, start)
            if path is not None:
                chain = " → ".join([start, *path])
                problems.append(
                    Problem(
                        machine.source_path,
                        state.line,
                        1,
                        f"steps.{state.id}.run_workflow",
                        f"`{start}` would run itself without end ({chain}); "
                        "a workflow cannot start itself, directly or through others",
                    )
                )
                break
    return problems


def _path_to(calls: dict[str, list[tuple[str, State]]], source: str, goal: str) -> list[str] | None:
    """The workflows from `source` to `goal` along run_workflow steps, or None (iterative)."""
    parent: dict[str, str | None] = {source: None}
    queue = [source]
    while queue:
        node = queue.pop(0)
        if node == goal:
            path = [node]
            while parent[path[-1]] is not None:
                path.append(parent[path[-1]])  # type: ignore[arg-type]
            return path[::-1]
        for target, _ in calls.get(node, []):
            if target not in parent:
                parent[target] = node
                queue.append(target)
    return None
