"""A request the supervisor answers itself instead of forwarding: the one error type the request path's stages
(validation, the media policy, image workers, the context guard) raise, and the proxy turns into a JSON answer."""

from __future__ import annotations


class Rejected(Exception):
    """A request the supervisor refuses before it reaches llama-server (4xx, or 503 when saturated)."""

    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or []
