"""What a request's answer says about it, read from llama-server's own numbers, and what a capture keeps.

The proxy only keeps references on the hot path (a whole answer, or a stream's last chunks, the ones that
carry `timings`); everything here runs later, on the activity log's writer thread: parsing JSON, assembling a
stream's text, hashing images.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

# Parsing a whole answer costs about its size in time: beyond this (big embeddings), the numbers are left out.
PARSE_MAX = 1 << 20
# A stream's raw SSE is several times its text: kept up to this many times the capture limit.
RAW_PER_TEXT = 8
# Fields that carry media as bare base64, without a data: prefix: OpenAI's input_audio.data, and llama-server's
# /completion `multimodal_data` (a list).
_BARE_KEYS = frozenset({"data", "multimodal_data"})
_BASE64 = re.compile(r"[A-Za-z0-9+/=\r\n]+")
_BARE_MIN = 512
_TOKEN_KEYS = (b'"content":"', b'"text":"', b'"reasoning_content":"', b'"tool_calls":[{')


# What llama-server says about one answer, by the activity record's field names; a key is present only when
# llama-server said it.
Numbers = dict[str, Any]


def has_token(chunk: bytes) -> bool:
    """Does this piece of a stream carry generated text (not the role-only first delta, not an empty string)?
    Checked only until the first one is found, for the time to first token."""
    for key in _TOKEN_KEYS:
        i = chunk.find(key)
        while i >= 0:
            after = i + len(key)
            if key.endswith(b"{") or (after < len(chunk) and chunk[after] != 0x22):  # 0x22: the closing quote
                return True
            i = chunk.find(key, after)
    return False


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def numbers_of(doc: Any, n: Numbers) -> None:
    """Add from one parsed answer (or stream event): `usage` (OpenAI shape), `timings` (llama-server's own),
    and the finish reason (OpenAI's `finish_reason`, or /completion's `stop_type`)."""
    if not isinstance(doc, dict):
        return
    usage, timings = doc.get("usage"), doc.get("timings")
    if isinstance(timings, dict):
        for key, name in _TIMINGS:
            v = timings.get(name)
            if v is not None and type(v) in (int, float):
                n[key] = v
        if type(n.get("prompt_tokens")) is int and type(n.get("cached_tokens")) is int:
            n["prompt_tokens"] += n["cached_tokens"]  # timings count only the evaluated part; usage the whole
    if isinstance(usage, dict):  # the client-facing count: it wins where both are given
        for key in ("prompt_tokens", "completion_tokens"):
            if (v := _int(usage.get(key))) is not None:
                n[key] = v
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and (v := _int(details.get("cached_tokens"))) is not None:
            n["cached_tokens"] = v
    choices = doc.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict) and choices[0].get("finish_reason"):
        n["finish_reason"] = str(choices[0]["finish_reason"])
    elif isinstance(doc.get("stop_type"), str) and doc.get("stop"):
        n["finish_reason"] = doc["stop_type"]


_TIMINGS = (("prompt_tokens", "prompt_n"), ("cached_tokens", "cache_n"), ("completion_tokens", "predicted_n"),
            ("prompt_tps", "prompt_per_second"), ("decode_tps", "predicted_per_second"), ("prompt_ms", "prompt_ms"),
            ("decode_ms", "predicted_ms"))


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    """The JSON events of a piece of SSE (`data: {...}` lines); others (`[DONE]`, comments, a cut line) skipped."""
    out = []
    for line in raw.split(b"\n"):
        line = line.strip()
        if line.startswith(b"data:"):
            line = line[5:].lstrip()
        if not line.startswith(b"{"):
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def answer_numbers(data: bytes, stream: bool) -> Numbers:
    """The numbers of a whole answer (JSON) or of a stream's last chunks (the events that carry timings/usage)."""
    n: Numbers = {}
    if not data or len(data) > PARSE_MAX:
        return n
    if stream:
        for doc in sse_events(data):
            if "timings" in doc or "usage" in doc or doc.get("stop") or _finish(doc):
                numbers_of(doc, n)
        return n
    try:
        numbers_of(json.loads(data), n)
    except ValueError:
        pass
    return n


def _finish(doc: dict[str, Any]) -> bool:
    choices = doc.get("choices")
    return isinstance(choices, list) and bool(choices) and isinstance(choices[0], dict) and bool(
        choices[0].get("finish_reason"))


def error_message(data: bytes) -> str | None:
    """The message of an error answer in the one error shape (or llama-server's), else its text."""
    if not data:
        return None
    try:
        doc = json.loads(data)
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])[:1000]
        if isinstance(err, str):
            return err[:1000]
    except ValueError:
        pass
    return data.decode("utf-8", "replace").strip()[:1000] or None


# ---- capture ---------------------------------------------------------------------------------------------


@dataclass
class Captured:
    """A request and its answer as kept for reading and replay (text, truncated to the limit)."""

    request: str | None = None
    response: str | None = None
    text: str | None = None  # the generated text alone (the answer's content, or a stream's deltas joined)
    truncated: bool = False
    images_hashed: int = 0  # images or audio kept as size + SHA-256 only: such a capture cannot be replayed


def _clip(text: str, limit: int, cap: Captured) -> str:
    if len(text) <= limit:
        return text
    cap.truncated = True
    return text[:limit]


def _hash_media(node: Any, cap: Captured, media_key: bool = False) -> Any:
    """The document with every inline image or audio replaced by its size and SHA-256: data: URLs anywhere,
    and the bare base64 of the fields that carry it (`input_audio.data`, /completion's `multimodal_data`)."""
    if isinstance(node, dict):
        return {k: _hash_media(v, cap, k in _BARE_KEYS) for k, v in node.items()}
    if isinstance(node, list):
        return [_hash_media(v, cap, media_key) for v in node]
    if isinstance(node, str):
        inline = node.startswith("data:") and ";base64," in node[:200]
        if inline or (media_key and len(node) >= _BARE_MIN and _BASE64.fullmatch(node)):
            cap.images_hashed += 1
            kind = node[5:node.index(";")] if inline else "base64"
            return f"sha256:{hashlib.sha256(node.encode()).hexdigest()} ({len(node)} bytes, {kind})"
    return node


def capture_request(body: bytes, limit: int, keep_media: bool, cap: Captured) -> None:
    """The request body as sent upstream; inline media as size + SHA-256 unless keep_media."""
    text = body.decode("utf-8", "replace")
    if not keep_media and (b";base64," in body or b'"data"' in body or b'"multimodal_data"' in body):
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if doc is not None:
            hashed = _hash_media(doc, cap)
            if cap.images_hashed:
                text = json.dumps(hashed, ensure_ascii=False)
    cap.request = _clip(text, limit, cap)


def answer_text(doc: Any) -> str | None:
    """The generated text of a whole answer: chat's message content, /completion's content, completions' text."""
    if not isinstance(doc, dict):
        return None
    choices = doc.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        c = choices[0]
        msg = c.get("message")
        if isinstance(msg, dict) and isinstance(msg.get("content"), str):
            return str(msg["content"])
        if isinstance(c.get("text"), str):
            return str(c["text"])
    return doc["content"] if isinstance(doc.get("content"), str) else None


def stream_text(raw: bytes) -> tuple[str, dict[str, Any] | None]:
    """A stream's deltas joined into its text, and its last event that carries usage or timings."""
    parts: list[str] = []
    final: dict[str, Any] | None = None
    for doc in sse_events(raw):
        choices = doc.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            c = choices[0]
            delta = c.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                parts.append(delta["content"])
            elif isinstance(c.get("text"), str):
                parts.append(c["text"])
        elif isinstance(doc.get("content"), str):
            parts.append(doc["content"])
        if "timings" in doc or "usage" in doc:
            final = {k: doc[k] for k in ("usage", "timings") if k in doc}
    return "".join(parts), final


def capture_response(data: bytes, stream: bool, limit: int, cap: Captured, complete: bool) -> None:
    """The answer: a whole answer as llama-server sent it (as text), or for a stream its assembled text and
    its final usage and timings. `complete`: False when the kept raw stream was cut at the limit."""
    if stream:
        joined, final = stream_text(data)
        cap.text = _clip(joined, limit, cap)
        cap.response = json.dumps({"text": cap.text, **(final or {})}, ensure_ascii=False)
        if not complete:
            cap.truncated = True
        return
    raw = data.decode("utf-8", "replace")
    cap.response = _clip(raw, limit, cap)
    text: str | None
    try:
        text = answer_text(json.loads(data)) if len(data) <= PARSE_MAX else None
    except ValueError:
        text = None
    cap.text = _clip(text, limit, cap) if text is not None else None
