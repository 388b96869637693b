"""Supervisor settings (not the model profile): where to listen, what to run, how patient to be.

Precedence, highest first: command-line flags, LLAMA_SUPERVISOR_* environment variables, the YAML
settings file (default /etc/llama-supervisor/supervisor.yaml, or LLAMA_SUPERVISOR_CONFIG), defaults.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .problems import pydantic_problems

DEFAULT_CONFIG_FILE = Path("/etc/llama-supervisor/supervisor.yaml")


class ConfigError(Exception):
    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source, self.problems = source, problems
        super().__init__("\n".join(f"{source}: {f}: {m}" if f else f"{source}: {m}" for f, m in problems))


class _YamlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if self.path is None or not self.path.exists():
            return {}
        data = yaml.safe_load(self.path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ConfigError(str(self.path), [("", "expected a mapping of settings")])
        base = self.path.parent
        # `profile: NAME` (no slash) is a name in profiles_dir: left alone here, resolved_profile() looks it up.
        # Without a profiles_dir it stays relative to this file, like the other paths.
        has_dir = bool(data.get("profiles_dir") or os.environ.get("LLAMA_SUPERVISOR_PROFILES_DIR"))
        for key in ("profile", "profiles_dir", "state_dir", "api_key_file", "admin_key_file"):
            v = data.get(key)
            if key == "profile" and has_dir and isinstance(v, str) and "/" not in v:
                continue
            if isinstance(v, str) and v and not os.path.isabs(os.path.expanduser(v)):
                data[key] = str(base / v)
        return data


class Config(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLAMA_SUPERVISOR_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    profile: Path | None = None  # the active profile file
    profiles_dir: Path | None = None  # where `profile: NAME` (no slash) is looked up
    state_dir: Path = Field(default_factory=lambda: Path(os.environ.get("STATE_DIRECTORY", "").split(":")[0]
                                                          or Path.home() / ".local/state/llama-supervisor"))
    # readiness
    load_stall_s: float = Field(120.0, gt=0)
    load_max_s: float = Field(1800.0, gt=0)
    warmup_timeout_s: float = Field(120.0, gt=0)
    stop_timeout_s: float = Field(10.0, gt=0)
    # restart policy
    backoff_base_s: float = Field(0.1, gt=0)
    backoff_cap_s: float = Field(30.0, gt=0)
    stable_s: float = Field(60.0, gt=0)
    breaker_failures: int = Field(5, ge=1)  # this many quick failures within breaker_window_s → crash loop
    breaker_window_s: float = Field(300.0, gt=0)
    crash_loop_cap_s: float = Field(300.0, gt=0)  # a crash loop retries at a backoff growing up to this, for ever
    healthy_uptime_s: float = Field(10.0, ge=0)  # a child ready this long before it died: the count starts again
    vram_release_wait_s: float = Field(10.0, ge=0)
    estimate_vram: bool = True  # start with the layers that fit (GGUF sizes + NVML) when the profile asks for more
    # climbing back after the out-of-memory ladder: at start, and every climb_interval_s while idle on reduced settings
    climb: str = Field("auto", pattern="^(auto|off)$")
    climb_interval_s: float = Field(60.0, gt=0)
    climb_retry_s: float = Field(3600.0, ge=0)  # a climb that ran out of memory is not tried again for this long
    # poison requests: in flight at two crashes within the window → refused for quarantine_s
    quarantine_window_s: float = Field(600.0, ge=0)
    quarantine_s: float = Field(3600.0, ge=0)
    # liveness
    liveness_interval_s: float = Field(5.0, gt=0)
    liveness_timeout_s: float = Field(2.0, gt=0)
    liveness_failures: int = Field(3, ge=1)
    # the inference loop (GET /slots or /metrics) must answer within this while /health says ok, or it is wedged;
    # it answers between two decode batches, so this must outlast the slowest batch (a long prompt on a CPU)
    loop_timeout_s: float = Field(30.0, gt=0)
    stall_s: float = Field(10.0, gt=0)  # a request in flight with no byte from llama-server this long: probe
    # requests while not ready
    queue_max: int = Field(64, ge=0)
    queue_wait_s: float = Field(120.0, ge=0)
    # requests sent to llama-server at once; the rest wait here (queue_wait_s). None: the profile's parallel + 2,
    # so llama-server's HTTP threads (parallel + 4 at least) always keep one free for the liveness probe
    upstream_max: int | None = Field(None, ge=1)
    drain_s: float = Field(30.0, ge=0)
    # several models (every profile in profiles_dir): residency
    memory_budget_mib: int | None = Field(None, gt=0)  # host RAM all children together may use (None: no budget)
    swap_pass_over_s: float = Field(5.0, ge=0)  # how long requests for an unloaded model let loaded ones go first
    # behind a load balancer (docs/fleet.md)
    agent_port: int | None = Field(None, ge=0, le=65535)  # HAProxy agent check listener; None: off
    agent_host: str | None = None  # where it listens; None: the same address as `host`
    drain_notice_s: float = Field(0.0, ge=0)  # /health 503 + agent `drain` this long before the drain starts
    # upgrading llama-server (a profile's binary changes): the canary's limits, and how long a switched build
    # that dies is still rolled back (README "Upgrading llama-server")
    upgrade_max_slowdown: float = Field(0.25, ge=0, lt=1)  # tokens/s this share below the old build's at most
    upgrade_max_memory_growth: float = Field(0.15, ge=0)  # memory this share above the old build's at most
    upgrade_probation_s: float = Field(600.0, ge=0)
    # request limits
    max_body_bytes: int = Field(64 * 1024 * 1024, gt=0)
    remote_image_hosts: list[str] = []  # hosts llama-server may fetch image URLs from (empty: none)
    image_max_pixels: int = Field(40_000_000, gt=0)  # pixels one image may decode to (after JPEG draft scaling)
    image_workers: int = Field(2, ge=1)  # images decoded at once (each holds up to image_max_pixels × 4 bytes)
    image_queue_wait_s: float = Field(10.0, gt=0)  # a turn for image work within this, else 503 + Retry-After
    image_queue_max: int = Field(32, ge=0)  # requests with images waiting for a turn, beyond: 503 at once
    max_header_bytes: int = Field(32 * 1024, ge=1024)  # request line + headers, beyond: 431
    max_headers: int = Field(100, ge=8)  # header count, beyond: 431
    client_timeout_s: float = Field(30.0, gt=0)  # a client silent this long while sending a request is cut off
    # auth
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    admin_key: SecretStr | None = None
    admin_key_file: Path | None = None
    # Listening beyond loopback with no key is refused unless this says it is meant (a trusted, isolated network).
    allow_network_without_key: bool = False
    # logging
    log_format: str = Field("auto", pattern="^(auto|json|console)$")
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$")
    log_child_output: bool = True
    # the ops page (/ui): seconds between chart samples (an hour of them is kept, then one a minute for a day);
    # 0 turns the sampler off
    sample_interval_s: float = Field(2.0, ge=0, le=60)
    # the activity log: one record per proxied request in state_dir/activity.sqlite3, kept this many rows and days
    activity: bool = True
    activity_max_rows: int = Field(100_000, ge=100)
    activity_days: float = Field(14.0, gt=0)
    # capture of requests and answers for reading and replay (a profile's own `capture:` wins): off, errors, all
    capture: Literal["off", "errors", "all"] = "off"
    capture_max_kib: int = Field(64, ge=1, le=16384)  # per request, for the request and for the answer
    capture_images: bool = False  # false: inline images and audio are kept as size + SHA-256 only

    @model_validator(mode="after")
    def _keys_from_files(self) -> Config:
        for attr in ("api_key", "admin_key"):
            path = getattr(self, f"{attr}_file")
            if path is not None and getattr(self, attr) is None:
                try:
                    key = Path(path).read_text(encoding="utf-8").strip()
                except OSError as exc:
                    raise ValueError(f"{attr}_file: cannot read {path}: {exc.strerror}") from None
                if not key:
                    raise ValueError(f"{attr}_file: {path} is empty")
                setattr(self, attr, SecretStr(key))
        return self

    @model_validator(mode="after")
    def _no_open_network(self) -> Config:
        if not (self.api_key or self.admin_key or self.allow_network_without_key or is_loopback(self.host)):
            raise ValueError(f"host: {self.host} is reachable from the network and no api_key or admin_key is set; "
                             "set a key (api_key_file), listen on 127.0.0.1, or set allow_network_without_key: "
                             "true if the network is trusted")
        return self

    def resolved_profile(self) -> Path:
        if self.profile is None:
            raise ConfigError("settings", [("profile", "no profile given (--profile, LLAMA_SUPERVISOR_PROFILE or the settings file)")])
        p = Path(os.path.expanduser(str(self.profile)))
        if self.profiles_dir is not None and "/" not in str(self.profile):
            p = Path(self.profiles_dir) / (p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml")
        return p

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _YamlSource(settings_cls, _config_file())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name that resolves elsewhere, or "0.0.0.0"-like wildcards: not loopback


def _config_file() -> Path | None:
    env = os.environ.get("LLAMA_SUPERVISOR_CONFIG")
    if env:
        return Path(env).expanduser()
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.exists() else None


def load_config(**overrides: Any) -> Config:
    """Build the settings; `overrides` are command-line values (None means not given)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    source = str(_config_file() or "settings")
    env_file = os.environ.get("LLAMA_SUPERVISOR_CONFIG")
    if env_file and not Path(env_file).expanduser().exists():
        raise ConfigError(env_file, [("", "settings file not found")])
    try:
        cfg = Config(**given)
    except ValidationError as exc:
        found = []
        for field, msg in pydantic_problems(exc, unknown="unknown setting"):
            env = f"LLAMA_SUPERVISOR_{field.upper()}"
            origin = "command line" if field in given else f"environment {env}" if env in os.environ else source
            found.append((field, f"{msg} (from {origin})"))
        raise ConfigError(source, found) from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, [("", f"invalid YAML: {exc}")]) from None
    return cfg
