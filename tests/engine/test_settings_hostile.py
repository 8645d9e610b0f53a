"""Settings and commands given something wrong: a clear message, the right exit code, no
traceback (SPEC §3)."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.settings import check_db_url, resolve_settings
from tests.conftest import cli


def _clean(result: object) -> str:
    out = result.stdout + result.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in out
    return str(out)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "'not a url' is not a URL"),
        ("mysql://u@h/d", "unsupported database 'mysql'"),
        ("postgresql://", "must name the host and the database"),
        ("postgresql://localhost", "must name the host and the database"),
        ("postgresql+asyncpg://u@h/d", "the PostgreSQL driver is psycopg"),
        ("http://example.com", "unsupported database 'http'"),
        ("sqlite:///{tmp}/%00.db", "the file name contains a NUL character"),
        ("sqlite:///{tmp}/p.db?timeout=abc", "could not convert string to float: 'abc'"),
    ],
)
def test_bad_database_urls(tmp_path: Path, url: str, message: str) -> None:
    result = cli("runs", "list", "--db", url.format(tmp=tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and message in _clean(result)
    assert not list(tmp_path.iterdir()), "nothing is written"


@pytest.mark.parametrize(
    "url", ["sqlite:////tmp/%00.db", "sqlite:////tmp/p.db?timeout=abc", "http://example.com"]
)
def test_the_store_refuses_a_url_check_db_url_did_not_see(url: str) -> None:
    from engine.store.db import Db

    with pytest.raises(ConfigError, match="database"):
        Db(url)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"tool = 5\n", "`tool` must be a table, not int"),
        (b'tool = "x"\n', "`tool` must be a table, not str"),
        (b"# caf\xe9\n[tool.durable-yaml]\n", "not UTF-8 text (byte 5)"),
        (b"a = " + b"[" * 20000 + b"]" * 20000 + b"\n", "nested too deeply"),
    ],
    ids=["tool-int", "tool-str", "latin1", "deep"],
)
def test_a_pyproject_that_cannot_be_read(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "pyproject.toml").write_bytes(content)
    with pytest.raises(ConfigError, match=r"pyproject\.toml: ") as raised:
        resolve_settings(cwd=str(tmp_path))
    assert message in str(raised.value)


def test_the_cli_names_an_unreadable_pyproject(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("tool = 5\n")
    result = cli("validate", cwd=tmp_path)
    assert result.returncode == 2
    assert f"{tmp_path}/pyproject.toml: `tool` must be a table" in _clean(result)


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'durable-yaml\[postgres\]'"):
        check_db_url("postgresql://u@h/d")


def test_sqlite_folder_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = cli("runs", "list", "--db", f"sqlite:///{tmp_path}/file/sub/x.db", cwd=tmp_path)
    assert result.returncode == 2 and "cannot create the database" in _clean(result)


def test_pyproject_values_of_the_wrong_type(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.durable-yaml]\nworkflows = 5\n")
    result = cli("runs", "list", cwd=tmp_path)
    assert result.returncode == 2 and "workflows must be a string, not int" in _clean(result)


def test_init_into_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    result = cli("init", "afile", cwd=tmp_path)
    assert result.returncode == 2 and "cannot create afile/workflows" in _clean(result)


def test_serve_on_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli("serve", "--port", str(port), "--db", f"sqlite:///{tmp_path}/s.db")
    assert result.returncode == 1 and "Address already in use" in _clean(result)


def test_validate_finds_run_workflow_cycles(tmp_path: Path) -> None:
    for me, other in (("a", "b"), ("b", "c"), ("c", "a")):
        (tmp_path / f"{me}.yaml").write_text(
            f'id: {me}\nversion: "1"\ntrigger: {{manual: true}}\n'
            f"steps:\n  - {{id: s, log: hi}}\n  - {{id: r, run_workflow: {other}}}\n"
        )
    result = cli("validate", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1
    out = _clean(result)
    assert (
        "a.yaml:6:1: steps.r.run_workflow: `a` would run itself without end (a → b → c → a)" in out
    )
    assert "b.yaml:6:1:" in out and "c.yaml:6:1:" in out


def test_graph_dot_escapes_names(tmp_path: Path) -> None:
    wf = tmp_path / "g.yaml"
    wf.write_text(
        'id: g\nversion: "1"\ntrigger: {event: go}\nsteps:\n'
        '  - {id: a, wait_for_event: "x\\"]; evil [label=\\"pwn"}\n'
    )
    result = cli("graph", str(wf), "--format", "dot", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'label="a: wait_for_event x\\"]; evil [label=\\"pwn"]' in result.stdout


def test_a_workflows_folder_with_a_fifo_and_a_dangling_symlink(tmp_path: Path) -> None:
    import os

    from engine.service import Engine
    from engine.settings import resolve_settings

    folder = tmp_path / "workflows"
    folder.mkdir()
    os.mkfifo(folder / "pipe.yaml")
    (folder / "gone.yaml").symlink_to(tmp_path / "nowhere")
    (folder / "loop").symlink_to(folder)
    result = cli("validate", str(folder), cwd=tmp_path, timeout=30)
    out = _clean(result)
    assert result.returncode == 1
    assert "pipe.yaml:1:1: not a regular file" in out and "gone.yaml:1:1: no such file" in out
    engine = Engine(resolve_settings(db=f"sqlite:///{tmp_path}/s.db", workflows=str(folder)))
    assert engine.refresh_catalog() and not engine.catalog.workflows


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("import sys; sys.exit(7)", "called sys.exit(7) while importing"),
        ("raise GeneratorExit('odd')", "failed while importing: GeneratorExit: odd"),
    ],
)
def test_a_step_module_that_exits_while_importing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, message: str
) -> None:
    import sys

    from engine.registry import import_modules

    name = f"exits_{abs(hash(body))}"
    (tmp_path / f"{name}.py").write_text(body + "\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(ConfigError, match=rf"step module `{name}` {re.escape(message)}"):
        import_modules([name], str(tmp_path))
    sys.modules.pop(name, None)


def test_the_cli_names_a_step_module_that_exits(tmp_path: Path) -> None:
    (tmp_path / "m_exit.py").write_text("import sys; sys.exit(7)\n")
    (tmp_path / "workflows").mkdir()
    result = cli("validate", cwd=tmp_path, env={"DURABLE_YAML_MODULES": "m_exit"})
    out = _clean(result)
    assert result.returncode == 2 and "step module `m_exit` called sys.exit(7)" in out


@pytest.mark.parametrize("value", ["²", "1e6", "-1"])
def test_serve_with_a_body_limit_that_is_no_number(tmp_path: Path, value: str) -> None:
    """`²` passed `str.isdigit` and then crashed `int()` (a traceback at start-up)."""
    result = cli(
        "serve",
        "--port",
        "1",
        "--db",
        f"sqlite:///{tmp_path}/s.db",
        env={"DURABLE_YAML_MAX_BODY": value},
    )
    out = _clean(result)
    assert result.returncode == 2 and "must be a number of bytes" in out, out
