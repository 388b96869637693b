"""Readiness: wait for the child's /health to say ok, then warm it with a real request."""

from __future__ import annotations

import asyncio
import base64
import io
import time

import httpx

from .process import Child


class NotReady(Exception):
    """The child did not become ready; the message says why."""


async def wait_healthy(client: httpx.AsyncClient, base_url: str, child: Child, *, stall_s: float, max_s: float,
                       interval_s: float = 0.01, max_interval_s: float = 0.25) -> float:
    """Poll /health until 200. Returns seconds waited.

    llama-server answers 503 while it loads; a big model can take minutes, so the deadline is a
    stall deadline: it moves forward whenever the child prints something, and `max_s` caps the total.
    """
    t0 = time.monotonic()
    while True:
        if child.returncode is not None:
            raise NotReady(f"exited with code {child.returncode} while loading")
        try:
            r = await client.get(f"{base_url}/health", timeout=2.0)
            if r.status_code == 200:
                return time.monotonic() - t0
        except httpx.TransportError:
            pass  # not listening yet
        now = time.monotonic()
        if now - t0 > max_s:
            raise NotReady(f"not healthy after {max_s:.0f}s")
        if now - max(t0, child.last_output) > stall_s:
            raise NotReady(f"no /health 200 and no output for {stall_s:.0f}s while loading")
        await asyncio.sleep(interval_s)
        # Small models are up in tens of milliseconds, big ones take minutes: poll fast first, then back off.
        interval_s = min(max_interval_s, interval_s * 1.5)


def tiny_png() -> bytes:
    """A small generated picture, so the vision encoder's first run happens during warmup."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), (200, 220, 240))
    ImageDraw.Draw(img).rectangle((16, 16, 48, 48), fill=(30, 90, 160))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


async def warmup(client: httpx.AsyncClient, base_url: str, *, with_image: bool, timeout_s: float) -> dict[str, object]:
    """One real chat completion (one token). Returns what was sent, for /status."""
    content: object = "Hello"
    if with_image:
        png = await asyncio.to_thread(tiny_png)
        url = "data:image/png;base64," + base64.b64encode(png).decode()
        content = [{"type": "text", "text": "Describe."}, {"type": "image_url", "image_url": {"url": url}}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1, "temperature": 0}
    t0 = time.monotonic()
    try:
        r = await client.post(f"{base_url}/v1/chat/completions", json=body, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise NotReady(f"warmup request failed: {exc!r}") from exc
    if r.status_code != 200:
        raise NotReady(f"warmup answered {r.status_code}: {r.text[:300]}")
    return {"seconds": round(time.monotonic() - t0, 4), "image": with_image}
