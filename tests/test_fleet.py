"""Three supervisors behind a real HAProxy (the shipped deploy/haproxy/haproxy.cfg), under steady load.

While streaming and non-streaming clients keep going through HAProxy: two slots of one box are taken by
traffic HAProxy cannot see (the agent's weight must steer new work away), one child is SIGKILLed, one
supervisor gets SIGTERM and is started again, and one profile is edited so its child restarts. Every
request must be answered 200, every stream must end complete, and nothing may be left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from fleet_support import (
    ADMIN_READY,
    OP_RUNNING,
    PROMPT,
    Box,
    HAProxy,
    Result,
    haproxy_binary,
    load_client,
    stop_fleet,
)

pytestmark = pytest.mark.integration


def _profile(path: Path, binary: str, vl: tuple[Path, Path], **extra: object) -> Path:
    data = {"name": path.stem, "binary": binary, "model": str(vl[0]), "mmproj": str(vl[1]), "n_gpu_layers": 0,
            "ctx_size": 4096, "cache_ram_mib": 0, "threads": 1, "parallel": 2,
            # a small warmup image: three boxes warm up at once on a small machine
            "images": {"max_long_side": 256, "max_short_side": 192}}
    data.update(extra)
    path.write_text(yaml.safe_dump(data))
    return path


async def _until(what: str, check: Callable[[], Awaitable[bool]], timeout: float = 30.0, every: float = 0.05) -> float:
    """Seconds until `check` holds."""
    t0 = time.monotonic()
    while not await check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(every)
    return time.monotonic() - t0


async def _healthy(client: httpx.AsyncClient, box: Box) -> bool:
    try:
        return (await client.get(f"{box.url}/health", timeout=2)).status_code == 200
    except httpx.HTTPError:
        return False


async def _new_child(admin: httpx.AsyncClient, box: Box, old_pid: int) -> bool:
    st = await box.status(admin)
    return st["state"] == "ready" and bool(st.get("child")) and int(st["child"]["pid"]) != old_pid


async def _kill_between_streams(admin: httpx.AsyncClient, box: Box) -> float:
    """SIGKILL the box's child at a moment no request is inside its proxy. Race-free: the child is frozen
    (SIGSTOP) first, so a request arriving after the check cannot have had an answer yet; it is in flight to a
    frozen child when the SIGKILL lands, and must be held and sent again to the next child."""
    pid = int((await box.status(admin))["child"]["pid"])
    while True:
        if (await box.status(admin))["requests"]["in_flight"] == 0:
            os.kill(pid, signal.SIGSTOP)
            if (await box.status(admin))["requests"]["in_flight"] == 0:
                os.kill(pid, signal.SIGKILL)
                return time.monotonic()
            os.kill(pid, signal.SIGCONT)  # a request got in between: it may be streaming already
        await asyncio.sleep(0.002)


async def test_fleet_behind_haproxy(tmp_path: Path, llama_server: str, tiny_vl: tuple[Path, Path]) -> None:
    binary = haproxy_binary()
    env = {**os.environ, "LLAMA_SUPERVISOR_STATE_DIR": str(tmp_path / "state"),
           "LLAMA_SUPERVISOR_DRAIN_NOTICE_S": "2", "LLAMA_SUPERVISOR_LOG_CHILD_OUTPUT": "false"}
    env.pop("LLAMA_SUPERVISOR_CONFIG", None)
    boxes = [Box(f"box{i}", _profile(tmp_path / f"box{i}.yaml", llama_server, tiny_vl), env) for i in (1, 2, 3)]
    haproxy: HAProxy | None = None
    stop = asyncio.Event()
    results: list[Result] = []
    load: list[asyncio.Task[None]] = []
    try:
        async with asyncio.timeout(240), httpx.AsyncClient() as admin:
            await asyncio.gather(*(asyncio.to_thread(b.start) for b in boxes))
            for b in boxes:
                await _until(f"{b.name} ready", lambda b=b: _healthy(admin, b), 60)
                await b.status(admin)
            haproxy = HAProxy(binary, tmp_path, boxes)

            async def serving(name: str) -> bool:
                st = (await haproxy.servers()).get(name)
                return st is not None and st[0] == OP_RUNNING and st[1] == ADMIN_READY

            async def out_of_pool(name: str) -> bool:
                return not await serving(name)

            for b in boxes:
                await _until(f"HAProxy sees {b.name} up", lambda b=b: serving(b.name), 20)

            # Steady load through HAProxy: three streaming clients and two that wait for the whole answer.
            load_from = time.monotonic()
            load = [asyncio.ensure_future(load_client(haproxy.url, s, stop, results)) for s in (True, True, True, False, False)]
            await asyncio.sleep(3)

            # 1. Two slots of box1 taken by traffic HAProxy cannot see: its agent weight must send new work
            #    to the boxes with free slots.
            busy_from = time.monotonic()
            busy_stop = asyncio.Event()

            async def hog() -> None:
                async with httpx.AsyncClient(timeout=60) as c:
                    while not busy_stop.is_set():
                        await c.post(f"{boxes[0].url}/v1/chat/completions",
                                     json={"messages": PROMPT, "max_tokens": 1500, "ignore_eos": True})

            hogs = [asyncio.ensure_future(hog()) for _ in range(2)]
            weights_seen: list[int] = []
            t_end = time.monotonic() + 5
            while time.monotonic() < t_end:
                weights_seen.append((await haproxy.servers())["box1"][2])
                await asyncio.sleep(0.2)
            busy_window = (busy_from + 1.5, time.monotonic())  # after one agent-inter plus a margin
            busy_stop.set()
            await asyncio.gather(*hogs)
            await asyncio.sleep(1.5)

            # 2. SIGKILL box1's llama-server while no stream is flowing from it (the tokens of a stream already
            #    flowing from a child that dies cannot be taken back by anyone: docs/fleet.md).
            killed_pid = int((await boxes[0].status(admin))["child"]["pid"])
            kill_at = await _kill_between_streams(admin, boxes[0])
            # HAProxy takes box1 out when its agent (every second) or health check sees the restart. On a quiet
            # machine the next child can be ready before either looks (P4: ~0.1 s), and then box1 never leaves:
            # both are fine, as long as a new child serves and no client saw a failure (asserted below).
            kill_out_s: float | None = None
            with contextlib.suppress(AssertionError):
                kill_out_s = await _until("box1 out of the pool", lambda: out_of_pool("box1"), 3, every=0.02)
            kill_back_s = await _until("box1 back in the pool", lambda: serving("box1"), 30, every=0.02)
            kill_back_s += kill_out_s or 0.0
            await _until("box1 serving from a new child",
                         lambda: _new_child(admin, boxes[0], killed_pid), 30, every=0.05)

            # 3. SIGTERM box2's supervisor: it leaves the pool (agent drain, /health 503) before it stops
            #    accepting; then it is started again on the same ports and rejoins.
            t_term = time.monotonic()
            boxes[1].signal(signal.SIGTERM)
            leave_s = await _until("box2 out of the pool", lambda: out_of_pool("box2"), 10, every=0.02)
            assert await asyncio.to_thread(boxes[1].proc.wait, 30) == 0  # type: ignore[union-attr]
            gone_at = time.monotonic()
            t_start = time.monotonic()
            await asyncio.to_thread(boxes[1].start)
            rejoin_s = await _until("box2 back in the pool", lambda: serving("box2"), 60, every=0.02)
            # From the moment HAProxy was seen to take box2 out until the last poll that still saw it out.
            box2_away = (t_term + leave_s, t_start + rejoin_s - 0.1)
            await boxes[1].status(admin)

            # 4. Edit box3's profile (a change that reaches llama-server's command line): drain, restart.
            _profile(boxes[2].profile, llama_server, tiny_vl, ctx_size=2048)
            reload_leave_s = await _until("box3 out of the pool", lambda: out_of_pool("box3"), 20, every=0.02)
            reload_back_s = await _until("box3 back in the pool", lambda: serving("box3"), 60, every=0.02)
            st3 = await boxes[2].status(admin)
            assert "--ctx-size" in st3["argv"] and st3["argv"][st3["argv"].index("--ctx-size") + 1] == "2048"

            await asyncio.sleep(2)
            stopped_at = time.monotonic()
            stop.set()
            await asyncio.gather(*load)
    finally:
        await stop_fleet(stop, load, boxes, haproxy)

    # ---- what the clients saw ----------------------------------------------------------------------
    per_box = Counter(r.box for r in results)
    failures = [r for r in results if not (r.status == 200 and r.complete)]
    busy = Counter(r.box for r in results if busy_window[0] <= r.sent <= busy_window[1])
    away = Counter(r.box for r in results if box2_away[0] <= r.sent <= box2_away[1])
    report = {
        "requests": len(results), "streams": sum(r.stream for r in results), "failures": len(failures),
        "per_box": dict(per_box), "while_box1_slots_busy": dict(busy), "box1_weights_seen": weights_seen,
        "while_box2_away": dict(away), "box2_leave_s": round(leave_s, 3), "box2_exit_after_sigterm_s":
        round(gone_at - t_term, 3), "box2_rejoin_after_start_s": round(rejoin_s, 3),
        "box3_leave_after_edit_s": round(reload_leave_s, 3), "box3_back_s": round(reload_back_s, 3),
        "box1_kill_out_s": None if kill_out_s is None else round(kill_out_s, 3), "box1_kill_to_back_s": round(kill_back_s, 3),
    }
    print("fleet:", json.dumps(report))
    out = Path(os.environ.get("FLEET_REPORT", tmp_path / "fleet.json"))
    await asyncio.to_thread(out.write_text, json.dumps(report, indent=1))
    moments = {"load": load_from, "kill": kill_at, "sigterm": t_term, "box2 start": t_start}
    assert not failures, f"{len(failures)} client-visible failures, e.g. {failures[:5]}, at {moments}\n" + "".join(
        haproxy.log[-20:] if haproxy else [])
    assert len(results) > 100 and set(per_box) == {"box1", "box2", "box3"}, report
    # Slot-aware: with both of box1's slots busy, its agent weight fell to the floor and new work went
    # to the boxes with free slots.
    assert min(weights_seen) <= 1, report
    assert busy["box1"] * 5 < busy["box2"] + busy["box3"], report
    # The drain came first: HAProxy took box2 out before it stopped accepting (drain_notice_s = 2).
    assert leave_s < 2.0, report
    # While box2 was away (from the moment HAProxy took it out until it was back), nothing was sent there.
    assert away["box2"] == 0 and away["box1"] + away["box3"] > 0, report
    assert load_from < kill_at and stopped_at - kill_at > 5  # the kill happened while the load ran
    # Nothing left running: supervisors, every llama-server they started, HAProxy.
    for b in boxes:
        assert b.proc is not None and b.proc.returncode == 0, f"{b.name} exited {b.proc and b.proc.returncode}"
        for pid in b.child_pids:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
    assert haproxy is not None and haproxy.proc.returncode is not None
