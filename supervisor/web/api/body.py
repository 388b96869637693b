"""Which model a request names: `model` in a JSON body, in a multipart form, or in the query string."""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from ..errors import Headers, Receive, Scope, json_error

# Bodies are only parsed when they mention a model at all; beyond this size the model field is looked up
# without parsing the whole document (it is near the top in every client seen).
_HEAD = 64 * 1024


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body; None when the client left first. Stops reading once over `limit` (the
    caller answers 413 when len(body) > limit)."""
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunk = msg.get("body", b"")
        size += len(chunk)
        chunks.append(chunk)
        if size > limit or not msg.get("more_body"):
            return b"".join(chunks)


def too_large(limit: int) -> tuple[int, Headers, bytes]:
    return json_error(413, f"request body over the limit of {limit} bytes", "invalid_request_error")


def requested_model(scope: Scope, body: bytes) -> str | None:
    """The model a request names, or None (the default is used). Never raises: a malformed body is the
    proxy's to refuse with its own 400."""
    query = scope.get("query_string", b"")
    if b"model=" in query:
        values = parse_qs(query.decode("latin-1")).get("model")
        if values and values[0]:
            return values[0]
    if not body or b"model" not in body:
        return None
    ctype = next((v for k, v in scope["headers"] if k == b"content-type"), b"").decode("latin-1").lower()
    if ctype.startswith("multipart/form-data"):
        return _form_field(body, ctype, "model")
    if body.lstrip()[:1] == b"{":
        return _json_model(body)
    return None


def _json_model(body: bytes) -> str | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    value = doc.get("model") if isinstance(doc, dict) else None
    return value if isinstance(value, str) and value else None


def _form_field(body: bytes, ctype: str, name: str) -> str | None:
    boundary = next((p.split("=", 1)[1].strip().strip('"') for p in ctype.split(";")[1:]
                     if p.strip().startswith("boundary=")), None)
    if not boundary:
        return None
    want = f'name="{name}"'.encode()
    for part in body.split(b"--" + boundary.encode("latin-1")):
        head, sep, value = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        disposition = next((ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-disposition:")), b"")
        if want in disposition and b"filename=" not in disposition:
            text = value.removesuffix(b"\r\n").decode("utf-8", "replace").strip()
            return text or None
    return None
