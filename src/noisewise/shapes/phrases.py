"""Splitting a shapes prompt into its object phrases (for composable guidance and phrase-wise text
states, :mod:`noisewise.guidance.compose`).

``object_phrases("two shapes: a green cross on the left and a small yellow triangle on grey")``
gives the objects ``["a green cross on the left", "a small yellow triangle"]`` and the background
phrase ``"on grey"``: each object phrase runs from the separator before it (``and``, ``,``, ``:``
or the start) to the separator before the next object, so the size and colour words before a
noun and the position words after it stay with their object, as :func:`~.captions.parse_prompt`
reads them. Character spans are kept so the phrases can be found in the prompt's tokens.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from .captions import _SHAPE_LOOKUP, BACKGROUND_WORDS, DEFECT_WORDS, GENERIC_WORDS

_WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*|[,:;()]")
_SEPARATORS = {",", ";", ":", "and"}


@dataclass(frozen=True)
class ObjectPhrases:
    """The object phrases of a prompt and their ``(start, end)`` character spans; the background
    phrase (``on a white background``, ``against grey``, ``on black``) and its span, or None."""

    objects: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]
    background: str | None = None
    background_span: tuple[int, int] | None = None

    def components(self, with_background: bool = True) -> list[str]:
        """One prompt per object (its phrase, plus the background phrase if asked and named)."""
        bg = f" {self.background}" if with_background and self.background else ""
        return [o + bg for o in self.objects]


def object_phrases(text: str) -> ObjectPhrases:
    """Object phrases of a shapes prompt (see the module docstring); no objects -> empty."""
    toks = [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(text)]
    low = [t[0].lower() for t in toks]
    n = len(toks)
    # the background phrase: (on|against) [a] <bg word> [background]
    bg_span: tuple[int, int] | None = None
    bg_tok: set[int] = set()
    for i, w in enumerate(low):
        if w in BACKGROUND_WORDS:
            j = i - 1
            if j >= 0 and low[j] == "a":
                j -= 1
            after = i + 1 < n and low[i + 1] == "background"
            if j >= 0 and low[j] in ("on", "against"):
                end = i + 1 + after
                bg_tok = set(range(j, end))
                bg_span = (toks[j][1], toks[end - 1][2])
            elif after:
                start = i - 1 if i > 0 and low[i - 1] == "a" else i
                bg_tok = set(range(start, i + 2))
                bg_span = (toks[start][1], toks[i + 1][2])
    nouns = [i for i, w in enumerate(low)
             if i not in bg_tok and w not in DEFECT_WORDS and (w in _SHAPE_LOOKUP or w in GENERIC_WORDS)]
    if not nouns:
        return ObjectPhrases((), (), None, None)
    # object k spans from the last separator before its noun (after the previous noun) to the next separator
    starts, ends = [], []
    for k, ni in enumerate(nouns):
        lo = nouns[k - 1] + 1 if k else 0
        seps = [j for j in range(lo, ni) if low[j] in _SEPARATORS and j not in bg_tok]
        if k == 0:
            s = seps[-1] + 1 if seps else 0
        else:
            if not seps:  # "a red circle blue square": no separator, split right after the previous noun
                seps = [nouns[k - 1]]
                ends.append(nouns[k - 1] + 1)
            else:
                ends.append(seps[-1])
            s = seps[-1] + 1
        starts.append(s)
    last_end = n
    for j in range(nouns[-1] + 1, n):  # the last object ends at the background phrase or a separator
        if j in bg_tok or low[j] in _SEPARATORS or low[j] in ("with", "(") or low[j] in DEFECT_WORDS:
            last_end = j
            break
    ends.append(last_end)
    objs, spans = [], []
    for s, e in zip(starts, ends):
        # drop defect words and leading separators from the phrase ("blurry: a red circle")
        keep = [j for j in range(s, e) if low[j] not in DEFECT_WORDS and low[j] not in _SEPARATORS]
        if not keep:
            continue
        a, b = toks[keep[0]][1], toks[keep[-1]][2]
        objs.append(text[a:b])
        spans.append((a, b))
    bg = text[bg_span[0]:bg_span[1]] if bg_span is not None else None
    return ObjectPhrases(tuple(objs), tuple(spans), bg, bg_span)


_ARTICLE = re.compile(r"\b([Aa])n? (?=([A-Za-z]))")


def _fix_articles(text: str) -> str:
    return _ARTICLE.sub(lambda m: m.group(1) + ("n " if m.group(2).lower() in "aeiou" else " "), text)


def attribute_spans(text: str) -> list[dict[str, tuple[int, int]]]:
    """Per object phrase, the character span of each attribute it names (``color``, ``size``,
    ``shape``: the noun, ``plus sign`` whole; ``position``: the words after the noun)."""
    from .captions import _COLOR_LOOKUP, _SIZE_LOOKUP, POSITION_WORDS

    op = object_phrases(text)
    out: list[dict[str, tuple[int, int]]] = []
    for a, e in op.spans:
        toks = [(m.group(0).lower(), a + m.start(), a + m.end()) for m in _WORD.finditer(text[a:e])]
        spans: dict[str, tuple[int, int]] = {}
        noun = next((i for i, t in enumerate(toks) if t[0] in _SHAPE_LOOKUP or t[0] in GENERIC_WORDS), None)
        if noun is None:
            out.append(spans)
            continue
        for t, s0, s1 in toks[:noun]:
            if t in _COLOR_LOOKUP:
                spans["color"] = (s0, s1)
            elif t in _SIZE_LOOKUP:
                spans["size"] = (s0, s1)
        end_noun = noun + 1 if not (toks[noun][0] == "plus" and noun + 1 < len(toks) and toks[noun + 1][0] == "sign") \
            else noun + 2
        if toks[noun][0] in _SHAPE_LOOKUP:
            spans["shape"] = (toks[noun][1], toks[end_noun - 1][2])
        rest = toks[end_noun:]
        if rest and any(t[0] in POSITION_WORDS for t in rest):
            spans["position"] = (rest[0][1], rest[-1][2])
        out.append(spans)
    return out


def _value(attr: str, words: str) -> str | None:
    from .captions import _WORD_VALUE

    table = _WORD_VALUE[attr]
    for w in reversed(words.lower().replace("plus sign", "plus").split()):
        if w in table:
            return table[w]
    return None


def binding_negatives(text: str, kinds: tuple[str, ...] = ("exchanged", "same")) -> list[tuple[str, str, str]]:
    """Wrongly bound versions of a two-object prompt: for every attribute (colour, shape, size,
    position) both objects name with different words, the prompt with the two values exchanged
    (``"exchanged"``) and with one object's value on both (``"same"``, both ways; not for position).
    Returns ``(attribute, kind, prompt)`` triples; ``[]`` for prompts without two objects."""
    objs = attribute_spans(text)
    if len(objs) != 2:
        return []
    a, b = objs
    out: list[tuple[str, str, str]] = []

    def put(repl: dict[tuple[int, int], str]) -> str:
        s = text
        for (s0, s1), new in sorted(repl.items(), reverse=True):
            s = s[:s0] + new + s[s1:]
        return _fix_articles(s)

    for attr in ("color", "shape", "size", "position"):
        if attr not in a or attr not in b:
            continue
        wa, wb = text[a[attr][0]:a[attr][1]], text[b[attr][0]:b[attr][1]]
        if _value(attr, wa) == _value(attr, wb):
            continue
        if "exchanged" in kinds:
            out.append((attr, "exchanged", put({a[attr]: wb, b[attr]: wa})))
        if "same" in kinds and attr != "position":
            out.append((attr, "same", put({b[attr]: wa})))
            out.append((attr, "same", put({a[attr]: wb})))
    return out


@dataclass(frozen=True)
class Layout:
    """A two-object prompt laid out for regional prompting: ``prompt`` names every object's
    position (those the prompt left open were chosen), ``components`` are the object phrases with
    their positions (and the background phrase), ``positions`` their positions, ``chosen`` which
    positions were filled in. ``context_components``: each object's phrase in a two-object prompt
    that names the other object only by its position ("two shapes: a red circle on the left and a
    shape on the right"), in the prompt's order of the objects. ``background_chosen``: the prompt
    named no background, so one was drawn and written into the prompt and every phrase."""

    prompt: str
    components: tuple[str, ...]
    positions: tuple[str, ...]
    chosen: tuple[bool, ...]
    context_components: tuple[str, ...] = ()
    background_chosen: bool = False


def layout(text: str, rng: np.random.Generator | None = None) -> Layout | None:
    """Lay out a prompt with exactly two objects (None otherwise, or when both name one position):
    an object without a position gets a free one (drawn with ``rng``; without one, the first free
    of left, right, top, bottom, center), written into the prompt after its phrase; a prompt
    without a background gets one (drawn after the positions; without ``rng``, black), written at
    its end, so that every phrase of the composition asks for the same background."""
    from .captions import POSITION_PHRASES, parse_prompt
    from .world import BACKGROUNDS, POSITION_XY, POSITIONS

    op = object_phrases(text)
    if len(op.objects) != 2:
        return None
    named = [parse_prompt(o).objects[0].position if parse_prompt(o).objects else None for o in op.objects]
    if named[0] is not None and named[0] == named[1]:
        return None
    pos = list(named)
    for k in range(2):  # a free position far enough from the other object's (large objects must fit)
        if pos[k] is None:
            other = pos[1 - k]
            if other is None:
                free = ["left", "right", "top", "bottom"]
            else:
                ox, oy = POSITION_XY[other]
                free = [p for p in POSITIONS if p != other and p != "center"
                        and math.hypot(POSITION_XY[p][0] - ox, POSITION_XY[p][1] - oy) >= 0.3]
                free = free or [p for p in POSITIONS if p not in (other, "center")]
            pos[k] = free[int(rng.integers(len(free)))] if rng is not None else free[0]
    s, shift = text, 0
    if op.background:
        bg = f" {op.background}"
    else:  # each phrase would pick its own background, and the regions would mix them
        drawn = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))] if rng is not None else BACKGROUNDS[0]
        bg = f" on a {drawn} background"
    own = []
    for k, (_, e) in enumerate(op.spans):
        phrase = op.objects[k]
        if named[k] is None:
            add = " " + POSITION_PHRASES[pos[k]][0]
            s = s[: e + shift] + add + s[e + shift :]
            shift += len(add)
            phrase += add
        own.append(phrase)
    if not op.background:
        s = s.rstrip() + bg
    others = [f"a shape {POSITION_PHRASES[p][0]}" for p in pos]  # type: ignore[index]
    context = (f"two shapes: {own[0]} and {others[1]}{bg}", f"two shapes: {others[0]} and {own[1]}{bg}")
    return Layout(s, tuple(o + bg for o in own), tuple(pos), tuple(n is None for n in named),  # type: ignore[arg-type]
                  context, not op.background)
