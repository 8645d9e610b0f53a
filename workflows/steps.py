"""The step functions behind the example workflows."""

from __future__ import annotations

import hashlib
import os
import random
import time

from engine import NonRetryableError, StepContext, step


@step("images.process")
def process_image(url: str, ctx: StepContext) -> dict[str, str]:
    """A flaky image API: the first attempt of every run fails with a connection error."""
    if not url.startswith(("http://", "https://")):
        raise NonRetryableError(f"not a URL: {url!r}")
    if ctx.attempt == 1:
        raise ConnectionError("image API unavailable (simulated)")
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    ctx.logger.info("image processed", extra={"url": url, "attempt": ctx.attempt})
    return {"processed_url": f"https://cdn.example.com/{digest}.webp"}


@step("health.ping")
def ping(target: str) -> dict[str, object]:
    started = time.perf_counter()
    return {
        "target": target,
        "status": "ok",
        "latency_ms": round((time.perf_counter() - started) * 1000, 3),
    }


@step("analytics.fetch")
def fetch_analytics(window_end: str, ctx: StepContext) -> dict[str, object]:
    """Fails 60% of the time (ANALYTICS_FAILURE_RATE overrides it)."""
    rate = float(os.environ.get("ANALYTICS_FAILURE_RATE", "0.6"))
    if random.random() < rate:
        raise ConnectionError(f"analytics API timed out (attempt {ctx.attempt})")
    return {"window_end": window_end, "visits": random.randint(100, 1000)}


@step("ai.transcribe")
async def transcribe(audio_url: str) -> dict[str, str]:
    return {"text": f"Transcript of {audio_url}: durable workflows are plain YAML."}


@step("ai.summarise")
def summarise(text: str) -> dict[str, str]:
    words = text.split()
    return {"title": " ".join(words[-4:]).rstrip("."), "summary": " ".join(words[:12])}


@step("ai.make_image")
def make_image(prompt: str, ctx: StepContext) -> dict[str, str]:
    key = hashlib.sha256(ctx.idempotency_key.encode()).hexdigest()[:10]
    return {"image_url": f"https://images.example.com/{key}.png", "prompt": prompt}


@step("ai.publish")
def publish(episode_id: str, title: str, summary: str, image_url: str) -> dict[str, str]:
    return {"url": f"https://blog.example.com/{episode_id}", "title": title}


class CardDeclined(Exception):
    """The card was refused: not retried, the order's `catch` releases its stock."""


@step("orders.reserve")
def reserve(order_id: str, items: list[str]) -> dict[str, object]:
    return {"reservation": f"r-{order_id}", "items": len(items)}


@step("orders.fraud_score")
def fraud_score(amount: float) -> dict[str, float]:
    return {"risk": 0.9 if amount > 10_000 else 0.1}


@step("orders.charge")
def charge(order_id: str, amount: float) -> dict[str, object]:
    if amount < 0:
        raise CardDeclined(f"card declined for order {order_id}")
    return {"order_id": order_id, "charged": amount}


@step("orders.release")
def release(reservation: str) -> dict[str, str]:
    return {"released": reservation}
