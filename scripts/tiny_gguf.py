#!/usr/bin/env python3
"""Write a tiny, seeded, random-weight llama GGUF chat model that the real llama-server loads.

The weights are noise, so the text is gibberish; what matters is that llama-server loads it in well
under a second and generates thousands of tokens per second on a CPU, which makes it a good stand-in
for a real model when the supervisor, not the model, is under test.

Usage: python scripts/tiny_gguf.py [OUTPUT] [--vision] [--layers N] [--embd N] [--seed N]

With --vision it writes a tiny Qwen3-VL pair instead: text model (arch `qwen3vl`) and vision
projector (`qwen3vl_merger`), both well under a megabyte, that llama-server loads and that
answers image requests.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
# A few merges: the gpt2 tokenizer refuses to load with an empty merge list.
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġ", "a"), ("i", "n"), ("e", "r")]


def byte_symbols() -> list[str]:
    """GPT-2's reversible byte → printable character table, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    table = dict(zip(printable, chars, strict=True))
    return [chr(table[b]) for b in range(256)]


def vocabulary(extra_control: list[str] | None = None) -> tuple[list[str], list[int]]:
    tokens = byte_symbols() + [a + b for a, b in MERGES]
    types = [1] * len(tokens)  # NORMAL
    control = CONTROL_TOKENS + (extra_control or [])
    tokens += control
    types += [3] * len(control)  # CONTROL
    return tokens, types


def default_cache_dir() -> Path:
    env = os.environ.get("LLAMA_SUPERVISOR_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "llama-supervisor"


def _add_tokenizer(w: object, tokens: list[str], types: list[int]) -> None:
    w.add_vocab_size(len(tokens))  # type: ignore[attr-defined]
    w.add_tokenizer_model("gpt2")  # type: ignore[attr-defined]
    w.add_tokenizer_pre("default")  # type: ignore[attr-defined]
    w.add_token_list(tokens)  # type: ignore[attr-defined]
    w.add_token_types(types)  # type: ignore[attr-defined]
    w.add_token_merges([f"{a} {b}" for a, b in MERGES])  # type: ignore[attr-defined]
    w.add_bos_token_id(tokens.index("<|endoftext|>"))  # type: ignore[attr-defined]
    w.add_eos_token_id(tokens.index("<|im_end|>"))  # type: ignore[attr-defined]
    w.add_add_bos_token(False)  # type: ignore[attr-defined]
    w.add_chat_template(CHATML_TEMPLATE)  # type: ignore[attr-defined]


def _finish(w: object, partial: Path, path: Path) -> Path:
    w.write_header_to_file()  # type: ignore[attr-defined]
    w.write_kv_data_to_file()  # type: ignore[attr-defined]
    w.write_tensors_to_file()  # type: ignore[attr-defined]
    w.close()  # type: ignore[attr-defined]
    partial.replace(path)
    return path


def _text_model(path: Path, arch: str, *, layers: int, embd: int, heads: int, ctx: int, seed: int,
                deepstack: int = 0) -> Path:
    import gguf  # imported late: only model generation needs it

    rng = np.random.default_rng(seed)
    tokens, types = vocabulary(VISION_TOKENS if arch == "qwen3vl" else None)
    n_vocab, n_ff, head_dim = len(tokens), embd * 2, embd // heads

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    w = gguf.GGUFWriter(str(partial), arch)
    w.add_name(f"tiny-random-{arch}")
    w.add_context_length(ctx)
    w.add_embedding_length(embd)
    w.add_block_count(layers)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if arch == "qwen3vl":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        half = head_dim // 2  # the four M-RoPE sections add up to half the head
        w.add_rope_dimension_sections([half - 2 * (half // 3), half // 3, half // 3, 0])
        w.add_num_deepstack_layers(deepstack)
        w.add_rope_freq_base(5000000.0)
    _add_tokenizer(w, tokens, types)

    w.add_tensor("token_embd.weight", rand(n_vocab, embd))
    w.add_tensor("output_norm.weight", ones(embd))
    w.add_tensor("output.weight", rand(n_vocab, embd))
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones(embd))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(p + name + ".weight", rand(embd, embd))
        if arch == "qwen3vl":
            w.add_tensor(p + "attn_q_norm.weight", ones(head_dim))
            w.add_tensor(p + "attn_k_norm.weight", ones(head_dim))
        w.add_tensor(p + "ffn_norm.weight", ones(embd))
        w.add_tensor(p + "ffn_gate.weight", rand(n_ff, embd))
        w.add_tensor(p + "ffn_up.weight", rand(n_ff, embd))
        w.add_tensor(p + "ffn_down.weight", rand(embd, n_ff))
    return _finish(w, partial, path)


def write_tiny_llama(path: Path, *, layers: int = 4, embd: int = 64, heads: int = 4, ctx: int = 4096,
                     seed: int = 0) -> Path:
    """Write a tiny llama chat model to `path` (atomically) and return it."""
    return _text_model(path, "llama", layers=layers, embd=embd, heads=heads, ctx=ctx, seed=seed)


def write_tiny_mmproj(path: Path, *, text_embd: int = 64, deepstack: int = 1, hidden: int = 32, heads: int = 2,
                      blocks: int = 2, patch: int = 16, image_size: int = 64, seed: int = 1) -> Path:
    """A random Qwen3-VL vision projector (`qwen3vl_merger`). Its output width is text_embd × (1 + deepstack)."""
    import gguf

    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    def zeros(n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.float32)

    merged, n_ff, n_pos = hidden * 4, hidden * 2, (image_size // patch) ** 2
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    w = gguf.GGUFWriter(str(partial), "clip")
    w.add_name("tiny-random-qwen3vl-mmproj")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", "qwen3vl_merger")
    w.add_bool("clip.use_gelu", True)
    w.add_uint32("clip.vision.embedding_length", hidden)
    w.add_uint32("clip.vision.feed_forward_length", n_ff)
    w.add_uint32("clip.vision.block_count", blocks)
    w.add_uint32("clip.vision.attention.head_count", heads)
    w.add_uint32("clip.vision.projection_dim", text_embd)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_uint32("clip.vision.image_size", image_size)
    w.add_uint32("clip.vision.patch_size", patch)
    w.add_uint32("clip.vision.spatial_merge_size", 2)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    w.add_uint32("general.file_type", 0)

    # numpy conv weights are (out, in, kh, kw): the two temporal halves of the 3D patch conv.
    w.add_tensor("v.patch_embd.weight", rand(hidden, 3, patch, patch))
    w.add_tensor("v.patch_embd.weight.1", rand(hidden, 3, patch, patch))
    w.add_tensor("v.patch_embd.bias", zeros(hidden))
    w.add_tensor("v.position_embd.weight", rand(n_pos, hidden))
    for i in range(blocks):
        p = f"v.blk.{i}."
        for ln in ("ln1", "ln2"):
            w.add_tensor(p + ln + ".weight", ones(hidden))
            w.add_tensor(p + ln + ".bias", zeros(hidden))
        w.add_tensor(p + "attn_qkv.weight", rand(3 * hidden, hidden))
        w.add_tensor(p + "attn_qkv.bias", zeros(3 * hidden))
        w.add_tensor(p + "attn_out.weight", rand(hidden, hidden))
        w.add_tensor(p + "attn_out.bias", zeros(hidden))
        w.add_tensor(p + "ffn_up.weight", rand(n_ff, hidden))
        w.add_tensor(p + "ffn_up.bias", zeros(n_ff))
        w.add_tensor(p + "ffn_down.weight", rand(hidden, n_ff))
        w.add_tensor(p + "ffn_down.bias", zeros(hidden))
    for i in range(deepstack):
        p = f"v.deepstack.{i}."
        w.add_tensor(p + "norm.weight", ones(merged))
        w.add_tensor(p + "norm.bias", zeros(merged))
        w.add_tensor(p + "fc1.weight", rand(merged, merged))
        w.add_tensor(p + "fc1.bias", zeros(merged))
        w.add_tensor(p + "fc2.weight", rand(text_embd, merged))
        w.add_tensor(p + "fc2.bias", zeros(text_embd))
    w.add_tensor("v.post_ln.weight", ones(hidden))
    w.add_tensor("v.post_ln.bias", zeros(hidden))
    w.add_tensor("mm.0.weight", rand(merged, merged))
    w.add_tensor("mm.0.bias", zeros(merged))
    w.add_tensor("mm.2.weight", rand(text_embd, merged))
    w.add_tensor("mm.2.bias", zeros(text_embd))
    return _finish(w, partial, path)


def write_tiny_qwen3vl(model: Path, mmproj: Path, *, layers: int = 4, embd: int = 64, heads: int = 4,
                       ctx: int = 8192, seed: int = 0, mmproj_embd: int | None = None) -> tuple[Path, Path]:
    """A tiny Qwen3-VL pair (text `qwen3vl` + projector `qwen3vl_merger`) that llama-server loads.

    `mmproj_embd` different from `embd` writes a projector that does not fit the text model, which
    llama-server refuses at start ("mismatch between text model ... and mmproj ...").
    """
    _text_model(model, "qwen3vl", layers=layers, embd=embd, heads=heads, ctx=ctx, seed=seed, deepstack=1)
    write_tiny_mmproj(mmproj, text_embd=mmproj_embd or embd, deepstack=1, seed=seed + 1)
    return model, mmproj


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", nargs="?", type=Path, default=default_cache_dir() / "models" / "tiny-llama.gguf")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embd", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rewrite even if the file exists")
    parser.add_argument("--vision", action="store_true",
                        help="write a Qwen3-VL pair: OUTPUT and OUTPUT's mmproj-*.gguf sibling")
    args = parser.parse_args()
    if args.vision:
        out = args.output if args.output.name != "tiny-llama.gguf" else args.output.with_name("tiny-qwen3vl.gguf")
        mmproj = out.with_name("mmproj-" + out.name)
        if args.force or not (out.exists() and mmproj.exists()):
            write_tiny_qwen3vl(out, mmproj, layers=args.layers, embd=args.embd, seed=args.seed)
        print(out, mmproj)
        return
    if args.force or not args.output.exists():
        write_tiny_llama(args.output, layers=args.layers, embd=args.embd, seed=args.seed)
    print(args.output)


if __name__ == "__main__":
    main()
