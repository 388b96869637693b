"""Request parsing, shape checks, the route allow-list and the media finder, as units (no server)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.media import policy as media
from supervisor.media.images import ImageError
from supervisor.web.api import routes
from supervisor.web.guard import validate
from supervisor.web.guard.validate import Rejected, parse_json, serialise

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
                        st.sampled_from(["messages", "role", "content", "type", "text", "image_url", "url",
                                         "input_audio", "data", "source", "multimodal_data", "prompt", "input"]),
                        kids, max_size=4), max_leaves=20)


@pytest.mark.parametrize(("body", "fragment"), [
    (b"", "not valid JSON"),
    ('{"a": 1}'.encode("utf-16"), "not UTF-8"),
    (b'{"a": "\xff"}', "not UTF-8"),
    (b"\xef\xbb\xbf{}", "not valid JSON"),  # a BOM
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"[" * 70 + b"]" * 70, "nested too deeply"),
    (b'{"a": NaN}', "not valid JSON"),
    (b'{"a": 1', "not valid JSON"),
])
def test_parse_refuses(body: bytes, fragment: str) -> None:
    with pytest.raises(Rejected) as exc:
        parse_json(body)
    assert exc.value.status == 400 and fragment in exc.value.message


def test_serialise_refuses_what_llama_server_cannot_read() -> None:
    with pytest.raises(Rejected, match="surrogate"):
        serialise(parse_json(b'{"a": "\\ud800"}'))
    with pytest.raises(Rejected, match="out of range"):
        serialise(parse_json(b'{"a": 1e999}'))
    assert serialise(parse_json('{"a": "caf\u00e9 \\u00e9"}'.encode())) == '{"a":"café é"}'.encode()


@pytest.mark.parametrize(("doc", "message"), [
    ({}, "messages: required"),
    ({"messages": "hi"}, "messages: expected an array of messages, got a string"),
    ({"messages": [1]}, "messages[0]: expected an object"),
    ({"messages": [{"content": "x"}]}, "messages[0].role: required"),
    ({"messages": [{"role": 1, "content": "x"}]}, "messages[0].role: expected a string, got a number"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content: expected a string or an array"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": 3}]}]},
     "messages[1].content[0].text: expected a string, got a number"),
    ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages[0].content[0].type: expected a string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 3}]}]},
     "messages[0].content[0].image_url: expected an object"),
    ({"messages": [{"role": "user", "content": [{"type": "file"}]}]}, "unsupported content part type 'file'"),
    ({"messages": [], "max_tokens": "5"}, "max_tokens: expected a number, got a string"),
    ({"messages": [], "temperature": True}, "temperature: expected a number, got a boolean"),
    ({"messages": [], "stream": "yes"}, "stream: expected true or false"),
    ({"messages": [], "stop": [1]}, "stop: expected a string or an array of strings"),
])
def test_chat_shape(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(Rejected) as exc:
        validate.chat(doc)
    assert exc.value.status == 400 and message in exc.value.message


def test_other_shapes() -> None:
    for check, doc, message in [
        (validate.tokenize, {"content": 5}, "content: expected a string or an array"),
        (validate.detokenize, {"tokens": ["a"]}, "tokens: expected an array of token ids"),
        (validate.completion, {"prompt": 5}, "prompt: expected a string, an array or an object"),
        (validate.completion, {"prompt": {"prompt_string": "x", "multimodal_data": [1]}}, "prompt.multimodal_data"),
        (validate.anthropic, {"messages": [{"role": 2, "content": "x"}]}, "messages[0].role"),
        (validate.responses, {"input": 5}, "input: expected a string or an array"),
        (validate.embeddings, {"input": 5}, "input: expected a string or an array"),
    ]:
        with pytest.raises(Rejected, match=message.replace("[", r"\[").replace("]", r"\]")):
            check(doc)
    validate.chat({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}],
                   "max_tokens": 4, "temperature": 0.5, "stop": ["a"], "stream": False})


def test_routes_are_an_allow_list_on_raw_bytes() -> None:
    assert routes.lookup(b"/v1/chat/completions") is not None
    assert routes.lookup(b"/slots/0") is routes.SLOT
    for raw in (b"/v1/chat%2Fcompletions", b"/v1/models%20x", b"/v1/caf%C3%A9", b"/v1/chat/completions/",
                b"//v1/chat/completions", b"/slots/x", b"/cors-proxy", b"/v1/audio/transcriptions"):
        assert routes.lookup(raw) is None, raw
    media_routes = {r.label for r in routes.ROUTES.values() if r.media}
    # every route where llama-server loads media (server.cpp + server-common.cpp handle_media)
    assert {"/v1/chat/completions", "/chat/completions", "/apply-template", "/v1/responses", "/responses",
            "/v1/messages", "/v1/messages/count_tokens", "/v1/chat/completions/input_tokens", "/completion",
            "/v1/completions", "/v1/embeddings", "/embeddings", "/predict"} <= media_routes


def _urls(doc: Any) -> list[str]:
    return sorted(s.value for s in media.find(doc).slots)


def test_media_is_found_in_every_shape_llama_server_reads() -> None:
    escaped = json.loads('{"messages": [{"role": "user", "content": [{"type": "image\\u005furl", '
                         '"image\\u005furl": {"url": "http://127.0.0.1:1/x"}}]}]}')
    assert _urls(escaped) == ["http://127.0.0.1:1/x"]
    assert _urls({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://a/"}]}]}) == [
        "http://a/"]
    assert _urls({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "http://b/"}},
        {"type": "tool_result", "content": [{"type": "image", "source": {"type": "base64", "data": "QUJD"}}]}]}]}) == [
        "QUJD", "http://b/"]
    assert _urls({"prompt": {"prompt_string": "x", "multimodal_data": ["QUJD"]}}) == ["QUJD"]
    assert _urls({"input": [{"content": [{"type": "image_url", "image_url": {"url": "http://c/"}}]}]}) == ["http://c/"]
    found = media.find({"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "http://d/", "format": "wav"}}]}]})
    with pytest.raises(ImageError, match="remote media URLs are not allowed"):
        media.check_urls(found, frozenset())


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_any_json_shape_is_checked_without_crashing(doc: Any) -> None:
    """Whatever the shape, the checks answer with a 4xx (Rejected / ImageError) or pass: never another error."""
    body = json.dumps(doc).encode()
    parsed = parse_json(body)
    for check in (validate.chat, validate.completion, validate.anthropic, validate.responses, validate.embeddings,
                  validate.tokenize, validate.detokenize, validate.infill, validate.rerank):
        if isinstance(parsed, dict):
            try:
                check(parsed)
            except Rejected as exc:
                assert 400 <= exc.status < 500
    try:
        found = media.find(parsed)
        media.check_urls(found, frozenset())
    except ImageError as exc:
        assert exc.status == 400


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_parse_or_400(body: bytes) -> None:
    try:
        parse_json(body)
    except Rejected as exc:
        assert exc.status == 400


def test_media_prefilter_is_escape_safe() -> None:
    """A body that names no media word and has no \\u escape cannot hold media; any escape means the full walk."""
    plain = json.dumps({"messages": [{"role": "user", "content": "hello"}]}).encode()
    assert not media.possible(plain) and not media.find(json.loads(plain)).slots
    escaped = b'{"messages": [{"role": "user", "content": [{"type": "\\u0069mage_url", "\\u0069mage_url": {"url": "x"}}]}]}'
    assert media.possible(escaped) and media.find(json.loads(escaped)).images == 1
