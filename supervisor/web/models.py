"""Answers about the models a box offers: the 404 for a model it does not have."""

from __future__ import annotations

import json
from collections.abc import Sequence


def unknown_model(requested: str, ids: Sequence[str]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """OpenAI's shape (a client library shows `message`), with the ids to pick from as data too."""
    offered = ", ".join(f"'{i}'" for i in ids) or "none"
    body = json.dumps({"error": {
        "message": f"model '{requested}' is not offered here; available models: {offered} (see GET /v1/models)",
        "type": "invalid_request_error", "code": 404, "param": "model", "available": list(ids)}}).encode()
    return 404, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())], body
