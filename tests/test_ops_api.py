"""The ops page's HTTP surface against the real daemon and llama-server: files, auth, samples, events, logs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from support import metric, running, wait_for

KEY = {"Authorization": "Bearer sesame"}


async def _sse(c: httpx.AsyncClient, headers: dict[str, str], until: str, params: str = "") -> list[dict]:
    """Read /logs/stream until a line containing `until` arrives; returns the log events seen."""
    seen: list[dict] = []
    async with c.stream("GET", "/logs/stream" + params, headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        event, ident = None, None
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("id: "):
                ident = int(line[4:])
            elif line.startswith("data: ") and event == "log":
                d = json.loads(line[6:])
                assert d["id"] == ident
                seen.append(d)
                if until in d["text"]:
                    return seen
    return seen


async def test_page_files_auth_and_live_data(tmp_path: Path, write_profile) -> None:
    async with running(tmp_path, write_profile(), admin_key="sesame", sample_interval_s=0.5) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        page = await c.get("/ui")
        assert page.status_code == 200 and "<title>llama-supervisor</title>" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]  # no CDN, no inline script
        for asset in ("/ui/static/app.js", "/ui/static/app.css", "/ui/static/vendor/uPlot.iife.min.js"):
            assert (await c.get(asset)).status_code == 200, asset
        assert (await c.get("/ui/static/nope.js")).status_code == 404
        assert (await c.get("/ui/api/auth")).json() == {"required": True, "valid": False}
        assert (await c.get("/ui/api/auth", headers=KEY)).json() == {"required": True, "valid": True}
        for path in ("/ui/api/overview", "/ui/api/events", "/ui/api/samples", "/logs/stream"):
            r = await c.get(path)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", path
        assert (await c.get("/ui/api/samples?window=abc", headers=KEY)).status_code == 400

        tokens = 0
        for _ in range(3):
            r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                             "max_tokens": 16, "ignore_eos": True})
            tokens += r.json()["usage"]["completion_tokens"]

        done = time.time()  # a row read after this has counted every token of the requests above
        for _ in range(200):
            s = (await c.get("/ui/api/samples?window=300", headers=KEY)).json()
            if s["t"] and s["t"][-1] > done:
                break
            await asyncio.sleep(0.1)
        assert s["interval_s"] == 0.5 and s["t"] == sorted(s["t"])
        t, tps = s["t"], s["series"]["completion_tps@test"]
        # Each rate times its row's interval adds up to the counter /metrics shows (a loaded machine stretches
        # the intervals; the rates follow).
        counted = sum((tps[i] or 0) * (t[i] - t[i - 1]) for i in range(1, len(t)))
        assert counted == pytest.approx(tokens, rel=0.05)
        metrics = (await c.get("/metrics", headers=KEY)).text
        assert metric(metrics, "tokens_total", kind="completion") == float(tokens)
        assert "llama_supervisor_process_resident_memory_bytes" in metrics
        assert s["series"]["sup_rss_mb"][-1] > 10 and s["series"]["child_rss_mb@test"][-1] > 1
        later = (await c.get(f"/ui/api/samples?window=300&since={s['t'][-1]}", headers=KEY)).json()
        assert all(t > s["t"][-1] for t in later["t"])

        ov = (await c.get("/ui/api/overview", headers=KEY)).json()
        (m,) = ov["models"]
        assert m["state"] == "ready" and m["profile"]["name"] == "test" and "log_tail" not in m
        assert ov["telemetry"]["sample_bytes"] > 0

        # The child is killed: the timeline gets the exit with its cause, then the way back to ready.
        pid = d.default.runner.child.pid
        os.kill(pid, signal.SIGKILL)
        await wait_for(lambda: d.default.runner.ready and d.default.runner.child is not None and d.default.runner.child.pid != pid,
                       what="back to ready")
        ev = (await c.get("/ui/api/events", headers=KEY)).json()["events"]
        exits = [e for e in ev if e["kind"] == "exit"]
        assert exits and exits[-1]["signal"] == "SIGKILL" and exits[-1]["cause"] == d.default.runner.machine.last_exit.cause
        after_exit = [e["title"] for e in ev if e["id"] > exits[-1]["id"]]
        assert after_exit[-1] == "warming → ready", after_exit
        assert (await c.get("/ui/api/overview", headers=KEY)).json()["models"][0]["exits_by_cause"] == {
            exits[-1]["cause"]: 1}
        assert (await c.get(f"/ui/api/events?after={exits[-1]['id']}", headers=KEY)).json()["events"][0]["id"] > \
            exits[-1]["id"]


async def test_log_stream_through_the_daemon_resumes_with_last_event_id(tmp_path: Path, write_profile) -> None:
    async with running(tmp_path, write_profile()) as d, httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        # llama-server's own startup lines are in the ring (the process's one ring: earlier tests' lines may be
        # there too, so look for this child's address).
        url = d.default.runner.child_url or ""
        first = await _sse(c, {}, url, "?n=1000")
        assert any(ln["source"] == "child" and "listening" in ln["text"] and url in ln["text"] for ln in first)
        assert [ln["id"] for ln in first] == sorted(ln["id"] for ln in first)
        last = first[-1]["id"]
        r = await c.post("/admin/restart")  # the new child prints its lines while no stream is open
        assert r.status_code == 202
        await wait_for(lambda: d.default.runner.ready and d.default.runner.machine.gen == 2, what="restarted")
        new_url = d.default.runner.child_url or ""
        resumed = await _sse(c, {"Last-Event-ID": str(last)}, new_url)
        assert resumed[0]["id"] == last + 1, (f"a resumed stream starts right after the last id it saw: "
                                              f"first ended {[(x['id'], x['text'][:50]) for x in first[-2:]]}, "
                                              f"resumed began {[(x['id'], x['text'][:50]) for x in resumed[:2]]}")
        assert [ln["id"] for ln in resumed] == list(range(last + 1, last + 1 + len(resumed))), "no line missed"
        assert any("listening" in ln["text"] and new_url in ln["text"] for ln in resumed)
        only_child = await _sse(c, {"Last-Event-ID": str(last)}, new_url, "?source=child&level=info")
        assert {ln["source"] for ln in only_child} == {"child"}


async def test_several_models_every_card_and_swaps_in_the_timeline(tmp_path: Path, write_profile) -> None:
    """With profiles_dir the overview lists every model, loaded or not (with its residency), and the timeline
    records the pool's swap steps: a load a request caused, an operator's drain and unload."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    for name in ("alpha", "beta"):
        write_profile(name).rename(profiles / f"{name}.yaml")
    async with running(tmp_path, profiles / "alpha.yaml", profiles_dir=profiles, admin_key="sesame",
                       sample_interval_s=0.5) as d, httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        assert d.pool is not None
        await wait_for(lambda: d.pool.models["alpha"].seen().value == "loaded", what="alpha loaded")  # type: ignore[union-attr]
        ov = (await c.get("/ui/api/overview", headers=KEY)).json()
        cards = {m["profile"]["name"]: m for m in ov["models"]}
        assert set(cards) == {"alpha", "beta"} and ov["supervisor"]["pid"] == os.getpid()
        assert cards["alpha"]["state"] == "ready" and cards["alpha"]["residency"]["default"] is True
        beta = cards["beta"]
        assert (beta["state"], beta["residency"]["state"], beta["child"]) == ("unloaded", "unloaded", None)
        assert beta["settings"]["profile"]["ctx_size"] == 1024 and beta["settings"]["effective"] is None
        assert beta["residency"]["memory"]["estimate"]["host_mib"] > 0 and beta["reason"] == "not loaded yet"

        r = await c.post("/v1/completions", json={"model": "beta", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
        await wait_for(lambda: d.pool.models["beta"].measured is not None, what="beta measured")  # type: ignore[union-attr]
        assert (await c.post("/admin/models/beta/unload", headers=KEY)).status_code == 202
        await wait_for(lambda: d.pool.models["beta"].seen().value == "unloaded", what="beta unloaded")  # type: ignore[union-attr]

        swaps = [(e["model"], e["action"], e["cause"]) for e in
                 (await c.get("/ui/api/events", headers=KEY)).json()["events"] if e["kind"] == "swap"]
        assert swaps == [("alpha", "load", "start"), ("beta", "load", "request"), ("beta", "drain", "admin"),
                         ("beta", "unload", "admin")], swaps
        stops = [(e["title"], e["detail"]) for e in (await c.get("/ui/api/events", headers=KEY)).json()["events"]
                 if e["kind"] == "state" and e["model"] == "beta" and e["dst"] in ("stopping", "stopped")]
        assert stops == [("ready → stopping", "unload (admin)"), ("stopping → stopped", "unload (admin)")], stops
        exits = [e["detail"] for e in (await c.get("/ui/api/events", headers=KEY)).json()["events"]
                 if e["kind"] == "exit" and e["model"] == "beta"]
        assert exits and all("unload (admin)" in x or "stopped by the supervisor" in x for x in exits), exits
        beta = next(m for m in (await c.get("/ui/api/overview", headers=KEY)).json()["models"]
                    if m["profile"]["name"] == "beta")
        assert beta["state"] == "unloaded" and beta["reason"].startswith("unloaded (admin)") and beta["since"]
        assert beta["residency"]["loads"] == 1 and beta["residency"]["memory"]["measured"] is not None

        # Reloads of the folder: one timeline event per model touched, one per rejected file.
        (profiles / "alpha.yaml").write_text((profiles / "alpha.yaml").read_text().replace("threads: 1", "threads: 2"))
        (profiles / "gamma.yaml").write_text("name: gamma\nmodel: 12\n")
        r = await c.post("/admin/reload", headers=KEY)
        assert r.status_code == 422 and r.json()["restarted"] == ["alpha"]
        reloads = [(e["model"], e["title"], e["ok"]) for e in
                   (await c.get("/ui/api/events", headers=KEY)).json()["events"] if e["kind"] == "reload"]
        assert reloads == [("alpha", "reload: restart", True), ("gamma", "reload rejected", False)], reloads
