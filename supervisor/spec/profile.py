"""Profiles: the YAML that says how to run llama-server, validated with errors that name file and field."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..core.command import GPU_CHOICE_ENV, RESERVED_FLAGS  # the command builder owns these flags
from ..host.gguf import check_gguf
from .problems import pydantic_problems

CacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ProfileError(Exception):
    """A profile that cannot be used; `problems` holds (field, message) pairs."""

    def __init__(self, path: Path | str, problems: list[tuple[str, str]]) -> None:
        self.path = str(path)
        self.problems = problems
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = [f"{self.path}: {field}: {msg}" if field else f"{self.path}: {msg}" for field, msg in self.problems]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.path, "errors": [{"field": f, "message": m} for f, m in self.problems]}


class ImagePolicy(BaseModel):
    """How the proxy treats images in requests (multimodal profiles)."""

    model_config = ConfigDict(extra="forbid")
    max_short_side: int = Field(768, gt=0)
    max_long_side: int = Field(1024, gt=0)
    jpeg_quality: int = Field(90, ge=1, le=100)
    max_image_bytes: int = Field(20 * 1024 * 1024, gt=0)
    keep_last_images: int | None = Field(3, ge=0)
    keep_last_turns: int | None = Field(None, gt=0)
    # The context guard: fit every chat request into one slot's context, dropping the oldest images, then the
    # oldest turns (null: on for profiles with a projector, off for text-only ones).
    fit_context: bool | None = None
    reply_tokens: int = Field(512, gt=0, description="room kept for the answer when a request sets no max_tokens")


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    binary: str = "llama-server"
    model: Path
    mmproj: Path | None = None
    n_gpu_layers: int | Literal["auto", "all"] = "auto"
    ctx_size: int = Field(4096, gt=0)
    min_ctx_size: int = Field(2048, gt=0, description="floor for the out-of-memory ladder")
    metal: bool | None = None  # None: the platform's default (Metal on macOS when the binary has it)
    # The NVIDIA GPUs the model may use, by NVML index or UUID; auto: any (core/placement.py decides where).
    gpus: Literal["auto"] | tuple[int | str, ...] = "auto"
    threads: int | None = Field(None, gt=0)
    parallel: int | None = Field(None, gt=0)
    flash_attn: Literal["on", "off", "auto"] | None = None
    cache_type_k: CacheType | None = None
    cache_type_v: CacheType | None = None
    cache_ram_mib: int = Field(512, ge=0, description="host RAM for the prompt cache; llama-server's 8 GiB default is too much")
    port: int | None = Field(None, ge=0, le=65535)
    extra_args: list[str] = []
    env: dict[str, str] = {}
    warmup: bool = True
    images: ImagePolicy = Field(default_factory=lambda: ImagePolicy.model_validate({}))
    # Several profiles on one box (profiles_dir): other names for this model, and what stays loaded.
    aliases: list[str] = []
    pinned: bool = False  # never unloaded to make room (loaded at start)
    ttl_s: float = Field(0.0, ge=0, description="unload after this many idle seconds; 0: never")
    preload: bool = False  # load at start, not on the first request
    capture: Literal["off", "errors", "all"] | None = None  # the activity log's capture for this model (None: settings')

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, v: list[str]) -> list[str]:
        seen: set[str] = set()
        for a in v:
            if not a.strip() or a != a.strip():
                raise ValueError(f"alias {a!r}: must be a non-empty name without surrounding spaces")
            if a in seen:
                raise ValueError(f"alias '{a}' is listed twice")
            seen.add(a)
        return v

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("'auto', or a list of GPUs by NVML index or UUID, e.g. [0] or [0, 1]")
        if isinstance(v, int | str) and v != "auto":
            v = [v]  # one GPU: `gpus: 1`
        if isinstance(v, list | tuple):
            if not v:
                raise ValueError("an empty list allows no GPU: leave gpus out (or 'auto'), or name one, e.g. [0]")
            out: list[int | str] = []
            for x in v:
                if isinstance(x, bool) or not isinstance(x, int | str) or (isinstance(x, int) and x < 0):
                    raise ValueError(f"{x!r}: a GPU is an NVML index (0, 1, ...) or a UUID ('GPU-...')")
                sel: int | str = int(x) if isinstance(x, str) and x.strip().isdigit() else x
                if isinstance(sel, str) and (sel != sel.strip() or not sel.upper().startswith(("GPU-", "MIG-"))):
                    raise ValueError(f"{x!r}: a GPU is an NVML index (0, 1, ...) or a UUID ('GPU-...')")
                if isinstance(sel, str) and sel.upper().startswith("MIG-"):
                    raise ValueError(f"{x!r}: MIG instances are not placed on; name the whole GPU")
                if sel in out:
                    raise ValueError(f"GPU {x!r} is listed twice")
                out.append(sel)
            return tuple(out)
        return v

    @field_validator("n_gpu_layers")
    @classmethod
    def _layers_not_negative(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("must be >= 0, 'auto' or 'all'")
        return v

    @field_validator("flash_attn", mode="before")
    @classmethod
    def _flash_attn_bool(cls, v: Any) -> Any:
        # YAML turns on/off into booleans; llama-server wants the words.
        if isinstance(v, bool):
            return "on" if v else "off"
        return v

    @field_validator("model", "mmproj")
    @classmethod
    def _gguf_file(cls, v: Path | None) -> Path | None:
        if v is not None:
            check_gguf(v)
        return v

    @field_validator("binary")
    @classmethod
    def _binary_exists(cls, v: str) -> str:
        resolved = resolve_binary(v)
        if resolved is None:
            raise ValueError(f"llama-server binary not found: {v}" + ("" if "/" in v else " (not on PATH)"))
        if not os.access(resolved, os.X_OK):
            raise ValueError(f"not executable: {resolved}")
        return str(resolved)

    @field_validator("extra_args")
    @classmethod
    def _no_reserved_flags(cls, v: list[str]) -> list[str]:
        for arg in v:
            flag = arg.split("=", 1)[0]
            if flag in RESERVED_FLAGS:
                raise ValueError(f"{flag} is set by the supervisor; use the profile field '{RESERVED_FLAGS[flag]}'")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        if self.metal and not sys.platform.startswith("darwin"):
            raise ValueError(
                f"metal: true needs macOS (this is {sys.platform}); Metal is chosen with the GPU layers there, "
                "never with a --metal flag. Remove it, or use n_gpu_layers for CUDA/Vulkan"
            )
        if self.min_ctx_size > self.ctx_size:
            raise ValueError(f"min_ctx_size ({self.min_ctx_size}) is larger than ctx_size ({self.ctx_size})")
        if self.name in self.aliases:
            raise ValueError(f"aliases: '{self.name}' is the profile's name already")
        if self.gpus != "auto" and (names := [k for k in GPU_CHOICE_ENV if k in self.env]):
            raise ValueError(f"gpus: {list(self.gpus)} and env {', '.join(names)} both choose GPUs: keep one of them "
                             "(gpus lets the supervisor place the model and see its memory per GPU)")
        if self.gpus != "auto" and self.metal:
            raise ValueError("gpus names NVIDIA GPUs; metal: true is Apple's: drop one of them")
        if self.pinned and self.ttl_s:
            raise ValueError(f"pinned: true and ttl_s: {self.ttl_s:g} contradict each other: a pinned model is "
                             "never unloaded; drop one of them")
        return self


def resolve_binary(value: str) -> Path | None:
    if "/" in value:
        p = Path(value)
        return p if p.is_file() else None
    found = shutil.which(value)
    return Path(found) if found else None


def _expand(value: Any, problems: list[tuple[str, str]], where: str) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            value = os.environ.get(name) or default
            if value is None:
                problems.append((where, f"environment variable ${{{name}}} is not set"))
                return m.group(0)
            return value

        return _ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, problems, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, problems, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


_PATH_FIELDS = ("model", "mmproj", "binary")


def _resolve_paths(data: dict[str, Any], path: Path) -> None:
    for key in _PATH_FIELDS:
        v = data.get(key)
        if isinstance(v, str) and v:
            expanded = os.path.expanduser(v)
            is_path = key != "binary" or "/" in expanded
            if is_path and not os.path.isabs(expanded):
                expanded = str(path.parent / expanded)
            data[key] = expanded


def named_files(path: Path) -> list[str]:
    """The files a profile names (model, projector, a binary given as a path), as the profile would resolve
    them, read from a file that may not validate (best effort: [] when it cannot be read as a mapping).
    Blocking. A profile rejected for a missing model is looked at again when one of these appears."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    if not isinstance(raw, dict):
        return []
    data = _expand(raw, [], "")
    _resolve_paths(data, path)
    return [os.path.abspath(data[k]) for k in _PATH_FIELDS
            if isinstance(data.get(k), str) and data[k] and (k != "binary" or "/" in data[k])]


def parse_profile(text: str, path: Path) -> Profile:
    """Validate profile YAML `text` read from `path` (relative paths resolve against its folder)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ProfileError(path, [("", f"invalid YAML: {where}{getattr(exc, 'problem', exc)}")]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ProfileError(path, [("", f"expected a mapping of fields, got {type(raw).__name__}")])
    problems: list[tuple[str, str]] = []
    data = _expand(raw, problems, "")
    if problems:
        raise ProfileError(path, problems)
    data.setdefault("name", path.stem)
    _resolve_paths(data, path)
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(path, pydantic_problems(exc)) from None


def load_profile(path: Path | str) -> Profile:
    """Read and validate a profile file. Blocking: call it through asyncio.to_thread from async code."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(p, [("", f"cannot read profile: {exc.strerror}")]) from None
    return parse_profile(text, p)
