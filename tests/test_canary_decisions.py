"""The upgrade canary's pure decisions (core/canary.py, core/answers.py), as tables: answers parsed, builds compared, room beside."""

from __future__ import annotations

from typing import Any

import pytest

from supervisor.core import answers as ans
from supervisor.core import canary as c
from supervisor.core import upgrade as up
from supervisor.core.residency import Mem, Room

LIMITS = c.Limits()  # 25 % slower, 15 % more memory at most


def chat(content: str = "abc", prompt: int = 60, completion: int = 24, pp: float = 2000.0, tg: float = 300.0
         ) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
            "timings": {"prompt_n": prompt, "prompt_per_second": pp, "predicted_n": completion,
                        "predicted_per_second": tg}}


def answer(name: str = "text", **kw: Any) -> ans.Answer:
    return ans.answer_from_json(name, 200, chat(**kw), 0.1)


def build(*answers: c.Answer, host: float = 100.0, gpu: tuple[float, ...] = (), failure: str = "") -> c.Measured:
    return c.Measured("b", failure, tuple(answers) or (answer(), answer("stream")), Mem(gpu, host))


def test_golden_set_is_deterministic_and_has_an_image_only_with_a_projector() -> None:
    text_only = c.golden_set(None)
    assert [g.name for g in text_only] == ["text", "stream"]
    with_image = c.golden_set("data:image/png;base64,AAAA")
    assert [g.name for g in with_image] == ["text", "stream", "image"]
    for g in with_image:
        assert g.body["temperature"] == 0 and g.body["seed"] == c.GOLDEN_SEED and g.body["ignore_eos"] is True
        assert g.body["max_tokens"] == c.GOLDEN_N_PREDICT
    assert with_image[1].stream and with_image[1].body["stream_options"] == {"include_usage": True}
    assert with_image[2].body["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/png")


def test_shape_of_names_every_path_with_its_type() -> None:
    shape = ans.shape_of({"a": [{"b": 1, "c": None}, {"c": "x"}], "d": True})
    assert shape == {".": "obj", ".a": "list", ".a[]": "obj", ".a[].b": "num", ".a[].c": "str", ".d": "bool"}


def test_answer_from_json_reads_tokens_speeds_and_text() -> None:
    a = ans.answer_from_json("text", 200, chat("hi", 61, 24, 1500.0, 250.0), 0.2)
    assert (a.prompt_tokens, a.completion_tokens, a.prompt_per_s, a.predicted_per_s, a.text) == (61, 24, 1500.0,
                                                                                               250.0, "hi")
    no_timings = {k: v for k, v in chat().items() if k != "timings"}
    assert ans.answer_from_json("text", 200, no_timings, 0.5).predicted_per_s == pytest.approx(48.0)  # 24 / 0.5 s
    err = ans.answer_from_json("image", 500, {"error": {"message": "image input is not supported", "code": 500}}, 0.01)
    assert err.status == 500 and err.error == "image input is not supported"


def test_answer_from_stream_joins_the_chunks() -> None:
    chunks: list[Any] = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "ab"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "c"}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 60, "completion_tokens": 24},
         "timings": {"prompt_per_second": 900.0, "predicted_per_second": 200.0}},
        "[DONE]",
    ]
    a = ans.answer_from_stream("stream", 200, chunks, 0.3)
    assert (a.text, a.prompt_tokens, a.completion_tokens, a.predicted_per_s) == ("abc", 60, 24, 200.0)
    assert a.shape["[DONE]"] == "end" and a.shape[".choices[].delta.content"] == "str" and not a.error
    cut = ans.answer_from_stream("stream", 200, chunks[:3], 0.3)
    assert "[DONE]" not in cut.shape and cut.completion_tokens is None
    broken = ans.answer_from_stream("stream", 200, [*chunks[:2], "garbage", {"error": {"message": "boom"}}], 0.3)
    assert "not JSON" in broken.error and "boom" in broken.error
    refused = ans.answer_from_stream("stream", 503, [{"error": {"message": "Loading model"}}], 0.0)
    assert refused.status == 503 and refused.error == "Loading model"


def test_best_of_takes_the_best_speed_but_never_hides_a_bad_repetition() -> None:
    runs = [answer(pp=1000, tg=200), answer(pp=1800, tg=150), answer(pp=900, tg=260)]
    best = ans.best_of(runs)
    assert (best.prompt_per_s, best.predicted_per_s) == (1800, 260)
    flaky = ans.best_of([answer(), ans.Answer("text", 500, error="crashed")])
    assert flaky.status == 500


@pytest.mark.parametrize(
    ("new", "passed", "reason"),
    [
        (build(), True, ""),
        # Same build, a bit of noise: 20 % slower, 10 % more memory is within the defaults.
        (build(answer(pp=1600, tg=240), answer("stream"), host=110), True, ""),
        (build(failure="warmup: answered 500: image input is not supported"), False, "did not come up"),
        (build(answer(), ans.Answer("stream", 0, error="connection reset")), False, "stream: answered nothing"),
        (build(answer(), ans.Answer("stream", 500, error="boom")), False, "stream: answered 500 (boom)"),
        (build(answer(prompt=64), answer("stream")), False, "text: prompt tokens 64, the old build 60"),
        (build(answer(completion=20), answer("stream")), False, "text: completion tokens 20"),
        (build(answer(pp=1400), answer("stream")), False, "prompt tokens/s: 1400, below 1500"),
        (build(answer(tg=200), answer("stream")), False, "generated tokens/s: 200, below 225"),
        (build(host=130), False, "host memory MiB: 130, above 116"),
        (build(answer()), False, "stream: the candidate was not asked"),
    ],
)
def test_compare(new: c.Measured, passed: bool, reason: str) -> None:
    v = c.compare(build(), new, LIMITS)
    assert v.passed is passed, v.rows
    assert (reason in "; ".join(v.reasons)) if reason else not v.reasons
    assert v.rows[0].check == "build"


def test_compare_shape_missing_and_changed_fields() -> None:
    old = build()
    gone = {k: v for k, v in chat().items() if k != "usage"}
    v = c.compare(old, build(ans.answer_from_json("text", 200, gone, 0.1), answer("stream")), LIMITS)
    assert not v.passed and any("missing .usage" in r for r in v.reasons)
    retyped = chat()
    retyped["choices"][0]["message"]["content"] = ["a list now"]
    v = c.compare(old, build(ans.answer_from_json("text", 200, retyped, 0.1), answer("stream")), LIMITS)
    assert any(".choices[].message.content is list, was str" in r for r in v.reasons)
    added = {**chat(), "system_fingerprint": "b1"}  # a new field is no regression
    assert c.compare(old, build(ans.answer_from_json("text", 200, added, 0.1), answer("stream")), LIMITS).passed


def test_compare_memory_noise_floor_and_gpu() -> None:
    small = c.Measured("b", "", (answer(),), Mem((), 20.0))
    # 20 → 30 MiB is +50 %, but within the few MiB a small child's RSS moves by between two runs.
    assert c.compare(small, c.Measured("b", "", (answer(),), Mem((), 30.0)), LIMITS).passed
    on_gpu = build(gpu=(4000.0,))
    v = c.compare(on_gpu, build(gpu=(4800.0,)), LIMITS)
    assert not v.passed and "GPU 0 memory MiB: 4800, above 4600" in v.reasons[0]
    assert c.compare(on_gpu, build(gpu=(4500.0,)), LIMITS).passed


def test_compare_with_a_wider_threshold_and_text_is_informational() -> None:
    wide = c.Limits(max_slowdown=0.6)
    assert c.compare(build(), build(answer(content="other words", pp=900, tg=130), answer("stream")), wide).passed
    v = c.compare(build(), build(answer(tg=110), answer("stream")), wide)
    assert not v.passed and "upgrade_max_slowdown 60%" in v.reasons[0]


def test_measured_round_trips_through_json() -> None:
    m = build(answer(), answer("stream"), host=123.4, gpu=(1.0, 2.0))
    assert c.Measured.from_dict(m.as_dict()) == m


@pytest.mark.parametrize(
    ("old", "room", "budget", "beside", "why"),
    [
        (Mem((), 100.0), Room((), None, 4000.0), None, True, "beside"),
        (Mem((), 100.0), Room((), None, 120.0), None, False, "host: 120 MiB available"),
        (Mem((), 100.0), Room((), None, None), None, False, "not known"),
        (Mem((), 100.0), Room((), 1000.0, 4000.0), 100.0, False, "memory_budget_mib leaves 100"),
        (Mem((5000.0,), 100.0), Room((8000.0,), None, 4000.0), None, True, "beside"),
        (Mem((5000.0,), 100.0), Room((5500.0,), None, 4000.0), None, False, "GPU 0: 5500 MiB free"),
        (Mem((0.0, 3000.0), 100.0), Room((0.0,), None, 4000.0), None, False, "GPU 1: 0 MiB free"),
        (None, Room((), None, 4000.0), None, False, "not known"),
    ],
)
def test_fits_beside(old: Mem | None, room: Room, budget: float | None, beside: bool, why: str) -> None:
    ok, reason = c.fits_beside(old, room, LIMITS, budget)
    assert ok is beside and why in reason


@pytest.mark.parametrize(
    ("facts", "run", "canary", "adopt", "note"),
    [
        # First start: nothing known, the profile's build runs and becomes the last good one once ready.
        (up.Facts("a", None, None, False, False), up.Run.PROFILE, False, True, ""),
        (up.Facts("a", "a", "a", True, False), up.Run.PROFILE, False, False, ""),
        # A new build at the path: the last good keeps serving while the new one is tried.
        (up.Facts("b", "a", "a", True, False), up.Run.LAST_GOOD, True, False, "canary"),
        (up.Facts("b", None, "a", True, False), up.Run.LAST_GOOD, True, False, "canary"),  # changed while stopped
        # It failed before: not tried again.
        (up.Facts("b", "b", "a", True, True), up.Run.LAST_GOOD, False, False, "failed its canary before"),
        # Upgraded through the API to c: the profile's unchanged build a is no candidate.
        (up.Facts("a", "a", "c", True, False), up.Run.LAST_GOOD, False, False, ""),
        # ... until the path leads elsewhere.
        (up.Facts("d", "a", "c", True, False), up.Run.LAST_GOOD, True, False, "canary"),
        # The last good build is gone: the profile's is all there is.
        (up.Facts("b", "a", "a", False, False), up.Run.PROFILE, False, True, "can no longer be started"),
        (up.Facts("b", "b", "a", False, True), up.Run.PROFILE, False, True, "can no longer be started"),
    ],
)
def test_plan(facts: up.Facts, run: up.Run, canary: bool, adopt: bool, note: str) -> None:
    p = up.plan(facts)
    assert (p.run, p.canary, p.adopt) == (run, canary, adopt)
    assert (note in p.note) if note else not p.note


@pytest.mark.parametrize(("switched", "now", "inside"), [(None, 5.0, False), (0.0, 5.0, True), (0.0, 10.0, True),
                                                          (0.0, 10.1, False)])
def test_in_probation(switched: float | None, now: float, inside: bool) -> None:
    assert up.in_probation(switched, now, 10.0) is inside


def test_without_a_baseline_the_candidate_must_still_answer_in_full() -> None:
    base = c.baseline_unknown(c.golden_set(None))
    assert c.compare(base, build(), LIMITS).passed
    v = c.compare(base, build(answer(), ans.Answer("stream", 500, error="boom")), LIMITS)
    assert not v.passed and "stream: answered 500" in v.reasons[0]
    assert not c.compare(base, build(answer(completion=3), answer("stream")), LIMITS).passed


def test_too_slow_asks_for_a_second_round_only_when_speed_alone_fails() -> None:
    assert not c.too_slow(build(), build(), LIMITS)
    assert c.too_slow(build(), build(answer(tg=200), answer("stream")), LIMITS)
    assert not c.too_slow(build(), build(failure="load: exited with code 1"), LIMITS)
    # A second round keeps each child's best of both.
    assert ans.best_of([answer(tg=200), answer(tg=290)]).predicted_per_s == 290
