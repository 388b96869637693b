"""Images in chat requests: check, orient, downscale and re-encode them, and keep conversations from piling them up.

Phone photos are 12 megapixels; llama-server would turn one into up to 4096 context tokens. Downscaling
in front (short side ≤ 768 px) costs a few milliseconds and saves bandwidth, decode time and context.
Everything here is blocking CPU work: callers run `rewrite_chat` in a thread.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass, field
from typing import Any

from ..spec.profile import ImagePolicy

SUPPORTED = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif",
             "BMP": "image/bmp", "MPO": "image/jpeg", "TIFF": "image/tiff"}
_DATA_URI = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w-]+=[^;,]*)*);base64,", re.IGNORECASE)
OMITTED = "[an earlier image was removed to keep the conversation within the context]"


class ImageError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Stats:
    images: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    downscaled: int = 0  # images re-encoded: smaller, or turned upright
    dropped: int = 0  # messages and image parts removed by the context policy
    # (width, height) of each chat image_url part left in the request, in order (None: a remote URL, size unknown)
    sizes: list[tuple[int, int] | None] = field(default_factory=list)


def target_size(w: int, h: int, policy: ImagePolicy) -> tuple[int, int]:
    scale = min(1.0, policy.max_short_side / min(w, h), policy.max_long_side / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


# Formats Pillow may open here: the others (EPS runs Ghostscript, for one) are never tried on client bytes.
OPEN_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG also opens MPO
DEFAULT_MAX_PIXELS = 40_000_000


def process_image(data: bytes, policy: ImagePolicy, where: str, max_pixels: int = DEFAULT_MAX_PIXELS
                  ) -> tuple[bytes, str, bool, tuple[int, int]]:
    """Returns (bytes, mime type, changed, size). Images already within limits and upright are left untouched.

    Memory is bounded before any pixel is decoded: the header gives the size, JPEGs are decoded at the smallest
    libjpeg scale (1/2, 1/4, 1/8) that still covers the target, and what would be decoded must fit `max_pixels`.
    """
    # Imported here: Pillow costs memory and start time that a text-only box never needs.
    from PIL import Image, ImageOps, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # the budget below is ours, checked before decoding (Pillow's is after open)
    if len(data) > policy.max_image_bytes:
        raise ImageError(413, f"{where}: image is {len(data)} bytes, over the limit of {policy.max_image_bytes}")
    img: Image.Image
    try:
        try:
            img = Image.open(io.BytesIO(data), formats=OPEN_FORMATS)
        except UnidentifiedImageError:
            fmt = _sniff(data)
            if fmt:
                raise ImageError(400, f"{where}: unsupported image format {fmt} (use JPEG, PNG, WebP, GIF or BMP)"
                                 ) from None
            raise
        fmt = img.format or "?"
        w, h = img.size
        if fmt not in ("JPEG", "MPO") and w * h > max_pixels:
            raise ImageError(413, f"{where}: image is {w}x{h} pixels, over the limit of {max_pixels} "
                                  "(image_max_pixels)")
        # PNG's getexif() decodes the whole image to look for an eXIf chunk after the pixels: only read what
        # the header already brought.
        orientation = 1 if fmt == "PNG" and "exif" not in img.info else img.getexif().get(0x0112, 1)
        if orientation in (5, 6, 7, 8):
            w, h = h, w
        tw, th = target_size(w, h, policy)
        if fmt in ("JPEG", "MPO") and (tw, th) != (w, h):
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that is still large enough: faster, less memory.
            img.draft("RGB", (tw, th) if orientation in (1, 2, 3, 4) else (th, tw))
        decoded = img.size[0] * img.size[1]
        if decoded > max_pixels:
            raise ImageError(413, f"{where}: image is {w}x{h} pixels; decoding it needs {decoded} pixels, over the "
                                  f"limit of {max_pixels} (image_max_pixels)")
        img.load()  # every image is decoded once here, so a corrupt or truncated one is the client's 400
        if (tw, th) == (w, h) and orientation == 1:
            return data, SUPPORTED[fmt], False, (w, h)
        img = ImageOps.exif_transpose(img)
        if img.size != (tw, th):
            img = img.resize((tw, th), Image.Resampling.LANCZOS, reducing_gap=3.0)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError
            ) as exc:
        raise ImageError(400, f"{where}: not a valid image ({exc})") from None
    out = io.BytesIO()
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img.save(out, format="PNG", optimize=False)
        mime = "image/png"
    else:
        img.convert("RGB").save(out, format="JPEG", quality=policy.jpeg_quality)
        mime = "image/jpeg"
    return out.getvalue(), mime, True, img.size


def _sniff(data: bytes) -> str | None:
    """The name of a format Pillow knows but the proxy does not take, for the error message (header only)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data[:4096])) as probe:
            return probe.format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        return None


def decode_base64(payload: str, where: str) -> bytes:
    """The bytes of a data URI or raw base64."""
    m = _DATA_URI.match(payload)
    if m:
        payload = payload[m.end():]
    elif ":" in payload[:12]:
        raise ImageError(400, f"{where}: unsupported image URL scheme {payload.split(':', 1)[0]!r}")
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


def rewrite_chat(doc: dict[str, Any], policy: ImagePolicy) -> tuple[dict[str, Any] | None, Stats]:
    """The context policy on a chat request: keep the last turns, and the last images (older ones become a short
    text). Returns (new document or None if unchanged, stats). The document is the proxy's own parse: changed
    in place, never copied. Checking and downscaling the images that stay is the media policy's (media.py).
    """
    stats = Stats()
    msgs = doc.get("messages")
    if not isinstance(msgs, list):
        return None, stats
    kept = _kept_messages(msgs, policy.keep_last_turns)
    stats.dropped = len(msgs) - len(kept)
    parts = [(msgs[i]["content"], j) for i in kept if isinstance(msgs[i], dict) and isinstance(msgs[i].get("content"), list)
             for j, part in enumerate(msgs[i]["content"])
             if isinstance(part, dict) and part.get("type") == "image_url"]
    keep = len(parts) if policy.keep_last_images is None else policy.keep_last_images
    for content, j in parts[:max(0, len(parts) - keep)]:
        content[j] = {"type": "text", "text": OMITTED}
        stats.dropped += 1
    if not stats.dropped:
        return None, stats
    doc["messages"] = [msgs[i] for i in kept]
    return doc, stats
