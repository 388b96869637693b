"""Signs of life from a child's answers, as liveness reads them: when the last byte came, from any answer and
from a stream (which only the inference loop produces). Updated on the proxy's hot path (once per streamed
chunk): a clock read and two attribute writes."""

from __future__ import annotations

import time


class Progress:
    def __init__(self) -> None:
        self.last = 0.0  # monotonic time of the last byte or whole answer from the child (warmup included)
        self.last_stream = 0.0  # ... of the last streamed chunk: generated text, so the loop ran

    def note(self, *, stream: bool = False) -> None:
        now = time.monotonic()
        self.last = now
        if stream:
            self.last_stream = now
