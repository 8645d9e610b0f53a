import time
from datetime import datetime

from engine import step


@step("bench.stamp")
def stamp(scheduled: str) -> dict[str, float]:
    now = time.time()
    return {"lateness": now - datetime.fromisoformat(scheduled).timestamp()}
