#!/usr/bin/env python3
"""Write a tiny, seeded, random-weight llama GGUF chat model that the real llama-server loads.

The weights are noise, so the text is gibberish; what matters is that llama-server loads it in well
under a second and generates thousands of tokens per second on a CPU, which makes it a good stand-in
for a real model when the supervisor, not the model, is under test.

Usage: python scripts/tiny_gguf.py [OUTPUT] [--layers N] [--embd N] [--seed N]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
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
    table = dict(zip(printable, chars))
    return [chr(table[b]) for b in range(256)]


def vocabulary() -> tuple[list[str], list[int]]:
    tokens = byte_symbols() + [a + b for a, b in MERGES]
    types = [1] * len(tokens)  # NORMAL
    tokens += CONTROL_TOKENS
    types += [3] * len(CONTROL_TOKENS)  # CONTROL
    return tokens, types


def default_cache_dir() -> Path:
    env = os.environ.get("LLAMA_SUPERVISOR_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "llama-supervisor"


def write_tiny_llama(path: Path, *, layers: int = 4, embd: int = 64, heads: int = 4, ctx: int = 4096,
                     seed: int = 0) -> Path:
    """Write the model to `path` (atomically) and return it."""
    import gguf  # imported late: only model generation needs it

    rng = np.random.default_rng(seed)
    tokens, types = vocabulary()
    n_vocab, n_ff = len(tokens), embd * 2

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    w = gguf.GGUFWriter(str(partial), "llama")
    w.add_name("tiny-random-llama")
    w.add_context_length(ctx)
    w.add_embedding_length(embd)
    w.add_block_count(layers)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(embd // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in MERGES])
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)

    w.add_tensor("token_embd.weight", rand(n_vocab, embd))
    w.add_tensor("output_norm.weight", np.ones(embd, dtype=np.float32))
    w.add_tensor("output.weight", rand(n_vocab, embd))
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(p + name + ".weight", rand(embd, embd))
        w.add_tensor(p + "ffn_norm.weight", np.ones(embd, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", rand(n_ff, embd))
        w.add_tensor(p + "ffn_up.weight", rand(n_ff, embd))
        w.add_tensor(p + "ffn_down.weight", rand(embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    partial.replace(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", nargs="?", type=Path, default=default_cache_dir() / "models" / "tiny-llama.gguf")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embd", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rewrite even if the file exists")
    args = parser.parse_args()
    if args.output.exists() and not args.force:
        print(args.output)
        return
    write_tiny_llama(args.output, layers=args.layers, embd=args.embd, seed=args.seed)
    print(args.output, file=sys.stdout)


if __name__ == "__main__":
    main()
