import time

from engine import step


@step("bench.work")
def work() -> int:
    time.sleep(0.01)  # a busy worker's step: 10 ms of work, then its commit and the next claim
    return 1
