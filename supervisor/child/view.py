"""What the runner shows and tells: a read-only snapshot for /status and metrics, and the observer hooks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..core.crash import Verdict
from ..core.lifecycle import Event, Machine
from ..spec.loaded import Loaded

if TYPE_CHECKING:
    import httpx

    from ..spec.settings import Config
    from ..telemetry.metrics import Metrics
    from .process import Child
    from .progress import LoopWatch, Progress

# Called with (generation, verdict, returncode) for every classified exit (the proxy's poison guard).
ExitListener = Callable[[int, Verdict, "int | None"], None]


@dataclass(frozen=True)
class RunnerView:
    """A read-only snapshot of the runner for /status and metrics."""

    machine: Machine
    loaded: Loaded
    child_pid: int | None
    child_started_at: float | None  # wall clock
    child_url: str | None
    argv: tuple[str, ...]
    log_tail: tuple[str, ...]
    load_s: float | None
    warmup: dict[str, Any] | None
    model_layers: int | None
    vram_estimate: dict[str, Any] | None
    climb: dict[str, Any] | None
    loop: dict[str, Any] | None = None  # the inference loop's probe: route, latency (child/liveness.py)


class RunnerCore(Protocol):
    """The runner as its helpers (driver, climber, liveness) and observers see it: what they read, and the one
    way they change anything (`dispatch`). A protocol, so that they need not import the runner that imports them."""

    cfg: Config
    metrics: Metrics
    progress: Progress
    loop_watch: LoopWatch

    @property
    def machine(self) -> Machine: ...

    @property
    def loaded(self) -> Loaded: ...

    @property
    def model_layers(self) -> int | None: ...

    @property
    def http(self) -> httpx.AsyncClient: ...

    @property
    def child(self) -> Child | None: ...

    @property
    def child_url(self) -> str | None: ...

    @property
    def argv(self) -> list[str]: ...

    @property
    def last_progress(self) -> float: ...

    def dispatch(self, ev: Event) -> None: ...

    def traffic(self) -> int: ...

    def note_progress(self) -> None: ...


class Observer(Protocol):
    """Sees what happened, decides nothing (the ops page's timeline and log ring)."""

    def machine_changed(self, runner: RunnerCore, old: Machine, new: Machine) -> None: ...

    def child_lines(self, runner: RunnerCore, gen: int, lines: list[str]) -> None: ...
