"""A profile loaded for real use: validated against the binary it names, and what it means for the lifecycle.

`load_checked` builds a `Loaded`; the daemon, the reloader and `llama-supervisor check` use it, the runner runs one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..core.capabilities import Capabilities
from ..core.command import CommandError, build_argv, child_env
from ..core.ladder import RunSettings
from ..core.lifecycle import Policy
from ..core.placement import choice_problem
from ..host import devices, gpu
from ..host.probe import CapabilityError, probe
from .profile import Profile, ProfileError, load_profile
from .settings import Config


@dataclass
class Loaded:
    """A validated profile together with what is needed to run it."""

    path: Path
    profile: Profile
    caps: Capabilities


def base_settings(p: Profile) -> RunSettings:
    """The profile's own settings, before the out-of-memory ladder or learned settings change them."""
    return RunSettings(n_gpu_layers=p.n_gpu_layers, ctx_size=p.ctx_size)


def policy_for(cfg: Config, p: Profile) -> Policy:
    return Policy(backoff_base_s=cfg.backoff_base_s, backoff_cap_s=cfg.backoff_cap_s, stable_s=cfg.stable_s,
                  breaker_failures=cfg.breaker_failures, breaker_window_s=cfg.breaker_window_s,
                  crash_loop_cap_s=cfg.crash_loop_cap_s, healthy_uptime_s=cfg.healthy_uptime_s,
                  min_ctx=min(p.min_ctx_size, p.ctx_size), has_mmproj=p.mmproj is not None)


def load_checked(path: Path) -> Loaded:
    """Validate a profile against the binary it names. Blocking; raises ProfileError naming file and field."""
    return check(path, load_profile(path))


def check(path: Path, profile: Profile) -> Loaded:
    """Validate a profile against the binary it names (a candidate build: its `binary` replaced). Blocking;
    raises ProfileError naming file and field."""
    try:
        caps = probe(profile.binary)
    except (CapabilityError, OSError) as exc:
        raise ProfileError(path, [("binary", str(exc))]) from None
    if profile.metal and not caps.has_metal:
        found = ", ".join(caps.devices) or "none"
        raise ProfileError(path, [("metal", f"metal: true, but {caps.binary} has no Metal device (--list-devices: "
                                            f"{found}): it was built without Metal; rebuild it with "
                                            "scripts/build_llama_server.py --backend metal")])
    if profile.gpus != "auto":
        gpus, unmatched = devices.named(caps)
        problem = choice_problem(profile.gpus, gpus, nvml=gpu.unavailable_reason(), devices=caps.devices,
                                 unmatched=unmatched)
        if problem is not None:
            raise ProfileError(path, [("gpus", problem)])
    try:
        build_argv(profile, caps, base_settings(profile), 0)
    except CommandError as exc:
        field, _, msg = str(exc).partition(": ")
        raise ProfileError(path, [(field, msg)]) from None
    return Loaded(path, profile, caps)


def child_identity(loaded: Loaded) -> tuple[list[str], dict[str, str]]:
    """What makes two loaded profiles the same child: its command line (any port) and its environment."""
    argv = build_argv(loaded.profile, loaded.caps, base_settings(loaded.profile), 0)
    return argv, child_env(os.environ, loaded.profile)


def same_child(a: Loaded, b: Loaded) -> bool:
    """Whether moving from one to the other needs no restart: the same file and the same child."""
    return a.path == b.path and child_identity(a) == child_identity(b)
