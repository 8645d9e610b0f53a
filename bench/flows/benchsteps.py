from engine import step


@step("bench.noop")
def noop(i: int) -> int:
    return i
