"""Image preprocessing and the context policy, as units (no server)."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from supervisor.core.ladder import RunSettings
from supervisor.core.lifecycle import initial
from supervisor.media import policy as media
from supervisor.media.images import OMITTED, ImageError, decode_base64, process_image, rewrite_chat
from supervisor.spec.profile import ImagePolicy, load_profile
from supervisor.web.api.predict import chat_to_predict, predict_to_chat
from supervisor.web.api.relay import context_hint

POLICY = ImagePolicy()


def encode(img: Image.Image, fmt: str = "JPEG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def test_big_photo_is_downscaled_keeping_aspect() -> None:
    out, mime, changed, size = process_image(encode(Image.new("RGB", (4000, 3000), "red")), POLICY, "x")
    assert changed and mime == "image/jpeg"
    assert Image.open(io.BytesIO(out)).size == size == (1024, 768)


def test_short_side_limit_applies_to_portrait() -> None:
    out, _, _, size = process_image(encode(Image.new("RGB", (900, 2400), "red")), POLICY, "x")
    assert Image.open(io.BytesIO(out)).size == size == (384, 1024)  # long side bound wins here


def test_small_image_is_untouched() -> None:
    data = encode(Image.new("RGB", (640, 480), "blue"))
    assert process_image(data, POLICY, "x") == (data, "image/jpeg", False, (640, 480))


def test_exif_rotation_is_applied() -> None:
    img = Image.new("RGB", (2000, 1000), "green")
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    out, _, changed, size = process_image(encode(img, exif=exif), POLICY, "x")
    result = Image.open(io.BytesIO(out))
    assert changed and result.size == size == (512, 1024)  # upright: portrait now
    assert result.getexif().get(0x0112, 1) == 1


def test_alpha_stays_png() -> None:
    out, mime, changed, _ = process_image(encode(Image.new("RGBA", (3000, 2000), (1, 2, 3, 100)), "PNG"), POLICY,
                                          "x")
    assert changed and mime == "image/png" and Image.open(io.BytesIO(out)).mode == "RGBA"


@pytest.mark.parametrize(
    ("data", "status", "fragment"),
    [
        (b"not an image at all", 400, "not a valid image"),
        (encode(Image.new("RGB", (8, 8)), "ICO"), 400, "unsupported image format ICO"),
        (b"\xff" * (2 * 1024 * 1024), 413, "over the limit"),
    ],
)
def test_bad_images(data: bytes, status: int, fragment: str) -> None:
    with pytest.raises(ImageError) as exc:
        process_image(data, ImagePolicy(max_image_bytes=1024 * 1024), "messages[0].content[1]")
    assert exc.value.status == status and fragment in exc.value.message
    assert exc.value.message.startswith("messages[0].content[1]")


def test_urls() -> None:
    assert decode_base64("data:image/png;base64,aGVsbG8=", "w") == b"hello"
    assert decode_base64("aGVsbG8", "w") == b"hello"  # raw base64, padding forgiven
    media.check_remote("https://cdn.example/a.png", "w", frozenset({"cdn.example"}))
    for url in ("http://169.254.169.254/latest", "https://cdn.example@evil.example/a.png",
                "http://evil.example\\@cdn.example/", "http://cdn.example.evil.example/", "https://user@cdn.example/"):
        with pytest.raises(ImageError, match="remote image URLs are not allowed"):
            media.check_remote(url, "w", frozenset({"cdn.example"}))
    with pytest.raises(ImageError, match="not valid base64"):
        decode_base64("data:image/png;base64,@@@###", "w")
    with pytest.raises(ImageError, match="scheme 'file'"):
        decode_base64("file:///etc/passwd", "w")
    # what llama-server itself would fetch: anything that starts with "http", and file:// URLs
    assert all(media.is_remote(u) for u in ("http://x", "https://x", "httpx", "HTTP://X", "file:///etc/passwd"))
    assert not any(media.is_remote(u) for u in ("data:image/png;base64,AAAA", "aGVsbG8="))


def _chat(n_images: int, turns: int = 1) -> dict:
    small = data_uri(encode(Image.new("RGB", (32, 32), "red")))
    msgs: list[dict] = [{"role": "system", "content": "be brief"}]
    for t in range(turns):
        parts = [{"type": "text", "text": f"turn {t}"}]
        parts += [{"type": "image_url", "image_url": {"url": small}} for _ in range(n_images)]
        msgs += [{"role": "user", "content": parts}, {"role": "assistant", "content": "ok"}]
    return {"messages": msgs}


def test_keep_last_images() -> None:
    new, stats = rewrite_chat(_chat(2, turns=3), ImagePolicy(keep_last_images=3))
    assert new is not None and stats.dropped == 3
    texts = [p for m in new["messages"] if isinstance(m["content"], list) for p in m["content"]]
    assert sum(p.get("text") == OMITTED for p in texts) == 3
    assert sum(p["type"] == "image_url" for p in texts) == 3
    found = media.find(new)
    assert found.images == 3  # what stays goes through the media policy
    stats = media.apply(found, POLICY, frozenset(), 40_000_000)
    assert stats.sizes == [(32, 32)] * 3  # the images left, in order: the context guard costs them


def test_keep_last_turns_keeps_system() -> None:
    new, _ = rewrite_chat(_chat(0, turns=4), ImagePolicy(keep_last_turns=2))
    assert new is not None and [m["role"] for m in new["messages"]] == ["system", "user", "assistant", "user",
                                                                          "assistant"]
    assert new["messages"][1]["content"][0]["text"] == "turn 2"


def test_nothing_to_do_returns_none() -> None:
    assert rewrite_chat(_chat(1), POLICY)[0] is None


def test_error_names_message_and_part() -> None:
    doc = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "user", "content": [{"type": "text", "text": "x"},
                                                     {"type": "image_url", "image_url": {"url": "data:;base64,!!"}}]}]}
    with pytest.raises(ImageError) as exc:
        media.apply(media.find(doc), POLICY, frozenset(), 40_000_000)
    assert exc.value.message.startswith("messages[1].content[1]:")


def test_predict_translation() -> None:
    chat = predict_to_chat({"prompt": "what is it?", "images": ["aGVsbG8="], "max_tokens": 5})
    assert chat["messages"][0]["content"][1]["image_url"]["url"] == "data:image/jpeg;base64,aGVsbG8="
    assert chat["max_tokens"] == 5 and chat["stream"] is False
    with pytest.raises(ImageError):
        predict_to_chat({"images": []})
    resp = {"choices": [{"message": {"content": "a cat"}, "finish_reason": "stop"}], "model": "m", "usage": {}}
    assert chat_to_predict(resp) == {"response": "a cat", "finish_reason": "stop", "model": "m", "usage": {}}


def test_context_hint_names_the_size_in_force_and_the_knobs(write_profile) -> None:
    answer = json.dumps({"error": {"code": 400, "message": "request (3018 tokens) exceeds the available context size "
                                   "(1024 tokens), try increasing it", "type": "exceed_context_size_error",
                                   "n_prompt_tokens": 3018, "n_ctx": 1024}}).encode()
    profile = load_profile(write_profile(name="vl", ctx_size=8192, parallel=1, images={"keep_last_turns": 4}))
    lowered = initial(RunSettings(99, 8192), RunSettings(0, 4096), "context: halved after oom_load")
    err = json.loads(context_hint(answer, profile, lowered))["error"]
    assert err["message"] == (
        "request (3018 tokens) exceeds the available context size (1024 tokens), try increasing it. Profile 'vl' runs "
        "with ctx_size 4096 (lowered from 8192: context: halved after oom_load); the proxy keeps the last 3 images and "
        "the last 4 turns: shorten the conversation, or raise ctx_size in the profile")
    assert err["n_ctx"] == 1024 and err["type"] == "exceed_context_size_error"  # the rest is llama-server's, intact
    assert context_hint(b"not json", profile, lowered) == b"not json"
