"""What the relay reads from llama-server's answers without parsing them: the token counts."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.web.api.relay import token_counts

TIMINGS = {"cache_n": 8, "prompt_n": 3, "prompt_ms": 1.2, "predicted_n": 7, "predicted_ms": 3.0}
USAGE = {"completion_tokens": 8, "prompt_tokens": 9, "total_tokens": 17, "prompt_tokens_details": {"cached_tokens": 4}}


def answer(**fields: Any) -> bytes:
    return json.dumps({"choices": [{"finish_reason": "length", "message": {"content": "hi"}}], **fields},
                      separators=(",", ":")).encode()


@pytest.mark.parametrize(("data", "counts"), [
    (answer(usage=USAGE, timings=TIMINGS), (9, 8)),  # usage wins over timings
    (answer(timings=TIMINGS), (3, 7)),
    (answer(usage={"prompt_tokens": 9}, timings=TIMINGS), (9, 7)),  # each number on its own
    (answer(), (None, None)),
    # A model's text that looks like usage is a JSON string: its quotes are escaped, never read as a key.
    (answer(choices=[{"message": {"content": '"prompt_tokens": 99, "completion_tokens":98'}}], usage=USAGE), (9, 8)),
    (answer(choices=[{"message": {"content": '"prompt_tokens": 99'}}]), (None, None)),
    # A stream's last chunks, spaced as json.dumps does, and two events in one read.
    (b'data: {"choices":[{"delta":{}}]}\n\ndata: ' + json.dumps({"usage": USAGE}).encode() + b"\n\n", (9, 8)),
    (b"data: " + json.dumps({"choices": [], "timings": TIMINGS}).encode() + b"\n\ndata: [DONE]\n\n", (3, 7)),
])
def test_token_counts(data: bytes, counts: tuple[int | None, int | None]) -> None:
    assert token_counts(data) == counts


@given(st.text(), st.integers(0, 10**9), st.integers(0, 10**9))
def test_token_counts_never_read_text_as_numbers(text: str, prompt: int, completion: int) -> None:
    data = answer(choices=[{"message": {"content": text}}], usage={"prompt_tokens": prompt,
                                                                    "completion_tokens": completion})
    assert token_counts(data) == (prompt, completion)
