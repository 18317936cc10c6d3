"""Draw a toy scene as a small RGB image.

Drawing happens at SUPERSAMPLE times the output size and is downsampled with a box filter, which gives
anti-aliased edges from PIL's aliased primitives while staying byte-for-byte deterministic.
"""
from __future__ import annotations

import io
import math
import random

from PIL import Image, ImageDraw

from .scene import OPEN_DOMAIN, SLOTS, Scene

SUPERSAMPLE = 4
# Radii as a fraction of the image side. A slot is 1/3 of the width: with the x jitter below, two large objects
# in neighbouring slots never overlap (2 * 0.13 * 1.1 < 1/3 - 2 * 0.02).
RADIUS = {"small": 0.08, "large": 0.13}
SLOT_X = {slot: (i + 0.5) / len(SLOTS) for i, slot in enumerate(SLOTS)}


def layout(scene: Scene, rng: random.Random) -> list[dict]:
    """Per-object centre and radius (fractions of the side), jittered so renderings of one scene differ."""
    placed = []
    for o in scene.objects:
        r = RADIUS[o.size] * rng.uniform(0.9, 1.1)
        x = SLOT_X[o.slot] + rng.uniform(-0.02, 0.02)
        y = 0.5 + rng.uniform(-0.25, 0.25)
        y = min(max(y, r + 0.02), 1 - r - 0.02)
        placed.append({"x": round(x, 4), "y": round(y, 4), "r": round(r, 4)})
    return placed


def _polygon(cx: float, cy: float, radii: list[float], start: float = -math.pi / 2) -> list[tuple[float, float]]:
    """Points at equal angles from `start` (the top), at the given distances from the centre in turn."""
    step = 2 * math.pi / len(radii)
    return [(cx + r * math.cos(start + i * step), cy + r * math.sin(start + i * step)) for i, r in enumerate(radii)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85  # a square of the same "radius" looks bigger than a circle; shrink to similar area
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "cross":
        t = r * 0.38
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    elif shape == "star":  # five points
        draw.polygon(_polygon(cx, cy, [r, r * 0.45] * 5), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, [r, r * 0.7] * 2), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, [r * 0.95] * 6, start=0.0), fill=fill)
    elif shape == "bar":  # a wide, flat rectangle
        draw.rectangle([cx - r, cy - r * 0.4, cx + r, cy + r * 0.4], fill=fill)
    elif shape == "pentagon":  # the open domain's extra shapes (scene.EXTRA_WORDS) from here on
        draw.polygon(_polygon(cx, cy, [r * 0.95] * 5), fill=fill)
    elif shape == "ring":  # a thick circle outline
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, round(r * 0.35)))
    elif shape == "arrow":  # pointing right
        t, head = r * 0.3, r * 0.2
        draw.rectangle([cx - r, cy - t, cx + head, cy + t], fill=fill)
        draw.polygon([(cx + head - r * 0.1, cy - r * 0.75), (cx + r, cy), (cx + head - r * 0.1, cy + r * 0.75)],
                     fill=fill)
    elif shape == "oval":  # a wide ellipse
        draw.ellipse([cx - r, cy - r * 0.6, cx + r, cy + r * 0.6], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, placed: list[dict], size: int = 64) -> Image.Image:
    # every world's words mean the same colour (OPEN_DOMAIN holds them all), so a scene mixing worlds draws too
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), OPEN_DOMAIN.backgrounds[scene.background])
    draw = ImageDraw.Draw(img)
    for o, p in zip(scene.objects, placed):
        _draw_shape(draw, o.shape, p["x"] * big, p["y"] * big, p["r"] * big, OPEN_DOMAIN.colours[o.colour])
    return img.resize((size, size), Image.Resampling.BOX)


def encode(img: Image.Image, fmt: str) -> bytes:
    """Image bytes; PNG and JPEG encoders here write no timestamps, so equal pixels give equal bytes."""
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=92)
    elif fmt == "png":
        img.save(buf, format="PNG")
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()
