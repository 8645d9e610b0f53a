"""Errors of the workflow language: every problem names its file, line, column and field."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DslError", "Problem", "TemplateError", "WorkflowInvalid"]


class DslError(Exception):
    """Base class of every error the `dsl` package raises."""


@dataclass(frozen=True, order=True)
class Problem:
    """One problem of a workflow file, located at `path:line:col` (1-based)."""

    path: str
    line: int
    col: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        return f"{self.path}:{self.line}:{self.col}: {where}{self.message}"

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "line": self.line,
            "col": self.col,
            "field": self.field,
            "message": self.message,
        }


class WorkflowInvalid(DslError):
    """A workflow file (or folder) has one or more problems; all of them are in `problems`."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class TemplateError(DslError):
    """A template failed to compile or render; `field` names where it lives (e.g. steps.x.with.url)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)
