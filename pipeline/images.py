"""Decode, validate and normalise one image: the only place that looks inside image bytes.

`prepare_image` either returns a `PreparedImage` (bytes to store + metadata) or raises `ImageRejected`
with a short reason code and a message; the caller turns that into a `failed.parquet` row. Nothing here
ever substitutes a placeholder.

Stored bytes are the original bytes unless the image had to change: resized (`--max-size`), rotated by its
EXIF orientation, a mode that viewers and models mishandle (CMYK, 16-bit, palette/alpha), or a container
outside jpg/png/webp (GIF, BMP, TIFF: first frame, re-encoded as PNG). `reencoded` says why.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Truncated files must fail, not be padded with grey by PIL.
ImageFile.LOAD_TRUNCATED_IMAGES = False

KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default decompression-bomb limit


class ImageRejected(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class PreparedImage:
    data: bytes  # bytes to store
    ext: str  # jpg | png | webp, matching `data`
    width: int
    height: int
    reencoded: Optional[str]  # None when `data` are the original bytes, else why they changed
    image: Image.Image  # decoded RGB, for models further down the job


def _to_rgb(img: Image.Image) -> tuple[Image.Image, Optional[str]]:
    """RGB with a note when the conversion was more than a relabel."""
    if img.mode == "RGB":
        return img, None
    if img.mode in ("L", "1") or img.mode == "P" and "transparency" not in img.info:
        return img.convert("RGB"), None  # every decoder gets these right: keep the original bytes
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # PIL's convert("RGB") clips 16-bit values at 255 (white); scale to 8 bits instead.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        arr8 = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB"), "16-bit"
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(base, rgba).convert("RGB"), "alpha"
    return img.convert("RGB"), img.mode.lower()


def _encode(img: Image.Image, source_format: str) -> tuple[bytes, str]:
    buf = io.BytesIO()
    if source_format == "JPEG":
        img.save(buf, format="JPEG", quality=95)
        return buf.getvalue(), "jpg"
    img.save(buf, format="PNG")
    return buf.getvalue(), "png"


def prepare_image(data: bytes, *, min_size: int = 1, max_size: Optional[int] = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    if not data:
        raise ImageRejected("empty", "zero-byte file")
    # No global state is touched (PIL's MAX_IMAGE_PIXELS, warning filters): the caption job decodes on several
    # threads. PIL's own guard raises past twice its limit; ours is checked on the header, before decoding.
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format or ""
        if img.width * img.height > max_pixels:
            raise ImageRejected("too_many_pixels", f"decompression bomb guard: {img.width}x{img.height} is more than "
                                                   f"{max_pixels} pixels")
        img.seek(0)  # animated images: the first frame
        img.load()
    except ImageRejected:
        raise
    except Image.DecompressionBombError as err:
        raise ImageRejected("too_many_pixels", f"decompression bomb guard: {err}") from err
    except Image.UnidentifiedImageError as err:
        raise ImageRejected("not_an_image", str(err)) from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageRejected("corrupt", f"cannot decode: {err}") from err
    reasons = []
    if getattr(img, "n_frames", 1) > 1:
        reasons.append("first_frame")
    oriented = img
    if _exif_orientation(img) not in (None, 1):
        try:
            oriented = ImageOps.exif_transpose(img)
        except Exception as err:  # broken EXIF blocks raise from deep inside PIL
            raise ImageRejected("corrupt", f"bad EXIF: {err}") from err
        reasons.append("exif_orientation")
    rgb, mode_note = _to_rgb(oriented)
    if mode_note:
        reasons.append(mode_note)
    if fmt not in KEEP_FORMATS:
        reasons.append(f"format_{fmt.lower() or 'unknown'}")
    w, h = rgb.size
    if min(w, h) < min_size:
        raise ImageRejected("too_small", f"{w}x{h} is below --min-size {min_size}")
    if max_size and max(w, h) > max_size:
        rgb = rgb.copy()
        rgb.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
        reasons.append("resized")
    if reasons:
        stored, ext = _encode(rgb, fmt)
        note = ",".join(reasons)
    else:
        stored, ext, note = data, KEEP_FORMATS[fmt], None
    return PreparedImage(stored, ext, rgb.size[0], rgb.size[1], note, rgb)


def _exif_orientation(img: Image.Image) -> Optional[int]:
    try:
        return img.getexif().get(0x0112)
    except Exception:
        return None
