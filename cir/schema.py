"""The sample formats (docs/SPEC.md, "Samples"): one definition for every writer (the caption job, mined and
edited synthesis, the supervised loader), every reader (the training stream and stages, the negative bank,
eval) and `inspect`.

A sample is a WebDataset dict: `__key__` (32 hex digits of sha256) and members named `{role prefix}{field}`:

    caption  jpg|png|webp          txt      json   [emb.npy]
    triplet  ref.jpg|png|webp      mod.txt  json   [ref.emb.npy, tgt.emb.npy]
             tgt.jpg|png|webp

An image member is named by its bytes' format. `{prefix}emb.npy` is that image's L2-normalised float16 CLIP
embedding, and the json field `{prefix with _}emb_clip` the fingerprint of the CLIP that made it
(cir.backbone.clip_fingerprint): a trainer takes the embedding only when it comes from its own CLIP.

    sample = TripletSample.from_webdataset(raw)       # raw: a dict of bytes, as a tar reader yields it
    raw = sample.to_webdataset()                      # every member as bytes, ready for wds.TarWriter
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from cir.errors import CIRError

IMAGE_EXTS = ("jpg", "png", "webp")  # the image members' names: the format of the bytes, never the source's
PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}  # what PIL calls each (inspect checks the bytes)


class SchemaError(CIRError, ValueError):
    """A sample that does not follow its format (a member missing or empty); the message names the sample."""


@dataclass(frozen=True)
class Role:
    """One image of a sample and what comes with it: members `{prefix}jpg|png|webp` and `{prefix}emb.npy`,
    and the json field `{prefix_}emb_clip`."""
    prefix: str  # "" (a caption sample's image), "ref." or "tgt."

    @property
    def images(self) -> tuple[str, ...]:
        return tuple(f"{self.prefix}{e}" for e in IMAGE_EXTS)

    @property
    def emb(self) -> str:
        return f"{self.prefix}emb.npy"

    @property
    def emb_clip(self) -> str:
        return f"{self.prefix.replace('.', '_')}emb_clip"

    @property
    def name(self) -> str:
        return self.prefix.rstrip(".") or "image"

    def image_member(self, sample: dict) -> Optional[str]:
        """The name of this role's image member in `sample`, or None."""
        return next((m for m in self.images if m in sample), None)

    def of_member(self, member: str) -> bool:
        """Whether `member` is one of this role's image members."""
        return member in self.images


IMAGE, REF, TGT = Role(""), Role("ref."), Role("tgt.")


@dataclass(frozen=True)
class Kind:
    """A dataset kind: its roles, its text member and the json fields every sample carries."""
    name: str
    roles: tuple[Role, ...]
    text: str  # the text member: the caption, or the modification text
    json_fields: frozenset  # required in every sample's json
    qualities: tuple[str, ...] = ()  # allowed json `quality` values (triplets)

    def members(self) -> dict[str, str]:
        """Every member a sample may carry -> its Hugging Face `datasets` type (the dataset card declares them
        all, so samples whose image formats differ load as one table)."""
        out = {m: "image" for role in self.roles for m in role.images}
        out.update({self.text: "string", "json": "json"})
        out.update({role.emb: EMBEDDING for role in self.roles})
        return out

    def required(self) -> tuple[str, ...]:
        """The members a reader needs, alternatives joined by "|" ("ref.jpg|ref.png|ref.webp", "mod.txt")."""
        return (*("|".join(role.images) for role in self.roles), self.text)


EMBEDDING = "float16 vector"
CAPTION = Kind("caption", (IMAGE,), "txt",
               frozenset({"key", "source", "width", "height", "sha256", "caption", "captioner"}))
TRIPLET = Kind("triplet", (REF, TGT), "mod.txt",
               frozenset({"ref_key", "tgt_key", "ref_caption", "tgt_caption", "quality", "method", "scores",
                          "hard_negatives", "seed"}),
               qualities=("low", "high", "supervised"))  # supervised: an annotated set read by train.supervised
KINDS = {k.name: k for k in (CAPTION, TRIPLET)}


def image_role(member: str) -> Optional[Role]:
    """The role whose image `member` is (`jpg` -> IMAGE, `tgt.png` -> TGT); None for other members."""
    return next((r for r in (IMAGE, REF, TGT) if r.of_member(member)), None)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def json_bytes(meta: dict) -> bytes:
    """What webdataset's TarWriter writes for a dict (so a sample encoded here gives the same tar bytes)."""
    return json.dumps(meta).encode("utf-8")


def parse_json(sample: dict) -> dict:
    """A raw sample's `json` member, parsed; {} when it has none or it does not parse."""
    value = sample.get("json")
    if isinstance(value, dict):
        return value
    try:
        meta = json.loads(value) if value is not None else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


@dataclass
class Picture:
    """One role's image: its encoded bytes, their format, and maybe its cached CLIP embedding."""
    data: bytes
    ext: str  # one of IMAGE_EXTS
    emb: Optional[np.ndarray] = None  # [d] float16, L2-normalised
    emb_clip: Optional[str] = None  # the fingerprint of the CLIP that made emb

    def __post_init__(self):
        if self.ext not in IMAGE_EXTS:
            raise SchemaError(f"image format {self.ext!r} is not one of {IMAGE_EXTS}")

    def members(self, role: Role, meta: dict) -> dict:
        out = {f"{role.prefix}{self.ext}": self.data}
        if self.emb is not None:
            out[role.emb] = npy_bytes(np.asarray(self.emb, dtype=np.float16))
            if self.emb_clip:
                meta[role.emb_clip] = self.emb_clip
        return out

    @classmethod
    def read(cls, raw: dict, role: Role, meta: dict, where: str) -> "Picture":
        member = role.image_member(raw)
        if member is None or not raw[member]:
            raise SchemaError(f"sample {where} has no {role.name} image")
        emb = load_npy(raw[role.emb]) if role.emb in raw else None
        return cls(raw[member], member[len(role.prefix):], emb, meta.get(role.emb_clip))


def _text(raw: dict, member: str, where: str) -> str:
    value = raw.get(member, b"")
    text = (value.decode("utf-8") if isinstance(value, bytes) else str(value)).strip()
    if not text:
        raise SchemaError(f"sample {where} has no {member}")
    return text


@dataclass
class CaptionSample:
    """An image and its caption (the caption job's output, synthesis's input). meta: the json member
    (CAPTION.json_fields; `emb_clip` is written from image.emb_clip)."""
    key: str
    image: Picture
    caption: str
    meta: dict = field(default_factory=dict)

    def to_webdataset(self) -> dict:
        meta = dict(self.meta)
        out = {"__key__": self.key, **self.image.members(IMAGE, meta), "txt": self.caption.encode("utf-8")}
        out["json"] = json_bytes(meta)
        return out

    @classmethod
    def from_webdataset(cls, raw: dict) -> "CaptionSample":
        key = raw.get("__key__", "?")
        meta = parse_json(raw)
        return cls(key, Picture.read(raw, IMAGE, meta, key), _text(raw, CAPTION.text, key), meta)


@dataclass
class TripletSample:
    """Reference image + modification text -> target image (synthesis's output, stage II's input). meta: the
    json member (TRIPLET.json_fields; `ref_emb_clip`/`tgt_emb_clip` are written from the pictures')."""
    key: str
    ref: Picture
    tgt: Picture
    mod: str
    meta: dict = field(default_factory=dict)

    def to_webdataset(self) -> dict:
        meta = dict(self.meta)
        out = {"__key__": self.key, **self.ref.members(REF, meta), **self.tgt.members(TGT, meta),
               "mod.txt": self.mod.encode("utf-8")}
        out["json"] = json_bytes(meta)
        return out

    @classmethod
    def from_webdataset(cls, raw: dict) -> "TripletSample":
        key = raw.get("__key__", "?")
        meta = parse_json(raw)
        return cls(key, Picture.read(raw, REF, meta, key), Picture.read(raw, TGT, meta, key),
                   _text(raw, TRIPLET.text, key), meta)
