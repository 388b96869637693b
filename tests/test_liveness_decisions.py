"""The pure liveness decisions (core/liveness.py), as tables: which route reaches the inference loop, when a probe
is due, and what its answers mean."""

from __future__ import annotations

import json

import pytest

from supervisor.child.liveness import work_from
from supervisor.core.liveness import (
    Answers,
    Outcome,
    Pace,
    Work,
    judge,
    loop_route_unusable,
    loop_routes,
    pace,
    probe_due,
)

BASE = ["llama-server", "--model", "m.gguf", "--port", "8080"]


@pytest.mark.parametrize(("extra", "routes"), [
    (["--metrics"], ("/slots", "/metrics")),  # what build_argv gives when the binary has --metrics
    ([], ("/slots",)),
    (["--metrics", "--no-slots"], ("/metrics",)),
    (["--no-slots"], ()),  # nothing reaches the loop: /health alone, as before
    # A server that may sleep: /slots would wait for (and cause) the model's reload; /metrics answers from a cache.
    (["--metrics", "--sleep-idle-seconds", "300"], ("/metrics", "/slots")),
    (["--metrics", "--sleep-idle-seconds=300"], ("/metrics", "/slots")),
])
def test_loop_routes(extra: list[str], routes: tuple[str, ...]) -> None:
    assert loop_routes(BASE + extra) == routes


@pytest.mark.parametrize(("idle", "stalled", "due"), [
    (0.0, 0.0, False),
    (4.9, 0.0, False),  # progress within the interval
    (5.0, 0.0, True),  # none for a whole interval: idle, or every answer stopped
    (0.1, 9.9, False),  # other answers flow; this request is quiet, but not for stall_s yet
    (0.1, 10.0, True),  # a request with no byte for stall_s while others flow (or /tokenize answers)
])
def test_probe_due(idle: float, stalled: float, due: bool) -> None:
    assert (probe_due(idle, stalled, interval_s=5.0, stall_s=10.0) is not None) is due


def ans(health: int | None, loop: int | None, asked: bool = True, progressed: bool = False,
        streamed: bool = False, still: float = 0.0, cpu: float | None = None) -> Answers:
    return Answers(health=health, loop=loop, asked_loop=asked, progressed=progressed, streamed=streamed,
                   still_s=still, still_cpu_s=cpu)


@pytest.mark.parametrize(("answers", "outcome"), [
    (ans(200, 200), Outcome.ALIVE),
    (ans(200, 500), Outcome.ALIVE),  # an error answer still came back through the loop's queue
    (ans(None, 200), Outcome.ALIVE),  # the loop answered: /health's thread was only slow
    (ans(200, None), Outcome.WEDGED),  # the hang /health cannot see
    (ans(200, None, progressed=True), Outcome.WEDGED),  # /tokenize or /props answers come from the HTTP threads
    (ans(200, None, progressed=True, streamed=True), Outcome.EXCUSED),  # generated text flowed: the loop runs
    (ans(200, 501), Outcome.ALIVE),  # the route is off (no loop answer): /health decides this round
    (ans(None, 501), Outcome.FAILED),
    (ans(None, None), Outcome.FAILED),  # nothing answers at all (SIGSTOP, a dead machine): unresponsive
    (ans(503, None), Outcome.FAILED),
    (ans(None, None, progressed=True), Outcome.EXCUSED),  # busy, not dead (as before)
    (ans(200, None, asked=False), Outcome.ALIVE),  # no loop route: /health alone
    (ans(None, None, asked=False), Outcome.FAILED),
    # Answered from inside a decode (a worker thread answers while the main thread decodes), slots busy:
    (ans(200, 200, still=9.9), Outcome.ALIVE),  # not still for the whole timeout yet
    (ans(200, 200, still=10.0), Outcome.WEDGED),  # a decode that never ends
    (ans(200, 200, still=10.0, streamed=True), Outcome.ALIVE),
    (ans(None, 200, still=10.0), Outcome.FAILED),
    (ans(200, 200, still=10.0, cpu=0.1), Outcome.WEDGED),  # still, and asleep: a hang
    (ans(200, 200, still=10.0, cpu=0.5), Outcome.EXCUSED),  # still, but computing: a batch longer than the limit
    (ans(200, 200, still=99.0, cpu=90.0), Outcome.EXCUSED),
    (ans(200, 200, still=100.0, cpu=95.0), Outcome.WEDGED),  # ten times the limit: a driver spinning on a dead GPU
])
def test_judge(answers: Answers, outcome: Outcome) -> None:
    assert judge(answers, limit_s=10.0) is outcome


IDLE, BUSY_A, BUSY_B = Work(False, 0), Work(True, 120), Work(True, 121)


@pytest.mark.parametrize(("prev", "work", "now", "still"), [
    (None, BUSY_A, 5.0, 0.0),  # first sight: its clock starts now
    (Pace(BUSY_A, 1.0), BUSY_A, 5.0, 4.0),  # busy and unchanged: still since the first sight
    (Pace(BUSY_A, 1.0), BUSY_B, 5.0, 0.0),  # a token or a prompt batch: moving
    (Pace(IDLE, 1.0), BUSY_A, 5.0, 0.0),  # newly busy
    (Pace(BUSY_A, 1.0), IDLE, 5.0, 0.0),  # idle is never still
    (Pace(BUSY_A, 1.0), Work(True, 120), 9.0, 8.0),
])
def test_pace(prev: Pace | None, work: Work, now: float, still: float) -> None:
    assert pace(prev, work, now).still_s(now) == still


def test_pace_keeps_the_cpu_time_from_when_the_work_stood_still() -> None:
    p = pace(None, BUSY_A, 1.0, cpu=40.0)
    p = pace(p, BUSY_A, 5.0, cpu=40.5)
    assert p.still_s(5.0) == 4.0 and p.still_cpu_s(41.0) == 1.0
    assert pace(p, BUSY_B, 6.0, cpu=42.0).still_cpu_s(42.0) == 0.0  # moving: counted afresh
    assert Pace(BUSY_A, 1.0).still_cpu_s(3.0) is None  # unknown then: unknown now


def slot(i: int, processing: bool, prompt: int = 0, decoded: int = 0) -> dict[str, object]:
    """A slot as this build's GET /slots shows it (only_metrics: no prompt or generated text)."""
    doc: dict[str, object] = {"id": i, "n_ctx": 512, "speculative": False, "is_processing": processing}
    if prompt or decoded:
        doc |= {"id_task": 7, "n_prompt_tokens": prompt, "n_prompt_tokens_processed": prompt, "params": {},
                "next_token": [{"has_next_token": True, "has_new_line": False, "n_remain": 10, "n_decoded": decoded}]}
    return doc


METRICS = (b"# HELP llamacpp:prompt_tokens_total x\n# TYPE llamacpp:prompt_tokens_total counter\n"
           b"llamacpp:prompt_tokens_total 300\nllamacpp:tokens_predicted_total 41\nllamacpp:n_decode_total 50\n"
           b"llamacpp:requests_processing 2\n")


@pytest.mark.parametrize(("route", "body", "work"), [
    ("/slots", json.dumps([slot(0, True, 100, 20), slot(1, False, 50, 3), slot(2, True, 30)]).encode(),
     Work(True, 150)),  # the idle slot's last task does not count
    ("/slots", json.dumps([slot(0, False), slot(1, False)]).encode(), Work(False, 0)),
    ("/slots", b'{"error": {"code": 501}}', None),
    ("/slots", b"not json", None),
    ("/metrics", METRICS, Work(True, 391)),
    ("/metrics", METRICS.replace(b"processing 2", b"processing 0"), Work(False, 391)),
    ("/metrics", b"# nothing we know\n", None),
])
def test_work_from_an_answer(route: str, body: bytes, work: Work | None) -> None:
    assert work_from(route, body) == work


@pytest.mark.parametrize(("status", "unusable"), [
    (200, False), (500, False), (None, False), (501, True), (404, True), (401, True), (403, True),
])
def test_a_route_that_answers_without_the_loop_is_dropped(status: int | None, unusable: bool) -> None:
    assert loop_route_unusable(status) is unusable
