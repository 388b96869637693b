"""The command builder: profile + capabilities + run settings → argv, as a table; and the child's environment."""

from __future__ import annotations

import pytest

from supervisor.core.capabilities import Capabilities, parse_help
from supervisor.core.command import CommandError, build_argv, check_extra_args, child_env
from supervisor.core.ladder import RunSettings
from supervisor.core.placement import Placement
from supervisor.host.probe import probe
from supervisor.spec.profile import ProfileError, load_profile


@pytest.fixture
def caps(llama_server: str) -> Capabilities:
    return probe(llama_server)


def _tail(argv: list[str]) -> list[str]:
    """Everything after --host/--port, which every argv has."""
    return argv[7:]


@pytest.mark.parametrize(
    ("fields", "settings", "expected"),
    [
        ({}, RunSettings(0, 1024), ["--ctx-size", "1024", "--n-gpu-layers", "0", "--threads", "1", "--parallel", "2",
                                    "--cache-ram", "0", "--alias", "test", "--metrics"]),
        ({"threads": None, "parallel": None}, RunSettings("all", 4096),
         ["--ctx-size", "4096", "--n-gpu-layers", "all", "--cache-ram", "0", "--alias", "test", "--metrics"]),
        ({"threads": None, "parallel": None, "flash_attn": "on", "cache_type_k": "q8_0", "cache_type_v": "q8_0"},
         RunSettings(12, 2048),
         ["--ctx-size", "2048", "--n-gpu-layers", "12", "--flash-attn", "on", "--cache-type-k", "q8_0",
          "--cache-type-v", "q8_0", "--cache-ram", "0", "--alias", "test", "--metrics"]),
        ({"threads": None, "parallel": None, "extra_args": ["--load-mode", "mmap", "-b", "256"]},
         RunSettings(0, 512, cpu_only=True),
         ["--ctx-size", "512", "--n-gpu-layers", "0", "--device", "none", "--cache-ram", "0", "--alias", "test",
          "--metrics", "--load-mode", "mmap", "-b", "256"]),
    ],
)
def test_argv_table(write_profile, caps: Capabilities, fields: dict, settings: RunSettings, expected: list[str]) -> None:
    p = load_profile(write_profile(**fields))
    argv = build_argv(p, caps, settings, 4321)
    assert argv[:7] == [caps.binary, "--model", str(p.model), "--host", "127.0.0.1", "--port", "4321"]
    assert _tail(argv) == expected


def test_mmproj_on_cpu(write_profile, caps: Capabilities, tiny_model) -> None:
    p = load_profile(write_profile(mmproj=str(tiny_model)))
    assert "--no-mmproj-offload" not in build_argv(p, caps, RunSettings(5, 1024), 1)
    argv = build_argv(p, caps, RunSettings(5, 1024, mmproj_offload=False), 1)
    assert argv[argv.index("--mmproj") + 1] == str(tiny_model) and "--no-mmproj-offload" in argv


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--metal"], "no --metal flag"),
        (["--memory-f16"], "removed long ago"),
        (["--mlock"], "--load-mode"),
        (["--no-mmap"], "--load-mode"),
        (["--mlock", "false"], "--load-mode"),
        (["--no-webui", "false"], "takes no value"),
        (["--batch-size"], "needs a value"),
        (["--frobnicate"], "does not know this flag"),
    ],
)
def test_extra_args_rejected(caps: Capabilities, args: list[str], fragment: str) -> None:
    with pytest.raises(CommandError) as exc:
        check_extra_args(args, caps)
    assert fragment in str(exc.value)
    assert "extra_args" in str(exc.value)


def test_extra_args_accepted(caps: Capabilities) -> None:
    check_extra_args(["--no-webui", "-b", "256", "--temp", "-0.5", "--rope-freq-base=10000"], caps)


def test_child_env_is_built_on_purpose(write_profile) -> None:
    p = load_profile(write_profile(env={"LLAMA_ARG_BATCH": "128", "CUDA_VISIBLE_DEVICES": "0"}))
    parent = {"PATH": "/bin", "LLAMA_ARG_CTX_SIZE": "99999", "LLAMA_API_KEY": "secret", "NOTIFY_SOCKET": "/run/x",
              "HOME": "/root"}
    env = child_env(parent, p)
    assert env == {"PATH": "/bin", "HOME": "/root", "LLAMA_ARG_BATCH": "128", "CUDA_VISIBLE_DEVICES": "0"}


def test_children_number_cuda_devices_as_nvml_does(write_profile) -> None:
    env = child_env({"PATH": "/bin", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}, load_profile(write_profile()))
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


ONE = Placement((1,), ("CUDA1",), (), ("GPU-b",))
TWO = Placement((0, 1), ("CUDA0", "CUDA1"), (20, 13), ("GPU-a", "GPU-b"))


@pytest.mark.parametrize(("settings", "expected"), [
    (RunSettings("auto", 1024, placement=ONE),
     ["--n-gpu-layers", "auto", "--device", "CUDA1", "--split-mode", "none", "--main-gpu", "0"]),
    (RunSettings(12, 1024, placement=ONE),
     ["--n-gpu-layers", "12", "--device", "CUDA1", "--split-mode", "none", "--main-gpu", "0"]),
    # A split carries its layer counts: llama-server's own fitting would give up on it.
    (RunSettings("auto", 1024, placement=TWO),
     ["--n-gpu-layers", "33", "--device", "CUDA0,CUDA1", "--split-mode", "layer", "--tensor-split", "20,13"]),
    (RunSettings(0, 1024, cpu_only=True, placement=TWO), ["--n-gpu-layers", "0", "--device", "none"]),
])
def test_argv_places_the_model(write_profile, caps: Capabilities, settings: RunSettings, expected: list[str]) -> None:
    argv = build_argv(load_profile(write_profile(threads=None, parallel=None)), caps, settings, 1)
    at = argv.index("--n-gpu-layers")
    assert argv[at:at + len(expected)] == expected


def test_placement_flags_are_checked_against_the_binary(write_profile, caps: Capabilities) -> None:
    no_split = Capabilities(caps.binary, "old", caps.flags - {"--tensor-split", "-ts"}, caps.value_flags, True)
    with pytest.raises(CommandError, match=r"gpus: --tensor-split is not supported by .*GPUs 0\+1"):
        build_argv(load_profile(write_profile()), no_split, RunSettings(33, 1024, placement=TWO), 1)
    problems = []
    for flag in ("--tensor-split", "-mg", "--device"):
        with pytest.raises(ProfileError) as exc:
            load_profile(write_profile(extra_args=[flag, "1"]))
        problems += exc.value.problems
    assert all(f == "extra_args" and "use the profile field 'gpus" in m for f, m in problems), problems


def test_old_binary_without_auto(write_profile, caps: Capabilities) -> None:
    old = Capabilities(caps.binary, "old", caps.flags, caps.value_flags, ngl_auto=False)
    p = load_profile(write_profile())
    assert "999" in build_argv(p, old, RunSettings("all", 1024), 1)
    with pytest.raises(CommandError, match="auto"):
        build_argv(p, old, RunSettings("auto", 1024), 1)


def test_capabilities_from_real_binary(caps: Capabilities) -> None:
    for flag in ("-m", "--model", "-ngl", "--n-gpu-layers", "--ctx-size", "--no-mmproj-offload", "--cache-ram",
                 "-fa", "--device", "--metrics"):
        assert caps.has(flag), flag
    assert not caps.has("--metal") and not caps.has("--mlock")
    assert "--ctx-size" in caps.value_flags and "--metrics" not in caps.value_flags
    assert caps.ngl_auto
    assert caps.version != "unknown"


def test_parse_help_layout() -> None:
    text = (
        "-c,    --ctx-size N                     size of the prompt context\n"
        "                                        (env: LLAMA_ARG_CTX_SIZE)\n"
        "-sm,   --split-mode {none,layer,row,tensor}\n"
        "                                        how to split\n"
        "--no-webui                              disable\n"
        "-ngl,  --gpu-layers, --n-gpu-layers N   max layers, 'auto', or 'all'\n"
    )
    flags, value_flags, auto = parse_help(text)
    assert flags == {"-c", "--ctx-size", "-sm", "--split-mode", "--no-webui", "-ngl", "--gpu-layers",
                     "--n-gpu-layers"}
    assert value_flags == flags - {"--no-webui"}
    assert auto


def test_devices_from_list_devices(caps: Capabilities) -> None:
    from supervisor.core.capabilities import parse_devices

    assert caps.devices == ()  # this CPU build: "Available devices: (none)"
    text = "Available devices:\n  MTL0: Apple M2 Pro (21845 MiB, 21845 MiB free)\n  BLAS: Accelerate\n"
    assert parse_devices(text) == ["MTL0"]
    assert parse_devices("Available devices:\n  CUDA0: NVIDIA H100 80GB HBM3 (81079 MiB, 80534 MiB free)\n") == ["CUDA0"]


def test_metal_false_on_a_mac_means_cpu_only(write_profile, caps: Capabilities) -> None:
    mac = Capabilities(caps.binary, caps.version, caps.flags, caps.value_flags, True, ("MTL0",))
    argv = build_argv(load_profile(write_profile(n_gpu_layers="all", metal=False)), mac, RunSettings("all", 1024), 1)
    assert _tail(argv)[:6] == ["--ctx-size", "1024", "--n-gpu-layers", "0", "--device", "none"]
    argv = build_argv(load_profile(write_profile(n_gpu_layers="all")), mac, RunSettings("all", 1024), 1)
    assert "--device" not in argv and "--metal" not in argv


def test_metal_true_with_a_binary_built_without_metal(write_profile, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from supervisor.spec.loaded import load_checked
    from supervisor.spec.profile import ProfileError

    monkeypatch.setattr(sys, "platform", "darwin")  # as on a Mac, with this CPU-only build
    path = write_profile(metal=True)
    with pytest.raises(ProfileError) as exc:
        load_checked(path)
    assert exc.value.problems[0][0] == "metal"
    assert "built without Metal" in exc.value.problems[0][1] and "--backend metal" in exc.value.problems[0][1]
