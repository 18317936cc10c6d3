"""Edits of a toy scene and the modification texts that describe them.

An `Edit` is data (kind + arguments); `apply_edit` gives the exact edited scene and `mod_texts` every
phrasing of it. The benchmarks draw their queries from here and the synthesis job's toy editor applies
them, so a modification text always names a change that the target really has.

Phrasings come in two families (`PHRASINGS`): `editor`, what the synthesis job's toy editor writes (so the
high-quality triplets' texts), and `held-out`, written the way a person describes the target against the
reference ("the red circle is blue now", "same picture but on a black background"), sharing no sentence with
the editor's or the caption-diff templates (synth/modtext.py). A world whose benchmarks use `held-out` asks
whether a model learnt the change or the toy editor's wording. Each family has four phrasings of every edit,
so the benchmarks draw the same queries, images and answers with either: only the texts differ.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

from .scene import SIZES, SLOT_PHRASE, SLOT_WORD, Obj, Scene, vocabulary_of

KINDS = ("colour", "shape", "size", "position", "background", "add", "remove")
PHRASINGS = ("editor", "held-out")  # families of modification texts (above)


@dataclass(frozen=True)
class Edit:
    kind: str  # one of KINDS
    target: str = ""  # the edited object's noun ("red circle"); empty for background and add
    value: str = ""  # new colour / shape / size / slot / background; for add the new object's "slot:size:colour:shape"

    def to_json(self) -> dict:
        return {"kind": self.kind, "target": self.target, "value": self.value}


def _added_object(edit: Edit) -> Obj:
    slot, size, colour, shape = edit.value.split(":")
    return Obj(slot, shape, colour, size)


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """The scene after the edit (exact: this is the toy world's perfect editor)."""
    if edit.kind == "background":
        return Scene(edit.value, scene.objects)
    if edit.kind == "add":
        return scene.with_objects(scene.objects + (_added_object(edit),))
    obj = scene.find(edit.target)
    others = [o for o in scene.objects if o is not obj]
    if edit.kind == "remove":
        return scene.with_objects(others)
    field = {"colour": "colour", "shape": "shape", "size": "size", "position": "slot"}[edit.kind]
    changed = Obj(**{**obj.__dict__, field: edit.value})
    return scene.with_objects(others + [changed])


def enumerate_edits(scene: Scene, kinds: tuple[str, ...] = KINDS) -> list[Edit]:
    """Every edit of the given kinds whose result is a valid scene different from this one (in the scene's own
    vocabulary)."""
    vocab = vocabulary_of(scene)
    edits: list[Edit] = []
    for obj in scene.objects:
        if "colour" in kinds:
            edits += [Edit("colour", obj.noun, c) for c in vocab.colours if c != obj.colour]
        if "shape" in kinds:
            edits += [Edit("shape", obj.noun, s) for s in vocab.shapes if s != obj.shape]
        if "size" in kinds:
            edits += [Edit("size", obj.noun, s) for s in SIZES if s != obj.size]
        if "position" in kinds:
            edits += [Edit("position", obj.noun, s) for s in scene.free_slots()]
        if "remove" in kinds and len(scene.objects) > 1:
            edits.append(Edit("remove", obj.noun))
    if "background" in kinds:
        edits += [Edit("background", "", b) for b in vocab.backgrounds if b != scene.background]
    if "add" in kinds:
        for slot in scene.free_slots():
            for shape in vocab.shapes:
                for colour in vocab.colours:
                    for size in SIZES:
                        edits.append(Edit("add", "", f"{slot}:{size}:{colour}:{shape}"))
    return [e for e in edits if apply_edit(scene, e).valid()]


def random_edit(scene: Scene, rng: random.Random, kinds: tuple[str, ...] = KINDS) -> Edit:
    """Pick the kind first, then an edit of that kind, so rare kinds (remove) are not drowned by add."""
    by_kind: dict[str, list[Edit]] = {}
    for e in enumerate_edits(scene, kinds):
        by_kind.setdefault(e.kind, []).append(e)
    kind = rng.choice(sorted(by_kind))
    return rng.choice(by_kind[kind])


def mod_texts(scene: Scene, edit: Edit, phrasing: str = "editor") -> list[str]:
    """Every phrasing of the edit in one family (PHRASINGS), as written looking at the reference scene."""
    if phrasing == "held-out":
        return _held_out_texts(scene, edit)
    if phrasing != "editor":
        raise ValueError(f"phrasing must be one of {PHRASINGS}, not {phrasing!r}")
    the = f"the {edit.target}"
    v = edit.value
    if edit.kind == "colour":
        return [f"make {the} {v}", f"change the colour of {the} to {v}", f"{the} should be {v} instead",
                f"turn {the} {v}"]
    if edit.kind == "shape":
        colour = scene.find(edit.target).colour
        return [f"turn {the} into a {v}", f"replace {the} with a {colour} {v}", f"make {the} a {v}",
                f"{the} should be a {v}"]
    if edit.kind == "size":
        if v == "large":
            return [f"make {the} bigger", f"enlarge {the}", f"{the} should be large", f"increase the size of {the}"]
        return [f"make {the} smaller", f"shrink {the}", f"{the} should be small", f"reduce the size of {the}"]
    if edit.kind == "position":
        return [f"move {the} to the {SLOT_WORD[v]}", f"put {the} {SLOT_PHRASE[v]}", f"{the} should be {SLOT_PHRASE[v]}",
                f"shift {the} to the {SLOT_WORD[v]}"]
    if edit.kind == "background":
        return [f"change the background to {v}", f"make the background {v}", f"put it on a {v} background",
                f"use a {v} background"]
    if edit.kind == "add":
        new = _added_object(edit)
        what = f"a {new.size} {new.colour} {new.shape} {SLOT_PHRASE[new.slot]}"
        return [f"add {what}", f"put {what}", f"also include {what}", f"insert {what}"]
    if edit.kind == "remove":
        return [f"remove {the}", f"take away {the}", f"delete {the}", f"get rid of {the}"]
    raise ValueError(f"unknown edit kind {edit.kind!r}")


def _held_out_texts(scene: Scene, edit: Edit) -> list[str]:
    """The held-out family: the target described against the reference, in none of the editor's sentences."""
    the = f"the {edit.target}"
    v = edit.value
    same = "same picture but"
    if edit.kind in ("colour", "shape", "size"):
        obj = scene.find(edit.target)  # what the edit keeps of it
    if edit.kind == "colour":
        return [f"{the} is {v} now", f"{same} with {the} in {v}", f"a {v} {obj.shape} in place of {the}",
                f"has a {v} {obj.shape} where {the} was"]
    if edit.kind == "shape":
        return [f"{the} is a {v} now", f"{same} with {the} as a {v}", f"a {obj.colour} {v} in place of {the}",
                f"has a {obj.colour} {v} where {the} was"]
    if edit.kind == "size":
        return [f"{the} is {v} now", f"{same} with a {v} {edit.target}",
                f"a {v} {edit.target} in place of the {obj.size} one", f"has a {v} {edit.target}"]
    if edit.kind == "position":
        where = SLOT_PHRASE[v]
        return [f"{the} is {where} now", f"{same} with {the} {where}", f"{the} goes {where}", f"has {the} {where}"]
    if edit.kind == "background":
        return [f"the background is {v} now", f"{same} on a {v} background",
                f"a {v} background in place of the {scene.background} one", f"has a {v} background"]
    if edit.kind == "add":
        new = _added_object(edit)
        what = f"a {new.size} {new.colour} {new.shape} {SLOT_PHRASE[new.slot]}"
        return [f"{same} with {what} too", f"now there is also {what}", f"has {what} as well", f"{what} is there too"]
    if edit.kind == "remove":
        return [f"{the} is gone", f"{same} {the} is missing", f"has no {edit.target}", f"leave out {the}"]
    raise ValueError(f"unknown edit kind {edit.kind!r}")


# A coarse modification asks for *some* other value of one attribute; every such edit answers it (one-to-many).
COARSE_KINDS = ("colour", "shape", "position", "background")


def coarse_edits(scene: Scene, kind: str, target: str = "") -> list[Edit]:
    """Every edit a coarse request of this kind on this object (noun; "" for the background) accepts."""
    return [e for e in enumerate_edits(scene, (kind,)) if e.target == target]


def coarse_texts(kind: str, target: str = "", phrasing: str = "editor") -> list[str]:
    """Every phrasing of a coarse request in one family (PHRASINGS): what changes, not what it becomes."""
    the = f"the {target}"
    if phrasing == "held-out":
        return _held_out_coarse_texts(kind, the)
    if phrasing != "editor":
        raise ValueError(f"phrasing must be one of {PHRASINGS}, not {phrasing!r}")
    if kind == "colour":
        return [f"give {the} another colour", f"change the colour of {the}", f"{the} should be a different colour",
                f"make {the} any other colour"]
    if kind == "shape":
        return [f"turn {the} into another shape", f"change the shape of {the}", f"{the} should be a different shape",
                f"make {the} any other shape"]
    if kind == "position":
        return [f"move {the} somewhere else", f"put {the} in another place", f"{the} should be elsewhere",
                f"change where {the} is"]
    if kind == "background":
        return ["change the background", "use another background", "put it on a different background",
                "the background should be different"]
    raise ValueError(f"no coarse request of kind {kind!r}")


def _held_out_coarse_texts(kind: str, the: str) -> list[str]:
    same = "same picture but"
    if kind in ("colour", "shape"):
        return [f"{the} is a new {kind} now", f"{same} {the} has a new {kind}", f"{the} is not the same {kind}",
                f"has {the} in some new {kind}"]
    if kind == "position":
        return [f"{the} is in a new place now", f"{same} {the} has moved", f"{the} is not where it was",
                f"{the} goes somewhere new"]
    if kind == "background":
        return ["the background is new now", f"{same} a new background", "the background is not the same",
                "has some new background"]
    raise ValueError(f"no coarse request of kind {kind!r}")


def shared_concept(scene: Scene, edit: Edit) -> str:
    """What reference and target have in common (CIRCO's `shared_concept`): an untouched object, or the
    unchanged attribute of the edited object when it is the only one."""
    untouched = [o for o in scene.objects if o.noun != edit.target]
    if untouched:
        return f"a {untouched[0].noun}"
    obj = scene.objects[0]
    if edit.kind == "colour":
        return f"a {obj.shape}"
    if edit.kind == "shape":
        return f"a {obj.colour} object"
    return f"a {obj.noun}"


def describe_edit(scene: Scene, edit: Edit, rng: Optional[random.Random] = None) -> str:
    texts = mod_texts(scene, edit)
    return rng.choice(texts) if rng else texts[0]
