"""The media policy, on the parsed request: find every place llama-server would fetch or decode media, refuse
remote URLs (llama-server fetches any URL that starts with "http" itself: a door into the box's network), and
check, downscale and re-encode images in a canonical form.

Media is found by shape, wherever it is in the document, the way llama-server recognises it after its own
translations (server-common.cpp `oaicompat_content_load_media`, server-chat.cpp for /v1/responses and
/v1/messages): OpenAI parts `{"type": "image_url"|"input_audio"|"input_video"|"video_url", ...}`, Responses parts
`{"type": "input_image", "image_url": "..."}`, Anthropic blocks `{"type": "image", "source": {...}}` and
completion prompts `{"prompt_string": ..., "multimodal_data": [base64, ...]}`. `apply` is blocking CPU work: the
proxy runs it on the image workers (admission.py).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..spec.profile import ImagePolicy
from .images import ImageError, Stats, decode_base64, process_image

# A remote URL the operator allowed must be plain: no user info, backslashes or spaces that URL parsers disagree on.
_PLAIN_URL = re.compile(r"https?://([A-Za-z0-9.-]+)(?::[0-9]{1,5})?(?:[/?#][^\s\\@]*)?")
AV_PARTS = ("input_audio", "input_video", "video_url")
_CHAT_PART = re.compile(r"messages\[\d+\]\.content\[\d+\]")  # where the context guard counts images


@dataclass
class MediaSlot:
    where: str
    value: str  # a URL, a data URI or raw base64, as sent
    put: Callable[[bytes, str], None]  # write back (image bytes, mime type) in the form llama-server reads there
    image: bool = True  # audio/video: only the remote check applies
    part: bool = False  # an OpenAI image_url part: the context guard counts these (Stats.sizes)


@dataclass
class Found:
    slots: list[MediaSlot] = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(1 for s in self.slots if s.image)


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _setter(obj: dict[str, Any] | list[Any], key: Any, form: str) -> Callable[[bytes, str], None]:
    def put(data: bytes, mime: str) -> None:
        if form == "object":  # {"type": "image_url", "image_url": {"url": ...}}
            ref = obj[key]
            obj[key] = {**(ref if isinstance(ref, dict) else {}), "url": _data_uri(data, mime)}
        elif form == "anthropic":  # {"type": "base64", "media_type": ..., "data": ...}
            obj[key] = {"type": "base64", "media_type": mime, "data": base64.b64encode(data).decode()}
        elif form == "raw":  # multimodal_data entries: bare base64
            obj[key] = base64.b64encode(data).decode()
        else:  # a data URI string
            obj[key] = _data_uri(data, mime)
    return put


def _path(parent: str, key: Any) -> str:
    return f"{parent}[{key}]" if isinstance(key, int) else f"{parent}.{key}" if parent else str(key)


# Without \\u escapes every string of the parsed document appears literally in the body, so a body that names
# none of these holds no media (and one escape anywhere means the full walk). Cheap: C-speed substring scans.
_MEDIA_WORDS = (b"\\u", b"image", b"input_", b"video", b"multimodal", b"document")


def possible(body: bytes) -> bool:
    return any(w in body for w in _MEDIA_WORDS)


def find(doc: Any) -> Found:
    """Every media slot in the document, with the position the client sent it at (messages[1].content[0])."""
    found = Found()
    stack: list[tuple[Any, str]] = [(doc, "")]
    while stack:  # depth first, in document order (children pushed reversed)
        node, where = stack.pop()
        if isinstance(node, list):
            stack.extend((v, _path(where, i)) for i, v in reversed(list(enumerate(node))) if isinstance(v, (dict, list)))
            continue
        if not isinstance(node, dict):
            continue
        _slots_of(node, where, found.slots)
        stack.extend((v, _path(where, k)) for k, v in reversed(node.items()) if isinstance(v, (dict, list)))
    return found


def _slots_of(node: dict[str, Any], where: str, out: list[MediaSlot]) -> None:
    kind = node.get("type")
    if kind == "image_url" and "image_url" in node:
        ref = node["image_url"]
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str) or not url:
            raise ImageError(400, f"{where}: image_url must be an object with a 'url' string")
        out.append(MediaSlot(where, url, _setter(node, "image_url", "object"), part=_CHAT_PART.fullmatch(where) is not None))
    elif kind == "input_image" and "image_url" in node:
        url = node["image_url"]
        if not isinstance(url, str) or not url:
            raise ImageError(400, f"{where}.image_url: expected a URL or data URI string")
        out.append(MediaSlot(where, url, _setter(node, "image_url", "uri")))
    elif kind in ("image", "document") and isinstance(node.get("source"), dict):
        src = node["source"]
        if src.get("type") == "url" or "url" in src:
            url = src.get("url")
            if not isinstance(url, str):
                raise ImageError(400, f"{where}.source.url: expected a string")
            out.append(MediaSlot(where, url, _setter(node, "source", "anthropic")))
        else:
            data = src.get("data")
            if not isinstance(data, str):
                raise ImageError(400, f"{where}.source.data: expected a base64 string")
            out.append(MediaSlot(where, data, _setter(node, "source", "anthropic")))
    elif kind in AV_PARTS and isinstance(node.get(kind), dict):
        ref = node[kind]
        for key in ("data", "url"):
            if isinstance(ref.get(key), str):
                out.append(MediaSlot(f"{where}.{kind}.{key}", ref[key], _setter(ref, key, "uri"), image=False))
    if "multimodal_data" in node:
        data = node["multimodal_data"]
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ImageError(400, f"{_path(where, 'multimodal_data')}: expected an array of base64 strings")
        for i, x in enumerate(data):
            out.append(MediaSlot(f"{_path(where, 'multimodal_data')}[{i}]", x, _setter(data, i, "raw")))


def is_remote(value: str) -> bool:
    """What llama-server fetches: anything starting with "http" (its check is exactly that), and file:// URLs."""
    head = value[:8].lower().lstrip()
    return head.startswith(("http", "file:", "ftp:"))


def check_remote(value: str, where: str, hosts: frozenset[str], what: str = "image") -> None:
    m = _PLAIN_URL.fullmatch(value)
    host = m.group(1).lower() if m else ""
    if m is None or host not in hosts:
        shown = host or value[:60]
        raise ImageError(400, f"{where}: remote {what} URLs are not allowed ({shown}); send the {what} as a data "
                              "URI (data:image/jpeg;base64,...) or add the host to remote_image_hosts")


def check_urls(found: Found, hosts: frozenset[str]) -> None:
    """Cheap, on the event loop: refuse remote URLs before any image work is queued."""
    for slot in found.slots:
        if is_remote(slot.value):
            check_remote(slot.value, slot.where, hosts, "image" if slot.image else "media")


def apply(found: Found, policy: ImagePolicy, hosts: frozenset[str], max_pixels: int) -> Stats:
    """Check, orient and downscale every image; write each back in a form llama-server reads. Blocking."""
    stats = Stats()
    for slot in found.slots:
        if is_remote(slot.value):
            check_remote(slot.value, slot.where, hosts, "image" if slot.image else "media")
            if slot.part:
                stats.sizes.append(None)
            continue  # an allowed host: llama-server fetches it
        if not slot.image:
            continue
        data = decode_base64(slot.value, slot.where)
        out, mime, changed, size = process_image(data, policy, slot.where, max_pixels)
        if slot.part:
            stats.sizes.append(size)
        stats.images += 1
        stats.downscaled += changed
        stats.bytes_in += len(data)
        stats.bytes_out += len(out)
        slot.put(out, mime)
    return stats
