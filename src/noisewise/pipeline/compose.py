"""Prompt composition for the text-to-image pipeline: splitting a prompt into components and
building the conditionings of composable guidance (:mod:`noisewise.guidance.compose`) and of
phrase-wise text states.

Modes (``pipe(prompt, compose=...)``; ``docs/composition.md`` has the measurements):

- ``"regions"`` (the shapes models' default): a two-object shapes prompt is laid out
  (:func:`noisewise.shapes.phrases.layout`: a position drawn from the seed for an object without
  one) and each object's phrase guides inside a soft region around its position
  (:func:`region_masks`), measured from the full prompt's prediction; at low noise
  (``region_context_below``) each phrase also names the other object by its position, so that it
  does not erase the objects already drawn; ``"regions-named"`` only for
  prompts naming both positions; ``"layout"`` only rewrites the prompt (an ablation);
- ``"and"``: the parts of a prompt joined by an upper-case ``AND`` (any model), added as
  ``compose_scale * (D(part) - D(negative))``;
- ``"objects"``: the same with the ``AND`` parts if there are any, otherwise the object phrases of
  a shapes prompt (:func:`noisewise.shapes.phrases.object_phrases`), each with the background phrase;
- ``"binding"`` / ``"binding-exchanged"``: ``+ s (D(prompt) - mean_j D(wrong_j))`` over the wrongly
  bound versions of a two-object prompt (:func:`noisewise.shapes.phrases.binding_negatives`);
- ``"off"`` (or None): plain classifier-free guidance.

A prompt with fewer than two components is sampled with plain CFG (no extra rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..guidance.compose import Composition, full_prompt, split_and
from ..guidance.guided import _map

Tensor = torch.Tensor
MODES = ("off", "and", "objects", "binding", "binding-exchanged", "regions", "regions-named", "layout")
REGION_SIGMA = 0.12
# below this noise level (sigma / alpha) each region's phrase also names the other object (docs/composition.md)
REGION_CONTEXT_BELOW = 0.6
MAX_COMPONENTS = 8


PHRASE_MODES = ("off", "replace", "mean")


def check_phrase_mode(mode: str | None) -> str:
    m = "off" if mode is None or mode is False else str(mode)
    if m not in PHRASE_MODES:
        raise ValueError(f"phrase_states must be one of {', '.join(PHRASE_MODES)} (or None), got {mode!r}")
    return m


def check_mode(mode: str | None) -> str:
    m = "off" if mode is None or mode is False else str(mode)
    if m not in MODES:
        raise ValueError(f"compose must be one of {', '.join(MODES)} (or None), got {mode!r}")
    return m


def components(prompt: str, mode: str) -> list[str]:
    """The component prompts of ``prompt`` under ``mode`` (``[]``: no composition)."""
    mode = check_mode(mode)
    if mode == "off":
        return []
    parts = split_and(prompt)
    if not parts and mode == "objects":
        from ..shapes.phrases import object_phrases

        parts = object_phrases(prompt).components(with_background=True)
        if len(parts) < 2:
            parts = []
    if len(parts) > MAX_COMPONENTS:
        raise ValueError(f"at most {MAX_COMPONENTS} components per prompt, got {len(parts)} in {prompt!r}")
    return parts


@dataclass(frozen=True)
class Composed:
    """What the pipeline samples with: the full prompt each image reads, its components and the
    :class:`Composition` (None when no prompt has two components)."""

    prompts: list[str]
    components: list[list[str]]
    composition: Composition | None


def region_masks(positions: Sequence[str], shape: tuple[int, int], sigma: float = REGION_SIGMA) -> Tensor:
    """Soft masks ``(k, 1, h, w)`` on an ``h x w`` latent grid: a Gaussian bump of width ``sigma``
    (fraction of the image) at each position's object centre, scaled so they sum to at most one."""
    from ..shapes.world import POSITION_XY

    h, w = shape
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    g = torch.stack([torch.exp(-((xs[None, :] - POSITION_XY[p][0]) ** 2 + (ys[:, None] - POSITION_XY[p][1]) ** 2)
                               / (2 * sigma**2)) for p in positions])
    g = g / g.amax(dim=(1, 2), keepdim=True)  # each bump peaks at one
    g = g / g.sum(0, keepdim=True).clamp(min=1.0)
    return g[:, None].float()


def _build_regions(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], weight: float, named_only: bool,
                   sigma: float, layout_only: bool = False, context_below: float = 0.0) -> Composed:
    import numpy as np

    from ..shapes.phrases import layout

    full, comps, masks, owner, context = [], [], [], [], []
    for b, (p, sd) in enumerate(zip(prompts, seeds)):
        lay = layout(p, np.random.default_rng([int(sd), 0x1A7]))
        if lay is None or (named_only and any(lay.chosen)):
            full.append(p)
            comps.append([])
            continue
        full.append(lay.prompt)
        if layout_only:
            comps.append([])
            continue
        comps.append(list(lay.components))
        context += lay.context_components
        masks.append(region_masks(lay.positions, tuple(pipe.latent_shape[1:]), sigma))
        owner += [b] * len(lay.components)
    flat = [c for cs in comps for c in cs]
    if not flat:
        return Composed(full, comps, None)
    if context_below > 0:  # the object phrases and their context phrases in one encoder call (a tensor or, SD3, a dict)
        both, n = pipe.encode_prompt(flat + context), len(flat)
        states, low = _map(lambda t: t[:n], both), _map(lambda t: t[n:], both)
    else:
        states, low = pipe.encode_prompt(flat), None
    return Composed(full, comps, Composition(states, owner, [float(weight)] * len(owner), torch.cat(masks), "cond",
                                             low, context_below))


def build(pipe: Any, prompts: Sequence[str], mode: str, scale: float, seeds: Sequence[int] | None = None,
          full_scale: float | None = None, sigma: float = REGION_SIGMA, context_below: float = 0.0) -> Composed:
    """Split every prompt, encode the components (through the pipeline's text-encoder cache) and
    lay them out as component rows of weight ``scale`` each. Regions: below the noise level
    ``context_below`` (sigma / alpha; 0 = never) the components are the layout's context phrases."""
    if mode in ("regions", "regions-named", "layout"):
        return _build_regions(pipe, prompts, seeds or [0] * len(prompts), scale * (full_scale or 0.0),
                              mode == "regions-named", sigma, mode == "layout", context_below)
    if mode in ("binding", "binding-exchanged"):
        from ..shapes.phrases import binding_negatives

        kinds = ("exchanged",) if mode == "binding-exchanged" else ("exchanged", "same")
        comps = [[t[2] for t in binding_negatives(p, kinds)] for p in prompts]
        flat = [c for cs in comps for c in cs]
        if not flat:
            return Composed(list(prompts), comps, None)
        states = pipe.encode_prompt(flat)
        owner = [b for b, cs in enumerate(comps) for _ in cs]
        weight = [-float(scale) / len(cs) for cs in comps for _ in cs]
        return Composed(list(prompts), comps, Composition(states, owner, weight))
    comps = [components(p, mode) for p in prompts]
    full = [full_prompt(p) if c else p for p, c in zip(prompts, comps)]
    flat = [c for cs in comps for c in cs]
    if not flat:
        return Composed(full, comps, None)
    states = pipe.encode_prompt(flat)
    owner = [b for b, cs in enumerate(comps) for _ in cs]
    return Composed(full, comps, Composition(states, owner, [float(scale)] * len(owner)))


def _object_spans(prompt: str) -> list[tuple[int, int]]:
    from ..shapes.phrases import object_phrases

    return list(object_phrases(prompt).spans)


@torch.no_grad()
def phrase_states(pipe: Any, prompts: Sequence[str], cond: Tensor, how: str = "replace") -> Tensor:
    """Phrase-wise text states (after Feng et al. 2023, structured diffusion guidance): each object
    phrase of a prompt with two or more objects is encoded on its own (with the background phrase)
    and its token states replace (``"replace"``) or are averaged with (``"mean"``) the full
    prompt's states at that phrase's tokens, so one object's words do not carry the other's.
    Other prompts keep their states. ``cond``: the full prompts' states ``(B, L, H)``."""
    from ..shapes.phrases import object_phrases

    te = pipe.text_encoder
    te._load()
    tok = te._tokenizer
    out = cond.clone()
    for b, p in enumerate(prompts):
        op = object_phrases(p)
        if len(op.objects) < 2:
            continue
        with te._tok_lock:
            enc = tok(p, padding="max_length", truncation=True, max_length=te.max_length, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        comps = op.components(with_background=True)
        states = pipe.encode_prompt(comps)
        for k, (a, e) in enumerate(op.spans):
            idx = [i for i, (s0, s1) in enumerate(offsets) if s1 > s0 and s0 >= a and s1 <= e]
            if not idx:
                continue  # truncated away
            with te._tok_lock:
                n_own = len(tok(op.objects[k], add_special_tokens=False)["input_ids"])
            if n_own != len(idx):  # the phrase tokenizes differently on its own: leave it
                continue
            src = states[k, 1 : 1 + n_own].to(out)
            if how == "replace":
                out[b, idx] = src
            else:
                out[b, idx] = 0.5 * (out[b, idx] + src)
    return out
