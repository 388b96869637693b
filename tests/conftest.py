"""Shared fixtures: the real llama-server, tiny generated models, profiles and in-process supervisors."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import build_llama_server  # noqa: E402
import tiny_gguf  # noqa: E402


@pytest.fixture(scope="session")
def llama_server() -> str:
    """The real llama-server. Missing is a failure, never a skip: CI must exercise the real thing."""
    configured = os.environ.get("LLAMA_SERVER_BIN")
    path = Path(configured) if configured else build_llama_server.cached_binary("cpu")
    if not os.access(path, os.X_OK):
        pytest.fail(f"llama-server not found at {path}: run scripts/setup.sh (it builds it from pinned source)")
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf.write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def tiny_vl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random Qwen3-VL pair: (text model, vision projector)."""
    d = tmp_path_factory.mktemp("vl")
    return tiny_gguf.write_tiny_qwen3vl(d / "tiny-qwen3vl.gguf", d / "mmproj-tiny-qwen3vl.gguf")


@pytest.fixture
def write_profile(tmp_path: Path, llama_server: str, tiny_model: Path) -> Callable[..., Path]:
    """Write a profile YAML (defaults: the real server, the tiny model, CPU) and return its path."""

    def write(name: str = "test", **fields: Any) -> Path:
        data: dict[str, Any] = {"name": name, "binary": llama_server, "model": str(tiny_model), "n_gpu_layers": 0,
                                "ctx_size": 1024, "min_ctx_size": 256, "cache_ram_mib": 0, "threads": 1,
                                "parallel": 2}
        data.update(fields)
        data = {k: v for k, v in data.items() if v is not None}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write


