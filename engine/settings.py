"""Settings, first found wins: flag, environment, `[tool.durable-yaml]` in the nearest
pyproject.toml, default."""

from __future__ import annotations

import importlib.util
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "DEFAULT_DB",
    "DEFAULT_RETENTION",
    "Settings",
    "check_db_url",
    "project_of",
    "resolve_settings",
]

DEFAULT_DB = "sqlite:///.durable-yaml/state.db"


# Retention (seconds) by finished status: `retention = {completed = "30d", ...}`
DEFAULT_RETENTION: dict[str, float] = {
    "completed": 30 * 86400.0,
    "failed": 90 * 86400.0,
    "cancelled": 90 * 86400.0,
    "expired": 90 * 86400.0,
}


@dataclass(frozen=True)
class Settings:
    db_url: str
    modules: tuple[str, ...]
    workflows: str
    project_dir: str
    retention: tuple[tuple[str, float], ...] = tuple(DEFAULT_RETENTION.items())


def _retention(value: Any, where: str) -> tuple[tuple[str, float], ...]:
    """`retention` of [tool.durable-yaml]: a table of status = duration ("30d"); statuses
    it does not name keep their defaults."""
    from dsl import DurationError, parse_duration

    if value is None:
        return tuple(DEFAULT_RETENTION.items())
    if not isinstance(value, dict):
        raise ConfigError(f'{where}: retention must be a table like {{completed = "30d"}}')
    out = dict(DEFAULT_RETENTION)
    for status, duration in value.items():
        if status not in DEFAULT_RETENTION:
            known = ", ".join(DEFAULT_RETENTION)
            raise ConfigError(f"{where}: retention.{status}: not a finished status ({known})")
        try:
            seconds = parse_duration(duration)
        except DurationError as exc:
            raise ConfigError(f"{where}: retention.{status}: {exc}") from None
        if seconds <= 0:
            raise ConfigError(f"{where}: retention.{status}: must be longer than 0")
        out[status] = float(seconds)
    return tuple(out.items())


def _pyproject(start: Path) -> tuple[dict[str, Any], Path | None]:
    for folder in (start, *start.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            try:
                data = tomllib.loads(candidate.read_text("utf-8"))
            except UnicodeDecodeError as exc:
                raise ConfigError(
                    f"{candidate}: cannot read [tool.durable-yaml]: not UTF-8 text (byte {exc.start})"
                ) from None
            except RecursionError:
                raise ConfigError(
                    f"{candidate}: cannot read [tool.durable-yaml]: nested too deeply"
                ) from None
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"{candidate}: cannot read [tool.durable-yaml]: {exc}") from None
            tool = data.get("tool", {})
            if not isinstance(tool, dict):
                raise ConfigError(f"{candidate}: `tool` must be a table, not {type(tool).__name__}")
            section = tool.get("durable-yaml")
            if section is not None:
                if not isinstance(section, dict):
                    raise ConfigError(f"{candidate}: [tool.durable-yaml] must be a table")
                return section, folder
    return {}, None


def _real(path: str) -> Path:
    """`path` with its symlinks followed; as given (made absolute) if they loop."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        return Path(os.path.abspath(path))


def project_of(workflow_file: str) -> Path | None:
    """The project a workflow file belongs to: the folder of the nearest pyproject.toml
    above it, None when there is none."""
    start = _real(workflow_file).parent
    return next((f for f in (start, *start.parents) if (f / "pyproject.toml").is_file()), None)


def resolve_settings(
    db: str | None = None,
    modules: tuple[str, ...] | list[str] = (),
    workflows: str | None = None,
    cwd: str | None = None,
    workflow_file: str | None = None,
    db_needed: bool = True,
) -> Settings:
    """With `workflow_file` (a `run PATH`), settings come from the file's project: its
    pyproject.toml, its folder on sys.path, its `.durable-yaml/` for the default database,
    wherever the command is typed. A file in no project and outside the current folder is
    refused (ConfigError) unless a database is given, so nothing is created in a folder
    that happens to be current. `db_needed=False` (validate, test: commands that never open
    the database) leaves the database URL unchecked, and SQLAlchemy unimported."""
    here = Path(cwd or os.getcwd()).resolve()
    default_db = DEFAULT_DB
    if workflow_file is not None:
        home = project_of(workflow_file)
        given_db = db or os.environ.get("DURABLE_YAML_DB")
        if home is not None:
            here = home
            default_db = f"sqlite:///{home / '.durable-yaml' / 'state.db'}"
        elif not given_db and not _real(workflow_file).is_relative_to(here):
            raise ConfigError(
                f"{workflow_file} is in no project (no pyproject.toml above it) and outside "
                f"the current folder {here}: run it from its own folder, or give --db "
                "(and -m for its step modules); nothing was created"
            )
    project, folder = _pyproject(here)
    env_modules = [
        m.strip() for m in os.environ.get("DURABLE_YAML_MODULES", "").split(",") if m.strip()
    ]
    project_modules = project.get("modules", [])
    if not isinstance(project_modules, list) or not all(
        isinstance(m, str) for m in project_modules
    ):
        raise ConfigError("[tool.durable-yaml] modules must be a list of module names")
    for key in ("db", "workflows"):
        if key in project and not isinstance(project[key], str):
            raise ConfigError(
                f"[tool.durable-yaml] {key} must be a string, not {type(project[key]).__name__}"
            )
    chosen_modules = tuple(modules) or tuple(env_modules) or tuple(str(m) for m in project_modules)
    db_url = db or os.environ.get("DURABLE_YAML_DB") or project.get("db") or default_db
    if workflow_file is not None and folder is not None and db_url == project.get("db"):
        db_url = _inside(str(db_url), folder)  # the project's own relative SQLite file
    chosen_workflows = (
        workflows
        or os.environ.get("DURABLE_YAML_WORKFLOWS")
        or project.get("workflows")
        or "workflows"
    )
    base = folder or here
    from_file = workflow_file is not None and base == here
    if not Path(chosen_workflows).is_absolute() and (folder or from_file) and not workflows:
        chosen_workflows = str(base / chosen_workflows)
    where = f"{folder / 'pyproject.toml'} [tool.durable-yaml]" if folder else "settings"
    return Settings(
        check_db_url(str(db_url)) if db_needed else str(db_url),
        chosen_modules,
        str(chosen_workflows),
        str(base),
        _retention(project.get("retention"), where),
    )


def _inside(url: str, folder: Path) -> str:
    """A SQLite URL with a relative file made relative to `folder`; any other URL as is."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return url  # check_db_url says what is wrong with it
    name = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or not name or name == ":memory:":
        return url
    if Path(name).is_absolute() or name.startswith("file:"):
        return url
    return parsed.set(database=str(folder / name)).render_as_string(hide_password=False)


def check_db_url(url: str) -> str:
    """The URL if this version can use it; else ConfigError saying what to write instead.
    A PostgreSQL URL must name its host and database: an empty one would silently use the
    local default database."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    example = "use sqlite:///path/state.db or postgresql://user@host/database"
    given = url
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg://" + url[len(prefix) :]
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ConfigError(f"database URL {given!r} is not a URL; {example}") from None
    backend = parsed.get_backend_name()
    try:
        driver = parsed.get_driver_name()
    except NoSuchModuleError:
        raise ConfigError(f"unsupported database {backend!r}; {example}") from None
    if backend == "sqlite":
        if "\x00" in (parsed.database or ""):
            raise ConfigError(f"database URL {given!r}: the file name contains a NUL character")
        return _engine_accepts(url, repr(given))
    if backend != "postgresql":
        raise ConfigError(f"unsupported database {backend!r}; {example}")
    if driver != "psycopg":
        raise ConfigError(f"the PostgreSQL driver is psycopg: write postgresql://, not {driver}")
    if not parsed.database or not (parsed.host or parsed.query.get("host")):
        raise ConfigError(
            f"database URL {given.split('@')[-1]!r} must name the host "
            "and the database: postgresql://user@host/database"
        )
    if importlib.util.find_spec("psycopg") is None:
        raise ConfigError(
            "PostgreSQL needs the psycopg driver: pip install 'durable-yaml[postgres]'"
        )
    return _engine_accepts(url, repr(parsed.render_as_string(hide_password=True)))


def _engine_accepts(url: str, shown: str) -> str:
    """The URL if SQLAlchemy can make an engine of it (its query options parsed); nothing is
    opened: an engine connects only when first used."""
    import sqlalchemy as sa
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        sa.create_engine(url).dispose()
    except (ArgumentError, NoSuchModuleError, ValueError, TypeError) as exc:
        raise ConfigError(f"database URL {shown}: {_first_line(exc)}") from None
    return url


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
