"""The rolling upgrade (deploy/rolling-upgrade.py) across three supervisors behind the real HAProxy (the shipped
deploy/haproxy/haproxy.cfg), under steady load: a good build goes to every box, one box at a time, with no
client-visible failure; a bad build stops at the first box, which keeps serving on its last good build, and the
boxes after it are not touched."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from doubles.bad_builds import write_build
from fleet_support import ADMIN_READY, OP_RUNNING, ROOT, Box, HAProxy, Result, haproxy_binary, load_client, stop_fleet

pytestmark = pytest.mark.integration
SCRIPT = ROOT / "deploy" / "rolling-upgrade.py"


def _profile(path: Path, binary: str, model: Path) -> Path:
    path.write_text(yaml.safe_dump({"name": path.stem, "binary": binary, "model": str(model), "n_gpu_layers": 0,
                                    "ctx_size": 1024, "min_ctx_size": 256, "cache_ram_mib": 0, "threads": 1,
                                    "parallel": 2}))
    return path


async def _rollout(binary: Path, haproxy: HAProxy, boxes: list[Box]) -> tuple[int, str]:
    cmd = [sys.executable, str(SCRIPT), "--binary", str(binary), "--haproxy-socket", str(haproxy.stats),
           "--notice-s", "2", "--drain-s", "20", "--ready-s", "60", *[b.url for b in boxes]]
    out = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=300, check=False)
    return out.returncode, out.stdout + out.stderr


async def _builds(client: httpx.AsyncClient, box: Box) -> dict:
    return (await box.status(client)).get("builds") or {}


@pytest.mark.timeout(400)
async def test_rolling_upgrade_behind_haproxy(tmp_path: Path, llama_server: str, tiny_model: Path) -> None:
    env = {**os.environ, "LLAMA_SUPERVISOR_DRAIN_NOTICE_S": "2", "LLAMA_SUPERVISOR_LOG_CHILD_OUTPUT": "false",
           # tests/test_upgrade_daemon.py says why 0.8 (this machine's noise); the bad build below fails outright.
           "LLAMA_SUPERVISOR_UPGRADE_MAX_SLOWDOWN": "0.8", "LLAMA_SUPERVISOR_UPGRADE_PROBATION_S": "5"}
    env.pop("LLAMA_SUPERVISOR_CONFIG", None)
    boxes = [Box(f"box{i}", _profile(tmp_path / f"box{i}.yaml", llama_server, tiny_model),
                 {**env, "LLAMA_SUPERVISOR_STATE_DIR": str(tmp_path / f"state{i}")}) for i in (1, 2, 3)]
    good = write_build(tmp_path / "llama-server-good", llama_server, "honest", 1)
    bad = write_build(tmp_path / "llama-server-bad", llama_server, "dies", 1)
    haproxy: HAProxy | None = None
    stop = asyncio.Event()
    results: list[Result] = []
    load: list[asyncio.Task[None]] = []
    try:
        async with asyncio.timeout(360), httpx.AsyncClient() as admin:
            await asyncio.gather(*(asyncio.to_thread(b.start) for b in boxes))
            haproxy = HAProxy(haproxy_binary(), tmp_path, boxes)

            async def serving(name: str) -> bool:
                st = (await haproxy.servers()).get(name)
                return st is not None and st[0] == OP_RUNNING and st[1] == ADMIN_READY

            for b in boxes:
                for _ in range(600):
                    if await serving(b.name):
                        break
                    await asyncio.sleep(0.05)
                assert await serving(b.name), f"{b.name} never joined the pool"
            load = [asyncio.ensure_future(load_client(haproxy.url, s, stop, results)) for s in (True, True, False)]
            await asyncio.sleep(2)

            # A good build: every box, one at a time.
            rc, out = await _rollout(good, haproxy, boxes)
            print(out)
            assert rc == 0 and "all 3 box(es) done" in out, out
            for b in boxes:
                builds = await _builds(admin, b)
                assert builds["running"]["path"] == str(good), (b.name, builds)
                assert await serving(b.name)
            await asyncio.sleep(6)  # probation ends: the good build becomes every box's last good one
            for b in boxes:
                assert (await _builds(admin, b))["last_good"]["path"] == str(good)

            # A bad build: the first box's canary fails; it keeps serving, the others are not touched.
            rc, out = await _rollout(bad, haproxy, boxes)
            print(out)
            assert rc == 1 and "canary FAILED" in out and "2 box(es) not touched" in out, out
            first = await _builds(admin, boxes[0])
            assert first["running"]["path"] == str(good) and first["candidate"]["state"] == "rejected", first
            assert await serving("box1")
            for b in boxes[1:]:
                builds = await _builds(admin, b)
                assert builds["running"]["path"] == str(good) and builds["candidate"]["state"] == "good", builds
            await asyncio.sleep(2)
            stop.set()
            await asyncio.gather(*load)
    finally:
        await stop_fleet(stop, load, boxes, haproxy)
    failures = [r for r in results if not (r.status == 200 and r.complete)]
    report = {"requests": len(results), "streams": sum(r.stream for r in results), "failures": len(failures),
              "per_box": {name: sum(r.box == name for r in results) for name in ("box1", "box2", "box3")}}
    print("fleet upgrade:", json.dumps(report))
    assert not failures, f"{len(failures)} client-visible failures, e.g. {failures[:5]}"
    assert len(results) > 50 and all(report["per_box"].values()), report
