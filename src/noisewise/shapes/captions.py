"""Captions for shapes scenes (varied templates, synonyms, omitted attributes, some defects named)
and the inverse: reading which attributes a prompt asks for.

``caption(scene, rng)`` writes web-like captions: about 10% are empty (the unconditional branch
classifier-free guidance needs), a few name only the defects (so a negative prompt such as
``"blurry, watermark"`` means something to the model), the rest describe the objects with
some attributes left out. ``parse_prompt(text)`` returns a :class:`Request` with the attributes a
prompt requests; ``parse_prompt(caption(scene))`` agrees with the scene's labels on every attribute
the caption names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .world import BACKGROUNDS, COLORS, DEFECTS, POSITIONS, SHAPES, SIZES, Obj, ObjectSpec, Scene, sample_scene

SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "disk"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
    "cross": ("cross", "plus sign", "plus"),
}
GENERIC_WORDS: tuple[str, ...] = ("shape", "object")
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
COLOR_WORDS: dict[str, tuple[str, ...]] = {c: (c,) for c in COLORS} | {"purple": ("purple", "violet")}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left", "on the left side", "to the left"),
    "right": ("on the right", "at the right", "on the right side", "to the right"),
    "top": ("at the top", "on top", "near the top"),
    "bottom": ("at the bottom", "near the bottom", "on the bottom"),
    "center": ("in the center", "in the middle", "centered"),
}
POSITION_WORDS: dict[str, str] = {
    "left": "left", "right": "right", "top": "top", "bottom": "bottom",
    "center": "center", "centre": "center", "middle": "center", "centered": "center", "centred": "center",
}
BACKGROUND_WORDS: dict[str, str] = {"black": "black", "white": "white", "gray": "gray", "grey": "gray"}
DEFECT_WORDS: dict[str, str] = {
    "blurry": "blurry", "blurred": "blurry", "blur": "blurry", "out-of-focus": "blurry",
    "noisy": "noisy", "grainy": "noisy", "noise": "noisy", "grain": "noisy",
    "watermark": "watermark", "watermarked": "watermark",
}

P_EMPTY = 0.10
P_DEFECT_ONLY = 0.03
P_MENTION = {"size": 0.7, "color": 0.85, "position": 0.7, "background": 0.5, "defect": 0.5, "generic": 0.08}


@dataclass(frozen=True)
class Request:
    """What a prompt asks for: per object the attributes named (``None`` = not named), the
    background if named, and the defects named."""

    objects: tuple[ObjectSpec, ...] = ()
    background: str | None = None
    defects: tuple[str, ...] = ()
    truncated: bool = field(default=False, compare=False)

    @property
    def is_empty(self) -> bool:
        return not self.objects and self.background is None and not self.defects

    def attributes(self) -> list[tuple[str, str]]:
        """Flat (attribute, value) list of every requested attribute (objects and background)."""
        out = [("background", self.background)] if self.background else []
        for o in self.objects:
            out += [(k, v) for k, v in (("shape", o.shape), ("color", o.color), ("size", o.size),
                                        ("position", o.position)) if v is not None]
        return out


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _object_phrase(o: Obj, rng: np.random.Generator, article: bool = True) -> str:
    words = []
    if rng.random() < P_MENTION["size"]:
        words.append(_pick(rng, SIZE_WORDS[o.size]))
    if rng.random() < P_MENTION["color"]:
        words.append(_pick(rng, COLOR_WORDS[o.color]))
    noun = _pick(rng, GENERIC_WORDS) if rng.random() < P_MENTION["generic"] else _pick(rng, SHAPE_WORDS[o.shape])
    words.append(noun)
    phrase = " ".join(words)
    if article:
        phrase = ("an " if phrase[0] in "aeiou" else "a ") + phrase
    if rng.random() < P_MENTION["position"]:
        phrase += " " + _pick(rng, POSITION_PHRASES[o.position])
    return phrase


def _background_phrase(bg: str, rng: np.random.Generator) -> str:
    word = _pick(rng, ("gray", "grey")) if bg == "gray" else bg
    return _pick(rng, (f"on a {word} background", f"on {word}", f"against a {word} background"))


def _defect_only_caption(scene: Scene, rng: np.random.Generator) -> str:
    names = list(scene.defect_names) or [_pick(rng, DEFECTS)]
    words = {"blurry": ("blurry", "blurred"), "noisy": ("noisy", "grainy"), "watermark": ("watermark", "watermarked")}
    chosen = [_pick(rng, words[d]) for d in names]
    form = int(rng.integers(3))
    if form == 0:
        return ", ".join(chosen)
    if form == 1:
        return "a " + " and ".join(chosen) + " image"
    return "low quality, " + ", ".join(chosen)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random caption for ``scene`` (may be empty, may omit attributes and defects)."""
    u = rng.random()
    if u < P_EMPTY:
        return ""
    if u < P_EMPTY + P_DEFECT_ONLY and scene.defects:
        return _defect_only_caption(scene, rng)
    objs = list(scene.objects)
    if len(objs) == 2 and rng.random() < 0.5:
        objs.reverse()
    phrases = [_object_phrase(o, rng) for o in objs]
    if len(phrases) == 1:
        body = phrases[0]
    else:
        body = _pick(rng, ("{a} and {b}", "two shapes: {a} and {b}", "{a}, {b}")).format(a=phrases[0], b=phrases[1])
    named = [d for d in scene.defect_names if rng.random() < P_MENTION["defect"]]
    if "blurry" in named:
        body = _pick(rng, ("a blurry photo of ", "blurry: ", "blurred, ")) + body
    if "noisy" in named:
        body = _pick(rng, ("a noisy image of ", "grainy: ", "noisy, ")) + body
    if rng.random() < P_MENTION["background"]:
        body += " " + _background_phrase(scene.background, rng)
    if "watermark" in named:
        body += _pick(rng, (" with a watermark", ", watermarked", " (watermark)"))
    return body


# ------------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[a-z]+(?:-[a-z]+)*")
_SHAPE_LOOKUP = {w: s for s, ws in SHAPE_WORDS.items() for w in ws if " " not in w}
_SIZE_LOOKUP = {w: s for s, ws in SIZE_WORDS.items() for w in ws}
_COLOR_LOOKUP = {w: c for c, ws in COLOR_WORDS.items() for w in ws}
_WORD_VALUE: dict[str, dict[str, str]] = {
    "shape": _SHAPE_LOOKUP, "color": _COLOR_LOOKUP, "size": _SIZE_LOOKUP, "position": POSITION_WORDS,
    "background": BACKGROUND_WORDS,
}


def parse_prompt(text: str) -> Request:
    """The attributes a prompt asks for.

    Shape nouns (and ``shape``/``object``) mark objects; size and colour words belong to the next
    object noun, position words to the previous one; ``on a white background`` (or ``white
    background``, ``on white``) sets the background; defect words anywhere name defects.
    """
    words = prompt_words(text)
    objects = tuple(
        ObjectSpec(**{k: (_WORD_VALUE[k][w] if w is not None else None) for k, w in o.items()})  # type: ignore[arg-type]
        for o in words.objects
    )
    background = BACKGROUND_WORDS[words.background] if words.background is not None else None
    return Request(objects, background, tuple(d for d in DEFECTS if d in words.defects))


@dataclass(frozen=True)
class PromptWords:
    """The words of a prompt that :func:`parse_prompt` read each requested attribute from: per
    object a dict ``shape/color/size/position -> word`` (``None`` = not named; ``shape`` is also
    ``None`` for the generic ``shape``/``object``), the background word, the defects named."""

    objects: tuple[dict[str, str | None], ...]
    background: str | None
    defects: tuple[str, ...]


def prompt_words(text: str) -> PromptWords:
    """The words behind every attribute :func:`parse_prompt` reads (``plus sign`` reads as ``plus``).

    ``is_synonym(attribute, word)`` tells whether a word is another name than the attribute value's
    own (``violet``, ``grey``, ``disc``, ``big``, ``middle`` ...)."""
    t = text.lower().replace("plus sign", "plus").replace("plus-sign", "plus")
    tokens = _TOKEN.findall(t)
    background = None
    defects: list[str] = []
    used = [False] * len(tokens)
    for i, tok in enumerate(tokens):
        if tok in BACKGROUND_WORDS:
            after = tokens[i + 1] if i + 1 < len(tokens) else ""
            before = tokens[i - 1] if i > 0 else ""
            before2 = tokens[i - 2] if i > 1 else ""
            if after == "background" or before in ("on", "against") or before2 in ("on", "against"):
                background = tok
                used[i] = True
        elif tok in DEFECT_WORDS:
            if DEFECT_WORDS[tok] not in defects:
                defects.append(DEFECT_WORDS[tok])
            used[i] = True
    nouns = [i for i, tok in enumerate(tokens) if not used[i] and (tok in _SHAPE_LOOKUP or tok in GENERIC_WORDS)]
    specs: list[dict[str, str | None]] = [
        {"shape": tokens[i] if tokens[i] in _SHAPE_LOOKUP else None, "color": None, "size": None, "position": None}
        for i in nouns
    ]
    if specs:
        for i, tok in enumerate(tokens):
            if used[i]:
                continue
            if tok in _COLOR_LOOKUP or tok in _SIZE_LOOKUP:
                following = [k for k, n in enumerate(nouns) if n > i]
                k = following[0] if following else len(nouns) - 1
                specs[k]["color" if tok in _COLOR_LOOKUP else "size"] = tok
            elif tok in POSITION_WORDS:
                preceding = [k for k, n in enumerate(nouns) if n < i]
                k = preceding[-1] if preceding else 0
                specs[k]["position"] = tok
    return PromptWords(tuple(specs), background, tuple(d for d in DEFECTS if d in defects))


def is_synonym(attribute: str, word: str) -> bool:
    """Whether ``word`` names the value of ``attribute`` by another name than the value itself
    (``("color", "violet")`` -> True, ``("color", "purple")`` -> False)."""
    table = _WORD_VALUE.get(attribute)
    if table is None or word not in table:
        raise ValueError(f"{word!r} is not a {attribute} word; known: {sorted(table or _WORD_VALUE)}")
    return table[word] != word


def scene_for_request(request: Request, rng: np.random.Generator, *, defects: Sequence[str] | None = None) -> Scene:
    """A random scene satisfying ``request`` (unnamed attributes drawn from the prior).

    ``defects``: the defects to draw (default: exactly those the request names). Requests for
    more than two objects keep the first two.
    """
    objs = list(request.objects[:2]) or None
    if objs is not None:
        seen: set[str] = set()
        for k, o in enumerate(objs):  # a repeated position cannot be satisfied: free the second one
            if o.position is not None and o.position in seen:
                objs[k] = ObjectSpec(o.shape, o.color, o.size, None)
            elif o.position is not None:
                seen.add(o.position)
    return sample_scene(
        rng, objects=objs, background=request.background,
        defects=list(request.defects) if defects is None else defects,
    )


VOCABULARY: dict[str, tuple[str, ...]] = {
    "background": BACKGROUNDS, "shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS,
    "defect": DEFECTS,
}
