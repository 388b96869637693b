"""Helpers for tests: settings tuned for speed, an in-process supervisor, waiting for conditions."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from supervisor.daemon import Daemon
from supervisor.host.sdnotify import Notifier
from supervisor.spec.settings import Config


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "state_dir": tmp_path / "state",
                              "backoff_base_s": 0.05, "backoff_cap_s": 0.5, "liveness_interval_s": 0.3,
                              "liveness_timeout_s": 1.0, "liveness_failures": 3, "drain_s": 2.0,
                              "stop_timeout_s": 3.0, "log_child_output": False, "load_stall_s": 20,
                              "queue_wait_s": 20.0}
    values.update(overrides)
    return Config(**values)


@contextlib.asynccontextmanager
async def running(tmp_path: Path, profile: Path, *, notifier: Notifier | None = None,
                  settings_file: Path | None = None, **overrides: Any) -> AsyncIterator[Daemon]:
    """An in-process supervisor on a free port; always stopped (and its child with it) on exit."""
    daemon = Daemon(make_config(tmp_path, **overrides), profile, settings_file, notifier=notifier or Notifier({}))
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


async def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of every `llama_supervisor_<name>` sample in a /metrics page whose labels include `labels`
    (every model's series carries a `model` label: pass model=... to pick one)."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"llama_supervisor_{name}(?:\{{([^}}]*)\}})? (\S+)$", line)
        if m is None:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total
