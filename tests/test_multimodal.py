"""The multimodal path with the real llama-server and the tiny Qwen3-VL pair."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image
from support import metric, running, wait_for


def jpeg(w: int, h: int, color: str = "orange", **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def image_part(data: bytes, mime: str = "image/jpeg") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64," + base64.b64encode(data).decode()}}


def chat(*parts: dict, text: str = "what is this?") -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}], "max_tokens": 1}


@pytest.fixture
def vl_profile(write_profile, tiny_vl):
    model, mmproj = tiny_vl

    def make(**fields):
        return write_profile(name="vl", model=str(model), mmproj=str(mmproj), ctx_size=8192, parallel=1, **fields)

    return make


async def test_big_photo_arrives_downscaled(tmp_path: Path, vl_profile) -> None:
    photo = image_part(jpeg(4000, 3000))
    async with running(tmp_path, vl_profile()) as d, httpx.AsyncClient(base_url=d.url, timeout=120) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        st = (await c.get("/status")).json()
        assert st["warmup"]["image"] is True  # the first-encode cost was paid at warmup
        through = (await c.post("/v1/chat/completions", json=chat(photo))).json()["usage"]["prompt_tokens"]
        direct = (await httpx.AsyncClient(timeout=120).post(f"{d.default.runner.child_url}/v1/chat/completions",
                                                             json=chat(photo))).json()["usage"]["prompt_tokens"]
        same_size = image_part(jpeg(1024, 768))
        expected = (await c.post("/v1/chat/completions", json=chat(same_size))).json()["usage"]["prompt_tokens"]
        assert direct > 3000  # llama-server alone spends ~4000 tokens on a 12 MP photo
        assert through == expected < 1000  # the proxy sent 1024×768
        metrics = (await c.get("/metrics")).text
        assert metric(metrics, "images_total") == 2.0


async def test_alpha_png_and_exif_photo_are_accepted(tmp_path: Path, vl_profile) -> None:
    buf = io.BytesIO()
    Image.new("RGBA", (2000, 1200), (10, 20, 30, 128)).save(buf, format="PNG")
    rotated = Image.new("RGB", (1600, 1200), "teal")
    exif = rotated.getexif()
    exif[0x0112] = 6
    async with running(tmp_path, vl_profile()) as d, httpx.AsyncClient(base_url=d.url, timeout=120) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        r = await c.post("/v1/chat/completions", json=chat(image_part(buf.getvalue(), "image/png")))
        assert r.status_code == 200, r.text
        r = await c.post("/v1/chat/completions", json=chat(image_part(_encode(rotated, exif))))
        assert r.status_code == 200, r.text


def _encode(img: Image.Image, exif: Image.Exif) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


async def test_bad_images_get_4xx(tmp_path: Path, vl_profile) -> None:
    async with running(tmp_path, vl_profile(images={"max_image_bytes": 50_000})) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=120) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        bad = {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%not-base64%%%"}}
        r = await c.post("/v1/chat/completions", json=chat(bad))
        assert r.status_code == 400
        assert r.json()["error"]["message"].startswith("messages[0].content[1]: image data is not valid base64")
        r = await c.post("/v1/chat/completions", json=chat(image_part(b"GIF89a-truncated")))
        assert r.status_code == 400 and "not a valid image" in r.json()["error"]["message"]
        noisy = Image.effect_noise((600, 600), 100).convert("RGB")
        buf = io.BytesIO()
        noisy.save(buf, format="PNG")
        r = await c.post("/v1/chat/completions", json=chat(image_part(buf.getvalue(), "image/png")))
        assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]
        remote = {"type": "image_url", "image_url": {"url": "http://10.0.0.1/cat.png"}}
        r = await c.post("/v1/chat/completions", json=chat(remote))
        assert r.status_code == 400 and "remote image URLs are not allowed" in r.json()["error"]["message"]
        assert d.default.runner.ready and d.default.runner.machine.restarts == 0


async def test_request_body_cap_is_413(tmp_path: Path, vl_profile) -> None:
    async with running(tmp_path, vl_profile(), max_body_bytes=100_000) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=120) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        r = await c.post("/v1/chat/completions", json=chat(image_part(b"x" * 200_000)))
        assert r.status_code == 413 and "100000 bytes" in r.json()["error"]["message"]


async def test_only_last_k_images_reach_the_server(tmp_path: Path, vl_profile) -> None:
    img = image_part(jpeg(64, 64))
    history = {"messages": [], "max_tokens": 1}
    for t in range(6):
        history["messages"] += [{"role": "user", "content": [{"type": "text", "text": f"photo {t}"}, img]},
                                {"role": "assistant", "content": "ok"}]
    history["messages"].append({"role": "user", "content": "and now?"})
    async with running(tmp_path, vl_profile(images={"keep_last_images": 3})) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=120) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        before = _images_total((await c.get("/metrics")).text)
        r = await c.post("/v1/chat/completions", json=history)
        assert r.status_code == 200
        assert _images_total((await c.get("/metrics")).text) - before == 3
        # Same prompt size as sending the placeholders ourselves, straight to llama-server.
        from supervisor.media.images import OMITTED

        manual = {"messages": [dict(m) for m in history["messages"]], "max_tokens": 1}
        for m in manual["messages"][:6:2]:
            m["content"] = [m["content"][0], {"type": "text", "text": OMITTED}]
        async with httpx.AsyncClient(timeout=120) as direct:
            want = (await direct.post(f"{d.default.runner.child_url}/v1/chat/completions", json=manual)).json()
        assert r.json()["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]


def _images_total(text: str) -> float:
    return metric(text, "images_total")


async def test_predict_compatibility(tmp_path: Path, vl_profile) -> None:
    async with running(tmp_path, vl_profile()) as d, httpx.AsyncClient(base_url=d.url, timeout=120) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        b64 = base64.b64encode(jpeg(3000, 2000)).decode()
        r = await c.post("/predict", json={"prompt": "Describe the image.", "images": [b64], "max_tokens": 4})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"response", "finish_reason", "model", "usage"}
        assert isinstance(body["response"], str) and body["usage"]["completion_tokens"] <= 4
        assert body["usage"]["prompt_tokens"] < 1000  # downscaled on the way
        r = await c.post("/predict", json={"images": [b64]})
        assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]


async def test_openai_client_sends_an_image(tmp_path: Path, vl_profile) -> None:
    async with running(tmp_path, vl_profile()) as d:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        client = openai.AsyncOpenAI(base_url=f"{d.url}/v1", api_key="unused")
        url = "data:image/jpeg;base64," + base64.b64encode(jpeg(800, 600)).decode()
        resp = await client.chat.completions.create(
            model="vl", max_tokens=3,
            messages=[{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                   {"type": "image_url", "image_url": {"url": url}}]}])
        assert resp.choices[0].message is not None and resp.usage.prompt_tokens > 100
        await client.close()


async def test_projector_mismatch_fails_with_the_message(tmp_path: Path, write_profile, tiny_vl) -> None:
    import tiny_gguf

    model, _ = tiny_vl
    bad = tiny_gguf.write_tiny_mmproj(tmp_path / "mmproj-wrong.gguf", text_embd=96)
    profile = write_profile(name="mismatch", model=str(model), mmproj=str(bad))
    async with running(tmp_path, profile) as d, httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.machine.state.value == "failed", what="failed")
        st = (await c.get("/status")).json()
        assert st["last_exit"]["cause"] == "model_error"
        assert "mismatch between text model" in st["reason"]
        assert st["restarts"] == 0  # retrying cannot help: no crash loop first
