"""Steps for the multi-process load tests: each records when it starts and ends."""

from __future__ import annotations

import json
import os
import time

from engine import StepContext, step


def _log(line: dict[str, object]) -> None:
    with open(os.environ["LOAD_LOG"], "a") as f:
        f.write(json.dumps(line) + "\n")


@step("load.work")
def work(queue: str, key: str | None, ctx: StepContext) -> dict[str, object]:
    start = time.time()
    _log({"run": ctx.run_id, "queue": queue, "key": key, "start": start, "pid": os.getpid()})
    time.sleep(float(os.environ.get("LOAD_STEP_SECONDS", "0.05")))
    end = time.time()
    _log(
        {
            "run": ctx.run_id,
            "queue": queue,
            "key": key,
            "start": start,
            "end": end,
            "pid": os.getpid(),
        }
    )
    return {"pid": os.getpid()}
