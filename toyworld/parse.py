"""Read a toy caption back into its scene: the inverse of `toyworld.scene.caption`.

Used by the synthesis job's exact toy editor, which gets images and captions from a caption dataset and
must know the scene to re-render it edited. Returns None for any caption the toy grammar did not write.
"""
from __future__ import annotations

import re
from typing import Optional

from .scene import BACKGROUNDS, CAPTION_PREFIXES, COLOURS, SHAPES, SIZES, SLOT_PHRASE, Obj, Scene

_SLOT_BY_PHRASE = {v: k for k, v in SLOT_PHRASE.items()}
_OBJECT = (rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) "
           rf"({'|'.join(map(re.escape, SLOT_PHRASE.values()))})")
_OBJECT_RE = re.compile(_OBJECT)
_CAPTION_RE = re.compile(rf"^(?:{'|'.join(re.escape(p) for p in CAPTION_PREFIXES if p)})?"
                         rf"({_OBJECT}(?:(?:, | and ){_OBJECT})*) on a ({'|'.join(BACKGROUNDS)}) background$")


def parse_caption(text: str) -> Optional[Scene]:
    match = _CAPTION_RE.match(text.strip())
    if not match:
        return None
    objects = tuple(Obj(_SLOT_BY_PHRASE[m.group(4)], m.group(3), m.group(2), m.group(1))
                    for m in _OBJECT_RE.finditer(match.group(1)))
    scene = Scene(match.groups()[-1], objects)
    return scene if scene.valid() else None
