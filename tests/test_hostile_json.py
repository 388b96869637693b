"""Hostile JSON against the real daemon and llama-server: malformed bodies of many kinds, wrong types at every
level of every route that takes JSON, bad encodings, and random shapes (hypothesis). Never a 500; every error
is one JSON shape; the daemon keeps serving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hostile import LiveDaemon, alive, check, start_daemon, stop_daemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(300)

JSON_ROUTES = ("/v1/chat/completions", "/chat/completions", "/apply-template", "/v1/chat/completions/input_tokens",
               "/completion", "/v1/completions", "/infill", "/tokenize", "/detokenize", "/v1/embeddings",
               "/v1/messages", "/v1/messages/count_tokens", "/v1/responses", "/predict", "/v1/rerank")


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory, llama_server: str, tiny_vl: tuple[Path, Path]) -> Iterator[LiveDaemon]:
    model, mmproj = tiny_vl
    daemon = start_daemon(tmp_path_factory.mktemp("hostile-json"), llama_server, model, mmproj)
    yield daemon
    stop_daemon(daemon)


@pytest.fixture(scope="module")
def client(d: LiveDaemon) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=d.url, timeout=60) as c:
        yield c


def post(c: httpx.Client, path: str, body: bytes) -> httpx.Response:
    return check(c.post(path, content=body, headers={"content-type": "application/json"}), f"{path} {body[:80]!r}")


MALFORMED = [
    b"", b" ", b"null", b"[]", b"1", b'"x"', b"true", b"{", b'{"messages": [}', b'{"a": 1} trailing', b"{'a': 1}",
    b'{"a": NaN}', b'{"a": Infinity}', b'{"a": "\\x41"}', b"\xef\xbb\xbf{}",
    '{"messages": []}'.encode("utf-16"), '{"messages": []}'.encode("utf-32"), '{"messages": "é"}'.encode("latin-1"),
    b'{"a": "\x00"}', b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 5000 + b"1" + b"}" * 5000, b"[" * 65 + b"]" * 65,
    b"\x00\x00\x00\x00",
]
# Valid JSON that parsers disagree on or that overflows: never a 500, whatever the route.
ODD = [b'{"a": 1e999}', b'{"a": "\\ud800"}', b'{"messages": [{"role": "user", "content": "x"}], "messages": 5}',
       b'{"content": "x", "content": 5}', b'{"n_predict": 99999999999999999999999, "prompt": "x"}']


def test_malformed_bodies_on_every_route(client: httpx.Client, d: LiveDaemon) -> None:
    for path in JSON_ROUTES:
        for body in MALFORMED:
            r = post(client, path, body)
            # /infill: the tiny model has no fill-in-the-middle tokens, llama-server says so (501) once the body parses
            ok = (400, 501) if path == "/infill" else (400,)
            assert r.status_code in ok, (path, body[:60], r.status_code, r.text[:200])
        for body in ODD:
            post(client, path, body)
    alive(d)


def _wrong_types() -> list[tuple[str, dict[str, Any]]]:
    msg = {"role": "user", "content": "hi"}
    cases: list[tuple[str, dict[str, Any]]] = []
    bad_values: list[Any] = [1, 1.5, True, None, "s", [], {}, [1], [{}], {"x": 1}]
    for v in bad_values:
        cases += [
            ("/v1/chat/completions", {"messages": v}),
            ("/v1/chat/completions", {"messages": [v]}),
            ("/v1/chat/completions", {"messages": [{"role": v, "content": "x"}]}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": v}]}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": [v]}]}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": v, "text": "x"}]}]}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": v}]}]}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                                                  "image_url": v}]}]}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                                                  "image_url": {"url": v}}]}]}),
            ("/v1/chat/completions", {"messages": [msg], "max_tokens": v}),
            ("/v1/chat/completions", {"messages": [msg], "temperature": v}),
            ("/v1/chat/completions", {"messages": [msg], "stop": v}),
            ("/v1/chat/completions", {"messages": [msg], "stream": v}),
            ("/v1/chat/completions", {"messages": [msg], "tools": v}),
            ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": None, "tool_calls": v}]}),
            ("/tokenize", {"content": v}),
            ("/detokenize", {"tokens": v}),
            ("/completion", {"prompt": v, "n_predict": 1}),
            ("/completion", {"prompt": "x", "n_predict": v}),
            ("/v1/completions", {"prompt": [v], "max_tokens": 1}),
            ("/v1/embeddings", {"input": v}),
            ("/infill", {"input_prefix": v, "input_suffix": "x"}),
            ("/v1/messages", {"model": "m", "max_tokens": 1, "messages": [{"role": v, "content": "x"}]}),
            ("/v1/messages", {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [v]}]}),
            ("/v1/responses", {"input": v}),
            ("/v1/responses", {"input": [{"role": "user", "content": [v]}]}),
            ("/predict", {"prompt": v, "images": []}),
            ("/predict", {"prompt": "x", "images": [v]}),
        ]
    return cases


def test_wrong_types_at_every_level(client: httpx.Client, d: LiveDaemon) -> None:
    statuses: dict[int, int] = {}
    for path, doc in _wrong_types():
        r = post(client, path, json.dumps(doc).encode())
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500 or r.status_code == 501, (path, doc, r.status_code, r.text[:300])  # 501: not enabled
    assert statuses.get(400, 0) > 100, statuses
    # the field is named
    r = post(client, "/v1/chat/completions", json.dumps({"messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": 5}]}]}).encode())
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(
        "messages[1].content[0].text: expected a string")
    r = post(client, "/tokenize", b'{"content": 5}')
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("content:")
    alive(d)


JSONS = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False,
                                                                                         allow_infinity=False)
                     | st.text(max_size=6),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
                         st.sampled_from(["role", "content", "type", "text", "image_url", "url", "name", "tool_calls",
                                          "max_tokens", "stop", "prompt", "tokens", "input"]), kids, max_size=3),
                     max_leaves=12)
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]) | JSONS},
                                          optional={"content": JSONS}) | JSONS, max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(["/v1/chat/completions", "/apply-template", "/tokenize", "/completion",
                              "/v1/embeddings", "/v1/messages"]),
       doc=st.fixed_dictionaries({"messages": MESSAGES}, optional={"max_tokens": st.just(1) | JSONS, "prompt": JSONS,
                                                                     "content": JSONS, "input": JSONS}))
def test_random_shapes_never_500(client: httpx.Client, route: str, doc: dict[str, Any]) -> None:
    doc.setdefault("max_tokens", 1)
    doc["n_predict"] = 1
    r = post(client, route, json.dumps(doc).encode())
    assert r.status_code < 500 or r.status_code == 501, (route, doc, r.text[:300])


def test_daemon_alive_after_the_json_groups(d: LiveDaemon) -> None:
    alive(d)
