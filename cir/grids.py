"""Retrieval example grids as PNG: one row per query, `reference | modification text | top-k results`, each
result labelled with its rank, score and name, the known target(s) outlined in green; a target the row does not
show has its rank written under the text panel (`GridRow.note`)."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Optional

from PIL import Image, ImageDraw, ImageFont, ImageOps

GAP = 8
LABEL = 36  # two lines of label under each panel
TARGET_COLOUR = (0, 170, 0)
NOTE_COLOUR = (170, 0, 0)  # GridRow.note: where a target not shown ranked
BACKGROUND = (255, 255, 255)
TEXT_PANEL = (238, 238, 245)
OUTLINE = 4


@dataclass
class GridRow:
    reference: Optional[Image.Image]  # None for a text-only query
    text: str  # the modification text ("" for an image-only query)
    results: list[tuple[Image.Image, str, float]]  # (image, name, score), best first
    targets: set[str] = field(default_factory=set)  # names to outline (CIRCO has several)
    note: str = ""  # a second line under the text panel: where a target missing from `results` ranked


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(img: Image.Image, panel: int) -> Image.Image:
    """The image scaled (up or down) to fit a square panel, centred on white."""
    img = ImageOps.contain(img.convert("RGB"), (panel, panel), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (panel, panel), BACKGROUND)
    canvas.paste(img, ((panel - img.width) // 2, (panel - img.height) // 2))
    return canvas


def grid_size(rows: int, columns: int, panel: int) -> tuple[int, int]:
    """(width, height) of a grid: `columns` result panels after the reference and text panels."""
    return GAP + (columns + 2) * (panel + GAP), GAP + rows * (panel + LABEL + GAP)


def panel_box(row: int, column: int, panel: int) -> tuple[int, int, int, int]:
    """The pixel box of a panel: column 0 is the reference, 1 the text, 2.. the results."""
    x, y = GAP + column * (panel + GAP), GAP + row * (panel + LABEL + GAP)
    return x, y, x + panel, y + panel


def render_grid(rows: list[GridRow], panel: int = 160) -> Image.Image:
    columns = max((len(r.results) for r in rows), default=0)
    sheet = Image.new("RGB", grid_size(len(rows), columns, panel), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font, small = _font(14), _font(11)
    chars = max(8, panel // 8)  # characters per line of the text panel
    for r, row in enumerate(rows):
        x, y, _, _ = panel_box(r, 0, panel)
        if row.reference is not None:
            sheet.paste(_fit(row.reference, panel), (x, y))
        else:
            draw.rectangle(panel_box(r, 0, panel), outline=(180, 180, 180))
            draw.text((x + 6, y + 6), "(no image)", fill=(120, 120, 120), font=small)
        draw.text((x, y + panel + 4), "reference", fill=(0, 0, 0), font=small)
        tx, ty, tx1, ty1 = panel_box(r, 1, panel)
        draw.rectangle((tx, ty, tx1, ty1), fill=TEXT_PANEL)
        lines = textwrap.wrap(row.text or "(image only)", chars)[: panel // 18]
        draw.multiline_text((tx + 6, ty + 6), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=4)
        draw.text((tx, ty1 + 4), "modification", fill=(0, 0, 0), font=small)
        if row.note:
            draw.text((tx, ty1 + 4 + LABEL // 2), row.note, fill=NOTE_COLOUR, font=small)
        for c, (img, name, score) in enumerate(row.results):
            box = panel_box(r, c + 2, panel)
            sheet.paste(_fit(img, panel), box[:2])
            if name in row.targets:
                draw.rectangle(box, outline=TARGET_COLOUR, width=OUTLINE)
            label = f"#{c + 1}  {score:.3f}\n{name[: chars + 4]}"
            draw.multiline_text((box[0], box[3] + 4), label, fill=(0, 0, 0), font=small, spacing=2)
    return sheet
