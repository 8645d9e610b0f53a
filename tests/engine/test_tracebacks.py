"""engine.tracebacks: the user's frames of a stored traceback, the engine's and libraries' dropped."""

from __future__ import annotations

import traceback
from pathlib import Path

import engine
from engine.tracebacks import user_traceback

ENGINE = str(Path(engine.__file__).parent / "executor.py")


def _stored(user_file: str) -> str:
    return (
        "Traceback (most recent call last):\n"
        f'  File "{ENGINE}", line 124, in call_function\n'
        "    value = registered.invoke(kwargs, ctx, timeout)\n"
        "            ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
        f'  File "{user_file}", line 12, in fetch\n'
        "    return data['missing']\n"
        "           ~~~~^^^^^^^^^^^\n"
        "KeyError: 'missing'\n"
    )


def test_engine_frames_are_dropped_and_paths_made_relative(tmp_path: Path) -> None:
    shown = user_traceback(_stored(str(tmp_path / "workflows" / "steps.py")), str(tmp_path))
    assert shown == (
        "raised in your code (most recent call last):\n"
        "  workflows/steps.py:12 in fetch\n"
        "    return data['missing']\n"
        "KeyError: 'missing'"
    )


def test_no_user_frame_leaves_the_exception_only() -> None:
    text = f'Traceback (most recent call last):\n  File "{ENGINE}", line 3, in f\n    x()\nValueError: bad\n'
    assert user_traceback(text) == "ValueError: bad"


def test_a_chained_exception_keeps_both_parts(tmp_path: Path) -> None:
    def inner() -> None:
        raise KeyError("a")

    try:
        try:
            inner()
        except KeyError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError:
        text = traceback.format_exc()
    shown = user_traceback(text)
    assert shown is not None
    assert "in inner" in shown and "KeyError: 'a'" in shown and "RuntimeError: wrapped" in shown
    assert "direct cause" in shown and "File " not in shown
