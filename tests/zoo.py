"""Hostile and awkward image files for the caption job's tests, built on the fly."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg(colour=(200, 30, 30), size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def huge_png_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG signature + IHDR claiming enormous dimensions, with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def sixteen_bit_png() -> bytes:
    arr = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    return png(Image.fromarray(arr))  # uint16 -> mode I;16


def palette_alpha_png() -> bytes:
    img = Image.new("P", (24, 24), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.info["transparency"] = 0
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)
    return buf.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    img = Image.new("RGB", (40, 20), (0, 120, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: a 40x20 file displays as 20x40
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


# name -> (bytes, caption or None, expected outcome: "ok" / "duplicate" / a failed reason)
def zoo() -> dict[str, tuple[bytes, str | None, str]]:
    good = jpeg((10, 200, 10))
    return {
        "good.jpg": (good, "a green picture", "ok"),
        "same bytes, other name.jpg": (good, "a green picture again", "duplicate"),
        "truncated.jpg": (jpeg((1, 2, 3), (64, 64))[:200], "cut", "corrupt"),
        "empty.jpg": (b"", "nothing", "empty"),
        "text.jpg": (b"this is not an image at all\n" * 5, "text", "not_an_image"),
        "bomb.png": (huge_png_header(), "huge", "too_many_pixels"),
        "cmyk.jpg": (jpeg((10, 20, 30, 40), mode="CMYK"), "cmyk", "ok"),
        "deep.png": (sixteen_bit_png(), "16-bit gradient", "ok"),
        "palette alpha.png": (palette_alpha_png(), "palette with alpha", "ok"),
        "anim.gif": (animated_gif(), "an animation", "ok"),
        "rotated.jpg": (exif_rotated_jpeg(), "rotated", "ok"),
        "ünïcode ñame.v2.final.png": (png(Image.new("RGB", (16, 16), (9, 9, 200))), "dotted unicode name", "ok"),
        "no caption.png": (png(Image.new("RGB", (16, 16), (90, 9, 20))), None, "no_caption"),
        "tiny.png": (png(Image.new("RGB", (3, 3), (1, 1, 1))), "too small", "too_small"),
    }


def write_zoo(root: Path) -> dict[str, tuple[bytes, str | None, str]]:
    items = zoo()
    (root / "sub dir").mkdir(parents=True)
    for i, (name, (data, caption, _)) in enumerate(items.items()):
        folder = root / "sub dir" if i % 2 else root  # recursion into sub-directories
        path = folder / name
        path.write_bytes(data)
        if caption is not None:
            stem = path.name.rsplit(".", 1)[0]
            (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return items
