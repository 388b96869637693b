"""Answers about the models a box offers: the 404 for a model it does not have."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import Headers, json_error


def unknown_model(requested: str, ids: Sequence[str]) -> tuple[int, Headers, bytes]:
    """OpenAI's shape (a client library shows `message`), with the ids to pick from as data too."""
    offered = ", ".join(f"'{i}'" for i in ids) or "none"
    return json_error(404, f"model '{requested}' is not offered here; available models: {offered} (see GET /v1/models)",
                      "invalid_request_error", param="model", available=list(ids))
