"""The context guard's pure decisions: trimming order, the image-cost fit, reply room, the no-tokenizer bound."""

from __future__ import annotations

import pytest

from supervisor.core.context import MessageCost, Plan, learn_image_cost, plan_fit, reply_room, upper_bound

S, U, A, T = "system", "user", "assistant", "tool"


def m(role: str, text: int, *images: int) -> MessageCost:
    return MessageCost(role, text, tuple(images))


# (conversation, fixed, limit, placeholder) → (images dropped, messages dropped, turns, prompt, fits)
CASES = {
    "fits as it is": (
        [m(S, 10), m(U, 20, 300), m(A, 5), m(U, 10)], 3, 400, 8,
        ((), (), 0, 348, True)),
    "exactly at the limit": (
        [m(U, 20, 300), m(A, 5), m(U, 10)], 0, 335, 8,
        ((), (), 0, 335, True)),
    "oldest image goes first, one is enough": (
        [m(S, 10), m(U, 20, 300), m(A, 5), m(U, 20, 300), m(A, 5), m(U, 10, 300)], 0, 700, 8,
        (((1, 0),), (), 0, 678, True)),
    "several images in one message, in order": (
        [m(U, 10, 100, 100, 100), m(A, 5), m(U, 10)], 0, 200, 10,
        (((0, 0), (0, 1)), (), 0, 145, True)),
    "images of the last user turn are never dropped: turns go next": (
        [m(S, 10), m(U, 50), m(A, 50), m(U, 10, 300)], 0, 330, 8,
        ((), (1, 2), 1, 320, True)),
    "all old images, then the oldest turn": (
        [m(U, 100, 300), m(A, 100), m(U, 100, 300), m(A, 100), m(U, 10, 300)], 0, 600, 8,
        (((2, 0),), (0, 1), 1, 518, True)),
    "system messages stay wherever they are": (
        [m(S, 10), m(U, 100), m(A, 100), m(S, 20), m(U, 100), m(A, 100), m(U, 10)], 0, 50, 8,
        ((), (1, 2, 4, 5), 2, 40, True)),
    "a tool exchange goes with its turn": (
        [m(U, 30), m(A, 30), m(T, 30), m(A, 30), m(U, 30)], 0, 40, 8,
        ((), (0, 1, 2, 3), 1, 30, True)),
    "messages before the first user message are a group of their own": (
        [m(S, 5), m(A, 40), m(U, 40), m(A, 40), m(U, 10)], 0, 100, 8,
        ((), (1,), 0, 95, True)),
    "an assistant prefill after the last user message is kept": (
        [m(U, 100), m(A, 100), m(U, 10), m(A, 30)], 0, 50, 8,
        ((), (0, 1), 1, 40, True)),
    "the last turn alone does not fit": (
        [m(S, 10), m(U, 100, 300), m(A, 100), m(U, 50, 400)], 5, 400, 8,
        ((), (1, 2), 1, 465, False)),
    "an image in a dropped turn is not counted twice": (
        [m(U, 100, 300), m(A, 10), m(U, 10)], 0, 50, 8,
        ((), (0, 1), 1, 10, True)),
    "an image cheaper than the placeholder stays": (
        [m(U, 10, 4), m(A, 50), m(U, 10)], 0, 60, 8,
        ((), (0, 1), 1, 10, True)),
    "no user message at all: nothing is protected but system": (
        [m(S, 10), m(A, 100)], 0, 50, 8,
        ((), (1,), 0, 10, True)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_plan_fit(name: str) -> None:
    msgs, fixed, limit, placeholder, (images, messages, turns, prompt, fits) = CASES[name]
    plan = plan_fit(msgs, fixed=fixed, limit=limit, placeholder=placeholder)
    assert (plan.drop_images, plan.drop_messages, plan.turns, plan.prompt, plan.fits) == \
        (images, messages, turns, prompt, fits)
    full = fixed + sum(x.text + sum(x.images) for x in msgs)
    assert plan.saved == full - plan.prompt
    assert plan.changed == bool(images or messages)


def test_nothing_to_drop_is_an_empty_plan() -> None:
    assert plan_fit([m(U, 10)], fixed=2, limit=100, placeholder=8) == Plan(prompt=12)


# samples → (size asked, tokens expected)
IMAGE_CASES = {
    "a size seen is exact": ({(1024, 768): 770, (512, 384): 194}, (1024, 768), 770),
    "area-linear model between samples": ({(1024, 768): 770, (512, 384): 194, (256, 192): 50}, (768, 576), 434),
    "one sample: proportional to area": ({(1000, 1000): 1000}, (500, 500), 250),
    "constant cost (fixed-size encoders)": ({(1024, 768): 258, (256, 192): 258}, (640, 480), 258),
    "slack keeps every sample covered": ({(100, 100): 50, (200, 200): 60, (300, 300): 150}, (250, 250), 119),
}


@pytest.mark.parametrize("name", list(IMAGE_CASES))
def test_image_cost(name: str) -> None:
    samples, size, expected = IMAGE_CASES[name]
    cost = learn_image_cost(samples)
    assert cost.tokens(size, (1024, 768)) == expected
    for s, t in samples.items():
        assert cost.tokens(s, (1024, 768)) == t
        # The line with its slack never under-counts a sample either.
        assert cost.base + cost.per_pixel * s[0] * s[1] + cost.slack >= t - 1e-9


def test_unknown_size_costs_the_largest_allowed() -> None:
    cost = learn_image_cost({(1024, 768): 770, (512, 384): 194})
    assert cost.tokens(None, (1024, 768)) == 770
    assert learn_image_cost({}).tokens((10, 10), (10, 10)) == 0


@pytest.mark.parametrize(("requested", "default", "n_ctx", "room"), [
    (None, 512, 8192, 512),
    (100, 512, 8192, 100),
    (100_000, 512, 2048, 1024),
    (0, 512, 2048, 512),
    (None, 512, 600, 300),
    (None, 0, 600, 1),
])
def test_reply_room(requested: int | None, default: int, n_ctx: int, room: int) -> None:
    assert reply_room(requested, default, n_ctx) == room


def test_upper_bound() -> None:
    assert upper_bound([5, 0], ["user", "assistant"], fixed=3, per_message=4) == 3 + (5 + 1 + 4 + 4) + (1 + 4 + 9)
    assert upper_bound([], [], fixed=3, per_message=4) == 3
