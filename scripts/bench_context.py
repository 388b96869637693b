"""P7: what the context guard costs a request (P1-style: one client, interleaved, p50/p99), with a 10-turn chat.

Two supervisors on the tiny Qwen3-VL pair, same settings, one with `images.fit_context` on and one with it off;
each request goes to both in turn, so machine noise hits both alike. One scenario per way the guard can decide:

- bound:     short turns, far inside the slot: no call to llama-server at all;
- estimate:  long turns, inside the slot by a little more than the estimate's margin: per-message counts from
             the guard's cache (the same conversation again), no call;
- uncached:  the same, but every request's texts are new (a counter in each message): one /tokenize call for all
             of them (what every request would cost without the cache). llama-server then has to process the
             whole prompt too (no prefix to reuse), which swamps the difference: read the guard's own time;
- counted:   inside the slot by less than the margin: llama-server's exact count (one input_tokens call);
- trimmed:   the `counted` conversation after extra older turns, clearly over the slot: planned on the (cached)
             estimate, re-serialised; the guard-off side is sent the `counted` conversation (the guard trims to
             the limit less its margin, so it sends a turn less: read the guard's own time here too).

Used by scripts/bench.py (`--only context` runs only this).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import httpx

MAX_TOKENS = 8
TURNS = 10


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def conversation(chars: int, nonce: str = "0000 ", extra_turns: int = 0) -> list[dict[str, Any]]:
    """System + `TURNS` user/assistant turns of about `chars` characters each + a last question; `extra_turns`
    older turns before them (different text), for the trimmed scenario."""
    line = "the quick brown fox jumps over the lazy dog while the cat watches from the window. "
    body = (line * (chars // len(line) + 1))[:chars]
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "You are a brief assistant."}]
    for i in range(extra_turns):
        msgs += [{"role": "user", "content": f"old question {i}: " + body.upper()},
                 {"role": "assistant", "content": f"old answer {i}: " + body.upper()}]
    for i in range(TURNS):
        msgs += [{"role": "user", "content": f"{nonce}question {i}: {body}"},
                 {"role": "assistant", "content": f"{nonce}answer {i}: {body}"}]
    msgs.append({"role": "user", "content": f"{nonce}and what now?"})
    return msgs


def exact(child: str, msgs: list[dict[str, Any]]) -> int:
    r = httpx.post(f"{child}/v1/chat/completions/input_tokens", json={"messages": msgs}, timeout=60)
    return int(r.json()["input_tokens"])


def chars_for(child: str, target: int) -> int:
    """The per-message length whose conversation llama-server counts closest to `target` tokens (below it)."""
    lo, hi = 1, 4096
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if exact(child, conversation(mid)) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def outcomes(url: str) -> dict[str, float]:
    """The guard's decisions so far by outcome, and its time (`_seconds`, `_n`) from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    # Every model's series carry a `model` label (one model here).
    out = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^llama_supervisor_context_checks_total\{(?:[^}]*,)?outcome="(\w+)"[^}]*\} (\S+)$', text, re.MULTILINE)}
    for key, name in (("_seconds", "sum"), ("_n", "count")):
        m = re.search(rf"^llama_supervisor_context_seconds_{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE)
        out[key] = float(m.group(1)) if m else 0.0
    return out


def measure(on: str, off: str, make_on: Callable[[int], list[dict[str, Any]]],
            make_off: Callable[[int], list[dict[str, Any]]], n: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {"on": [], "off": []}
    before = outcomes(on)
    with httpx.Client(timeout=60, limits=httpx.Limits(max_keepalive_connections=2)) as c:
        for i in range(-min(10, n), n):  # warm-up rounds, not recorded
            order = [("on", on, make_on), ("off", off, make_off)]
            for name, base, make in (order if i % 2 == 0 else order[::-1]):
                body = {"messages": make(i), "max_tokens": MAX_TOKENS, "ignore_eos": True}
                t = time.perf_counter()
                r = c.post(f"{base}/v1/chat/completions", json=body)
                dt = (time.perf_counter() - t) * 1000
                assert r.status_code == 200, r.text[:300]
                if i >= 0:
                    times[name].append(dt)
    after = outcomes(on)
    out: dict[str, Any] = {k: {"p50_ms": round(pct(v, 50), 3), "p99_ms": round(pct(v, 99), 3)}
                           for k, v in times.items()}
    # The guard's own time, measured inside the supervisor: free of llama-server's (noisier) share.
    calls = after.pop("_n") - before.pop("_n")
    spent = after.pop("_seconds") - before.pop("_seconds")
    out["guard_mean_ms"] = round(spent / calls * 1000, 3) if calls else None
    out["added_p50_ms"] = round(out["on"]["p50_ms"] - out["off"]["p50_ms"], 3)
    out["added_p99_ms"] = round(out["on"]["p99_ms"] - out["off"]["p99_ms"], 3)
    out["outcomes"] = {k: int(v - before.get(k, 0)) for k, v in after.items() if v - before.get(k, 0)}
    out["n"] = n
    return out


def p7_context_guard(on: str, off: str, child_on: str, n_ctx: int, n: int) -> dict[str, Any]:
    limit = n_ctx - MAX_TOKENS
    long_chars = chars_for(child_on, limit - 120)
    near_chars = chars_for(child_on, limit - 20)
    near = conversation(near_chars)
    extra = 1
    while exact(child_on, conversation(near_chars, extra_turns=extra)) <= limit + 300:
        extra += 1
    res: dict[str, Any] = {"n_ctx": n_ctx, "turns": TURNS,
                           "prompt_tokens": {"bound": exact(child_on, conversation(40)),
                                             "estimate": exact(child_on, conversation(long_chars)),
                                             "counted": exact(child_on, near),
                                             "trimmed": exact(child_on, conversation(near_chars, extra_turns=extra))}}
    short, long_ = conversation(40), conversation(long_chars)
    res["bound"] = measure(on, off, lambda i: short, lambda i: short, n)
    res["estimate"] = measure(on, off, lambda i: long_, lambda i: long_, n)
    res["uncached"] = measure(on, off, lambda i: conversation(long_chars, nonce=f"{i % 10_000:04d} "),
                              lambda i: conversation(long_chars, nonce=f"{i % 10_000:04d} "), max(10, n // 10))
    res["counted"] = measure(on, off, lambda i: near, lambda i: near, n)
    trim = conversation(near_chars, extra_turns=extra)
    res["trimmed"] = measure(on, off, lambda i: trim, lambda i: near, n)
    return res


def rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Table rows for scripts/bench.py: guard off vs guard on, per scenario."""
    out = []
    for key, words in (("bound", "far inside (no call)"), ("estimate", "near, cached counts (no call)"),
                       ("uncached", "near, new texts (/tokenize)"), ("counted", "at the edge (input_tokens)"),
                       ("trimmed", "over: turns dropped on the estimate")):
        s = r[key]
        tokens = r["prompt_tokens"]["estimate" if key == "uncached" else key]
        out.append((f"P7 guard, 10 turns, {words}, {tokens} tokens: p50 / p99 (guard's own time)",
                    f"{s['off']['p50_ms']} / {s['off']['p99_ms']} ms (guard off)",
                    f"{s['on']['p50_ms']} / {s['on']['p99_ms']} ms (guard on)",
                    f"+{s['added_p50_ms']} / +{s['added_p99_ms']} ms ({s['guard_mean_ms']} ms)", ""))
    return out
