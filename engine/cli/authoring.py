"""Commands for writing workflows: validate, graph, init, test."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..settings import resolve_settings
from .common import _json, cli, new_engine, settings_options, start_up_done


@cli.command()
@click.argument("paths", nargs=-1)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.option(
    "-m",
    "--module",
    "modules",
    multiple=True,
    metavar="MODULE",
    help="Also check `call` names against the steps these modules register.",
)
@click.option("--workflows", "workflows", metavar="DIR")
def validate(
    paths: tuple[str, ...], fmt: str, modules: tuple[str, ...], workflows: str | None
) -> None:
    """Check workflow files or folders (default: the workflows folder)."""
    from dsl import Problem, check_paths
    from dsl.catalog import find_test_files, is_test_file

    settings = resolve_settings(modules=modules, workflows=workflows, db_needed=False)
    targets = list(paths) or [settings.workflows]
    for target in targets:
        if not Path(target).exists():
            raise click.UsageError(f"no such file or folder: {target}")
    registered = None
    start_up_done()  # (before the user's step modules: see there)
    if settings.modules:  # the steps they register, not the store
        from ..registry import import_modules, registered_names

        import_modules(settings.modules, settings.project_dir)
        registered = registered_names()
    catalog = check_paths([t for t in targets if not is_test_file(Path(t))], registered)
    problems: list[Problem] = catalog.problems
    # a folder's *.test.yaml files, and the test files named; a workflow file named is not one
    tests = find_test_files([t for t in targets if Path(t).is_dir() or is_test_file(Path(t))])
    if tests:  # SPEC §6: test files are checked as tests, against the workflows they name
        from ..testfiles import check_test_file

        known = dict(catalog.workflows)
        folder = Path(settings.workflows)
        if folder.is_dir() and folder.resolve() not in [Path(t).resolve() for t in targets]:
            known = {**check_paths([folder]).workflows, **known}
        for test in tests:
            problems += check_test_file(test, known)
        catalog.files += len(tests)
    if fmt == "json":
        _json(
            {
                "files": catalog.files,
                "valid": not problems,
                "workflows": sorted(catalog.workflows),
                "problems": [p.as_dict() for p in problems],
            }
        )
    else:
        for p in problems:
            click.echo(str(p))
        files = {p.path for p in problems}
        summary = (
            f"{catalog.files} file(s) checked, {len(files)} with problems ({len(problems)} in all)"
        )
        click.echo(summary if problems else f"{catalog.files} file(s) valid", err=bool(problems))
    if problems:
        sys.exit(1)


@cli.command()
@click.argument("workflow")
@click.option("--format", "fmt", type=click.Choice(["mermaid", "dot"]), default="mermaid")
@settings_options
def graph(
    workflow: str, fmt: str, db: str | None, modules: tuple[str, ...], workflows: str | None
) -> None:
    """Draw the compiled state machine of WORKFLOW (a file or an id)."""
    from dsl import render_graph

    engine = new_engine(
        resolve_settings(db=db, modules=(), workflows=workflows), import_steps=False
    )
    click.echo(render_graph(engine.workflow(workflow), fmt), nl=False)


@cli.command()
@click.argument("directory", default=".")
def init(directory: str) -> None:
    """Create a starter project in DIRECTORY: a workflow, its steps module and config."""
    from importlib import resources

    target = Path(directory)
    files = {
        target / "workflows" / "hello.yaml": "hello.yaml",
        target / "workflows" / "steps.py": "steps.py",
        target / "workflows" / "tests" / "hello.test.yaml": "hello.test.yaml",
    }
    existing = [str(p) for p in [*files, target / "pyproject.toml"] if p.exists()]
    if existing:
        raise click.UsageError(f"{', '.join(existing)} already exist(s); nothing was written")
    try:
        (target / "workflows" / "tests").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.UsageError(
            f"cannot create {target / 'workflows'}: {exc.strerror or exc}"
        ) from None
    starter = resources.files("engine").joinpath("starter")
    for path, name in files.items():
        path.write_text(starter.joinpath(name).read_text("utf-8"), "utf-8")
    (target / "workflows" / "__init__.py").write_text("")
    (target / "pyproject.toml").write_text(
        '[tool.durable-yaml]\nmodules = ["workflows.steps"]\nworkflows = "workflows"\n'
        '# db = "postgresql://user@host/db"   # default: sqlite:///.durable-yaml/state.db\n'
    )
    click.echo(f"created {target / 'workflows'} and {target / 'pyproject.toml'}; try:")
    click.echo(f'  cd {directory} && durable-yaml run hello --payload \'{{"name": "Ada"}}\'')
    click.echo(f"  cd {directory} && durable-yaml test      # its test, on a virtual clock")


@cli.command("test")
@click.argument("paths", nargs=-1)
@settings_options
def test_command(
    paths: tuple[str, ...], db: str | None, modules: tuple[str, ...], workflows: str | None
) -> None:
    """Run workflow tests (*.test.yaml) on a virtual clock; exit 1 if any fails."""
    from ..testfiles import find_test_files, run_test_file

    settings = resolve_settings(modules=modules, workflows=workflows)
    targets = list(paths) or [settings.workflows, str(Path(settings.project_dir) / "tests")]
    for target in paths:
        if not Path(target).exists():
            raise click.UsageError(f"no such file or folder: {target}")
    files = find_test_files(targets)
    if not files:
        raise click.UsageError(f"no *.test.yaml files in {', '.join(targets)}")
    from .. import testing  # noqa: F401  (its engine's modules: start-up, before user code)

    start_up_done()  # (its engines are made by engine.testing, not `new_engine`)
    failed = 0
    for path in files:
        result = run_test_file(path, settings.workflows, settings.modules, settings.project_dir)
        mark = "PASS" if result.passed else "FAIL"
        click.echo(f"{mark} {result.path} ({result.seconds:.2f}s)")
        for problem in result.problems:
            click.echo(f"    {problem}")
        failed += not result.passed
    click.echo(f"{len(files) - failed} passed, {failed} failed")
    if failed:
        sys.exit(1)
