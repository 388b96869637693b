"""What the context guard learns from one child, right after its warmup: the slot's size, how the chat
template wraps messages, and what images cost this model.

The image cost comes from the warmup itself: it sent one full-size image (as large as the image policy
lets through) and llama-server answered with `usage.prompt_tokens`; minus the same message's text, that is
the full-size image's cost. How the cost scales with size is learned from llama-server's own count
(/v1/chat/completions/input_tokens, which preprocesses the image but runs no encoder) for a few smaller and
odd sizes. No model's formula is written down here: a Qwen-VL image costs about one token per 32×32
pixels, a Gemma 3 image a fixed 256, and both come out of the same samples.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ...child.readiness import WARMUP_TEXT
from ...core.context import ImageCost, learn_image_cost
from ...media.images import OMITTED
from ...spec.profile import ImagePolicy

TEXT_CACHE_MAX = 4096  # message texts whose token counts are kept per child
PROBE_TEXT = "x"
ROLES = ("user", "assistant", "system")

Call = Callable[[str, dict[str, Any] | None], Awaitable[dict[str, Any]]]


class CountError(Exception):
    """llama-server did not count (it went away, or answered something unexpected)."""


@dataclass
class Learned:
    """What one child (generation) taught: its slot, its template's wrapping, its images' cost."""

    gen: int
    n_ctx: int  # per slot, as llama-server reports it (the ladder may have lowered ctx_size)
    slots: int
    fixed: int  # the prompt's tokens besides its messages (generation prompt, preamble)
    wrap: dict[str, int]  # per role: the template's tokens around a message's content
    placeholder: int  # tokens of the text that replaces a dropped image
    images: ImageCost
    image_size: tuple[int, int]  # the largest image the policy lets through (the cost of an unknown size)
    seconds: float = 0.0
    texts: OrderedDict[str, int] = field(default_factory=OrderedDict)  # message text → tokens

    def wrap_for(self, role: str) -> int:
        return self.wrap.get(role, max(self.wrap.values(), default=0))

    def as_dict(self) -> dict[str, Any]:
        """For /status and the log."""
        w, h = self.image_size
        return {"n_ctx_per_slot": self.n_ctx, "slots": self.slots, "template_tokens": self.wrap,
                "fixed_tokens": self.fixed, "learn_seconds": self.seconds,
                "image_tokens": {f"{a}x{b}": t for (a, b), t in sorted(self.images.known.items(), reverse=True)},
                "image_tokens_per_megapixel": round(self.images.per_pixel * 1e6, 1),
                "image_tokens_full_size": self.images.tokens((w, h), (w, h))}


async def count_messages(call: Call, msgs: list[Any], extra: dict[str, Any] | None = None) -> int:
    """llama-server's own template and tokenizer on a conversation, in one call (`extra`: tools and the like)."""
    n = (await call("/v1/chat/completions/input_tokens", {**(extra or {}), "messages": msgs})).get("input_tokens")
    if not isinstance(n, int):
        raise CountError(f"input_tokens answered {n!r}")
    return n


async def token_counts(call: Call, texts: list[str]) -> list[int]:
    """Token counts of several texts in one /tokenize call: it takes a list of strings and token ids and
    tokenizes each string on its own, so a -1 after each text marks where its tokens end."""
    mixed: list[str | int] = []
    for t in texts:
        mixed += [t, -1]
    tokens = (await call("/tokenize", {"content": mixed, "add_special": False})).get("tokens")
    if not isinstance(tokens, list):
        raise CountError("/tokenize answered without a token list")
    counts, n = [], 0
    for tok in tokens:
        if tok == -1:
            counts.append(n)
            n = 0
        else:
            n += 1
    if len(counts) != len(texts):
        raise CountError(f"/tokenize returned {len(counts)} pieces for {len(texts)} texts")
    return counts


def probe_image(w: int, h: int) -> str:
    """A plain JPEG of w×h as a data URI (blocking: Pillow)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 160, 200)).save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def probe_sizes(w: int, h: int) -> list[tuple[int, int]]:
    """Sizes to ask llama-server about besides the full size: portrait, half, quarter and an odd size that no
    patch grid divides, so the fit sees both the slope and the rounding."""
    sizes = [(h, w), (w // 2, h // 2), (w // 4, h // 4), (w * 7 // 10 + 3, h * 9 // 10 + 5)]
    return list(dict.fromkeys((max(1, a), max(1, b)) for a, b in sizes if (a, b) != (w, h)))


async def _image_cost(call: Call, policy: ImagePolicy, warmup: dict[str, Any] | None) -> ImageCost:
    w, h = policy.max_long_side, policy.max_short_side

    def message(part: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "text", "text": WARMUP_TEXT}, part]}]

    text_only = await count_messages(call, message({"type": "text", "text": ""}))
    samples: dict[tuple[int, int], int] = {}
    prompt = (warmup or {}).get("prompt_tokens")
    if isinstance(prompt, int) and (warmup or {}).get("image_size") == f"{w}x{h}":
        samples[(w, h)] = prompt - text_only  # what the warmup's full-size image really cost
    sizes = probe_sizes(w, h) + ([] if samples else [(w, h)])
    for size in sizes:
        url = await asyncio.to_thread(probe_image, *size)
        samples[size] = await count_messages(call, message({"type": "image_url", "image_url": {"url": url}})) - text_only
    return learn_image_cost(samples)


async def learn(call: Call, gen: int, policy: ImagePolicy | None, warmup: dict[str, Any] | None) -> Learned:
    """Ask the child `gen` (through `call`) what the guard needs. `policy` is None for a text-only profile."""
    props = await call("/props", None)
    n_ctx = int(props["default_generation_settings"]["n_ctx"])
    slots = int(props.get("total_slots") or 1)
    t_x, *t_roles, t_omitted = await token_counts(call, [PROBE_TEXT, *ROLES, OMITTED])
    x = PROBE_TEXT
    one = await count_messages(call, [{"role": "user", "content": x}])
    three = await count_messages(call, [{"role": "user", "content": x}, {"role": "assistant", "content": x},
                                {"role": "user", "content": x}])
    # The template's tokens around a user and an assistant message together; templates mostly differ
    # between roles in how they spell the role's name, so the pair is split by the names' token counts.
    pair = three - one - 2 * t_x
    user = max(0, (pair - (t_roles[1] - t_roles[0])) // 2)
    wrap = {"user": user, "assistant": max(0, pair - user)}
    try:
        wrap["system"] = max(0, await count_messages(call, [{"role": "system", "content": x},
                                                     {"role": "user", "content": x}]) - one - t_x)
    except CountError:  # a template that refuses system messages: assume the dearest wrapping
        wrap["system"] = max(wrap.values())
    fixed = max(0, one - t_x - user)
    images = ImageCost() if policy is None else await _image_cost(call, policy, warmup)
    size = (policy.max_long_side, policy.max_short_side) if policy is not None else (0, 0)
    return Learned(gen, n_ctx, slots, fixed, wrap, t_omitted, images, size)
