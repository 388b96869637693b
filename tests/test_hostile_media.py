"""Hostile media against the real daemon and llama-server: remote URLs on every media route (a local listener
must never be reached), image bombs of several formats, broken images, and the memory bound under load."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from hostile import Listener, LiveDaemon, alive, check, listener, start_daemon, stop_daemon
from PIL import Image

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory, llama_server: str, tiny_vl: tuple[Path, Path]) -> Iterator[LiveDaemon]:
    model, mmproj = tiny_vl
    daemon = start_daemon(tmp_path_factory.mktemp("hostile-media"), llama_server, model, mmproj,
                          env={"LLAMA_SUPERVISOR_IMAGE_WORKERS": "2"})
    yield daemon
    stop_daemon(daemon)


@pytest.fixture(scope="module")
def spy() -> Iterator[Listener]:
    yield from listener()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def zero_png(w: int, h: int) -> bytes:
    """An all-zero grey PNG of any size, written without holding the pixels (10000×10000 is ~100 KB)."""
    row = b"\x00" * (w + 1)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def chat_with(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "?"},
                                                      {"type": "image_url", "image_url": {"url": url}}]}],
            "max_tokens": 1}


def post(d: LiveDaemon, path: str, body: bytes | dict, timeout: float = 120) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return check(httpx.post(f"{d.url}{path}", content=content, headers={"content-type": "application/json"},
                            timeout=timeout))


def test_no_remote_fetch_on_any_media_route(d: LiveDaemon, spy: Listener) -> None:
    base = f"127.0.0.1:{spy.port}"
    urls = [f"http://{base}/a.png", f"HTTP://{base}/b.png", f"https://{base}/c.png", f"http:/{base}/d.png",
            f"http://x@{base}/e.png", f" http://{base}/f.png", f"httpx://{base}/g", f"http://{base}\\@ok/h",
            "file:///etc/passwd", f"http://[::ffff:127.0.0.1]:{spy.port}/i"]
    esc = '"image\\u005furl"'
    bodies: list[tuple[str, str]] = []
    for url in urls:
        u = json.dumps(url)
        part = f'{{"type": {esc}, {esc}: {{"url": {u}}}}}'
        msg = f'{{"role": "user", "content": [{{"type": "text", "text": "x"}}, {part}]}}'
        for route in ("/v1/chat/completions", "/chat/completions", "/apply-template", "/v1/chat/completions/input_tokens",
                      "/predict"):
            if route == "/predict":
                bodies.append((route, json.dumps({"prompt": "x", "images": [url]})))
            else:
                bodies.append((route, f'{{"messages": [{msg}], "max_tokens": 1}}'))
        for route in ("/v1/responses", "/v1/responses/input_tokens", "/responses"):
            bodies.append((route, json.dumps({"input": [{"role": "user", "content": [
                {"type": "input_text", "text": "x"}, {"type": "input_image", "image_url": url}]}],
                "max_output_tokens": 1})))
        for route in ("/v1/messages", "/v1/messages/count_tokens"):
            bodies.append((route, json.dumps({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
                {"type": "image", "source": {"type": "url", "url": url}}, {"type": "text", "text": "x"}]}]})))
            bodies.append((route, json.dumps({"model": "m", "max_tokens": 1, "messages": [
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
                    {"type": "image", "source": {"type": "url", "url": url}}]}]}]})))
        for route in ("/v1/embeddings", "/embeddings", "/embedding"):
            bodies.append((route, json.dumps({"input": [{"content": [{"type": "image_url", "image_url": {"url": url}}]}]})))
        bodies.append(("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": url, "format": "wav"}}]}], "max_tokens": 1})))
        bodies.append(("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": url}}]}], "max_tokens": 1})))
    for route, body in bodies:
        r = post(d, route, body.encode())
        assert r.status_code == 400, (route, body[:200], r.status_code, r.text[:300])
    time.sleep(0.5)
    assert spy.hits == [], f"a remote fetch reached the local listener: {spy.hits[:3]}"
    alive(d)


def _big_headers() -> dict[str, bytes]:
    gif = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    gif[6:10] = struct.pack("<HH", 60000, 60000)  # logical screen: 3.6 gigapixels
    bmp = bytearray(encode(Image.new("RGB", (1, 1)), "BMP"))
    bmp[18:26] = struct.pack("<ii", 30000, 30000)
    return {"png 10000x10000 zeros": zero_png(10000, 10000), "gif 60000x60000 screen": bytes(gif),
            "bmp 30000x30000 header": bytes(bmp),
            "tiff 9000x9000": encode(Image.new("1", (9000, 9000)), "TIFF", compression="group4"),
            "webp 16000x16000": encode(Image.new("L", (16000, 3000)), "WEBP", lossless=True)}


def test_bombs_are_refused_before_decoding(d: LiveDaemon) -> None:
    for name, data in _big_headers().items():
        r = post(d, "/v1/chat/completions", chat_with("data:image/png;base64," + b64(data)))
        assert r.status_code in (400, 413), (name, r.text)
        if name != "bmp 30000x30000 header":  # a lying BMP header may also be a broken image
            assert r.status_code == 413 and "image_max_pixels" in r.text, (name, r.text)
    alive(d)


def test_broken_and_odd_images(d: LiveDaemon) -> None:
    jpeg = encode(Image.new("RGB", (1200, 900), "teal"), "JPEG")
    png = encode(Image.new("RGB", (300, 200), "red"), "PNG")
    frames = [Image.new("P", (64, 64), i % 256) for i in range(300)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=10, loop=0)
    cases = {
        "truncated jpeg": (jpeg[: len(jpeg) // 2], {400}),
        "truncated png": (png[: len(png) // 2], {400}),
        "corrupt png crc": (png[:40] + b"\x00" * 8 + png[48:], {400}),
        "random bytes": (bytes(range(256)) * 8, {400}),
        "empty": (b"", {400}),
        "ico": (encode(Image.new("RGB", (16, 16)), "ICO"), {400}),
        "eps header": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", {400}),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', {400}),
        "animated gif, 300 frames": (buf.getvalue(), {200}),
        "long thin png 20000x2": (encode(Image.new("RGB", (20000, 2), "blue"), "PNG"), {200}),
        "tall thin png 3x30000": (encode(Image.new("L", (3, 30000)), "PNG"), {200}),
        "1x1 png": (encode(Image.new("RGB", (1, 1)), "PNG"), {200}),
    }
    for name, (data, ok) in cases.items():
        for url in ("data:image/png;base64," + b64(data), b64(data)):
            r = post(d, "/v1/chat/completions", chat_with(url))
            assert r.status_code in ok, (name, r.status_code, r.text[:300])
    r = post(d, "/v1/chat/completions", chat_with("data:image/png;base64,%%%notbase64"))
    assert r.status_code == 400
    # every media route takes the same policy: a bomb in Anthropic's and the completion shapes too
    bomb = b64(zero_png(10000, 10000))
    r = post(d, "/v1/messages", {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": bomb}}]}]})
    assert r.status_code == 413
    r = post(d, "/completion", {"prompt": {"prompt_string": "<__media__> x", "multimodal_data": [bomb]}, "n_predict": 1})
    assert r.status_code == 413
    alive(d)


def test_memory_bound_and_other_requests_keep_flowing(d: LiveDaemon) -> None:
    """8 concurrent 10000×10000 zero PNGs and 8 concurrent 12 MP JPEGs: supervisor RSS grows < 150 MB."""
    photo = encode(Image.linear_gradient("L").resize((4000, 3000)).convert("RGB"), "JPEG", quality=90)
    post(d, "/v1/chat/completions", chat_with("data:image/jpeg;base64," + b64(photo)))  # codecs loaded, pools warm
    png_body = json.dumps(chat_with("data:image/png;base64," + b64(zero_png(10000, 10000)))).encode()
    jpeg_body = json.dumps(chat_with("data:image/jpeg;base64," + b64(photo))).encode()
    time.sleep(0.5)
    base = d.rss()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], d.rss())
            time.sleep(0.01)

    flowing: list[float] = []

    def small_requests() -> None:
        with httpx.Client(base_url=d.url, timeout=60) as c:
            while not done.is_set():
                t0 = time.monotonic()
                r = c.post("/tokenize", json={"content": "hello"})
                assert r.status_code == 200
                flowing.append(time.monotonic() - t0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    talker = threading.Thread(target=small_requests, daemon=True)
    talker.start()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda body: post(d, "/v1/chat/completions", body, timeout=180),
                                [png_body] * 8 + [jpeg_body] * 8))
    done.set()
    sampler.join(5)
    talker.join(60)
    # Saturated image work answers 503 with Retry-After (allowed); a bomb is 413 before decoding; never a 500.
    pngs, jpegs = [r.status_code for r in results[:8]], [r.status_code for r in results[8:]]
    assert set(pngs) <= {413, 503} and 413 in pngs, pngs
    assert set(jpegs) <= {200, 503} and 200 in jpegs, jpegs
    assert all(r.headers.get("retry-after") for r in results if r.status_code == 503)
    growth = (peak[0] - base) / 2**20
    print(f"RSS growth {growth:.1f} MB, statuses {pngs} {jpegs}, {len(flowing)} small requests meanwhile")
    assert growth < 150, f"supervisor RSS grew {growth:.0f} MB"
    assert len(flowing) >= 3, "small requests did not flow while images were processed"
    alive(d)
