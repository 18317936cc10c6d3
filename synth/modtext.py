"""Modification text from a (reference caption, target caption) pair, by templates over the word diff.

Captions are compared word by word (difflib on lowercase tokens, after boilerplate openings such as
"a photo of" are dropped): each replaced, inserted or deleted span becomes one clause ("replace red with
blue", "add a small cross in the middle", "remove the dog"), with several phrasings picked by a seeded rng.
A pair whose captions differ in more than `max_ops` places is not a modification anyone would write and
is rejected.
"""
from __future__ import annotations

import difflib
import random
import re
from dataclasses import dataclass
from typing import Optional

BOILERPLATE = ("a photo of", "a picture of", "an image of", "a close up of", "a closeup of", "there is",
               "this is", "a photograph of")
TOKEN_RE = re.compile(r"[\w']+")
EDGE_WORDS = {"and", "or", "with", "but", "while"}  # conjunctions left over at a span's edges

TEMPLATES = {
    "replace": ("replace {a} with {b}", "change {a} to {b}", "make it {b} instead of {a}", "{b} instead of {a}"),
    "insert": ("add {b}", "include {b}", "with {b} added", "also show {b}"),
    "delete": ("remove {a}", "without {a}", "take away {a}", "no {a}"),
}


@dataclass(frozen=True)
class Change:
    op: str  # replace | insert | delete
    before: str  # words of the reference caption ("" for insert)
    after: str  # words of the target caption ("" for delete)


def words(caption: str) -> list[str]:
    text = caption.lower().strip()
    for prefix in BOILERPLATE:
        if text.startswith(prefix + " "):
            text = text[len(prefix) + 1:]
            break
    return TOKEN_RE.findall(text)


def _trim(span: list[str]) -> list[str]:
    while span and span[0] in EDGE_WORDS:
        span = span[1:]
    while span and span[-1] in EDGE_WORDS:
        span = span[:-1]
    return span


def caption_diff(ref_caption: str, tgt_caption: str) -> list[Change]:
    a, b = words(ref_caption), words(tgt_caption)
    changes = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        before, after = _trim(a[i1:i2]), _trim(b[j1:j2])
        if not before and not after:
            continue
        kind = "replace" if before and after else ("insert" if after else "delete")
        changes.append(Change(kind, " ".join(before), " ".join(after)))
    return changes


def modification_text(ref_caption: str, tgt_caption: str, rng: random.Random, max_ops: int = 2
                      ) -> tuple[Optional[str], list[Change], str]:
    """(text or None, the changes, reason when None: 'same_caption' or 'too_different')."""
    changes = caption_diff(ref_caption, tgt_caption)
    if not changes:
        return None, changes, "same_caption"
    if len(changes) > max_ops:
        return None, changes, "too_different"
    clauses = [rng.choice(TEMPLATES[c.op]).format(a=c.before, b=c.after) for c in changes]
    return " and ".join(clauses), changes, ""
