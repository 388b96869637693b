"""What a golden request's answer was (core/canary.py compares two builds' answers): its status, its JSON shape,
its token counts and speeds, read from a chat completion or a stream. Pure: no I/O, no clock."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Answer:
    """One golden request's outcome on one build. Speeds are the best of the repetitions (noise only slows)."""

    name: str
    status: int  # HTTP status; 0: no answer at all
    shape: Mapping[str, str] = field(default_factory=dict)  # JSON path → type ("str", "num", "bool", "null", ...)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_per_s: float | None = None
    predicted_per_s: float | None = None
    text: str = ""
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "shape": dict(self.shape),
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "prompt_per_s": self.prompt_per_s, "predicted_per_s": self.predicted_per_s,
                "text": self.text, "error": self.error}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Answer:
        return cls(str(d["name"]), int(d["status"]), {str(k): str(v) for k, v in dict(d.get("shape") or {}).items()},
                   _opt_int(d.get("prompt_tokens")), _opt_int(d.get("completion_tokens")),
                   _opt_float(d.get("prompt_per_s")), _opt_float(d.get("predicted_per_s")),
                   str(d.get("text") or ""), str(d.get("error") or ""))


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def shape_of(doc: Any, prefix: str = "") -> dict[str, str]:
    """Every JSON path in `doc` with its value's type; list items share one path (`choices[]`)."""
    out: dict[str, str] = {}
    if isinstance(doc, dict):
        out[prefix or "."] = "obj"
        for k, v in doc.items():
            out.update(shape_of(v, f"{prefix}.{k}"))
    elif isinstance(doc, list):
        out[prefix or "."] = "list"
        for item in doc:
            for path, kind in shape_of(item, f"{prefix}[]").items():
                out[path] = merge_kind(out.get(path), kind)
    else:
        out[prefix or "."] = ("null" if doc is None else "bool" if isinstance(doc, bool)
                              else "num" if isinstance(doc, int | float) else "str")
    return out


def merge_kind(a: str | None, b: str) -> str:
    """Two values seen at one path (list items, stream chunks): null gives way to a real type."""
    return b if a is None or a == "null" else a


def answer_from_json(name: str, status: int, doc: Any, wall_s: float) -> Answer:
    """A non-streamed chat completion: shape, token counts, text and speeds (the server's own timings when it
    sends them, else the completion tokens over the wall time)."""
    if status != 200 or not isinstance(doc, dict):
        return Answer(name, status, shape_of(doc), error=_error_text(doc))
    usage: dict[str, Any] = doc["usage"] if isinstance(doc.get("usage"), dict) else {}
    text = ""
    choices = doc.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        msg = choices[0].get("message")
        if isinstance(msg, dict) and isinstance(msg.get("content"), str):
            text = msg["content"]
    return _with_speed(Answer(name, status, shape_of(doc), _int_or_none(usage.get("prompt_tokens")),
                              _int_or_none(usage.get("completion_tokens")), text=text), doc.get("timings"), wall_s)


def answer_from_stream(name: str, status: int, events: Sequence[Any], wall_s: float) -> Answer:
    """A streamed chat completion, from its `data:` payloads in order, each parsed from JSON (a payload that
    was not JSON stays a str; the end marker is the str `[DONE]`). With another status than 200, `events`
    holds the error body. The shape is the union of the chunks', plus `[DONE]` when the stream ended properly."""
    if status != 200:
        doc = events[0] if events else None
        return Answer(name, status, shape_of(doc), error=_error_text(doc))
    shape: dict[str, str] = {}
    text: list[str] = []
    usage: dict[str, Any] = {}
    timings: Any = None
    errors: list[str] = []
    for ev in events:
        if isinstance(ev, str):
            if ev.strip() == "[DONE]":
                shape["[DONE]"] = "end"
            else:
                errors.append(f"not JSON: {ev[:100]}")
            continue
        if not isinstance(ev, dict):
            continue
        chunk = ev
        if "error" in chunk:
            errors.append(_error_text(chunk))
        for path, kind in shape_of(chunk).items():
            shape[path] = merge_kind(shape.get(path), kind)
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                text.append(delta["content"])
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        if chunk.get("timings") is not None:
            timings = chunk["timings"]
    ans = Answer(name, status, shape, _int_or_none(usage.get("prompt_tokens")),
                 _int_or_none(usage.get("completion_tokens")), text="".join(text), error="; ".join(errors))
    return _with_speed(ans, timings, wall_s)


def _with_speed(a: Answer, timings: Any, wall_s: float) -> Answer:
    t = timings if isinstance(timings, dict) else {}
    prompt = _float_or_none(t.get("prompt_per_second"))
    predicted = _float_or_none(t.get("predicted_per_second"))
    if predicted is None and a.completion_tokens and wall_s > 0:
        predicted = a.completion_tokens / wall_s
    return Answer(a.name, a.status, a.shape, a.prompt_tokens, a.completion_tokens, prompt, predicted, a.text, a.error)


def best_of(runs: Sequence[Answer]) -> Answer:
    """Repetitions of one request: the first answer, with the best speeds any repetition reached; a failed
    repetition (another status, other token counts) wins, so a flaky build is not hidden."""
    first = runs[0]
    for r in runs[1:]:
        if (r.status, r.prompt_tokens, r.completion_tokens) != (first.status, first.prompt_tokens,
                                                                first.completion_tokens) or r.error:
            return r
    prompt = [r.prompt_per_s for r in runs if r.prompt_per_s is not None]
    predicted = [r.predicted_per_s for r in runs if r.predicted_per_s is not None]
    return Answer(first.name, first.status, first.shape, first.prompt_tokens, first.completion_tokens,
                  max(prompt) if prompt else None, max(predicted) if predicted else None, first.text, first.error)


def _int_or_none(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _float_or_none(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and v > 0 else None


def _error_text(doc: Any) -> str:
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err)[:300]
        if err is not None:
            return str(err)[:300]
    return "" if doc is None else str(doc)[:300]
