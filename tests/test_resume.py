"""Resuming a cut stream (web/api/resume.py): what was relayed, which requests can go on, the continuation asked
for, and its answer spliced into the first one. The events are shaped as this build of llama-server sends them
(recorded from the real server)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from supervisor.core.ladder import RunSettings
from supervisor.core.lifecycle import initial
from supervisor.telemetry.metrics import Metrics
from supervisor.web.api.relay import relay
from supervisor.web.api.resume import Relayed, Splice, continuation, read_relayed, refusal
from supervisor.web.api.upstream import UpstreamPool


def ev(doc: Any) -> bytes:
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


def chat(delta: dict[str, Any], finish: str | None = None, cid: str = "chatcmpl-A", index: int = 0) -> bytes:
    return ev({"choices": [{"finish_reason": finish, "index": index, "delta": delta}], "created": 1, "id": cid,
               "model": "m", "object": "chat.completion.chunk"})


ROLE = {"role": "assistant", "content": None}
USAGE = {"choices": [], "created": 2, "id": "chatcmpl-B", "model": "m", "object": "chat.completion.chunk",
         "usage": {"completion_tokens": 6, "prompt_tokens": 28, "total_tokens": 34},
         "timings": {"prompt_n": 28, "predicted_n": 6, "prompt_ms": 1.0}}


def native(content: str, predicted: int, stop: bool = False) -> bytes:
    doc: dict[str, Any] = {"index": 0, "content": content, "stop": stop, "tokens_predicted": predicted,
                           "tokens_evaluated": 4 if predicted < 100 else 9}
    if stop:
        doc["timings"] = {"prompt_n": 9, "predicted_n": predicted}
    return ev(doc)


@pytest.mark.parametrize(("kind", "raw", "text", "why_not", "finished"), [
    ("chat", chat(ROLE) + chat({"content": "Hel"}) + chat({"content": "lo"}), "Hello", None, False),
    ("chat", chat(ROLE), "", None, False),  # cut before the first word: the same request again
    ("chat", b"", "", None, False),  # cut before the first event (the response had begun)
    ("chat", chat(ROLE) + chat({"content": "Hel"})[:-3], "", "cut in the middle of an event", False),
    ("chat", chat(ROLE) + chat({"tool_calls": [{"index": 0, "function": {"name": "f"}}]}), "", "cut inside a tool call",
     False),
    ("chat", chat(ROLE) + chat({"reasoning_content": "hmm"}), "", "cut inside a reasoning block", False),
    ("chat", chat(ROLE) + chat({"content": "x"}, index=1), "", "several choices", False),
    ("chat", chat(ROLE) + chat({"content": "Hi"}) + chat({}, "length"), "Hi", None, True),  # only the end was lost
    ("chat", chat(ROLE) + ev({"error": {"code": 500, "message": "boom"}}), "", "llama-server sent an error", False),
    ("oai", ev({"choices": [{"text": "ab", "index": 0, "finish_reason": None}], "id": "c"}), "ab", None, False),
    ("native", native("ab", 2) + native("c", 3), "abc", None, False),
])
def test_read_relayed(kind: str, raw: bytes, text: str, why_not: str | None, finished: bool) -> None:
    r = read_relayed(kind, raw)
    assert (r.why_not, r.finished) == (why_not, finished)
    if why_not is None:
        assert r.text == text


def test_native_stream_tells_the_exact_token_counts() -> None:
    r = read_relayed("native", native("ab", 2) + native("c", 5))
    assert (r.predicted, r.evaluated, r.pieces) == (5, 4, 2)


MSGS = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("kind", "doc", "why"), [
    ("chat", {"messages": MSGS, "stream": True}, None),
    ("chat", {"messages": MSGS, "stream": True, "n": 1}, None),
    ("chat", {"messages": MSGS}, "not a stream"),
    ("chat", {"messages": MSGS, "stream": True, "n": 2}, "several choices (n > 1)"),
    ("chat", {"messages": MSGS, "stream": True, "tools": [{"type": "function"}]}, "structured output"),
    ("chat", {"messages": MSGS, "stream": True, "response_format": {"type": "json_object"}}, "structured output"),
    ("chat", {"messages": MSGS, "stream": True, "response_format": {"type": "text"}}, None),
    ("chat", {"messages": [*MSGS, {"role": "assistant", "content": [{"type": "text"}]}], "stream": True},
     "not plain text"),
    ("oai", {"prompt": "Once", "stream": True}, None),
    ("oai", {"prompt": ["Once", "Twice"], "stream": True}, "not plain text"),
    ("native", {"prompt": [1, 2, 3], "stream": True}, "not plain text"),
    ("native", {"prompt": "x", "stream": True, "grammar": "root ::= [a-z]"}, "structured output"),
])
def test_which_requests_can_be_resumed(kind: str, doc: dict[str, Any], why: str | None) -> None:
    got = refusal(kind, doc)
    assert (got is None) if why is None else (got is not None and why in got), got


def test_chat_continuation_is_an_assistant_prefill_with_the_rest_of_the_budget() -> None:
    doc = {"messages": MSGS, "stream": True, "max_tokens": 300, "temperature": 0.2}
    new = continuation("chat", doc, Relayed(text="Hello wor"), before=3)
    assert new["messages"] == [*MSGS, {"role": "assistant", "content": "Hello wor"}]
    assert new["max_tokens"] == 297 and new["temperature"] == 0.2
    assert new["continue_final_message"] is True and new["add_generation_prompt"] is False
    assert doc["messages"] == MSGS and doc["max_tokens"] == 300  # the request as sent is left alone
    # The client's own prefill is continued further, not followed by a second assistant message (a 400).
    own = {"messages": [*MSGS, {"role": "assistant", "content": "Sure: "}], "stream": True}
    assert continuation("chat", own, Relayed(text="one"), 1)["messages"][-1] == {"role": "assistant",
                                                                                 "content": "Sure: one"}
    # Nothing but the opening reached the client: the same request again.
    assert continuation("chat", doc, Relayed(text=""), 0) == doc


@pytest.mark.parametrize("kind", ["oai", "native"])
def test_completion_continuation_is_prompt_plus_text(kind: str) -> None:
    doc = {"prompt": "Once upon", "stream": True, "n_predict": 10, "max_tokens": 10}
    new = continuation(kind, doc, Relayed(text=" a time"), before=4)
    assert new["prompt"] == "Once upon a time" and new["n_predict"] == 6 and new["max_tokens"] == 6


def test_splice_drops_the_opening_keeps_the_id_and_adds_up_the_usage() -> None:
    first = Relayed(text="Hel", id="chatcmpl-A")
    s = Splice("chat", first, before=3, prefix=2)
    rest = chat(ROLE, cid="chatcmpl-B") + chat({"content": "lo"}, cid="chatcmpl-B")
    out = s.feed(rest[:40]) + s.feed(rest[40:])  # split mid-event: nothing half is sent
    assert out == chat({"content": "lo"}, cid="chatcmpl-A")
    out = s.feed(chat({}, "length", cid="chatcmpl-B") + ev(USAGE) + b"data: [DONE]\n\n")
    events = [json.loads(line[6:]) for line in out.split(b"\n\n") if line.startswith(b"data: {")]
    assert events[0]["choices"][0]["finish_reason"] == "length" and events[0]["id"] == "chatcmpl-A"
    assert events[1]["usage"] == {"completion_tokens": 9, "prompt_tokens": 26, "total_tokens": 35}
    assert events[1]["timings"]["predicted_n"] == 9 and events[1]["timings"]["prompt_n"] == 26
    assert out.endswith(b"data: [DONE]\n\n")


def test_splice_of_a_native_stream_counts_on_from_the_first_answer() -> None:
    first = read_relayed("native", native("ab", 2))
    s = Splice("native", first, before=2, prefix=2)
    out = s.feed(native("c", 1) + native("", 3, stop=True))
    events = [json.loads(line[6:]) for line in out.split(b"\n\n") if line]
    assert [e["tokens_predicted"] for e in events] == [3, 5]
    assert events[-1]["tokens_evaluated"] == 4 and events[-1]["timings"] == {"prompt_n": 7, "predicted_n": 5}


# ---- the relay keeps a stream at event boundaries ---------------------------------------------------------------


class _Runner:
    """What the relay reads from a runner on a stream: its metrics, its state, where it notes progress."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.machine = initial(RunSettings(0, 512))
        self.notes = 0

    def note_progress(self, *, stream: bool = False, ex: object = None) -> None:
        self.notes += 1


async def test_a_stream_cut_inside_an_event_leaves_the_client_at_an_event_end() -> None:
    """llama-server's chunks can arrive split inside an event (a read ends anywhere) and the child can die right
    there: the client gets whole events only, then the error event on a line of its own."""
    first, second = chat({"content": "Hel"}), chat({"content": "lo"})

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (first + second[:30], second[30:] + first[:20]):  # both reads end inside an event
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.close()  # dies in the middle of the third event

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool(max_idle=1, idle_s=1.0)
    sent: list[bytes] = []

    async def send(msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.body":
            sent.append(msg.get("body", b""))

    try:
        resp = await pool.send(f"http://127.0.0.1:{port}", "POST", b"/v1/chat/completions", [], b"{}")
        status = [0]
        whole = await relay(_Runner(), resp, send, status)  # type: ignore[arg-type]
        await resp.aclose()
    finally:
        server.close()
        await pool.aclose()
    assert not whole and status == [502]
    assert sent[0] == first and sent[1] == second  # each whole, as soon as it was whole
    assert sent[2].startswith(b'data: {"error"') and sent[2].endswith(b"\n\n") and sent[3] == b""
