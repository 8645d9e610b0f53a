"""`@step`: registering Python functions that workflows `call`, and calling them."""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import ConfigError, NonRetryableError, UnknownStep
from .inputs import loggable
from .models import NewLog

__all__ = [
    "RegisteredStep",
    "StepContext",
    "StepLogger",
    "get_step",
    "import_modules",
    "registered_names",
    "step",
]

F = TypeVar("F", bound=Callable[..., Any])
_REGISTRY: dict[str, RegisteredStep] = {}
_LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "error",
}
_NUMERIC = {name: number for number, name in _LEVELS.items() if number != logging.CRITICAL}
_step_log = logging.getLogger("durable_yaml.step")
_step_log.addHandler(logging.NullHandler())  # shown where logging is configured, else nowhere


class StepLogger:
    """A logger whose records are persisted with the run (with step and attempt).

    Each record also goes, as it is written, to `listener` (the foreground `run` shows it)
    and to the Python logger `durable_yaml.step` with `run_id`, `step_id` and `attempt` in
    its `extra` (a worker's own log output)."""

    def __init__(
        self,
        step_key: str | None = None,
        attempt: int | None = None,
        _shared: tuple[threading.Lock, list[NewLog]] | None = None,
        *,
        run_id: str | None = None,
        listener: Callable[[NewLog], None] | None = None,
    ) -> None:
        self.step_key = step_key
        self.attempt = attempt
        self.run_id = run_id
        self.listener = listener
        self._lock, self._buffer = _shared or (threading.Lock(), [])

    def bind(self, step_key: str, attempt: int) -> StepLogger:
        """A logger for one attempt that writes into this logger's buffer."""
        return StepLogger(
            step_key,
            attempt,
            (self._lock, self._buffer),
            run_id=self.run_id,
            listener=self.listener,
        )

    def log(
        self,
        level: int | str,
        message: str,
        *args: Any,
        extra: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        name = level if isinstance(level, str) else _LEVELS.get(level, "info")
        text = loggable(message % args if args else str(message))
        entry = NewLog(name, text, self.step_key, self.attempt, _jsonable(extra), time.time())
        with self._lock:
            self._buffer.append(entry)
        _step_log.log(
            _NUMERIC.get(name, logging.INFO),
            "%s",
            text,
            extra={
                "run_id": self.run_id,
                "step_id": self.step_key,
                "attempt": self.attempt,
                "fields": entry.extra,
            },
        )
        if self.listener is not None:
            try:
                self.listener(entry)
            except Exception:  # showing a line must never fail the step that logs it
                logging.getLogger("durable_yaml.runner").exception("a log listener failed")

    @property
    def pending(self) -> bool:
        """Whether records wait to be written to the store."""
        with self._lock:
            return bool(self._buffer)

    def debug(self, message: str, *args: Any, **kw: Any) -> None:
        self.log("debug", message, *args, **kw)

    def info(self, message: str, *args: Any, **kw: Any) -> None:
        self.log("info", message, *args, **kw)

    def warning(self, message: str, *args: Any, **kw: Any) -> None:
        self.log("warning", message, *args, **kw)

    def error(self, message: str, *args: Any, **kw: Any) -> None:
        self.log("error", message, *args, **kw)

    exception = error

    def drain(self) -> list[NewLog]:
        with self._lock:
            out = list(self._buffer)
            self._buffer.clear()
        return out


def _jsonable(extra: dict[str, Any] | None) -> dict[str, Any] | None:
    if not extra:
        return None
    return {
        loggable(str(k)): loggable(v if isinstance(v, str | int | float | bool | None) else repr(v))
        for k, v in extra.items()
    }


@dataclass(frozen=True)
class StepContext:
    """What a step may know about its execution (pass a parameter named `ctx` to get it)."""

    run_id: str
    step_id: str
    attempt: int
    idempotency_key: str
    logger: StepLogger = field(repr=False)
    # searchable keys for the run, stored with this step's result (JSON data, bounded)
    metadata: dict[str, Any] = field(default_factory=dict)


class StepTimeout(TimeoutError):
    pass


class StepExited(NonRetryableError):
    """A step raised SystemExit or another BaseException that would end the process."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(f"the step raised {type(exc).__name__}({exc})")


class _EventLoop:
    """The one event loop, in a daemon thread, on which every `async def` step of this
    process runs: executors hand coroutines over and wait for their results, so concurrent
    async steps interleave on it (an async step must not block the loop)."""

    def __init__(self) -> None:
        import asyncio  # only in a process that runs an async step

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="async-steps", daemon=True).start()

    def run(self, coro: Any, timeout: float | None) -> Any:
        import asyncio

        async def bounded() -> Any:
            try:
                return await asyncio.wait_for(coro, timeout)
            except (Exception, KeyboardInterrupt, asyncio.CancelledError):
                raise
            except BaseException as exc:  # SystemExit would stop this loop's thread
                raise StepExited(exc) from exc

        try:
            return asyncio.run_coroutine_threadsafe(bounded(), self.loop).result()
        except TimeoutError:
            raise StepTimeout(f"step timed out after {timeout:g}s") from None


_LOOP: _EventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _event_loop() -> _EventLoop:
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = _EventLoop()
        return _LOOP


@dataclass(frozen=True)
class RegisteredStep:
    name: str
    fn: Callable[..., Any]
    ctx_param: str | None
    is_async: bool
    module: str

    @functools.cached_property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.fn)

    @functools.cached_property
    def _verdicts(self) -> dict[frozenset[str], str | None]:
        return {}

    def check_arguments(self, kwargs: dict[str, Any]) -> str | None:
        """A message if `kwargs` cannot be passed to the function, else None. Keyword
        arguments bind by their names alone, so each set of names is checked once (a
        step's `with` keys rarely change; at most 64 sets are remembered)."""
        names = frozenset(kwargs)
        verdicts = self._verdicts
        if names in verdicts:
            return verdicts[names]
        params = dict.fromkeys(kwargs)
        if self.ctx_param:
            params[self.ctx_param] = None
        try:
            self.signature.bind(**params)
            verdict = None
        except TypeError as exc:
            verdict = f"{self.name}: {exc}"
        if len(verdicts) < 64:
            verdicts[names] = verdict
        return verdict

    def invoke(self, kwargs: dict[str, Any], ctx: StepContext, timeout: float | None) -> Any:
        """Call the function; TimeoutError after `timeout` seconds (a late result is dropped).
        A `SystemExit` (or any BaseException but KeyboardInterrupt) from the step becomes
        `StepExited`, an ordinary failure of the step, never the end of the process."""
        try:
            return self._invoke(kwargs, ctx, timeout)
        except (Exception, KeyboardInterrupt):
            raise
        except BaseException as exc:
            raise StepExited(exc) from exc

    def _invoke(self, kwargs: dict[str, Any], ctx: StepContext, timeout: float | None) -> Any:
        if self.ctx_param:
            kwargs = {**kwargs, self.ctx_param: ctx}
        if self.is_async:
            return _event_loop().run(self.fn(**kwargs), timeout)
        if timeout is None:
            return self.fn(**kwargs)
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = self.fn(**kwargs)
            except BaseException as exc:  # re-raised in the caller's thread
                box["error"] = exc

        worker = threading.Thread(  # in this context: the attempt's span and run ids
            target=contextvars.copy_context().run,
            args=(target,),
            name=f"step:{self.name}",
            daemon=True,
        )
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            raise StepTimeout(f"step timed out after {timeout:g}s")
        if "error" in box:
            raise box["error"]
        return box.get("value")


def step(name: str) -> Callable[[F], F]:
    """Register `fn` under `name`, the value workflows give to `call:`."""

    def register(fn: F) -> F:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.fn.__qualname__ != fn.__qualname__:
            raise ConfigError(
                f"step `{name}` is registered twice: {existing.module}.{existing.fn.__qualname__} "
                f"and {fn.__module__}.{fn.__qualname__}"
            )
        ctx_param = None
        for param in inspect.signature(fn).parameters.values():
            if param.name == "ctx" or param.annotation in (StepContext, "StepContext"):
                ctx_param = param.name
        _REGISTRY[name] = RegisteredStep(
            name, fn, ctx_param, inspect.iscoroutinefunction(fn), fn.__module__
        )
        return fn

    return register


def registered_names() -> set[str]:
    return set(_REGISTRY)


def get_step(name: str) -> RegisteredStep:
    try:
        return _REGISTRY[name]
    except KeyError:
        from dsl.schema_check import closest

        raise UnknownStep(
            name, closest(name, _REGISTRY) or "; pass the module that registers it with -m/--module"
        ) from None


# Set once a user's step module is imported: the `durable-yaml` command then exits the
# ordinary way (engine/cli `entry`), whose teardown finalizes what that code holds (a file
# it wrote and never closed, its own SQLite database, a C library's buffered output).
user_modules_imported = False


def import_modules(modules: Iterable[str], cwd: str = ".") -> None:
    """Import step modules with the current folder on sys.path; ConfigError on failure."""
    global user_modules_imported
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    for module in modules:
        user_modules_imported = True
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            raise ConfigError(f"cannot import step module `{module}`: {exc}") from None
        except ConfigError:
            raise
        except KeyboardInterrupt:
            raise
        except SystemExit as exc:
            raise ConfigError(
                f"step module `{module}` called sys.exit({exc.code!r}) while importing"
            ) from None
        except BaseException as exc:
            raise ConfigError(
                f"step module `{module}` failed while importing: {type(exc).__name__}: {exc}"
            ) from None
