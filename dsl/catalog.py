"""Reading workflow files and folders: the entry points of the `dsl` package."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path as FsPath

from .compiler import compile_document
from .errors import Problem, WorkflowInvalid
from .loader import load_yaml
from .model import Machine
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
    try:
        text = FsPath(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, [Problem(name, 1, 1, "", "no such file")]
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(name, 1, 1, "", f"cannot read the file: {exc}")]
    loaded, problems = load_yaml(text, name)
    if loaded is None:
        return None, problems
    problems += schema_problems(loaded.data, loaded.positions, name)
    machine, meaning = compile_document(
        loaded.data, loaded.positions, name, registered, build=not problems
    )
    problems += [p for p in meaning if p not in problems]
    return (None if problems else machine), sorted(problems)


def load_workflow(path: str | FsPath, registered: Collection[str] | None = None) -> Machine:
    """Like `check_file`, raising `WorkflowInvalid` with every problem."""
    machine, problems = check_file(path, registered)
    if machine is None:
        raise WorkflowInvalid(problems)
    return machine


def is_test_file(path: FsPath) -> bool:
    """`*.test.yaml` files are workflow tests (run by `durable-yaml test`), not workflows."""
    return path.name.endswith((".test.yaml", ".test.yml"))


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
            target = state.config.get("workflow") if state.kind == "run_workflow" else None
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
    catalog.problems.sort()
    return catalog
