"""Modification text from a (reference caption, target caption) pair, by templates over the word diff.

Captions are compared word by word (difflib on lowercase tokens, after boilerplate openings such as
"a photo of" are dropped): each replaced, inserted or deleted span is one change. A pair whose captions differ
in more than `max_ops` places is not a modification anyone would write and is rejected.

Each change becomes one clause ("replace red with blue", "add a ball", "remove the dog"), with several
phrasings picked by a seeded rng. `span="words"` (the default) names the changed words alone, which leaves the
object unsaid when a caption has several ("change large to small"). `span="phrase"` names the whole phrase
around them ("replace the red car with a blue car"): the noun phrase the words sit in (split at punctuation,
conjunctions, prepositions and determiners), and, when that phrase is the object of a preposition ("on the
left"), the noun phrase it belongs to ("a red cross on the left"); changes in one phrase make one clause.
"""
from __future__ import annotations

import difflib
import random
import re
from dataclasses import dataclass
from typing import Optional

BOILERPLATE = ("a photo of", "a picture of", "an image of", "a close up of", "a closeup of", "there is",
               "this is", "a photograph of")
TOKEN_RE = re.compile(r"[\w']+|[,;:.!?()]")
EDGE_WORDS = {"and", "or", "with", "but", "while"}  # conjunctions left over at a span's edges
SPANS = ("words", "phrase")

# Phrase boundaries in English captions: words that separate noun phrases (not part of any phrase) ...
CONJUNCTIONS = {"and", "or", "but", "while", "nor", "plus", "then", "that", "which", "who", "where", "is", "are",
                "was", "were", "has", "have"}
PREPOSITIONS = {"on", "in", "at", "of", "near", "next", "to", "under", "over", "above", "below", "beneath", "behind",
                "beside", "besides", "by", "from", "into", "onto", "with", "without", "between", "among", "across",
                "along", "around", "inside", "outside", "for", "against", "through", "toward", "towards", "atop",
                "upon", "underneath", "like", "during", "after", "before", "beyond", "past", "via", "within"}
# ... and words that start a new one.
DETERMINERS = {"a", "an", "the", "this", "these", "those", "some", "its", "his", "her", "their", "my", "your",
               "our", "two", "three", "four", "five", "six", "several", "many", "no", "another", "each", "every"}

TEMPLATES = {
    "replace": ("replace {a} with {b}", "change {a} to {b}", "make it {b} instead of {a}", "{b} instead of {a}"),
    "insert": ("add {b}", "include {b}", "with {b} added", "also show {b}"),
    "delete": ("remove {a}", "without {a}", "take away {a}", "no {bare_a}"),
}


@dataclass(frozen=True)
class Change:
    op: str  # replace | insert | delete
    before: str  # words of the reference caption ("" for insert)
    after: str  # words of the target caption ("" for delete)


def tokens(caption: str) -> tuple[list[str], set[int]]:
    """(lowercase words without a boilerplate opening, indices of the words that follow punctuation)."""
    text = caption.lower().strip()
    for prefix in BOILERPLATE:
        if text.startswith(prefix + " "):
            text = text[len(prefix) + 1:]
            break
    found, breaks = [], set()
    for tok in TOKEN_RE.findall(text):
        if tok[0].isalnum() or tok[0] in "_'":
            found.append(tok)
        else:
            breaks.add(len(found))
    return found, breaks


def words(caption: str) -> list[str]:
    return tokens(caption)[0]


def _trim(span: list[str]) -> list[str]:
    while span and span[0] in EDGE_WORDS:
        span = span[1:]
    while span and span[-1] in EDGE_WORDS:
        span = span[:-1]
    return span


def _opcodes(a: list[str], b: list[str]) -> list[tuple[int, int, int, int]]:
    """The changed spans (i1, i2, j1, j2) of a -> b whose words are not all conjunctions."""
    return [(i1, i2, j1, j2) for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()
            if op != "equal" and (_trim(a[i1:i2]) or _trim(b[j1:j2]))]


def caption_diff(ref_caption: str, tgt_caption: str) -> list[Change]:
    a, b = words(ref_caption), words(tgt_caption)
    changes = []
    for i1, i2, j1, j2 in _opcodes(a, b):
        before, after = _trim(a[i1:i2]), _trim(b[j1:j2])
        kind = "replace" if before and after else ("insert" if after else "delete")
        changes.append(Change(kind, " ".join(before), " ".join(after)))
    return changes


def phrase_ids(ws: list[str], breaks: set[int]) -> list[Optional[int]]:
    """Per word, the noun phrase it belongs to (None: a conjunction or preposition, between phrases)."""
    ids: list[Optional[int]] = []
    current = -1
    for i, w in enumerate(ws):
        if w in CONJUNCTIONS or w in PREPOSITIONS:
            ids.append(None)
            continue
        if not ids or ids[-1] is None or i in breaks or w in DETERMINERS:
            current += 1
        ids.append(current)
    return ids


def _widen(lo: int, hi: int, ws: list[str], ids: list[Optional[int]]) -> tuple[int, int]:
    """[lo, hi) grown to whole phrases; an empty span inside a phrase becomes that phrase."""
    if lo == hi:
        if 0 < lo < len(ids) and ids[lo - 1] is not None and ids[lo - 1] == ids[lo]:
            lo, hi = lo - 1, lo + 1
        else:
            return lo, hi
    if ids[lo] is not None:
        while lo > 0 and ids[lo - 1] == ids[lo]:
            lo -= 1
    if ws[hi - 1] in PREPOSITIONS and hi < len(ids) and ids[hi] is not None:
        hi += 1  # a changed preposition takes its object along: "on the right" -> "in the middle"
    if ids[hi - 1] is not None:
        while hi < len(ids) and ids[hi] == ids[hi - 1]:
            hi += 1
    return lo, hi


def _head(lo: int, ws: list[str], ids: list[Optional[int]]) -> int:
    """Where the phrase that a preposition at `lo` (or before `lo`, whose object starts there) belongs to starts:
    "a red cross" of "on the left"; `lo` when there is no such phrase or it is itself a preposition's object."""
    prep = lo if lo < len(ws) and ws[lo] in PREPOSITIONS else lo - 1
    if prep < 1 or ws[prep] not in PREPOSITIONS or ids[prep - 1] is None:
        return lo
    start = prep - 1
    while start > 0 and ids[start - 1] == ids[prep - 1]:
        start -= 1
    return start if start == 0 or ws[start - 1] not in PREPOSITIONS else lo


def _phrases(a: list[str], a_breaks: set[int], b: list[str], b_breaks: set[int]) -> list[tuple[str, str]]:
    """Each change's (reference phrase, target phrase), widened as the module docstring says and merged where
    they overlap."""
    ids_a, ids_b = phrase_ids(a, a_breaks), phrase_ids(b, b_breaks)
    spans: list[list[int]] = []
    for i1, i2, j1, j2 in _opcodes(a, b):
        i1, i2 = _widen(i1, i2, a, ids_a)
        j1, j2 = _widen(j1, j2, b, ids_b)
        hi, hj = _head(i1, a, ids_a), _head(j1, b, ids_b)
        same_head = i1 - hi == j1 - hj and a[hi:i1] == b[hj:j1]
        changed_head = bool(spans) and spans[-1][0] == hi and spans[-1][2] == hj  # the last change was in it
        if i1 < i2 and j1 < j2 and (same_head or changed_head):
            i1, j1 = hi, hj  # name the phrase it belongs to
        if spans and (i1 < spans[-1][1] or j1 < spans[-1][3]):
            last = spans[-1]
            spans[-1] = [min(i1, last[0]), max(i2, last[1]), min(j1, last[2]), max(j2, last[3])]
        else:
            spans.append([i1, i2, j1, j2])
    return [(" ".join(_trim(a[i1:i2])), " ".join(_trim(b[j1:j2]))) for i1, i2, j1, j2 in spans]


def definite(phrase: str) -> str:
    """'a red car' -> 'the red car': a clause refers to what the reference shows."""
    first, _, rest = phrase.partition(" ")
    return f"the {rest}" if first in ("a", "an") and rest else phrase


def bare(phrase: str) -> str:
    """'the red car' -> 'red car' ("no red car")."""
    first, _, rest = phrase.partition(" ")
    return rest if first in ("a", "an", "the") and rest else phrase


def modification_text(ref_caption: str, tgt_caption: str, rng: random.Random, max_ops: int = 2,
                      span: str = "words") -> tuple[Optional[str], list[Change], str]:
    """(text or None, the changes, reason when None: 'same_caption' or 'too_different')."""
    if span not in SPANS:
        raise ValueError(f"span must be one of {SPANS}, not {span!r}")
    changes = caption_diff(ref_caption, tgt_caption)
    if not changes:
        return None, changes, "same_caption"
    if len(changes) > max_ops:
        return None, changes, "too_different"
    if span == "words":
        pairs = [(c.before, c.after) for c in changes]
    else:
        pairs = [(definite(before), after) for before, after in _phrases(*tokens(ref_caption), *tokens(tgt_caption))]
    clauses = [rng.choice(TEMPLATES["replace" if before and after else "insert" if after else "delete"])
               .format(a=before, b=after, bare_a=bare(before) if span == "phrase" else before)
               for before, after in pairs]
    return " and ".join(clauses), changes, ""
