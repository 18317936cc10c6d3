"""Read a toy caption back into its scene: the inverse of `toyworld.scene.caption`.

Used by the synthesis job's exact toy editor, which gets images and captions from a caption dataset and
must know the scene to re-render it edited. Returns None for any caption the toy grammar did not write.
"""
from __future__ import annotations

import re
from typing import Optional

from .scene import SIZES, SLOT_PHRASE, VOCABULARIES, Obj, Scene, Vocabulary

_SLOT_BY_PHRASE = {v: k for k, v in SLOT_PHRASE.items()}


def _patterns(vocab: Vocabulary) -> tuple[re.Pattern, re.Pattern]:
    """(one object, a whole caption) of this vocabulary's grammar."""
    obj = (rf"a ({'|'.join(SIZES)}) ({'|'.join(vocab.colours)}) ({'|'.join(vocab.shapes)}) "
           rf"({'|'.join(map(re.escape, SLOT_PHRASE.values()))})")
    prefixes = "|".join(re.escape(p) for p in vocab.caption_prefixes if p)
    whole = rf"^(?:{prefixes})?({obj}(?:(?:, | and ){obj})*) on a ({'|'.join(vocab.backgrounds)}) background$"
    return re.compile(obj), re.compile(whole)


_GRAMMARS = [_patterns(v) for v in VOCABULARIES.values()]


def parse_caption(text: str) -> Optional[Scene]:
    """The scene a toy caption of any vocabulary describes; None for anything else."""
    for object_re, caption_re in _GRAMMARS:
        match = caption_re.match(text.strip())
        if match:
            objects = tuple(Obj(_SLOT_BY_PHRASE[m.group(4)], m.group(3), m.group(2), m.group(1))
                            for m in object_re.finditer(match.group(1)))
            scene = Scene(match.groups()[-1], objects)
            return scene if scene.valid() else None
    return None
