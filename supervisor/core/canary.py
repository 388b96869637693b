"""The upgrade canary's decisions: what the golden set asks, what an answer's shape is, whether a candidate build
is as good as the last good one, and whether it can run beside the old child. Pure: no I/O, no clock.

A candidate passes when, for every golden request the old build answered, it answers with the same status,
a response shape that lacks nothing the old one had, the same token counts (a deterministic request:
temperature 0, a fixed seed, a fixed number of tokens with end-of-stream ignored, so a tokenizer or chat
template change shows), tokens/s no more than `max_slowdown` below the old build's, and memory no more
than `max_memory_growth` above it. A candidate that does not start, or fails its warmup, fails outright.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .answers import Answer
from .residency import Mem, Room

GOLDEN_SEED = 4242
GOLDEN_N_PREDICT = 24
# Long enough that prompt processing is measured at all (a few tokens take microseconds on a small model),
# short enough for any context the supervisor accepts (min_ctx_size floors at 256 tokens).
GOLDEN_PROMPT = ("The lighthouse keeper wrote in the log every evening: the wind, the sea, the ships that passed, "
                 "the lamp's oil and the weather to come. ") * 3
# RSS of a small model's child moves by a few MiB between two runs of the same build (allocator arenas, the
# pages a request happened to touch): growth below this is never a failure, whatever the share.
MEMORY_NOISE_MIB = 16.0


@dataclass(frozen=True)
class Limits:
    max_slowdown: float = 0.25  # the candidate's tokens/s may be this share below the old build's
    max_memory_growth: float = 0.15  # its memory (host RSS, each GPU) this share above


@dataclass(frozen=True)
class Golden:
    """One request of the golden set."""

    name: str  # "text", "stream", "image"
    path: str
    body: dict[str, Any]
    stream: bool = False


def golden_set(image_url: str | None, n_predict: int = GOLDEN_N_PREDICT) -> list[Golden]:
    """The golden requests: a text completion, a stream, and an image when the profile has a projector
    (`image_url`: a data URL). Deterministic: temperature 0, a seed, `n_predict` tokens whatever comes."""
    # cache_prompt off: a repetition (or a user's earlier request) must not find the prompt in the KV cache,
    # or prompt processing is measured on one token.
    common: dict[str, Any] = {"temperature": 0, "seed": GOLDEN_SEED, "max_tokens": n_predict, "ignore_eos": True,
                              "cache_prompt": False}
    text = {"messages": [{"role": "user", "content": GOLDEN_PROMPT}], **common}
    out = [Golden("text", "/v1/chat/completions", text),
           Golden("stream", "/v1/chat/completions",
                  {**text, "stream": True, "stream_options": {"include_usage": True}}, stream=True)]
    if image_url is not None:
        content = [{"type": "text", "text": "Describe the picture."}, {"type": "image_url", "image_url": {"url": image_url}}]
        out.append(Golden("image", "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], **common}))
    return out


@dataclass(frozen=True)
class Measured:
    """One build's run of the canary: whether it came up, its answers and the memory it held after them."""

    build: str  # a label for people: version and checksum
    failure: str = ""  # why it never got to the golden set (flags, start, warmup); empty when it did
    answers: tuple[Answer, ...] = ()
    memory: Mem | None = None

    def answer(self, name: str) -> Answer | None:
        return next((a for a in self.answers if a.name == name), None)

    def as_dict(self) -> dict[str, Any]:
        mem = None if self.memory is None else {"gpu_mib": list(self.memory.gpu_mib), "host_mib": self.memory.host_mib}
        return {"build": self.build, "failure": self.failure, "answers": [a.as_dict() for a in self.answers],
                "memory": mem}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Measured:
        m = d.get("memory")
        mem = None if not isinstance(m, Mapping) else Mem(tuple(float(x) for x in m.get("gpu_mib") or ()),
                                                           float(m.get("host_mib") or 0.0))
        return cls(str(d.get("build") or ""), str(d.get("failure") or ""),
                   tuple(Answer.from_dict(a) for a in d.get("answers") or ()), mem)


# ---- the comparison ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One line of the comparison table."""

    check: str
    old: str
    new: str
    ok: bool
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "old": self.old, "new": self.new, "ok": self.ok, "reason": self.reason}


@dataclass(frozen=True)
class Verdict:
    passed: bool
    rows: tuple[Row, ...]

    @property
    def reasons(self) -> list[str]:
        return [r.reason for r in self.rows if not r.ok]

    def summary(self) -> str:
        return "passed" if self.passed else "failed: " + "; ".join(self.reasons)

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": self.reasons, "rows": [r.as_dict() for r in self.rows]}


def compare(old: Measured, new: Measured, limits: Limits) -> Verdict:
    """Row by row: what the old build did, what the candidate did, and whether that is good enough."""
    rows: list[Row] = [Row("build", old.build, new.build, True)]
    if new.failure:
        rows.append(Row("start", "ok" if not old.failure else old.failure, new.failure, False,
                        f"the candidate did not come up: {new.failure}"))
        return Verdict(False, tuple(rows))
    rows.append(Row("start", "ok", "ok", True))
    for o in old.answers:
        n = new.answer(o.name)
        rows.extend(_answer_rows(o, n))
    rows.extend(_speed_rows(old, new, limits))
    rows.extend(_memory_rows(old.memory, new.memory, limits))
    return Verdict(all(r.ok for r in rows), tuple(rows))


def _answer_rows(o: Answer, n: Answer | None) -> list[Row]:
    name = o.name
    if n is None:
        return [Row(f"{name}: status", str(o.status), "not asked", False, f"{name}: the candidate was not asked")]
    rows = []
    status_ok = n.status == o.status or o.status != 200
    why = f"{name}: answered {n.status or 'nothing'}" + (f" ({n.error})" if n.error else "") + f", the old build {o.status}"
    rows.append(Row(f"{name}: status", str(o.status), str(n.status or "no answer"), status_ok and not n.error,
                    "" if status_ok and not n.error else why))
    if o.status != 200 or n.status != 200:
        return rows
    missing = sorted(p for p in o.shape if p not in n.shape)
    changed = sorted(p for p, k in o.shape.items()
                     if p in n.shape and "null" not in (k, n.shape[p]) and n.shape[p] != k)
    shape_ok = not missing and not changed
    detail = ", ".join([f"missing {p}" for p in missing[:5]] + [f"{p} is {n.shape[p]}, was {o.shape[p]}"
                                                                 for p in changed[:5]])
    rows.append(Row(f"{name}: shape", f"{len(o.shape)} fields", f"{len(n.shape)} fields", shape_ok,
                    "" if shape_ok else f"{name}: response shape changed: {detail}"))
    for label, a, b in (("prompt tokens", o.prompt_tokens, n.prompt_tokens),
                        ("completion tokens", o.completion_tokens, n.completion_tokens)):
        ok = a is None or a == b  # None: the old build's count is not known (no baseline recorded)
        rows.append(Row(f"{name}: {label}", str(a), str(b), ok, "" if ok else f"{name}: {label} {b}, the old build {a}"))
    same = n.text == o.text
    rows.append(Row(f"{name}: text", "", "same" if same else "differs", True))  # informational: numerics may move
    return rows


def baseline_unknown(golden: Sequence[Golden]) -> Measured:
    """No old build to compare with (its child is not running, nothing recorded): the candidate must still come
    up and answer every golden request with 200 and the full answer."""
    return Measured("unknown (no baseline)", "",
                    tuple(Answer(g.name, 200, {}, None, int(g.body["max_tokens"])) for g in golden))


def too_slow(old: Measured, new: Measured, limits: Limits) -> bool:
    """Only a speed check fails so far: worth a second round before the verdict (on a busy box one round can be
    unlucky; a second can only raise the best, and a build really slower stays slower)."""
    rows = _speed_rows(old, new, limits)
    return any(not r.ok for r in rows) and not new.failure


def _speed_rows(old: Measured, new: Measured, limits: Limits) -> list[Row]:
    rows = []
    for label, attr in (("prompt tokens/s", "prompt_per_s"), ("generated tokens/s", "predicted_per_s")):
        a = _best_speed(old, attr)
        b = _best_speed(new, attr)
        if a is None:
            continue  # nothing to compare with: the old build never reported it
        floor = a * (1 - limits.max_slowdown)
        ok = b is not None and b >= floor
        why = "" if ok else (f"{label}: {_num(b)}, below {_num(floor)} (the old build's {_num(a)} less "
                             f"upgrade_max_slowdown {limits.max_slowdown:.0%})")
        rows.append(Row(label, _num(a), _num(b), ok, why))
    return rows


def _best_speed(m: Measured, attr: str) -> float | None:
    """The text request's speed: the one request both builds always run, the same way."""
    a = m.answer("text")
    v = getattr(a, attr) if a is not None and a.status == 200 else None
    return float(v) if v is not None else None


def _memory_rows(old: Mem | None, new: Mem | None, limits: Limits) -> list[Row]:
    if old is None:
        return []
    pairs = [("host memory MiB", old.host_mib, new.host_mib if new is not None else None)]
    for i, mib in enumerate(old.gpu_mib):
        if mib > 0:
            pairs.append((f"GPU {i} memory MiB", mib, new.gpu(i) if new is not None else None))
    rows = []
    for label, a, b in pairs:
        ceiling = max(a * (1 + limits.max_memory_growth), a + MEMORY_NOISE_MIB)
        ok = b is not None and b <= ceiling
        why = "" if ok else (f"{label}: {_num(b)}, above {_num(ceiling)} (the old build's {_num(a)} plus "
                             f"upgrade_max_memory_growth {limits.max_memory_growth:.0%})")
        rows.append(Row(label, _num(a), _num(b), ok, why))
    return rows


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"


# ---- where the candidate runs -----------------------------------------------------------------------------

def fits_beside(old: Mem | None, room: Room, limits: Limits, budget_left_mib: float | None = None
                ) -> tuple[bool, str]:
    """Can the candidate run next to the old child? It needs what the old one holds plus the growth allowed,
    on every GPU the old one uses and in host RAM (MemAvailable, and what `memory_budget_mib` leaves to new
    children when one is set). Unknown memory: not beside (the safe way, the drain, costs a short pause;
    running out of memory costs the box)."""
    if old is None:
        return False, "the old child's memory is not known"
    need = 1 + limits.max_memory_growth
    for i, mib in enumerate(old.gpu_mib):
        if mib <= 0:
            continue
        free = room.gpu_free_mib[i] if i < len(room.gpu_free_mib) else 0.0
        if free < mib * need:
            return False, f"GPU {i}: {free:.0f} MiB free, the candidate may need {mib * need:.0f}"
    if room.host_available_mib is None:
        return False, "available host memory is not known"
    host_need = old.host_mib * need + MEMORY_NOISE_MIB
    if room.host_available_mib < host_need:
        return False, f"host: {room.host_available_mib:.0f} MiB available, the candidate may need {host_need:.0f}"
    if budget_left_mib is not None and budget_left_mib < host_need:
        return False, f"memory_budget_mib leaves {budget_left_mib:.0f} MiB, the candidate may need {host_need:.0f}"
    return True, "beside the old child"
