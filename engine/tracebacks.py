"""A step's traceback as its author wants to read it: only the frames of their own code, each
as `path:line in function` with its source line, then the exception.

The store keeps the full text `traceback.format_exc()` wrote; this renders it for the CLI,
the API and the dashboard alike. Dropped: the engine's and the language's own frames, the
standard library's and installed libraries' (site-packages), and `<frozen ...>` ones.
"""

from __future__ import annotations

import os
import re
import sysconfig
from functools import cache
from pathlib import Path

__all__ = ["user_traceback"]

_FRAME = re.compile(r'^  File "(?P<file>[^"]*)", line (?P<line>\d+), in (?P<name>.*)$')
_HEADER = "Traceback (most recent call last):"
_SHOWN_HEADER = "raised in your code (most recent call last):"


@cache
def _hidden_roots() -> tuple[str, ...]:
    here = Path(__file__).resolve().parent
    roots = {str(here), str(here.parent / "dsl")}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            roots.add(str(Path(path).resolve()))
    return tuple(sorted(roots))


def _hidden(file: str) -> bool:
    if file.startswith("<"):
        return True
    try:
        resolved = str(Path(file).resolve())
    except (OSError, ValueError):
        return False
    return any(resolved == r or resolved.startswith(r + os.sep) for r in _hidden_roots()) or (
        f"{os.sep}site-packages{os.sep}" in resolved
    )


def _shown_path(file: str, base: str | None) -> str:
    """Relative to `base` when inside it, else as written."""
    try:
        inside = Path(file).resolve().relative_to(Path(base or os.getcwd()).resolve())
    except (OSError, ValueError):
        return file
    return str(inside)


def user_traceback(text: str | None, base: str | None = None) -> str | None:
    """`text` (a stored traceback) with the user's frames only, paths relative to `base`
    (default: the current folder) when inside it, absolute otherwise. A text that is not a traceback, or one
    with no frame of the user's (a failure raised by the engine itself: a bad template, a
    non-JSON output), comes back with only its exception lines."""
    if not text:
        return text
    out: list[str] = []
    keep = True
    for line in text.splitlines():
        frame = _FRAME.match(line)
        if frame:
            keep = not _hidden(frame["file"])
            if keep:
                where = _shown_path(frame["file"], base)
                out.append(f"  {where}:{frame['line']} in {frame['name']}")
            continue
        if line.startswith("    "):  # a frame's source line or its ^^^ marker
            if keep and line.strip() and set(line.strip()) - set("^~ "):
                out.append(line)
            continue
        keep = True
        out.append(line.replace(_HEADER, _SHOWN_HEADER))
    shown = [  # a header with no frame of the user's after it says nothing
        line
        for i, line in enumerate(out)
        if line != _SHOWN_HEADER or (i + 1 < len(out) and out[i + 1].startswith("  "))
    ]
    return "\n".join(shown)
