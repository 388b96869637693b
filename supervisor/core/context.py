"""The context guard's decisions: what a conversation costs and what to drop so it fits one slot. Pure.

Trimming order (fixed, documented in docs/configuration.md): the oldest images first (each becomes a short text
placeholder), then the oldest turns (a user message with the replies that follow it). System messages and
the last user turn (with everything after it) are never touched; when they alone do not fit, the request
cannot be answered and the plan says how many tokens they need.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MessageCost:
    """One message's tokens: its text with the template's wrapping, and each of its images in order."""

    role: str
    text: int
    images: tuple[int, ...] = ()


@dataclass(frozen=True)
class Plan:
    """What to drop. `prompt` is the estimated prompt after the plan; `fits` says whether it is within `limit`."""

    drop_images: tuple[tuple[int, int], ...] = ()  # (message index, image ordinal within the message)
    drop_messages: tuple[int, ...] = ()
    turns: int = 0  # user turns among the dropped messages
    prompt: int = 0
    saved: int = 0
    fits: bool = True

    @property
    def changed(self) -> bool:
        return bool(self.drop_images or self.drop_messages)


def _turns(msgs: Sequence[MessageCost], protected_from: int) -> list[list[int]]:
    """Droppable groups, oldest first: each user message with the non-system messages that follow it.
    Non-system messages before the first user message form a group of their own."""
    groups: list[list[int]] = []
    for i in range(protected_from):
        role = msgs[i].role
        if role == "system":
            continue
        if role == "user" or not groups:
            groups.append([i])
        else:
            groups[-1].append(i)
    return groups


def plan_fit(msgs: Sequence[MessageCost], *, fixed: int, limit: int, placeholder: int) -> Plan:
    """Drop the least material that brings the prompt within `limit` tokens.

    `fixed` is what the prompt costs besides its messages (generation prompt, template preamble);
    `placeholder` what the text replacing a dropped image costs.
    """
    cost = [m.text + sum(m.images) for m in msgs]
    total = fixed + sum(cost)
    original = total
    if total <= limit:
        return Plan(prompt=total, fits=True)
    users = [i for i, m in enumerate(msgs) if m.role == "user"]
    protected_from = users[-1] if users else len(msgs)
    drop_images: list[tuple[int, int]] = []
    for i in range(protected_from):
        if total <= limit:
            break
        if msgs[i].role == "system":
            continue
        for k, img in enumerate(msgs[i].images):
            if total <= limit:
                break
            if img > placeholder:
                drop_images.append((i, k))
                total -= img - placeholder
                cost[i] -= img - placeholder
    drop_messages: list[int] = []
    turns = 0
    for group in _turns(msgs, protected_from):
        if total <= limit:
            break
        drop_messages.extend(group)
        total -= sum(cost[i] for i in group)
        turns += msgs[group[0]].role == "user"
    dropped = set(drop_messages)
    # An image inside a message that went anyway is not reported as an image drop.
    kept_images = tuple((i, k) for i, k in drop_images if i not in dropped)
    return Plan(kept_images, tuple(drop_messages), turns, total, original - total, total <= limit)


@dataclass(frozen=True)
class ImageCost:
    """What an image costs this model, in context tokens, by its size after the proxy's downscale.

    Learned from samples (size → tokens as llama-server counted them): sizes seen are known exactly, any
    other size gets `base + per_pixel × w × h + slack`, the least-squares line through the samples raised by
    the largest amount any sample lies above it, so no sample is under-counted.
    """

    known: dict[tuple[int, int], int] = field(default_factory=dict)
    base: float = 0.0
    per_pixel: float = 0.0
    slack: float = 0.0

    def tokens(self, size: tuple[int, int] | None, default: tuple[int, int]) -> int:
        """Tokens for an image of `size` (None: unknown, e.g. a remote URL: costed as `default`, the largest
        image the policy lets through)."""
        w, h = size or default
        exact = self.known.get((w, h))
        if exact is not None:
            return exact
        # Rounded up, but not for floating-point dust: 250.00000000000003 tokens are 250.
        return max(0, math.ceil(self.base + self.per_pixel * w * h + self.slack - 1e-6))


def learn_image_cost(samples: dict[tuple[int, int], int]) -> ImageCost:
    """Fit tokens ≈ base + per_pixel × area over the samples (one sample: proportional to area)."""
    if not samples:
        return ImageCost()
    points = [(w * h, t) for (w, h), t in samples.items()]
    n = len(points)
    mean_a = sum(a for a, _ in points) / n
    mean_t = sum(t for _, t in points) / n
    var = sum((a - mean_a) ** 2 for a, _ in points)
    if n == 1 or var == 0:
        base, per_pixel = 0.0, mean_t / mean_a if mean_a else 0.0
    else:
        per_pixel = sum((a - mean_a) * (t - mean_t) for a, t in points) / var
        per_pixel = max(0.0, per_pixel)  # a cost that shrinks with size would be a bad fit, not a fact
        base = mean_t - per_pixel * mean_a
    slack = max(0.0, *(t - (base + per_pixel * a) for a, t in points))
    return ImageCost(dict(samples), base, per_pixel, slack)


def reply_room(requested: int | None, default: int, n_ctx: int) -> int:
    """Tokens kept free for the answer: what the request asks for (else the profile's default), at least 1
    (llama-server refuses a prompt that fills the slot) and at most half the slot, so a client that always
    sends a huge max_tokens still gets its conversation answered (llama-server stops at the context's end)."""
    want = requested if requested is not None and requested > 0 else default
    return max(1, min(want, n_ctx // 2))


def upper_bound(text_bytes: Sequence[int], roles: Sequence[str], *, fixed: int, per_message: int) -> int:
    """A prompt-size bound that needs no tokenizer: a token covers at least one byte of text (byte-level BPE,
    SentencePiece with byte fallback), plus one for a tokenizer's leading-space prefix, plus the template's
    wrapping per message (learned, with the role name's bytes in case the template spells it out)."""
    return fixed + sum(b + 1 + per_message + len(r.encode()) for b, r in zip(text_bytes, roles, strict=True))
