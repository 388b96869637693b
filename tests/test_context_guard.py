"""The context guard with the real llama-server and the tiny Qwen3-VL pair in a 2048-token slot."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image
from support import metric, running, wait_for

from supervisor.media.images import OMITTED

CTX = 2048


def photo(color: str, w: int = 1024, h: int = 768) -> dict[str, Any]:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="JPEG")
    return {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()}}


def photo_conversation(colors: list[str], last: str = "white") -> list[dict[str, Any]]:
    """A system message, one turn per colour with a 1024×768 photo and an answer, then a last turn with a photo."""
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "You are brief."}]
    for i, c in enumerate(colors):
        msgs += [{"role": "user", "content": [{"type": "text", "text": f"What is in picture {i}?"}, photo(c)]},
                 {"role": "assistant", "content": f"A {c} rectangle."}]
    msgs.append({"role": "user", "content": [{"type": "text", "text": "And this one?"}, photo(last)]})
    return msgs


def trimmed(header: str | None) -> dict[str, int]:
    assert header is not None, "no x-context-trimmed header"
    return {k: int(v) for k, v in (part.split("=") for part in header.split("; "))}


@pytest.fixture
def vl_profile(write_profile, tiny_vl):
    model, mmproj = tiny_vl

    def make(**images: Any) -> Path:
        # keep_last_images off: the guard, not the static policy, decides which photos go.
        return write_profile(name="vl", model=str(model), mmproj=str(mmproj), ctx_size=CTX, parallel=1,
                             images={"keep_last_images": None, **images})

    return make


async def exact_count(child_url: str, body: dict[str, Any]) -> int:
    """What llama-server itself counts for a request, images included."""
    async with httpx.AsyncClient(timeout=120) as direct:
        r = await direct.post(f"{child_url}/v1/chat/completions/input_tokens", json=body)
        return int(r.json()["input_tokens"])


async def test_photos_that_do_not_fit_are_dropped_oldest_first(tmp_path: Path, vl_profile) -> None:
    body = {"messages": photo_conversation(["red", "green", "blue"]), "max_tokens": 8}
    async with running(tmp_path, vl_profile()) as d, httpx.AsyncClient(base_url=d.url, timeout=120) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        child = d.default.runner.child_url or ""
        original = await exact_count(child, body)
        assert original > CTX  # four photos of ~770 tokens: llama-server alone would refuse it

        # The cost of one full-size photo learned at warmup is what llama-server counts for one.
        learned = (await c.get("/status")).json()["context"]
        one = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, photo("red")]}]}
        text_only = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"},
                                                               {"type": "text", "text": ""}]}]}
        real_cost = await exact_count(child, one) - await exact_count(child, text_only)
        assert abs(learned["image_tokens_full_size"] - real_cost) <= 3, (learned, real_cost)
        assert learned["n_ctx_per_slot"] == CTX and learned["slots"] == 1

        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        prompt = r.json()["usage"]["prompt_tokens"]
        assert prompt + 8 <= CTX
        dropped = trimmed(r.headers.get("x-context-trimmed"))
        assert dropped["images"] == 2 and dropped["turns"] == 0  # two of the three old photos were enough
        assert abs(dropped["tokens"] - (original - prompt)) <= 3  # the saving is what llama-server saw
        # Oldest first: the placeholder stands where the red and green photos were, the blue one is still sent.
        sent = json.loads(json.dumps(body))
        for i in (1, 3):
            sent["messages"][i]["content"][1] = {"type": "text", "text": OMITTED}
        assert await exact_count(child, sent) == prompt

        text = (await c.get("/metrics")).text
        assert metric(text, "images_dropped_total") == 2
        assert metric(text, "turns_dropped_total") == 0
        assert metric(text, "context_tokens_saved_total") == dropped["tokens"]
        assert metric(text, "context_checks_total", outcome="trimmed") == 1

        # Streaming: the same decision, the header on the stream's response.
        async with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True,
                                                                   "stream_options": {"include_usage": True}}) as s:
            assert s.status_code == 200
            assert trimmed(s.headers.get("x-context-trimmed")) == dropped
            chunks = [json.loads(line[6:]) for line in [x async for x in s.aiter_lines()]
                      if line.startswith("data: {")]
        usage = [ch["usage"] for ch in chunks if ch.get("usage")]
        assert usage and usage[-1]["prompt_tokens"] == prompt
        assert metric((await c.get("/metrics")).text, "images_dropped_total") == 4


async def test_old_turns_go_after_the_photos_and_a_last_turn_too_big_is_a_400(tmp_path: Path, vl_profile) -> None:
    chatter = "tell me more about the picture, with all the details you can see " * 6
    msgs = photo_conversation(["red"])
    msgs[-1:-1] = [m for i in range(4) for m in ({"role": "user", "content": f"{i}: {chatter}"},
                                                 {"role": "assistant", "content": chatter})]
    body = {"messages": msgs, "max_tokens": 16}
    async with running(tmp_path, vl_profile()) as d, httpx.AsyncClient(base_url=d.url, timeout=120) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        dropped = trimmed(r.headers.get("x-context-trimmed"))
        assert dropped["images"] == 0  # the red photo's turn went whole, with its photo
        assert dropped["turns"] >= 2 and dropped["messages"] == 2 * dropped["turns"]
        assert r.json()["usage"]["prompt_tokens"] + 16 <= CTX
        text = (await c.get("/metrics")).text
        assert metric(text, "turns_dropped_total") == dropped["turns"]

        # Just over the limit, inside the estimate's margin: the exact count decides, and one old turn goes.
        def near(n: int) -> list[dict[str, Any]]:  # n: one token per step ("z" merges with nothing)
            return [{"role": "system", "content": "You are brief."}] + [
                m for i in range(3) for m in ({"role": "user", "content": f"{i}: " + "a b c d " * 40 + "z" * n},
                                              {"role": "assistant", "content": "e f g h " * 40})] + [
                {"role": "user", "content": "go on"}]
        child, lo, hi = d.default.runner.child_url or "", 0, 2000
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if await exact_count(child, {"messages": near(mid)}) <= CTX - 16 + 8 else (lo, mid - 1)
        over = {"messages": near(lo), "max_tokens": 16}
        assert CTX - 16 < await exact_count(child, over)
        r = await c.post("/v1/chat/completions", json=over)
        assert r.status_code == 200, r.text
        assert trimmed(r.headers.get("x-context-trimmed"))["turns"] == 1
        assert r.json()["usage"]["prompt_tokens"] + 16 <= CTX

        # Three photos in the last turn alone: nothing may be dropped from it, so the answer is a 400 with numbers.
        alone = {"messages": [{"role": "system", "content": "You are brief."},
                              {"role": "user", "content": [{"type": "text", "text": "Compare."}, photo("red"),
                                                           photo("green"), photo("blue")]}], "max_tokens": 100}
        r = await c.post("/v1/chat/completions", json=alone)
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["code"] == 400
        needed = await exact_count(d.default.runner.child_url or "", alone)
        m = re.search(r"needs (\d+) tokens \((\d+) for the prompt with the system messages \+ 100 kept for the "
                      rf"reply\) but profile 'vl' allows {CTX} per slot \(ctx_size {CTX}\)", err["message"])
        assert m, err["message"]
        assert int(m.group(1)) == int(m.group(2)) + 100 and abs(int(m.group(2)) - needed) <= 3
        assert metric((await c.get("/metrics")).text, "context_checks_total", outcome="rejected") == 1
        assert d.default.runner.ready and d.default.runner.machine.restarts == 0


async def test_feature_off_keeps_llama_servers_own_answer_and_a_reload_turns_it_on(tmp_path: Path,
                                                                                  vl_profile) -> None:
    body = {"messages": photo_conversation(["red", "green", "blue"]), "max_tokens": 8}
    profile = vl_profile(fit_context=False)
    async with running(tmp_path, profile) as d, httpx.AsyncClient(base_url=d.url, timeout=120) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        assert (await c.get("/status")).json()["context"] is None  # nothing learned, nothing asked at warmup
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and "x-context-trimmed" not in r.headers
        err = r.json()["error"]
        assert err["type"] == "exceed_context_size_error" and f"ctx_size {CTX}" in err["message"]
        text = (await c.get("/metrics")).text
        assert metric(text, "images_dropped_total") == 0 and "context_checks_total{" not in text

        # Turned on by a reload (no restart: nothing llama-server sees changed): the guard learns on first use.
        pid = d.default.runner.child.pid if d.default.runner.child else None
        data = yaml.safe_load(profile.read_text())
        profile.write_text(yaml.safe_dump({**data, "images": {**data["images"], "fit_context": True}}))
        assert (await c.post("/admin/reload")).status_code == 200
        await wait_for(lambda: d.default.runner.loaded.profile.images.fit_context is True, what="reloaded")
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert trimmed(r.headers.get("x-context-trimmed"))["images"] == 2
        assert d.default.runner.child is not None and d.default.runner.child.pid == pid
        assert (await c.get("/status")).json()["context"]["n_ctx_per_slot"] == CTX


def test_apply_plan_and_what_is_counted_as_text() -> None:
    from supervisor.web.guard.context import apply_plan, message_text, requested_reply, strip_images

    img = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    msgs = [{"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, img, {"type": "text", "text": "b"}, img]},
            {"role": "assistant", "content": "ok", "tool_calls": [{"id": "1"}]},
            {"role": "user", "content": "last"}]
    out = apply_plan(msgs, ((1, 1),), ())
    assert out[1]["content"][3] == {"type": "text", "text": OMITTED} and out[1]["content"][1] == img
    assert msgs[1]["content"][3] == img  # the client's document is not changed in place
    assert apply_plan(msgs, (), (1, 2)) == [msgs[0], msgs[3]]
    assert [p["type"] for p in strip_images(msgs)[1]["content"]] == ["text"] * 4
    assert message_text(msgs[1]) == "ab"
    assert message_text(msgs[2]) == 'ok[{"id": "1"}]'
    assert requested_reply({"max_tokens": 5}) == 5 and requested_reply({"n_predict": 7}) == 7
    assert requested_reply({"max_completion_tokens": 3, "max_tokens": 5}) == 3
    assert requested_reply({"max_tokens": True}) is None and requested_reply({}) is None
