"""What llama-server answered, turned into what the client gets: relayed chunk by chunk for streams, and for
whole answers made JSON in the one error shape, with the operator's hints where llama-server gives none."""

from __future__ import annotations

import json
import re
import time
from typing import TYPE_CHECKING

from ...core.lifecycle import Machine
from ...spec.profile import Profile
from ...telemetry.activity_record import Record, StreamTap
from ..errors import Send, error_doc, json_error, send_simple
from .predict import chat_to_predict
from .upstream import Response, UpstreamError

if TYPE_CHECKING:
    from ...child.progress import Exchange
    from ...child.runner import Runner
    from ...telemetry.metrics import Metrics
    from .carry import Carry

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                        b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"host", b"content-length"})


def ctx_words(profile: Profile, m: Machine) -> str:
    """The context in force, in words: the out-of-memory ladder may have lowered it, slots share it."""
    ctx = f"ctx_size {m.effective.ctx_size}"
    if m.effective.ctx_size != m.base.ctx_size:
        ctx += f" (lowered from {m.base.ctx_size}: {m.adjustment})"
    if profile.parallel and profile.parallel > 1:
        ctx += f" shared by {profile.parallel} parallel slots"
    return ctx


def context_hint(data: bytes, profile: Profile, m: Machine) -> bytes:
    """llama-server's 'exceeds the available context size' says 'try increasing it'; the operator also needs
    the size in force (the out-of-memory ladder may have lowered it) and which profile knobs bear on it."""
    try:
        doc = json.loads(data)
        err = doc["error"]
        ctx = ctx_words(profile, m)
        policy = profile.images
        kept = [f"the last {policy.keep_last_images} images"] if policy.keep_last_images is not None else []
        kept += [f"the last {policy.keep_last_turns} turns"] if policy.keep_last_turns else []
        err["message"] = (f"{err['message']}. Profile '{profile.name}' runs with {ctx}"
                          + (f"; the proxy keeps {' and '.join(kept)}" if kept else "")
                          + ": shorten the conversation, or raise ctx_size"
                          + (" in the profile" if policy.keep_last_turns else " or set images.keep_last_turns in the profile"))
        return json.dumps(doc).encode()
    except (ValueError, KeyError, TypeError):
        return data  # not the shape we know: llama-server's answer goes through as it is


def client_error_from_500(data: bytes) -> bytes | None:
    """llama-server answers 500 when its JSON library throws on a field of the wrong type: that is the client's
    request, so the client gets a 400 saying so (fields the proxy checks never get this far)."""
    if b"[json.exception." not in data:
        return None
    try:
        message = json.loads(data)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = data.decode("utf-8", "replace")[:300]
    return json_error(400, f"llama-server could not read a field of the request: {message}",
                      "invalid_request_error")[2]


async def relay(runner: Runner, upstream: Response, send: Send, status: list[int], predict: bool = False,
                extra: list[tuple[bytes, bytes]] | None = None, rec: Record | None = None,
                carry: Carry | None = None, ex: Exchange | None = None) -> bool:
    """Pass the answer on; True when the child's answer came in full. `rec` (the activity log's record) gets
    references to what the numbers are read from later, off the event loop. `carry`: a stream that may go on
    on the next child when this one dies (web/api/carry.py); it keeps the chunks relayed. `ex`: this request's
    exchange, whose silence liveness watches (child/progress.py)."""
    code = status[0] = upstream.status
    headers = [(k, v) for k, v in upstream.headers if k.lower() not in HOP_BY_HOP] + (extra or [])
    sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)
    if not sse:
        try:
            data = await upstream.read()
        except UpstreamError as exc:
            status[0] = 502
            await send_simple(send, *json_error(502, f"llama-server failed mid-response: {exc!r}", "server_error"))
            if rec is not None:
                rec.error = f"llama-server failed mid-response: {exc!r}"
            return False
        runner.note_progress(ex=ex)  # it answered: alive, whatever the status
        if rec is not None:
            rec.ttft_ms = (time.perf_counter() - rec.t0) * 1000
            rec.answer = data  # llama-server's own, with its timings (an error is replaced below)
        if 200 <= code < 300:
            if b'"usage"' in data:
                count_tokens(runner.metrics, data)
            if predict:
                data = json.dumps(chat_to_predict(json.loads(data))).encode()
                headers = [(k, v) for k, v in headers if k.lower() != b"content-type"]
                headers.append((b"content-type", b"application/json"))
        elif code == 500 and (fixed := client_error_from_500(data)) is not None:
            code = status[0] = 400
            data = fixed
            headers = [(k, v) for k, v in headers if k.lower() != b"content-type"]
            headers.append((b"content-type", b"application/json"))
        elif code == 400 and b"exceed_context_size_error" in data:
            data = context_hint(data, runner.loaded.profile, runner.machine)
        if code >= 400 and not data.lstrip().startswith(b"{"):
            # llama-server's HTTP library answers some errors with an empty or plain-text body
            text = data.decode("utf-8", "replace").strip()[:300] or "no details"
            data = json_error(code, f"llama-server answered {code}: {text}",
                              "server_error" if code >= 500 else "invalid_request_error")[2]
            headers = [(k, v) for k, v in headers if k.lower() != b"content-type"]
            headers.append((b"content-type", b"application/json"))
        if rec is not None and code >= 400:
            rec.answer = data  # the message the client got
        await send_simple(send, code, headers + [(b"content-length", str(len(data)).encode())], data)
        return True
    await send({"type": "http.response.start", "status": code, "headers": headers})
    tap = StreamTap(rec) if rec is not None else None

    def passed(chunk: bytes) -> None:
        runner.note_progress(stream=True, ex=ex)  # generated text: the inference loop runs (liveness)
        timings = b'"timings"' in chunk
        if timings:
            count_tokens(runner.metrics, chunk)
        if tap is not None:
            tap.feed(chunk, timings)

    whole = True
    held = b""  # the start of an event whose end has not come yet
    try:
        async for chunk in upstream:
            # Only whole events go on (llama-server ends each with a blank line; a read may end inside one), so a
            # stream cut at any byte leaves the client at an event's end, where its continuation or the error
            # event can follow. A check per chunk; a copy only for the rare chunk that ends mid-event.
            if held:
                chunk, held = held + chunk, b""
            if not chunk.endswith(b"\n\n"):
                end = chunk.rfind(b"\n\n")
                end = end + 2 if end >= 0 else 0
                chunk, held = chunk[:end], chunk[end:]
                if not chunk:
                    continue
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            passed(chunk)
            if carry is not None:
                carry.keep(chunk)
        if held:  # the stream ended without its blank line: pass on what came
            await send({"type": "http.response.body", "body": held, "more_body": True})
    except UpstreamError as exc:
        whole = False  # this child's answer was cut (the poison guard's suspect), even when the next one ends it
        if carry is None or not await carry.carry_on(send, passed, type(exc).__name__):
            m = runner.machine
            err = error_doc(502, f"llama-server stream was cut ({type(exc).__name__}); state: {m.state.value}",
                            "server_error")
            await send({"type": "http.response.body", "body": b"data: " + json.dumps(err).encode() + b"\n\n",
                        "more_body": True})
            status[0] = 502
            if rec is not None:
                rec.error = err["error"]["message"]
    finally:
        if tap is not None:
            tap.done()
    await send({"type": "http.response.body", "body": b""})
    return whole


# The numbers are read with a byte search, not by parsing the JSON (12 us a request with json.loads, ~2 here): a
# key followed by its colon only ever appears unescaped as a key (inside a JSON string its quotes are escaped).
_NUMBER = {key: re.compile(rb'"%s"\s*:\s*(\d+)' % key) for key in
           (b"prompt_tokens", b"completion_tokens", b"prompt_n", b"predicted_n")}


def _number(data: bytes, key: bytes) -> int | None:
    m = _NUMBER[key].search(data)
    return int(m.group(1)) if m else None


def token_counts(data: bytes) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens from llama-server's usage, else its timings, in an answer or a stream chunk."""
    prompt = _number(data, b"prompt_tokens")
    completion = _number(data, b"completion_tokens")
    return (_number(data, b"prompt_n") if prompt is None else prompt,
            _number(data, b"predicted_n") if completion is None else completion)


def count_tokens(metrics: Metrics, data: bytes) -> None:
    """Token counts from llama-server's own usage/timings, read only from the chunk that has them."""
    prompt, completion = token_counts(data)
    if prompt is not None:
        metrics.tokens.labels("prompt").inc(prompt)
    if completion is not None:
        metrics.tokens.labels("completion").inc(completion)
