"""Upgrades (models/upgrade.py) on a real runner and the real llama-server: a candidate beside the old child or
in its place, switch, probation, rollback, and the builds book afterwards."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from doubles.bad_builds import write_build
from support import make_config, wait_for

from supervisor.child.runner import Runner
from supervisor.core.lifecycle import State
from supervisor.models.upgrade import Upgrades
from supervisor.spec.loaded import Loaded, load_checked

pytestmark = pytest.mark.integration


class Direct:
    """The model side an upgrade needs, without a proxy in front (nothing to hold)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.restarts: list[str] = []

    @property
    def id(self) -> str:
        return self.runner.loaded.profile.name

    async def restart_with(self, loaded: Loaded, why: str) -> None:
        self.restart_now(loaded, why)

    def restart_now(self, loaded: Loaded, why: str) -> None:
        self.restarts.append(why)
        self.runner.replace_profile(loaded)


def _profile(tmp_path: Path, binary: str, model: Path, mmproj: Path | None = None) -> Path:
    data: dict[str, Any] = {"name": "m", "binary": binary, "model": str(model), "n_gpu_layers": 0, "ctx_size": 1024,
                            "min_ctx_size": 256, "cache_ram_mib": 0, "threads": 1, "parallel": 1}
    if mmproj is not None:
        data.update(mmproj=str(mmproj), images={"max_long_side": 128, "max_short_side": 96})
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def _start(tmp_path: Path, profile: Path, **cfg: Any) -> tuple[Upgrades, Direct]:
    # 0.8: tests/test_upgrade_daemon.py says why (noise up to 3x here; the slow build is 10-25x slower)
    settings = {"upgrade_max_slowdown": 0.8, "upgrade_max_memory_growth": 0.5, "upgrade_probation_s": 600.0, **cfg}
    config = make_config(tmp_path, **settings)
    ups = Upgrades(config)
    loaded = load_checked(profile)
    chosen, due = await ups.resolve("m", loaded)
    assert chosen is loaded and not due
    target = Direct(Runner(config, chosen))
    ups.attach(target)
    await target.runner.start()
    assert await target.runner.wait_ready(30)
    await wait_for(lambda: ups.book.last_good("m") is not None, 10, "the first build adopted")
    return ups, target


async def _chat(runner: Runner) -> int:
    """Straight to the child (no proxy here to hold and resend): the one that dies leaves its request unanswered."""
    try:
        async with httpx.AsyncClient(timeout=30) as c:
            r = await c.post(f"{runner.child_url}/v1/chat/completions",
                             json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            return r.status_code
    except httpx.HTTPError:
        return 0


async def test_beside_honest_switches_bad_ones_stay(tmp_path: Path, llama_server: str, tiny_model: Path) -> None:
    ups, target = await _start(tmp_path, _profile(tmp_path, llama_server, tiny_model), upgrade_probation_s=1.0)
    r = target.runner
    try:
        first = ups.book.last_good("m")
        assert first is not None and Path(first.real_path) == Path(llama_server).resolve()
        pid = r.child.pid if r.child else None
        for kind in ("dies", "slow", "renamed"):
            out = await ups.try_binary(target, str(write_build(tmp_path / f"bin-{kind}", llama_server, kind)))
            assert not out["passed"] and not out["switched"] and out["where"] in ("beside", "nowhere"), out
            assert r.ready and r.child is not None and r.child.pid == pid  # the old child never stopped
            assert ups.models["m"].candidate["state"] == "rejected"  # type: ignore[index]
        assert target.restarts == []
        honest = write_build(tmp_path / "bin-honest", llama_server, "honest")
        dry = await ups.try_binary(target, str(honest), dry_run=True)
        assert dry["passed"] and not dry["switched"] and target.restarts == []
        out = await ups.try_binary(target, str(honest))
        assert out["passed"] and out["switched"] and out["where"] == "beside", out
        rows = {row["check"]: row for row in out["verdict"]["rows"]}
        assert rows["text: completion tokens"]["new"] == rows["text: completion tokens"]["old"]
        assert await r.wait_ready(30) and r.loaded.caps.binary == str(honest)
        # After probation the honest build is the last good one, with its golden answers recorded.
        await wait_for(lambda: (ups.models["m"].candidate or {}).get("state") == "good", 10, "probation over")
        good = ups.book.last_good("m")
        assert good is not None and good.path == str(honest) and ups.book.golden("m") is not None
    finally:
        await r.stop()
        await ups.close()


async def test_in_place_when_there_is_no_room(tmp_path: Path, llama_server: str, tiny_vl: tuple[Path, Path]) -> None:
    # A memory budget smaller than one child: the candidate cannot run beside, it runs in the old one's place.
    ups, target = await _start(tmp_path, _profile(tmp_path, llama_server, *tiny_vl), memory_budget_mib=1)
    r = target.runner
    try:
        out = await ups.try_binary(target, str(write_build(tmp_path / "bin-novision", llama_server, "no-vision")))
        assert not out["passed"] and out["where"] == "in place", out
        assert "warmup" in out["reasons"][0] and "image" in out["reasons"][0], out["reasons"]
        assert await r.wait_ready(30) and r.loaded.caps.binary == llama_server
        assert await _chat(r) == 200
        out = await ups.try_binary(target, str(write_build(tmp_path / "bin-dies", llama_server, "dies", 3)))
        assert not out["passed"] and out["where"] == "in place", out
        assert await r.wait_ready(30) and r.loaded.caps.binary == llama_server
        honest = write_build(tmp_path / "bin-honest", llama_server, "honest")
        out = await ups.try_binary(target, str(honest))
        assert out["passed"] and out["switched"] and out["where"] == "in place", out
        assert await r.wait_ready(30) and r.loaded.caps.binary == str(honest)
    finally:
        await r.stop()
        await ups.close()


async def test_probation_rolls_back_a_build_that_dies_after_the_switch(tmp_path: Path, llama_server: str,
                                                                       tiny_model: Path) -> None:
    # The wrapper that dies keeps the real server as its child behind a Python forwarder: more memory, allowed here.
    ups, target = await _start(tmp_path, _profile(tmp_path, llama_server, tiny_model), upgrade_max_memory_growth=4.0)
    r = target.runner
    try:
        # It survives the canary (warmup + 4 golden requests), then, restarted as the model's child, dies at its
        # 8th completion: the 7th request after its own warmup.
        late = write_build(tmp_path / "bin-late", llama_server, "dies", 8)
        out = await ups.try_binary(target, str(late))
        assert out["passed"] and out["switched"], out
        assert await r.wait_ready(30) and r.loaded.caps.binary == str(late)
        for _ in range(7):
            if r.loaded.caps.binary != str(late):
                break
            if await r.wait_ready(30):
                await _chat(r)
        await wait_for(lambda: r.loaded.caps.binary == llama_server and r.machine.state is State.READY, 30,
                       "rolled back to the last good build")
        assert "probation" in target.restarts[-1]
        cand = ups.models["m"].candidate or {}
        assert cand["state"] == "rejected" and "upgrade_probation_s" in cand["reasons"][0], cand
        good = ups.book.last_good("m")
        assert good is not None and good.path == llama_server
        await asyncio.sleep(0)
    finally:
        await r.stop()
        await ups.close()
