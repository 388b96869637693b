"""Profile validation: each bad field gets a message naming the file, the field and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.spec.profile import ProfileError, load_profile, parse_profile


def _problems(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ProfileError) as exc:
        load_profile(path)
    assert str(path) in str(exc.value)
    return exc.value.problems


def test_valid_profile_with_defaults(write_profile) -> None:
    p = load_profile(write_profile(n_gpu_layers="all", flash_attn=True))
    assert p.n_gpu_layers == "all" and p.flash_attn == "on" and p.cache_ram_mib == 0
    assert p.aliases == [] and not p.pinned and p.ttl_s == 0 and not p.preload


def test_gpus_field(write_profile) -> None:
    assert load_profile(write_profile()).gpus == "auto"
    assert load_profile(write_profile(gpus=1)).gpus == (1,)
    assert load_profile(write_profile(gpus=["0", "GPU-5d2d4c4e-aaaa"])).gpus == (0, "GPU-5d2d4c4e-aaaa")


def test_residency_fields(write_profile) -> None:
    p = load_profile(write_profile(aliases=["small", "fast"], ttl_s=300, preload=True))
    assert p.aliases == ["small", "fast"] and p.ttl_s == 300 and p.preload and not p.pinned


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"ctx_size": 0}, "ctx_size", "greater than 0"),
        ({"ctx_size": "big"}, "ctx_size", "valid integer"),
        ({"n_gpu_layers": -1}, "n_gpu_layers", ">= 0"),
        ({"n_gpu_layers": "most"}, "n_gpu_layers", "'auto' or 'all'"),
        ({"colour": "blue"}, "colour", "unknown field"),
        ({"model": "/nonexistent/model.gguf"}, "model", "file not found"),
        ({"binary": "/nonexistent/llama-server"}, "binary", "not found"),
        ({"metal": True}, "", "metal: true needs macOS"),
        ({"extra_args": ["--port", "9"]}, "extra_args", "set by the supervisor"),
        ({"min_ctx_size": 4096, "ctx_size": 1024}, "", "min_ctx_size"),
        ({"cache_type_k": "q3"}, "cache_type_k", "q8_0"),
        ({"aliases": ["a", "a"]}, "aliases", "listed twice"),
        ({"aliases": [" a"]}, "aliases", "without surrounding spaces"),
        ({"aliases": ["test"]}, "", "'test' is the profile's name already"),
        ({"aliases": "small"}, "aliases", "valid list"),
        ({"ttl_s": -1}, "ttl_s", "greater than or equal to 0"),
        ({"pinned": True, "ttl_s": 60}, "", "a pinned model is never unloaded"),
        ({"pinned": "maybe"}, "pinned", "valid boolean"),
        ({"preload": "later"}, "preload", "valid boolean"),
        ({"gpus": []}, "gpus", "an empty list allows no GPU"),
        ({"gpus": [-1]}, "gpus", "a GPU is an NVML index"),
        ({"gpus": ["CUDA0"]}, "gpus", "a GPU is an NVML index (0, 1, ...) or a UUID"),
        ({"gpus": [0, "0"]}, "gpus", "listed twice"),
        ({"gpus": True}, "gpus", "'auto', or a list of GPUs"),
        ({"gpus": ["MIG-5d2d4c4e"]}, "gpus", "MIG instances are not placed on"),
        ({"gpus": [0], "env": {"CUDA_VISIBLE_DEVICES": "1"}}, "", "gpus: [0] and env CUDA_VISIBLE_DEVICES both choose"),
    ],
)
def test_bad_fields_are_named(write_profile, fields: dict, field: str, fragment: str) -> None:
    problems = _problems(write_profile(**fields))
    assert any(f == field and fragment in msg for f, msg in problems), problems


def test_not_a_gguf_file(write_profile, tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 definitely a zip")
    problems = _problems(write_profile(model=str(fake)))
    assert problems[0][0] == "model" and "not a GGUF file" in problems[0][1]


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodel: [unclosed\n")
    problems = _problems(path)
    assert "invalid YAML" in problems[0][1] and "line" in problems[0][1]


def test_env_and_home_expansion(tmp_path: Path, tiny_model: Path, llama_server: str, monkeypatch) -> None:
    monkeypatch.setenv("MODELS", str(tiny_model.parent))
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "llama-server").symlink_to(llama_server)
    text = f"model: ${{MODELS}}/{tiny_model.name}\nbinary: ~/bin/llama-server\n"
    p = parse_profile(text, tmp_path / "x.yaml")
    assert p.model == tiny_model and p.binary == str(tmp_path / "bin" / "llama-server") and p.name == "x"


def test_unset_env_var_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError) as exc:
        parse_profile("model: ${NOPE_NOT_SET_ANYWHERE}/m.gguf\n", tmp_path / "p.yaml")
    assert exc.value.problems == [("model", "environment variable ${NOPE_NOT_SET_ANYWHERE} is not set")]


def test_env_default_syntax(tmp_path: Path, tiny_model: Path, llama_server: str) -> None:
    text = f"model: ${{NOPE_NOT_SET_ANYWHERE:-{tiny_model}}}\nbinary: {llama_server}\n"
    assert parse_profile(text, tmp_path / "p.yaml").model == tiny_model


def test_relative_paths_resolve_against_profile_folder(tmp_path: Path, tiny_model: Path, llama_server: str) -> None:
    (tmp_path / "m.gguf").write_bytes(tiny_model.read_bytes())
    p = parse_profile(f"model: m.gguf\nbinary: {llama_server}\n", tmp_path / "p.yaml")
    assert p.model == tmp_path / "m.gguf"
