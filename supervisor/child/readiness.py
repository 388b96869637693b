"""Readiness: wait for the child's /health to say ok, then warm it with a real request."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import time

import httpx

from ..media.images import process_image
from ..spec.profile import ImagePolicy
from .process import Child

MIN_POLL_GAP_S = 0.003
WARMUP_TEXT = "Describe."


class NotReady(Exception):
    """The child did not become ready; the message says why."""


async def wait_healthy(client: httpx.AsyncClient, base_url: str, child: Child, *, stall_s: float, max_s: float,
                       interval_s: float = 0.01, max_interval_s: float = 0.25) -> float:
    """Poll /health until 200. Returns seconds waited.

    llama-server answers 503 while it loads; a big model can take minutes, so the deadline is a
    stall deadline: it moves forward whenever the child prints something, and `max_s` caps the total.
    Between polls it also listens: llama-server logs "model loaded" the moment it is ready, so a new log
    line brings the next poll forward instead of waiting out an interval that has grown to `max_interval_s`.
    """
    t0 = time.monotonic()
    last_poll = t0 - MIN_POLL_GAP_S
    while True:
        # A burst of log lines (tensor loading) must not become a burst of probes.
        await asyncio.sleep(max(0.0, last_poll + MIN_POLL_GAP_S - time.monotonic()))
        if child.returncode is not None:
            raise NotReady(f"exited with code {child.returncode} while loading")
        child.printed.clear()
        last_poll = time.monotonic()
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
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval_s):
                await child.printed.wait()
        # Small models are up in tens of milliseconds, big ones take minutes: poll fast first, then back off.
        interval_s = min(max_interval_s, interval_s * 1.5)


def warmup_image(policy: ImagePolicy) -> bytes:
    """A picture as large as the image policy lets through, run through the proxy's own image path.

    The first image of a given size makes llama-server build and allocate the vision encoder's graph
    (llama.cpp issue 27147), and the proxy's first image loads Pillow's codecs: warming with a full-size
    image pays both before ready, not on a user's first request.
    """
    from PIL import Image, ImageDraw

    w, h = policy.max_long_side, policy.max_short_side
    img = Image.new("RGB", (w, h), (200, 220, 240))
    ImageDraw.Draw(img).rectangle((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(30, 90, 160))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=policy.jpeg_quality)
    data, _, _, _ = process_image(buf.getvalue(), policy, "warmup")
    return data


async def warmup(client: httpx.AsyncClient, base_url: str, *, image: ImagePolicy | None, timeout_s: float
                 ) -> dict[str, object]:
    """One real chat completion (one token), with a full-size image when `image` (the profile's policy) is given.
    Returns what was sent, for /status."""
    content: object = "Hello"
    if image is not None:
        jpeg = await asyncio.to_thread(warmup_image, image)
        url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
        content = [{"type": "text", "text": WARMUP_TEXT}, {"type": "image_url", "image_url": {"url": url}}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1, "temperature": 0}
    t0 = time.monotonic()
    try:
        r = await client.post(f"{base_url}/v1/chat/completions", json=body, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise NotReady(f"warmup request failed: {exc!r}") from exc
    if r.status_code != 200:
        raise NotReady(f"warmup answered {r.status_code}: {r.text[:300]}")
    size = f"{image.max_long_side}x{image.max_short_side}" if image is not None else None
    try:  # what the warmup cost in context: the context guard learns the full-size image's cost from it
        prompt_tokens = r.json()["usage"]["prompt_tokens"]
    except (ValueError, KeyError, TypeError):
        prompt_tokens = None
    return {"seconds": round(time.monotonic() - t0, 4), "image": image is not None, "image_size": size,
            "prompt_tokens": prompt_tokens}
