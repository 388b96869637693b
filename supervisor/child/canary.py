"""The upgrade canary, carried out: the golden set sent to a running llama-server, and a candidate build started
on a port of its own, warmed up, asked the golden set, measured and stopped.

The decisions (what to ask, what counts as as-good-as, whether the candidate fits beside the old child) are
core/canary.py's; this module only talks to processes. A candidate never touches the model's own runner:
it is a separate llama-server, so the old child keeps serving while the candidate is tried beside it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import psutil
import structlog

from ..core import canary
from ..core.answers import answer_from_json, answer_from_stream, best_of
from ..core.canary import Answer, Golden, Measured
from ..core.command import CommandError, build_argv, child_env, redact
from ..core.ladder import RunSettings
from ..core.residency import Mem
from ..host import gpu
from ..spec.loaded import Loaded, check
from ..spec.profile import ImagePolicy, ProfileError
from .driver import free_port
from .process import Child, spawn
from .readiness import NotReady, wait_healthy, warmup, warmup_image

log = structlog.get_logger("canary")
# One of the serving child's upstream slots, held while the canary's own request goes to it (web/api's gate).
Slot = Callable[[], contextlib.AbstractAsyncContextManager[None]]
Recheck = Callable[[Measured, Measured], bool]  # (old, candidate) → measure the speed once more
# The lines of a failed child's output that say why (llama-server's own words), most telling first.
_TELLING = re.compile(r"error|invalid|not supported|unknown|failed|abort|assert", re.I)


@dataclass(frozen=True)
class Timing:
    """How patient the canary is (the supervisor's own readiness settings) and how often it repeats the text
    request to measure speed (the best run counts: noise on a busy box only ever slows a run down)."""

    load_stall_s: float = 120.0
    load_max_s: float = 1800.0
    request_timeout_s: float = 120.0
    stop_timeout_s: float = 10.0
    speed_runs: int = 5


async def prepare(loaded: Loaded, binary: str) -> Loaded | str:
    """The profile with its binary replaced by the candidate's, checked as every profile is (the flags it needs
    are there, Metal when asked for); a str says why the candidate is refused before it ever runs."""
    profile = loaded.profile.model_copy(update={"binary": binary})
    try:
        return await asyncio.to_thread(check, loaded.path, profile)
    except ProfileError as exc:
        return "flags: " + "; ".join(f"{field}: {msg}" if field else msg for field, msg in exc.problems)


async def golden_for(policy: ImagePolicy | None) -> list[Golden]:
    """The golden set for a profile: with an image (the size its warmup uses) when it has a projector."""
    if policy is None:
        return canary.golden_set(None)
    jpeg = await asyncio.to_thread(warmup_image, policy)
    return canary.golden_set("data:image/jpeg;base64," + base64.b64encode(jpeg).decode())


async def ask(http: httpx.AsyncClient, url: str, g: Golden, timeout_s: float) -> Answer:
    """One golden request; a transport failure is an answer too (status 0, the error)."""
    t0 = time.monotonic()
    try:
        if not g.stream:
            r = await http.post(url + g.path, json=g.body, timeout=timeout_s)
            try:
                doc = r.json()
            except ValueError:
                doc = r.text[:300]
            return answer_from_json(g.name, r.status_code, doc, time.monotonic() - t0)
        events: list[object] = []
        async with http.stream("POST", url + g.path, json=g.body, timeout=timeout_s) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode("utf-8", "replace")
                return answer_from_stream(g.name, r.status_code, [_parse(body)], 0.0)
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    payload = line[6:]
                    events.append(payload if payload.strip() == "[DONE]" else _parse(payload))
        return answer_from_stream(g.name, 200, events, time.monotonic() - t0)
    except httpx.HTTPError as exc:
        return Answer(g.name, 0, error=f"{type(exc).__name__}: {exc}"[:300])


def _parse(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text


async def run_golden(http: httpx.AsyncClient, urls: list[str], golden: list[Golden], timing: Timing,
                     slot: Slot | None = None) -> list[tuple[Answer, ...]]:
    """The golden set against each child in `urls`, request by request in turn (old, new, old, new...): two
    builds measured side by side meet the same load from the box, so their speeds compare fairly. `slot` is
    held around each request to the first (the serving child, whose proxy counts what reaches it)."""
    runs: list[dict[str, list[Answer]]] = [{} for _ in urls]
    for g in golden:
        for _ in range(timing.speed_runs if g.name == "text" else 1):
            for i, url in enumerate(urls):
                async with slot() if slot is not None and i == 0 else contextlib.nullcontext():
                    runs[i].setdefault(g.name, []).append(await ask(http, url, g, timing.request_timeout_s))
    return [tuple(best_of(r[g.name]) for g in golden) for r in runs]


async def again(http: httpx.AsyncClient, urls: list[str], golden: list[Golden], timing: Timing,
                answers: list[tuple[Answer, ...]], slot: Slot | None = None) -> list[tuple[Answer, ...]]:
    """A second round of the text request (its speed looked too low): each child's best of both rounds."""
    text = [g for g in golden if g.name == "text"]
    more = await run_golden(http, urls, text, timing, slot)
    return [tuple(best_of([a, m[0]]) if a.name == "text" else a for a in before)
            for before, m in zip(answers, more, strict=True)]


@dataclass(frozen=True)
class Running:
    """The old child, serving: measured beside the candidate, each request within one of its proxy's slots."""

    url: str
    pid: int
    label: str
    slot: Slot | None = None


def memory_of(pid: int) -> Mem | None:
    """What a child and the processes it started hold (a wrapper script may keep the real server as its child):
    RSS and NVML's per-process VRAM, summed over the tree. Blocking."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    pids = {p.pid for p in procs}
    rss = 0.0
    for p in procs:
        try:
            rss += p.memory_info().rss / 2**20
        except psutil.Error:
            continue
    per_gpu = [sum(m for q, m in g.processes if q in pids) for g in gpu.snapshot()]
    while per_gpu and per_gpu[-1] == 0:
        per_gpu.pop()
    return Mem(tuple(round(x, 1) for x in per_gpu), round(rss, 1))


async def measure_running(http: httpx.AsyncClient, url: str, pid: int, label: str, golden: list[Golden],
                          timing: Timing, slot: Slot | None = None) -> Measured:
    """The golden set against a child that is already up (the old build, serving), then its memory."""
    (answers,) = await run_golden(http, [url], golden, timing, slot)
    return Measured(label, "", answers, await asyncio.to_thread(memory_of, pid))


def telling_line(tail: list[str]) -> str:
    """The line of a failed child's output that says why: the last telling one, else the last one."""
    for line in reversed(tail):
        if _TELLING.search(line):
            return line.strip()[:300]
    return tail[-1].strip()[:300] if tail else ""


async def try_candidate(loaded: Loaded, settings: RunSettings, label: str, golden: list[Golden], timing: Timing,
                        http: httpx.AsyncClient, beside: Running | None = None,
                        recheck: Recheck | None = None) -> tuple[Measured, Measured | None]:
    """Start the candidate build (its own free port, the settings the old child runs with), warm it up as the
    runner would, ask it the golden set, measure it, and stop it, whatever happened. With `beside`, the old
    child answers the golden set in turn with the candidate: (candidate, old); the old is None when the
    candidate never got to the golden set."""
    p = loaded.profile
    port = free_port()
    try:
        argv = build_argv(p, loaded.caps, settings, port)
    except CommandError as exc:
        return Measured(label, f"flags: {exc}"), None
    log.info("canary_spawn", argv=redact(argv))
    try:
        child = await spawn(argv, child_env(os.environ, p), echo=False)
    except (OSError, ValueError) as exc:
        return Measured(label, f"cannot start {argv[0]}: {exc}"), None
    url = f"http://127.0.0.1:{port}"
    try:
        return await _exercise(child, url, loaded, label, golden, timing, http, beside, recheck)
    finally:
        await child.stop(timing.stop_timeout_s)


async def _exercise(child: Child, url: str, loaded: Loaded, label: str, golden: list[Golden], timing: Timing,
                    http: httpx.AsyncClient, beside: Running | None, recheck: Recheck | None
                    ) -> tuple[Measured, Measured | None]:
    p = loaded.profile
    try:
        await wait_healthy(http, url, child, stall_s=timing.load_stall_s, max_s=timing.load_max_s)
    except NotReady as exc:
        await _settle(child)
        return Measured(label, f"load: {exc}" + _because(child)), None
    try:
        await warmup(http, url, image=p.images if p.mmproj is not None else None, timeout_s=timing.request_timeout_s)
    except NotReady as exc:
        await _settle(child)
        return Measured(label, f"warmup: {exc}" + _because(child)), None
    urls = [beside.url, url] if beside is not None else [url]
    slot = beside.slot if beside is not None else None
    answers = await run_golden(http, urls, golden, timing, slot)
    if beside is not None and recheck is not None and recheck(Measured(beside.label, "", answers[0]),
                                                              Measured(label, "", answers[-1])):
        answers = await again(http, urls, golden, timing, answers, slot)
    old = None
    if beside is not None:
        old = Measured(beside.label, "", answers[0], await asyncio.to_thread(memory_of, beside.pid))
    if child.returncode is not None or not await _alive(http, url):
        await _settle(child)
        why = f"exited with code {child.returncode} during the golden set" + _because(child)
        return Measured(label, why, answers[-1]), old
    return Measured(label, "", answers[-1], await asyncio.to_thread(memory_of, child.pid)), old


async def _alive(http: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await http.get(f"{url}/health", timeout=5.0)).status_code == 200
    except httpx.HTTPError:
        return False


async def _settle(child: Child) -> None:
    """A child that is going away: give it a moment to finish printing why."""
    if child.returncode is None:
        try:
            await asyncio.wait_for(child.wait(), 1.0)
        except TimeoutError:
            return


def _because(child: Child) -> str:
    """Why a child that exited did, in its own words (a live one's log says nothing the answer did not)."""
    if child.returncode is None:
        return ""
    line = telling_line(list(child.tail))
    return f" ({line})" if line else ""
