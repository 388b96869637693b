"""Issue 11's seen failures, each as a regression test, with the real llama-server (doubles only for faults
this machine cannot produce: a GPU out-of-memory exit, a crash on one input)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from doubles.oom_llama_server import write_double
from doubles.poison_llama_server import write_poison_double
from support import make_config, metric, running, wait_for

import supervisor.child.driver as driver_module
from supervisor.core.lifecycle import State
from supervisor.daemon import Daemon
from supervisor.host import gpu

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def wrapper(path: Path, llama_server: str, body: str) -> Path:
    """A shell script in front of the real llama-server: --help/--version/--list-devices go straight to it."""
    path.write_text("#!/bin/sh\n"
                    f"case \"$1\" in --help|--version|--list-devices) exec {llama_server} \"$1\";; esac\n" + body)
    path.chmod(0o755)
    return path


class FakeGpu:
    """NVML as the runner sees it (host/gpu.snapshot): one GPU whose free memory the test sets."""

    def __init__(self, free_mib: float) -> None:
        self.free_mib = free_mib
        self.processes: tuple[tuple[int, float], ...] = ()

    def snapshot(self) -> list[gpu.GpuInfo]:
        total = 81559.0
        return [gpu.GpuInfo(0, "Fake H100", total, total - self.free_mib, self.free_mib, 0.0, 30.0, self.processes)]


# ---- 5: an unexpected exception wedges the daemon --------------------------------------------------------------


async def test_bad_environment_value_fails_cleanly_instead_of_wedging(tmp_path: Path, write_profile) -> None:
    """A NUL byte in an environment value: the stdlib event loop raises ValueError from the spawn. It is a
    classified exit (bad_args → failed, with the reason), not a machine stuck in `starting`."""
    async with running(tmp_path, write_profile(env={"BROKEN": "a\0b"})) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.machine.state is State.FAILED, timeout=10, what="failed")
        h = await c.get("/health")
        assert h.status_code == 503 and "null byte" in h.json()["reason"]
        assert (await c.get("/status")).json()["last_exit"]["cause"] == "bad_args"


async def test_unexpected_error_while_starting_is_retried(tmp_path: Path, write_profile,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real_spawn = driver_module.spawn
    calls: list[int] = []

    async def flaky_spawn(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) <= 2:
            raise RuntimeError("something nobody expected")
        return await real_spawn(*args, **kwargs)

    monkeypatch.setattr(driver_module, "spawn", flaky_spawn)
    async with running(tmp_path, write_profile()) as d:
        await wait_for(lambda: d.default.runner.ready, timeout=30, what="ready after two internal errors")
        causes = [t.cause for t in d.default.runner.machine.history]
        assert causes.count("internal_error") == 2 and len(calls) == 3


async def test_stop_is_bounded_when_a_child_task_hangs(tmp_path: Path, write_profile,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM while wedged: stop() must finish (the kill escalation is bounded), not wait for ever."""

    async def hang(*_args: Any, **_kwargs: Any) -> Any:
        await asyncio.Event().wait()

    monkeypatch.setattr(driver_module, "spawn", hang)
    d = Daemon(make_config(tmp_path, stop_timeout_s=1.0), write_profile())
    await d.start()
    await wait_for(lambda: d.default.runner.machine.state is State.STARTING, what="starting")
    t0 = time.monotonic()
    await asyncio.wait_for(d.stop(), 30)
    assert time.monotonic() - t0 < 15
    assert d.default.runner.machine.state is State.STOPPED


# ---- 6: held requests are not woken on failed ---------------------------------------------------------------


async def test_held_requests_get_503_at_once_when_the_start_fails(tmp_path: Path, write_profile,
                                                                 llama_server: str) -> None:
    flag = tmp_path / "broken"
    binary = wrapper(tmp_path / "llama-server", llama_server,
                     f"[ -e {flag} ] && {{ sleep 1; echo 'error: invalid argument: --bogus' >&2; exit 1; }}\n"
                     f"exec {llama_server} \"$@\"\n")
    async with running(tmp_path, write_profile(binary=str(binary)), queue_wait_s=60) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=90) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        flag.touch()
        await c.post("/admin/restart")
        t0 = time.monotonic()
        held = await asyncio.gather(*(c.post("/v1/chat/completions", json=CHAT) for _ in range(4)))
        took = time.monotonic() - t0
        assert d.default.runner.machine.state is State.FAILED
        for r in held:
            assert r.status_code == 503
            err = r.json()["error"]
            assert err["type"] == "unavailable_error" and "failed" in err["message"]
            assert "invalid argument" in err["message"]
        assert took < 20, f"held requests waited {took:.1f}s for a child that was not coming"


# ---- 4: `ready` while the child is dead (evidence gathering after an OOM exit) -------------------------------


async def test_health_is_503_and_requests_are_held_while_an_oom_exit_is_examined(
        tmp_path: Path, write_profile, llama_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    trigger = tmp_path / "oom-now"
    binary = wrapper(tmp_path / "llama-server", llama_server, f"""{llama_server} "$@" &
pid=$!
while [ ! -e {trigger} ]; do
    kill -0 $pid 2>/dev/null || {{ wait $pid; exit $?; }}
    sleep 0.05
done
rm -f {trigger}
echo 'ggml_cuda_compute_forward: MUL_MAT failed' >&2
echo 'CUDA error: out of memory' >&2
kill -KILL $pid
kill -ABRT $$
""")
    fake = FakeGpu(free_mib=40000)
    monkeypatch.setattr(gpu, "snapshot", fake.snapshot)
    profile = write_profile(binary=str(binary))
    # NVML keeps listing the dead child: the evidence step waits the whole vram_release_wait_s.
    async with running(tmp_path, profile, vram_release_wait_s=4.0, climb="off") as d, \
            httpx.AsyncClient(base_url=d.url, timeout=60) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        child = d.default.runner.child
        assert child is not None
        fake.processes = ((child.pid, 900.0),)
        trigger.touch()
        await wait_for(lambda: child.returncode is not None, what="the child's exit")
        await asyncio.sleep(0.5)  # well inside the evidence wait
        h = await c.get("/health")
        assert h.status_code == 503, h.text
        assert d.default.runner.child_url is None and not d.default.runner.ready
        r = await c.post("/v1/chat/completions", json=CHAT)  # held until the next child, not sent to a closed port
        assert r.status_code == 200, r.text
        st = (await c.get("/status")).json()
        assert st["last_exit"]["cause"] == "oom_compute"
        assert st["settings"]["effective"]["ctx_size"] == 512  # the ladder's next step


# ---- 3: learned settings override the profile --------------------------------------------------------------


async def test_settings_learned_for_another_profile_are_not_used(tmp_path: Path, write_profile,
                                                                 llama_server: str) -> None:
    record = tmp_path / "layers.txt"
    double = write_double(tmp_path / "llama-server", llama_server, limit=1, mode="load", record=record)
    profile = write_profile(binary=str(double), n_gpu_layers=99, ctx_size=1024)
    async with running(tmp_path, profile, estimate_vram=False) as d:
        await wait_for(lambda: d.default.runner.ready, what="ready after the ladder")
        assert d.default.runner.machine.effective.n_gpu_layers == 1
    # Edited while stopped: another context size. The next start is the profile's, not what was learned for 1024.
    data = yaml.safe_load(profile.read_text())
    profile.write_text(yaml.safe_dump({**data, "ctx_size": 512}))
    record.write_text("")
    async with running(tmp_path, profile, estimate_vram=False) as d:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        assert record.read_text().split()[0] == "99"
        assert "--ctx-size" in d.default.runner.argv and d.default.runner.argv[d.default.runner.argv.index("--ctx-size") + 1] == "512"
        assert "resumed" not in (d.default.runner.machine.adjustment or "")
    # Back to the first profile: what was learned for it is used again.
    profile.write_text(yaml.safe_dump(data))
    record.write_text("")
    async with running(tmp_path, profile, estimate_vram=False) as d:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        assert record.read_text().split() == ["1"]


# ---- 8: reloads: command-line overrides, policy, late SIGHUP ------------------------------------------------


async def test_reload_keeps_the_command_line_profile_and_recomputes_the_policy(
        tmp_path: Path, write_profile, monkeypatch: pytest.MonkeyPatch) -> None:
    from_file = write_profile(name="from-file")
    from_cli = write_profile(name="from-cli", ctx_size=2048)
    settings = tmp_path / "supervisor.yaml"
    settings.write_text(f"profile: {from_file}\n")
    monkeypatch.setenv("LLAMA_SUPERVISOR_CONFIG", str(settings))
    d = Daemon(make_config(tmp_path), from_cli, settings, overrides={"profile": str(from_cli), "port": 0})
    await d.start()
    try:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        pid = d.default.runner.child.pid
        outcome = await d.reloader.reload("SIGHUP")
        assert outcome["ok"] and not outcome["restarted"]
        assert d.default.runner.loaded.profile.name == "from-cli" and d.default.runner.child.pid == pid
        # A change that does not reach llama-server's command line still reaches the policy.
        data = yaml.safe_load(from_cli.read_text())
        from_cli.write_text(yaml.safe_dump({**data, "min_ctx_size": 1024}))
        outcome = await d.reloader.reload("SIGHUP")
        assert outcome["ok"] and outcome["restarted"] == [] and outcome["updated"] == ["from-cli"]
        assert d.default.runner.policy.min_ctx == 1024 and d.default.runner.child.pid == pid
    finally:
        await d.stop()


async def test_reload_after_shutdown_starts_nothing(tmp_path: Path, write_profile) -> None:
    """A SIGHUP that arrives during or after shutdown must not spawn a child after the runner finished."""
    profile = write_profile(name="late")
    d = Daemon(make_config(tmp_path), profile)
    await d.start()
    await wait_for(lambda: d.default.runner.ready, what="ready")
    data = yaml.safe_load(profile.read_text())
    profile.write_text(yaml.safe_dump({**data, "ctx_size": 2048}))  # a change that would restart the child
    d.request_stop()
    assert not (await d.reloader.reload("SIGHUP"))["ok"]  # during shutdown
    await d.stop()
    assert not (await d.reloader.reload("SIGHUP"))["ok"]  # after it
    d.default.runner.restart("late restart")
    await asyncio.sleep(0.5)
    assert d.default.runner.machine.state is State.STOPPED and d.default.runner.child is None
    assert not [p for p in psutil.Process().children(recursive=True) if "llama-server" in p.name()]


# ---- poison requests ------------------------------------------------------------------------------------------


async def test_poison_request_is_quarantined_after_two_crashes(tmp_path: Path, write_profile,
                                                               llama_server: str) -> None:
    double = write_poison_double(tmp_path / "llama-server", llama_server, poison="PoIsOn")
    poison = {"messages": [{"role": "user", "content": "PoIsOn"}], "max_tokens": 4}
    async with running(tmp_path, write_profile(binary=str(double)), quarantine_window_s=600) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=60) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        # The first copy kills the child; the proxy sends it again once (it never got an answer): a second crash.
        r = await c.post("/v1/chat/completions", json=poison)
        assert r.status_code == 502 and r.json()["error"]["type"] == "server_error"
        await wait_for(lambda: d.default.runner.ready and d.default.runner.machine.gen == 3, what="ready after the two crashes")
        await wait_for(lambda: len(d.proxy_of().poison.state.blocked) == 1, what="quarantine")
        assert d.default.runner.machine.restarts == 2
        r = await c.post("/v1/chat/completions", json=poison)
        assert r.status_code == 422
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and "quarantined" in err["message"]
        assert d.default.runner.machine.restarts == 2  # refused before it reached llama-server
        ok = await c.post("/v1/chat/completions", json=CHAT)
        assert ok.status_code == 200
        st = (await c.get("/status")).json()
        assert len(st["quarantine"]["requests"]) == 1
        assert st["quarantine"]["requests"][0]["what"].startswith("POST /v1/chat/completions")
        text = (await c.get("/metrics")).text
        assert metric(text, "quarantined_requests") == 1.0
        assert metric(text, "quarantine_refusals_total") == 1.0


async def test_sigkill_from_outside_quarantines_nothing(tmp_path: Path, write_profile) -> None:
    """The same request in flight at two kills from outside (SIGKILL, the OOM killer) is not an input bug."""
    async with running(tmp_path, write_profile(parallel=1)) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=60) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        long = {**CHAT, "max_tokens": 100000, "ignore_eos": True}
        for _ in range(2):
            task = asyncio.ensure_future(c.post("/v1/chat/completions", json={**long, "stream": True}))
            await wait_for(lambda: d.default.runner.last_progress > time.monotonic() - 0.2, what="tokens flowing")
            old = d.default.runner.child.pid
            os.kill(old, 9)
            await task
            await wait_for(lambda old=old: d.default.runner.ready and d.default.runner.child.pid != old, what="ready again")
        assert d.proxy_of().poison.state.blocked == {}


# ---- failed is retried when a file it depends on changes ------------------------------------------------------


async def test_failed_start_is_retried_when_the_binary_comes_back(tmp_path: Path, write_profile,
                                                                 llama_server: str) -> None:
    """An operator who puts the missing file back has nothing else to do: no /admin/restart."""
    import shutil

    binary = tmp_path / "bin" / "llama-server"
    binary.parent.mkdir()
    shutil.copy2(llama_server, binary)
    async with running(tmp_path, write_profile(binary=str(binary))) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        binary.unlink()
        await c.post("/admin/restart")
        await wait_for(lambda: d.default.runner.machine.state is State.FAILED, what="failed")
        assert d.default.runner.machine.last_exit is not None and d.default.runner.machine.last_exit.cause.value == "spawn_failed"
        tmp = binary.with_name("llama-server.part")
        shutil.copy2(llama_server, tmp)
        tmp.rename(binary)
        await wait_for(lambda: d.default.runner.ready, timeout=30, what="ready again by itself")
        assert any(t.cause == "retry" for t in d.default.runner.machine.history)


async def test_a_reload_that_changes_only_the_supervisor_side_retries_a_failed_model(
        tmp_path: Path, write_profile) -> None:
    """An edit that reaches no flag of llama-server (here: the image policy) applies without a restart; for a
    model stuck in `failed`, the reload is also the operator's "try again"."""
    profile = write_profile(env={"BROKEN": "a\0b"})  # the spawn fails: bad_args, not retried by itself
    async with running(tmp_path, profile) as d:
        await wait_for(lambda: d.default.runner.machine.state is State.FAILED, timeout=10, what="failed")
        data = yaml.safe_load(profile.read_text())
        profile.write_text(yaml.safe_dump({**data, "images": {"keep_last_images": 2}}))
        outcome = await d.reloader.reload("SIGHUP")
        assert outcome["updated"] == ["test"] and outcome["restarted"] == []
        await wait_for(lambda: any(t.cause == "retry" for t in d.default.runner.machine.history), timeout=10,
                       what="the failed model tried again")


# ---- 9: preexec_fn without dlopen in the child -----------------------------------------------------------------


def test_die_with_parent_does_no_dlopen_after_the_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    """What runs between fork and exec only calls prctl, resolved before: a dlopen there can deadlock."""
    import ctypes

    from supervisor.child import process

    def no_dlopen(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("dlopen in the forked child")

    calls: list[tuple[int, ...]] = []
    monkeypatch.setattr(ctypes, "CDLL", no_dlopen)
    monkeypatch.setattr(process, "_PRCTL", lambda *args: calls.append(args) or 0)
    process._die_with_parent()
    assert calls == [(process.PR_SET_PDEATHSIG, 9, 0, 0, 0)]


# ---- 1: a busy box is given up for good --------------------------------------------------------------------


async def test_killed_while_serving_again_and_again_is_never_given_up(tmp_path: Path, write_profile) -> None:
    """Issue 11, seen 1, scaled down: each child serves (longer than healthy_uptime_s) and is then SIGKILLed from
    outside, more times than breaker_failures. The old breaker went to `failed` for good; now every death starts a
    new count and the restart is quick."""
    async with running(tmp_path, write_profile(), breaker_failures=3, healthy_uptime_s=1.0) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=30) as c:
        for _ in range(5):
            await wait_for(lambda: d.default.runner.ready, what="ready")
            await asyncio.sleep(1.2)  # serving
            assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
            os.kill(d.default.runner.child.pid, 9)
            await wait_for(lambda: not d.default.runner.ready, what="noticed")
        await wait_for(lambda: d.default.runner.ready, what="ready after five kills")
        m = d.default.runner.machine
        assert m.restarts == 5 and not m.crash_loop and m.attempt == 1
        assert all(t.dst is not State.FAILED for t in m.history)


async def test_request_cut_by_the_shutdown_timeout_gets_json_503(tmp_path: Path, write_profile) -> None:
    """A request still without an answer when the graceful shutdown runs out (drain_s) is cancelled by uvicorn,
    which would answer a plain-text 500: the client gets the supervisor's JSON 503 with Retry-After."""
    long = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3800, "ignore_eos": True}
    async with running(tmp_path, write_profile(ctx_size=4096, parallel=1), drain_s=1) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=60) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        waiting = asyncio.ensure_future(c.post("/v1/chat/completions", json=long))
        await wait_for(lambda: d.default.in_flight == 1, what="the long request in flight")
        d.request_stop()
        r = await waiting
        assert r.status_code == 503, r.text
        assert r.headers["content-type"] == "application/json" and r.headers["retry-after"] == "5"
        assert "could not finish this request in time (drain_s)" in r.json()["error"]["message"]


async def test_stream_cut_by_the_shutdown_timeout_is_cut_not_answered_twice(tmp_path: Path, write_profile) -> None:
    """A stream under way when drain_s runs out is cut: no second answer is written into it."""
    long = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3800, "ignore_eos": True, "stream": True}
    async with running(tmp_path, write_profile(ctx_size=4096, parallel=1), drain_s=1) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=60) as c:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        async with c.stream("POST", "/v1/chat/completions", json=long) as r:
            assert r.status_code == 200
            seen = b""
            with pytest.raises(httpx.RemoteProtocolError):  # the connection closes mid-stream
                async for chunk in r.aiter_raw():
                    if not seen:
                        d.request_stop()
                    seen += chunk
        assert b"data: " in seen and b"shutting down" not in seen and b"[DONE]" not in seen
