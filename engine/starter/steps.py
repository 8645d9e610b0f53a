"""Step functions for the starter workflow: register more with @step("name")."""

from __future__ import annotations

from engine import StepContext, step


@step("hello.greet")
def greet(name: str, ctx: StepContext) -> dict[str, str]:
    ctx.logger.info("greeting", extra={"name": name, "attempt": ctx.attempt})
    return {"message": f"Hello, {name}!"}
