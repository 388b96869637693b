"""Carrying a stream over a child's end: what was relayed, the continuation to ask for, and its answer spliced
into the same client stream.

A stream already flowing when llama-server dies (a crash, out of memory, the kill of a wedged loop) would end
with an SSE `error` event. llama-server can continue an answer instead: a chat whose last message is the
assistant's text so far (assistant prefill, `continue_final_message`), or for `/completion` and
`/v1/completions` the prompt plus the text so far. So the proxy keeps the chunks it relayed (bytes, parsed only
if the stream is cut), and once the next child is ready sends that continuation with what is left of the token
budget, drops its repeated opening (the role delta), gives its events the first answer's id, and makes the final
`usage` (and llama-server's `timings` counts) add up as one answer. The client sees a pause, not an error.

Not resumed (the error event as before): a request asked for several choices, structured output (a grammar, a
JSON schema, tools: their state starts again with a continuation), a cut inside a tool call or a reasoning
block, a cut in the middle of an event, more kept than KEEP_MAX, a prompt that is not plain text. The wait for
the next child, the quarantine and the at-most-once rule are the caller's (web/api/carry.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

KEEP_MAX = 8 * 2**20  # bytes of one stream kept for a resume; a longer stream is not resumed
# Route (its label: the path the client used) → how its stream reads.
KINDS = {"/v1/chat/completions": "chat", "/chat/completions": "chat", "/v1/completions": "oai",
         "/completions": "oai", "/completion": "native"}
# Fields under which a request constrains its output with state a continuation would start again.
_STRUCTURED = ("grammar", "json_schema", "tools", "functions")
_BUDGET = ("max_completion_tokens", "max_tokens", "n_predict")
_TOKENS_PREDICTED = re.compile(rb'"tokens_predicted":(\d+)')


@dataclass
class Relayed:
    """What the client got before the cut."""

    text: str = ""
    pieces: int = 0  # events that carried text (a lower bound of the tokens: llama-server may merge a few)
    predicted: int | None = None  # /completion tells the tokens generated so far, exactly
    evaluated: int | None = None  # ... and the prompt's tokens
    id: str | None = None
    finished: bool = False  # the answer's end (finish_reason, stop) came: only the closing events were lost
    done: bool = False  # `data: [DONE]` came too
    why_not: str | None = None


def _events(raw: bytes) -> list[bytes] | None:
    """The `data:` payloads of whole events; None when the stream was cut in the middle of an event."""
    if raw and not raw.endswith(b"\n\n"):
        return None
    out = []
    for event in raw.split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                out.append(line[5:].strip())
    return out


def read_relayed(kind: str, raw: bytes) -> Relayed:
    r = Relayed()
    events = _events(raw)
    if events is None:
        r.why_not = "cut in the middle of an event"
        return r
    parts: list[str] = []
    for payload in events:
        if payload == b"[DONE]":
            r.done = True
            continue
        try:
            doc = json.loads(payload)
        except ValueError:
            r.why_not = "an event that is not JSON"
            return r
        if not isinstance(doc, dict) or "error" in doc:
            r.why_not = "llama-server sent an error"
            return r
        r.id = doc.get("id") if isinstance(doc.get("id"), str) else r.id
        if kind == "native":
            piece, r.finished = doc.get("content"), r.finished or doc.get("stop") is True
            r.predicted = doc.get("tokens_predicted", r.predicted)
            r.evaluated = doc.get("tokens_evaluated", r.evaluated)
        else:
            if "usage" in doc:
                r.finished = True
            piece = None
            for choice in doc.get("choices") or []:
                if choice.get("index", 0) != 0:
                    r.why_not = "several choices"
                    return r
                r.finished = r.finished or choice.get("finish_reason") is not None
                if kind == "oai":
                    piece = choice.get("text")
                    continue
                delta = choice.get("delta") or {}
                if delta.get("tool_calls") or delta.get("function_call"):
                    r.why_not = "cut inside a tool call"
                    return r
                if delta.get("reasoning_content"):
                    r.why_not = "cut inside a reasoning block"
                    return r
                piece = delta.get("content")
        if isinstance(piece, str) and piece:
            parts.append(piece)
            r.pieces += 1
    r.text = "".join(parts)
    return r


def refusal(kind: str, doc: Any) -> str | None:
    """Why this request's stream could not be resumed, judged before it is sent (None: it could)."""
    if not isinstance(doc, dict) or doc.get("stream") is not True:
        return "not a stream"
    if doc.get("n", 1) != 1:
        return "several choices (n > 1)"
    if any(doc.get(k) for k in _STRUCTURED):
        return "structured output (grammar, schema or tools)"
    fmt = doc.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        return "structured output (response_format)"
    if kind == "chat":
        msgs = doc.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            return "no messages"
        last = msgs[-1]
        if last.get("role") == "assistant" and not isinstance(last.get("content"), str | None):
            return "the request ends with an assistant message that is not plain text"
        if doc.get("continue_final_message") not in (None, False, True):
            return "continue_final_message other than true"
    elif not isinstance(doc.get("prompt"), str):
        return "a prompt that is not plain text"
    return None


def continuation(kind: str, doc: dict[str, Any], relayed: Relayed, before: int) -> dict[str, Any]:
    """The request that continues the answer: `before` tokens of it were generated already."""
    new = dict(doc)
    for key in _BUDGET:
        if isinstance(doc.get(key), int) and doc[key] > 0:
            new[key] = max(1, doc[key] - before)
    if not relayed.text:
        return new  # nothing but the opening reached the client: the same request again
    if kind != "chat":
        new["prompt"] = doc["prompt"] + relayed.text
        return new
    msgs = list(doc["messages"])
    last = msgs[-1]
    if last.get("role") == "assistant":  # the client's own prefill: continue it further
        msgs[-1] = {**last, "content": (last.get("content") or "") + relayed.text}
    else:
        msgs.append({"role": "assistant", "content": relayed.text})
    new["messages"] = msgs
    new["continue_final_message"] = True
    new["add_generation_prompt"] = False
    return new


@dataclass
class Splice:
    """Turns the continuation's events into the rest of the first answer, one whole event at a time."""

    kind: str
    relayed: Relayed
    before: int  # tokens generated before the cut
    prefix: int  # tokens the text so far adds to the continuation's prompt
    new_id: bytes | None = None
    opening: bool = True  # the continuation's role delta is still to come (chat)
    buf: bytes = b""
    out: list[bytes] = field(default_factory=list)

    def feed(self, chunk: bytes) -> bytes:
        """Bytes for the client: the whole events in what has come so far, rewritten."""
        self.buf += chunk
        head, sep, self.buf = self.buf.rpartition(b"\n\n")
        if not sep:
            self.buf = head + self.buf
            return b""
        return b"".join(self._event(e) for e in head.split(b"\n\n") if e.strip())

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(b"data:"):
            return event + b"\n\n"
        payload = event[5:].strip()
        if payload == b"[DONE]":
            return b"data: [DONE]\n\n"
        if self.kind == "native":
            payload = _TOKENS_PREDICTED.sub(lambda m: b'"tokens_predicted":%d' % (int(m.group(1)) + self.before),
                                            payload)
        elif self.new_id is None and (m := re.search(rb'"id":"([^"]*)"', payload)):
            self.new_id = m.group(1)
        if self.opening and self.kind == "chat" and b'"role"' in payload:
            self.opening = False
            doc = json.loads(payload)
            deltas = [c.get("delta") or {} for c in doc.get("choices") or []]
            if all(not d.get("content") and set(d) <= {"role", "content"} for d in deltas):
                return b""  # the client had this opening already
        if self.new_id and self.relayed.id:
            payload = payload.replace(b'"id":"' + self.new_id + b'"', b'"id":"' + self.relayed.id.encode() + b'"')
        if b'"usage"' in payload or b'"timings"' in payload or (self.kind == "native" and b'"stop":true' in payload):
            payload = self._totals(payload)
        return b"data: " + payload + b"\n\n"

    def _totals(self, payload: bytes) -> bytes:
        """The final counts as one answer: the continuation's prompt held the text so far, its completion is
        only the rest."""
        doc = json.loads(payload)
        usage = doc.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            prompt = max(0, int(usage.get("prompt_tokens") or 0) - self.prefix)
            usage["prompt_tokens"] = prompt
            usage["completion_tokens"] += self.before
            usage["total_tokens"] = prompt + usage["completion_tokens"]
        timings = doc.get("timings")
        if isinstance(timings, dict):
            if isinstance(timings.get("predicted_n"), int):
                timings["predicted_n"] += self.before
            if isinstance(timings.get("prompt_n"), int):
                timings["prompt_n"] = max(0, timings["prompt_n"] - self.prefix)
        if self.kind == "native" and self.relayed.evaluated is not None:
            doc["tokens_evaluated"] = self.relayed.evaluated
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
