"""Images in chat requests: check, orient, downscale and re-encode them, and keep conversations from piling them up.

Phone photos are 12 megapixels; llama-server would turn one into up to 4096 context tokens. Downscaling
in front (short side ≤ 768 px) costs a few milliseconds and saves bandwidth, decode time and context.
Everything here is blocking CPU work: callers run `rewrite_chat` in a thread.
"""

from __future__ import annotations

import base64
import binascii
import copy
import io
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..profile import ImagePolicy

SUPPORTED = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif",
             "BMP": "image/bmp", "MPO": "image/jpeg", "TIFF": "image/tiff"}
_DATA_URI = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w-]+=[^;,]*)*);base64,", re.IGNORECASE)
OMITTED = "[an earlier image was removed to keep the conversation within the context]"
# Pillow refuses images over twice this many pixels (decompression bombs) and warns above it.
MAX_IMAGE_PIXELS = 64_000_000


class ImageError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Stats:
    images: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped: int = 0  # messages and image parts removed by the context policy
    # (width, height) of each image left in the request, in order (None: a remote URL, size unknown)
    sizes: list[tuple[int, int] | None] = field(default_factory=list)


def target_size(w: int, h: int, policy: ImagePolicy) -> tuple[int, int]:
    scale = min(1.0, policy.max_short_side / min(w, h), policy.max_long_side / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def process_image(data: bytes, policy: ImagePolicy, where: str) -> tuple[bytes, str, bool, tuple[int, int]]:
    """Returns (bytes, mime type, changed, size). Images already within limits and upright are left untouched."""
    # Imported here: Pillow costs memory and start time that a text-only box never needs.
    from PIL import Image, ImageOps, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    if len(data) > policy.max_image_bytes:
        raise ImageError(413, f"{where}: image is {len(data)} bytes, over the limit of {policy.max_image_bytes}")
    img: Image.Image
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format or "?"
        if fmt not in SUPPORTED:
            raise ImageError(400, f"{where}: unsupported image format {fmt} (use JPEG, PNG, WebP, GIF or BMP)")
        orientation = img.getexif().get(0x0112, 1)
        w, h = img.size
        if orientation in (5, 6, 7, 8):
            w, h = h, w
        tw, th = target_size(w, h, policy)
        if (tw, th) == (w, h) and orientation == 1:
            img.verify()  # cheap integrity check without decoding every pixel into memory twice
            return data, SUPPORTED[fmt], False, (w, h)
        if fmt in ("JPEG", "MPO"):
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that is still large enough: much faster.
            img.draft("RGB", (tw, th) if orientation in (1, 2, 3, 4) else (th, tw))
        img = ImageOps.exif_transpose(img)
        if img.size != (tw, th):
            img = img.resize((tw, th), Image.Resampling.LANCZOS, reducing_gap=3.0)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(413, f"{where}: image has too many pixels ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(400, f"{where}: not a valid image ({exc})") from None
    out = io.BytesIO()
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img.save(out, format="PNG", optimize=False)
        mime = "image/png"
    else:
        img.convert("RGB").save(out, format="JPEG", quality=policy.jpeg_quality)
        mime = "image/jpeg"
    return out.getvalue(), mime, True, img.size


def decode_image_url(url: str, where: str, remote_hosts: frozenset[str]) -> bytes | None:
    """The image bytes of a data URI or raw base64; None for an allowed remote URL (left to llama-server)."""
    if url.startswith(("http://", "https://")):
        host = urlsplit(url).hostname or ""
        if host in remote_hosts:
            return None
        raise ImageError(400, f"{where}: remote image URLs are not allowed ({host}); send the image as a data URI "
                              "(data:image/jpeg;base64,...) or add the host to remote_image_hosts")
    m = _DATA_URI.match(url)
    payload = url[m.end():] if m else url
    if not m and ":" in url[:12]:
        raise ImageError(400, f"{where}: unsupported image URL scheme {url.split(':', 1)[0]!r}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        try:  # be lenient about whitespace and missing padding, strict about everything else
            cleaned = re.sub(r"\s+", "", payload)
            return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ImageError(400, f"{where}: image data is not valid base64") from None


def _kept_messages(msgs: list[Any], turns: int | None) -> list[int]:
    """Indices of the messages kept: system messages and the last `turns` user turns (and what follows them)."""
    user_idx = [i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "user"]
    if turns is None or len(user_idx) <= turns:
        return list(range(len(msgs)))
    cut = user_idx[-turns]
    return [i for i, m in enumerate(msgs) if i >= cut or (isinstance(m, dict) and m.get("role") == "system")]


def rewrite_chat(doc: dict[str, Any], policy: ImagePolicy, remote_hosts: frozenset[str] = frozenset()
                 ) -> tuple[dict[str, Any] | None, Stats]:
    """Apply the image policy to a chat request. Returns (new document or None if unchanged, stats).

    Error messages name positions in the request as the client sent it (messages[i].content[j]).
    """
    stats = Stats()
    msgs = doc.get("messages")
    if not isinstance(msgs, list):
        return None, stats
    kept = _kept_messages(msgs, policy.keep_last_turns)
    stats.dropped = len(msgs) - len(kept)
    out_msgs = {i: copy.deepcopy(msgs[i]) if isinstance(msgs[i], dict) and isinstance(msgs[i].get("content"), list)
                else msgs[i] for i in kept}
    parts = [(i, j, part) for i in kept if isinstance(out_msgs[i], dict) and isinstance(out_msgs[i].get("content"), list)
             for j, part in enumerate(out_msgs[i]["content"])
             if isinstance(part, dict) and part.get("type") == "image_url"]
    changed = stats.dropped > 0
    keep = len(parts) if policy.keep_last_images is None else policy.keep_last_images
    for n, (i, j, part) in enumerate(parts):
        where = f"messages[{i}].content[{j}]"
        if n < len(parts) - keep:
            out_msgs[i]["content"][j] = {"type": "text", "text": OMITTED}
            stats.dropped += 1
            changed = True
            continue
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str) or not url:
            raise ImageError(400, f"{where}: image_url must be a string or an object with a 'url' string")
        data = decode_image_url(url, where, remote_hosts)
        if data is None:
            stats.sizes.append(None)
            continue
        out, mime, resized, size = process_image(data, policy, where)
        stats.sizes.append(size)
        stats.images += 1
        stats.bytes_in += len(data)
        stats.bytes_out += len(out)
        if resized or not url.startswith("data:"):
            part["image_url"] = {**(ref if isinstance(ref, dict) else {}),
                                 "url": f"data:{mime};base64," + base64.b64encode(out).decode()}
            changed = True
    if not changed:
        return None, stats
    return {**doc, "messages": [out_msgs[i] for i in kept]}, stats
