"""A request's body, read once, and the model it names: `model` in a JSON body, a multipart form or the query."""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from ..errors import Receive, Scope


class TooLarge(Exception):
    """The body is over max_body_bytes (by its Content-Length, or by what arrived): answered 413."""


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole request body, read once for everyone after it; None when the client left first. The limit is
    enforced before reading (Content-Length) and while reading: raises TooLarge, the rest is not read."""
    for k, v in scope["headers"]:
        if k == b"content-length" and (not v.isdigit() or int(v) > limit):
            raise TooLarge
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge
        chunks.append(chunk)
        if not msg.get("more_body"):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


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
    # Not lowercased: a multipart boundary is case-sensitive (only the media type is not).
    ctype = next((v for k, v in scope["headers"] if k == b"content-type"), b"").decode("latin-1")
    if ctype.lower().startswith("multipart/form-data"):
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
                     if p.strip().lower().startswith("boundary=")), None)
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
