"""Toy scenes: a background and up to three objects, each with a shape, colour, size and horizontal slot.

A scene's *canonical key* names what it shows (the attributes), not how it was drawn (jitter), so two
renderings of one canonical scene are the same answer to a query. The benchmarks and the exact editor use
canonical keys as ground truth.

The words come from a `Vocabulary`: `shapes` (the default world: circles, squares, ... on gray, black or brown)
or `gems` (stars, diamonds, ... in other colours on other backgrounds, with other caption openings), a second
world to check that what was tuned on the first transfers, and `glyphs` (pentagons, rings, ...), a third on which
nothing was ever tuned or checked before. Vocabularies share no shape, colour or background word, so a scene's
words say which world it belongs to (`vocabulary_of`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Iterable, Optional

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Vocabulary:
    name: str
    shapes: tuple[str, ...]  # each drawn by toyworld.render
    colours: dict[str, RGB]  # object colours, far apart so a tiny CLIP at 64 px can tell them
    backgrounds: dict[str, RGB]
    fashioniq: dict[str, str]  # the toy FashionIQ's categories -> the shape each is made of
    caption_prefixes: tuple[str, ...]  # openings of the training captions ("" included)


SHAPES_WORLD = Vocabulary(
    name="shapes",
    shapes=("circle", "square", "triangle", "cross"),
    colours={"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (240, 215, 40),
             "purple": (150, 60, 190), "white": (245, 245, 245)},
    backgrounds={"gray": (128, 128, 128), "black": (20, 20, 20), "brown": (120, 85, 50)},
    fashioniq={"dress": "triangle", "shirt": "square", "toptee": "circle"},
    caption_prefixes=("", "a picture of ", "an image of ", "a photo of "),
)
GEMS_WORLD = Vocabulary(
    name="gems",
    shapes=("star", "diamond", "hexagon", "bar"),
    colours={"orange": (245, 140, 30), "pink": (240, 120, 200), "cyan": (50, 210, 220), "lime": (160, 230, 50),
             "maroon": (120, 20, 40), "ivory": (250, 245, 215)},
    backgrounds={"sand": (205, 185, 140), "slate": (70, 80, 100), "forest": (35, 90, 45)},
    fashioniq={"dress": "diamond", "shirt": "hexagon", "toptee": "star"},
    caption_prefixes=("", "a render of ", "a drawing of ", "an illustration of "),
)
# Words neither tuning world uses: the pretraining corpus of the toy CLIP (toyworld.pretrain) knows them too, as a
# web-trained CLIP knows far more than any benchmark asks about.
EXTRA_WORDS = Vocabulary(
    name="extra",
    shapes=("pentagon", "ring", "arrow", "oval"),
    colours={"teal": (0, 130, 130), "gold": (190, 150, 20), "navy": (25, 35, 120), "coral": (250, 110, 90)},
    backgrounds={"plum": (90, 40, 80), "sky": (140, 180, 230), "olive": (95, 100, 40)},
    fashioniq={},
    caption_prefixes=("", "a rendering of ", "a simple graphic of ", "there is "),
)
# A third world made of the extra words (four colours): one no config or default was ever chosen on, to check
# that the toy configs are general. Unlike shapes and gems, its benchmark scenes were not kept out of the
# pretraining corpus (the corpus predates it): how many of them the corpus shows is counted where it is used.
GLYPHS_WORLD = replace(EXTRA_WORDS, name="glyphs", fashioniq={"dress": "pentagon", "shirt": "oval", "toptee": "ring"})
VOCABULARIES = {v.name: v for v in (SHAPES_WORLD, GEMS_WORLD, GLYPHS_WORLD)}
# The open domain: every word of every world and the extra ones. Not a benchmark world (not in VOCABULARIES,
# and `vocabulary_of` never returns it); the renderer takes its colours from here.
OPEN_DOMAIN = Vocabulary(
    name="open",
    shapes=tuple(s for v in (SHAPES_WORLD, GEMS_WORLD, EXTRA_WORDS) for s in v.shapes),
    colours={c: rgb for v in (SHAPES_WORLD, GEMS_WORLD, EXTRA_WORDS) for c, rgb in v.colours.items()},
    backgrounds={b: rgb for v in (SHAPES_WORLD, GEMS_WORLD, EXTRA_WORDS) for b, rgb in v.backgrounds.items()},
    fashioniq={},
    caption_prefixes=tuple(dict.fromkeys(p for v in (SHAPES_WORLD, GEMS_WORLD, EXTRA_WORDS)
                                         for p in v.caption_prefixes)),
)
SIZES = ("small", "large")
SLOTS = ("left", "center", "right")  # left-to-right order is the object order in captions
SLOT_PHRASE = {"left": "on the left", "center": "in the middle", "right": "on the right"}
SLOT_WORD = {"left": "left", "center": "middle", "right": "right"}
MAX_OBJECTS = len(SLOTS)


def vocabulary_of(scene: "Scene") -> Vocabulary:
    """The vocabulary whose backgrounds include the scene's (KeyError for a background no world has)."""
    for vocab in VOCABULARIES.values():
        if scene.background in vocab.backgrounds:
            return vocab
    raise KeyError(f"no toy vocabulary has the background {scene.background!r}")


@dataclass(frozen=True, order=True)
class Obj:
    slot: str
    shape: str
    colour: str
    size: str

    @property
    def noun(self) -> str:
        """How an edit refers to it: colour + shape is unique within a scene (see `Scene.valid`)."""
        return f"{self.colour} {self.shape}"

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {SLOT_PHRASE[self.slot]}"


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...] = field(default_factory=tuple)

    def __post_init__(self):
        # Keep objects in slot order so equal scenes compare (and hash) equal.
        ordered = tuple(sorted(self.objects, key=lambda o: SLOTS.index(o.slot)))
        object.__setattr__(self, "objects", ordered)

    @property
    def key(self) -> str:
        """Canonical key: what is shown, independent of rendering jitter."""
        objs = ";".join(f"{o.slot}:{o.size}:{o.colour}:{o.shape}" for o in self.objects)
        return f"{self.background}|{objs}"

    def valid(self) -> bool:
        """One to three objects in distinct slots with distinct nouns, every word from one vocabulary."""
        slots = [o.slot for o in self.objects]
        nouns = [o.noun for o in self.objects]
        try:
            vocab = vocabulary_of(self)
        except KeyError:
            return False
        return (1 <= len(self.objects) <= MAX_OBJECTS and len(set(slots)) == len(slots)
                and len(set(nouns)) == len(nouns)
                and all(o.shape in vocab.shapes and o.colour in vocab.colours and o.size in SIZES and o.slot in SLOTS
                        for o in self.objects))

    def free_slots(self) -> list[str]:
        used = {o.slot for o in self.objects}
        return [s for s in SLOTS if s not in used]

    def find(self, noun: str) -> Obj:
        for o in self.objects:
            if o.noun == noun:
                return o
        raise KeyError(noun)

    def with_objects(self, objects: Iterable[Obj]) -> "Scene":
        return replace(self, objects=tuple(objects))

    def to_json(self) -> dict:
        return {"background": self.background,
                "objects": [{"slot": o.slot, "shape": o.shape, "colour": o.colour, "size": o.size}
                            for o in self.objects],
                "key": self.key}

    @classmethod
    def from_json(cls, d: dict) -> "Scene":
        return cls(d["background"], tuple(Obj(o["slot"], o["shape"], o["colour"], o["size"]) for o in d["objects"]))


def caption(scene: Scene, rng: Optional[random.Random] = None) -> str:
    """A sidecar caption listing every object left to right and the background.

    With an rng the opening words vary (training captions); without one the caption is canonical.
    """
    phrases = [o.phrase() for o in scene.objects]
    if len(phrases) == 1:
        body = phrases[0]
    else:
        body = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    prefix = rng.choice(vocabulary_of(scene).caption_prefixes) if rng else ""
    return f"{prefix}{body} on a {scene.background} background"


def random_object(rng: random.Random, slot: str, taken_nouns: set[str], vocab: Vocabulary = SHAPES_WORLD) -> Obj:
    while True:
        obj = Obj(slot, rng.choice(vocab.shapes), rng.choice(list(vocab.colours)), rng.choice(SIZES))
        if obj.noun not in taken_nouns:
            return obj


def random_scene(rng: random.Random, num_objects: Optional[int] = None, vocab: Vocabulary = SHAPES_WORLD) -> Scene:
    n = num_objects or rng.randint(1, MAX_OBJECTS)
    slots = rng.sample(SLOTS, n)
    objs: list[Obj] = []
    for slot in slots:
        objs.append(random_object(rng, slot, {o.noun for o in objs}, vocab))
    return Scene(rng.choice(list(vocab.backgrounds)), tuple(objs))
