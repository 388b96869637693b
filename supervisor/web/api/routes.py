"""Which llama-server routes the proxy forwards, and how it checks each one: an allow-list.

Read from the pinned llama-server's source (tools/server/server.cpp registers the routes; server-common.cpp
`handle_media` fetches `http...` URLs and decodes base64 media). A path that is not listed here is refused with
404: a new llama-server route stays closed until someone decides how it is checked. Paths are matched on the raw
bytes the client sent (what is forwarded), so percent-encoding cannot smuggle one route in as another.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..guard import validate
from ..guard.validate import Check

GET_ONLY = frozenset({"GET", "HEAD", "OPTIONS"})
POST = frozenset({"POST", "OPTIONS"})


@dataclass(frozen=True)
class Route:
    label: str  # the metrics label: the canonical path
    methods: frozenset[str]
    check: Check | None = None  # a POST body is parsed and checked when set
    media: bool = False  # llama-server fetches or decodes media for this route: the media policy applies
    chat: bool = False  # the chat context policy (keep_last_images / keep_last_turns) applies


def _same(paths: tuple[str, ...], route: Route) -> dict[bytes, Route]:
    return {p.encode(): Route(p, route.methods, route.check, route.media, route.chat) for p in paths}


CHAT = Route("", POST, validate.chat, media=True, chat=True)
ROUTES: dict[bytes, Route] = {
    **_same(("/v1/chat/completions", "/chat/completions"), CHAT),
    **_same(("/v1/chat/completions/input_tokens", "/chat/completions/input_tokens", "/apply-template"),
            Route("", POST, validate.chat, media=True)),
    **_same(("/v1/responses", "/responses", "/v1/responses/input_tokens", "/responses/input_tokens"),
            Route("", POST, validate.responses, media=True)),
    **_same(("/v1/messages", "/v1/messages/count_tokens"), Route("", POST, validate.anthropic, media=True)),
    # "prompt": {"prompt_string": ..., "multimodal_data": [base64, ...]} is decoded by llama-server
    **_same(("/completion", "/completions", "/v1/completions"), Route("", POST, validate.completion, media=True)),
    # embeddings take OpenAI content arrays (image_url parts, fetched like chat's) and multimodal_data
    **_same(("/embedding", "/embeddings", "/v1/embeddings"), Route("", POST, validate.embeddings, media=True)),
    **_same(("/infill",), Route("", POST, validate.infill)),
    **_same(("/rerank", "/reranking", "/v1/rerank", "/v1/reranking"), Route("", POST, validate.rerank)),
    **_same(("/tokenize",), Route("", POST, validate.tokenize)),
    **_same(("/detokenize",), Route("", POST, validate.detokenize)),
    **_same(("/v1/chat/completions/control", "/v1/streams/lookup"), Route("", POST, validate.any_object)),
    **_same(("/v1/models", "/models", "/v1/health", "/slots", "/", "/v1/stream"), Route("", GET_ONLY)),
    **_same(("/props", "/lora-adapters"), Route("", GET_ONLY | POST, validate.any_object)),
}
# The supervisor's own translation of the seed guide's shape into a chat completion.
PREDICT = Route("/predict", POST, validate.any_object, media=True, chat=True)
ROUTES[b"/predict"] = PREDICT
_SLOT = re.compile(rb"/slots/[0-9]{1,6}")
SLOT = Route("/slots/{id}", POST, validate.any_object)

# Refused on purpose (docs/security.md): llama-server fetches or decodes what the supervisor cannot check there.
REFUSED: dict[bytes, str] = {
    b"/v1/audio/transcriptions": "audio uploads (multipart) are not inspected by the supervisor",
    b"/audio/transcriptions": "audio uploads (multipart) are not inspected by the supervisor",
    b"/cors-proxy": "llama-server's CORS proxy fetches arbitrary URLs",
    b"/tools": "llama-server's server-side tools run outside the supervisor's policy",
    b"/models/load": "router mode is not used under the supervisor",
    b"/models/unload": "router mode is not used under the supervisor",
}


def lookup(raw_path: bytes) -> Route | None:
    route = ROUTES.get(raw_path)
    if route is None and _SLOT.fullmatch(raw_path):
        return SLOT
    return route


def label(raw_path: bytes) -> str:
    """Bounded metrics label set: unknown paths are 'other'."""
    route = lookup(raw_path)
    return route.label if route is not None else "other"
