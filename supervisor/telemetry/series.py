"""A fixed-size columnar ring of samples: one array of doubles per series, so an hour costs kilobytes.

A dict per sample would cost ~1.5 KB each (an hour at 2 s: ~3 MB); one `array('d')` per series costs
8 bytes a value. Missing values are NaN and leave as JSON null.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Mapping

NAN = float("nan")


class SeriesRing:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.t = array("d", [NAN]) * capacity  # wall-clock seconds of each row
        self.cols: dict[str, array[float]] = {}
        self.head = 0  # next row to write
        self.count = 0

    def append(self, t: float, row: Mapping[str, float | None]) -> None:
        i = self.head
        self.t[i] = t
        for name, value in row.items():
            col = self.cols.get(name)
            if col is None:  # a series that appears later (a GPU, a model) has no past: NaN
                col = self.cols[name] = array("d", [NAN]) * self.capacity
            col[i] = NAN if value is None else float(value)
        for name, col in self.cols.items():
            if name not in row:
                col[i] = NAN
        self.head = (i + 1) % self.capacity
        self.count = min(self.count + 1, self.capacity)

    def _order(self) -> Iterable[int]:
        start = (self.head - self.count) % self.capacity
        return ((start + k) % self.capacity for k in range(self.count))

    def rows_after(self, since: float) -> list[int]:
        """Ring indexes of rows newer than `since` (wall seconds), oldest first."""
        return [i for i in self._order() if self.t[i] > since]

    def last(self, n: int) -> list[int]:
        idx = list(self._order())
        return idx[-n:] if n > 0 else []

    def export(self, idx: list[int], digits: int = 4) -> dict[str, object]:
        def clean(v: float) -> float | None:
            return None if math.isnan(v) else round(v, digits)

        return {"t": [round(self.t[i], 3) for i in idx],
                "series": {name: [clean(col[i]) for i in idx] for name, col in sorted(self.cols.items())}}

    def summary_of_last(self, n: int) -> dict[str, float | None]:
        """The last n rows as one (a coarse ring is fed with this): the mean of each series, NaN ignored,
        except high percentiles, whose worst value is kept (a mean of p99s would hide the spike)."""
        idx = self.last(n)
        out: dict[str, float | None] = {}
        for name, col in self.cols.items():
            vals = [col[i] for i in idx if not math.isnan(col[i])]
            if not vals:
                out[name] = None
            elif name.split("@")[0].endswith(("_p90", "_p99")):
                out[name] = max(vals)
            else:
                out[name] = sum(vals) / len(vals)
        return out

    def nbytes(self) -> int:
        return (1 + len(self.cols)) * self.capacity * 8
