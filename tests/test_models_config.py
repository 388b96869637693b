"""Settings and answers for several models on one box: the memory budget, the unknown-model 404."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supervisor.spec.settings import ConfigError, load_config
from supervisor.web.api.models import unknown_model


def test_memory_budget_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "supervisor.yaml"
    f.write_text("memory_budget_mib: 1500\nswap_pass_over_s: 2.5\n")
    monkeypatch.setenv("LLAMA_SUPERVISOR_CONFIG", str(f))
    cfg = load_config()
    assert cfg.memory_budget_mib == 1500 and cfg.swap_pass_over_s == 2.5
    f.write_text("memory_budget_mib: 0\n")
    with pytest.raises(ConfigError) as exc:
        load_config()
    assert "memory_budget_mib: Input should be greater than 0" in str(exc.value) and str(f) in str(exc.value)
    f.write_text("memory_budget_mib: lots\n")
    with pytest.raises(ConfigError, match="memory_budget_mib: Input should be a valid integer"):
        load_config()
    f.write_text("")
    assert load_config().memory_budget_mib is None


def test_unknown_model_404_lists_ids() -> None:
    status, headers, body = unknown_model("gpt-4", ["vision", "gemma"])
    doc = json.loads(body)
    assert status == 404 and (b"content-type", b"application/json") in headers
    assert doc["error"]["type"] == "invalid_request_error" and doc["error"]["code"] == 404
    assert doc["error"]["available"] == ["vision", "gemma"]
    assert "'gpt-4'" in doc["error"]["message"] and "'vision', 'gemma'" in doc["error"]["message"]
