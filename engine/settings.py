"""Settings, first found wins: flag, environment, `[tool.durable-yaml]` in the nearest
pyproject.toml, default."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["DEFAULT_DB", "Settings", "resolve_settings"]

DEFAULT_DB = "sqlite:///.durable-yaml/state.db"


@dataclass(frozen=True)
class Settings:
    db_url: str
    modules: tuple[str, ...]
    workflows: str
    project_dir: str


def _pyproject(start: Path) -> tuple[dict[str, Any], Path | None]:
    for folder in (start, *start.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            try:
                data = tomllib.loads(candidate.read_text("utf-8"))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"{candidate}: cannot read [tool.durable-yaml]: {exc}") from None
            section = data.get("tool", {}).get("durable-yaml")
            if section is not None:
                if not isinstance(section, dict):
                    raise ConfigError(f"{candidate}: [tool.durable-yaml] must be a table")
                return section, folder
    return {}, None


def resolve_settings(
    db: str | None = None,
    modules: tuple[str, ...] | list[str] = (),
    workflows: str | None = None,
    cwd: str | None = None,
) -> Settings:
    here = Path(cwd or os.getcwd()).resolve()
    project, folder = _pyproject(here)
    env_modules = [
        m.strip() for m in os.environ.get("DURABLE_YAML_MODULES", "").split(",") if m.strip()
    ]
    project_modules = project.get("modules", [])
    if not isinstance(project_modules, list):
        raise ConfigError("[tool.durable-yaml] modules must be a list of module names")
    chosen_modules = tuple(modules) or tuple(env_modules) or tuple(str(m) for m in project_modules)
    db_url = db or os.environ.get("DURABLE_YAML_DB") or project.get("db") or DEFAULT_DB
    chosen_workflows = (
        workflows
        or os.environ.get("DURABLE_YAML_WORKFLOWS")
        or project.get("workflows")
        or "workflows"
    )
    base = folder or here
    if not Path(chosen_workflows).is_absolute() and folder is not None and not workflows:
        chosen_workflows = str(base / chosen_workflows)
    return Settings(str(db_url), chosen_modules, str(chosen_workflows), str(base))
