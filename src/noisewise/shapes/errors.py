"""Where a text-to-image model's attribute errors are: accuracy split by the number of objects a
prompt asks for, confusion matrices (requested value -> the value the evaluator read), accuracy per
word of the prompt (synonyms such as ``violet``, ``grey``, ``disc`` against the values' own names)
and how often a wrong colour or shape is the one the prompt gave the *other* object (attribute
binding). Used by ``bench/bench_model_errors.py``; pure functions over prompts and
:class:`~noisewise.shapes.evaluator.Prediction` lists, so they can be checked on hand-built inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .captions import is_synonym, parse_prompt, prompt_words
from .evaluator import Prediction, attribute_accuracy, match_objects

OBJECT_ATTRIBUTES: tuple[str, ...] = ("shape", "color", "size", "position")
NONE_READ = "none"  # the requested object was matched to no predicted object


def _ratio(hits: int, n: int) -> float:
    return hits / n if n else float("nan")


def error_breakdown(prompts: Sequence[str], predictions: Sequence[Prediction]) -> dict[str, Any]:
    """Error analysis of ``predictions[i]`` (the evaluator's reading of an image generated for
    ``prompts[i]``; repeat a prompt once per seed).

    Returns a JSON-ready dict:

    - ``by_objects``: ``{"1": attribute_accuracy(...), "2": ...}`` over the prompts asking for one
      / two objects (keys are the object counts as strings);
    - ``confusion``: ``{attribute: {requested: {read: count}}}`` for shape, colour, size, position,
      with ``"none"`` where the requested object was matched to no predicted object (objects are
      matched as the accuracy is scored: :func:`~noisewise.shapes.evaluator.match_objects`);
    - ``per_value``: ``{attribute: {value: [hits, n]}}`` (the confusion's diagonal and row sums);
    - ``by_word``: ``{attribute: {word: [hits, n]}}``, the word of the prompt each requested value
      was read from (``background`` included);
    - ``synonyms``: ``{attribute: {"own name": [hits, n], "synonym": [hits, n]}}``, and the same
      per object count in ``synonyms_by_objects`` (``{"1": {...}, "2": {...}}``);
    - ``binding``: for two-object prompts whose objects are given different values of an attribute
      (colour, shape, size, position): ``{attribute: {"pairs": n objects, "errors": wrong reads,
      "swapped": wrong reads equal to the other object's requested value}}``;
    - ``binding_images``: the same prompts per image, both objects matched: ``{attribute:
      {"images": n, "both right": .., "exchanged": each read as the other's, "same value": both
      read with one value (one object took the other's), "other": ..}}``;
    - ``missing``: ``{"1": [objects matched to nothing, objects requested], "2": ...}``;
    - ``missing_by_size``: the same split by the size the prompt asked for (``"small"``, ``"large"``,
      ``"unnamed"``): ``{"2": {"small": [missing, requested], ...}, ...}``.
    """
    if len(prompts) != len(predictions):
        raise ValueError(f"one prediction per prompt: got {len(prompts)} prompts and {len(predictions)} predictions")
    groups: dict[str, tuple[list[Any], list[Prediction]]] = {}
    confusion: dict[str, dict[str, dict[str, int]]] = {a: {} for a in OBJECT_ATTRIBUTES}
    by_word: dict[str, dict[str, list[int]]] = {a: {} for a in (*OBJECT_ATTRIBUTES, "background")}
    synonyms: dict[str, dict[str, list[int]]] = {
        a: {"own name": [0, 0], "synonym": [0, 0]} for a in (*OBJECT_ATTRIBUTES, "background")
    }
    binding = {a: {"pairs": 0, "errors": 0, "swapped": 0} for a in OBJECT_ATTRIBUTES}
    binding_images = {a: {"images": 0, "both right": 0, "exchanged": 0, "same value": 0, "other": 0}
                      for a in OBJECT_ATTRIBUTES}
    syn_by_objects: dict[str, dict[str, dict[str, list[int]]]] = {}
    missing_by_size: dict[str, dict[str, list[int]]] = {}  # ``missing`` is its sum over sizes

    def count_word(attr: str, word: str, ok: bool, key: str) -> None:
        w = by_word[attr].setdefault(word, [0, 0])
        w[0] += ok
        w[1] += 1
        kind = "synonym" if is_synonym(attr, word) else "own name"
        group = syn_by_objects.setdefault(key, {})
        for s in (synonyms[attr][kind], group.setdefault(attr, {"own name": [0, 0], "synonym": [0, 0]})[kind]):
            s[0] += ok
            s[1] += 1

    for text, pred in zip(prompts, predictions):
        req = parse_prompt(text)
        words = prompt_words(text)
        objs = req.objects[:2]
        key = str(len(objs))
        g = groups.setdefault(key, ([], []))
        g[0].append(req)
        g[1].append(pred)
        if req.background is not None and words.background is not None:
            count_word("background", words.background, pred.background == req.background, key)
        matched = match_objects(req, pred)
        by_size = missing_by_size.setdefault(key, {})
        for r, o in zip(objs, matched):
            ms = by_size.setdefault(r.size or "unnamed", [0, 0])
            ms[0] += o is None
            ms[1] += 1
        for k, (r, o, w) in enumerate(zip(objs, matched, words.objects)):
            other = objs[1 - k] if len(objs) == 2 else None
            for a in OBJECT_ATTRIBUTES:
                want = getattr(r, a)
                if want is None:
                    continue
                got = getattr(o, a) if o is not None else NONE_READ
                row = confusion[a].setdefault(want, {})
                row[got] = row.get(got, 0) + 1
                word = w[a]
                if word is not None:
                    count_word(a, word, got == want, key)
                if a in binding and other is not None and getattr(other, a) not in (None, want):
                    b = binding[a]
                    b["pairs"] += 1
                    b["errors"] += got != want
                    b["swapped"] += got == getattr(other, a)
        if len(objs) == 2 and None not in matched:
            for a in OBJECT_ATTRIBUTES:
                w0, w1 = getattr(objs[0], a), getattr(objs[1], a)
                if w0 is None or w1 is None or w0 == w1:
                    continue
                g0, g1 = getattr(matched[0], a), getattr(matched[1], a)
                bi = binding_images[a]
                bi["images"] += 1
                bi["both right" if (g0, g1) == (w0, w1) else "exchanged" if (g0, g1) == (w1, w0)
                   else "same value" if g0 == g1 else "other"] += 1

    per_value = {
        a: {v: [row.get(v, 0), sum(row.values())] for v, row in sorted(confusion[a].items())}
        for a in OBJECT_ATTRIBUTES
    }
    return {
        "by_objects": {k: attribute_accuracy(r, p) for k, (r, p) in sorted(groups.items())},
        "confusion": confusion,
        "per_value": per_value,
        "by_word": by_word,
        "synonyms": synonyms,
        "synonyms_by_objects": dict(sorted(syn_by_objects.items())),
        "binding": binding,
        "binding_images": binding_images,
        "missing": {k: [sum(v[0] for v in d.values()), sum(v[1] for v in d.values())]
                    for k, d in missing_by_size.items()},
        "missing_by_size": {k: dict(sorted(v.items())) for k, v in sorted(missing_by_size.items())},
    }


def rate(pair: Sequence[int]) -> float:
    """``[hits, n]`` -> hits / n (NaN for n = 0)."""
    return _ratio(int(pair[0]), int(pair[1]))
