"""The guidance family: one option class and one formula per paper.

Every formula takes the conditional prediction ``c`` and the guiding prediction ``u`` (the
unconditional branch, a negative prompt, or a weaker model) in the space the method declares,
with a per-sample scale ``w`` already shaped to broadcast (``(b, 1, ..., 1)``), and returns the
guided prediction in that same space. :class:`~noisewise.guidance.GuidedDenoiser` converts to and
from that space and composes the options:

======================  ===========  =======================================================
option                  space        paper
======================  ===========  =======================================================
:class:`CFG`            any (affine) Ho & Salimans 2022, Classifier-Free Diffusion Guidance
:class:`Rescale`        v (default)  Lin et al. 2023, Common Diffusion Noise Schedules and
                                     Sample Steps are Flawed, sec. 3.4 / Algorithm 2
:class:`Interval`       (a gate)     Kynkäänniemi et al. 2024, Applying Guidance in a Limited
                                     Interval Improves Sample and Distribution Quality
:class:`DynamicThreshold` x0         Saharia et al. 2022 (Imagen), sec. 2.3
:class:`APG`            x0           Sadat, Hilliges & Weber 2024, Eliminating Oversaturation
                                     and Artifacts of High Guidance Scales (APG), Alg. 1
:class:`CFGZeroStar`    flow         Fan et al. 2025, CFG-Zero*: Improved Classifier-Free
                                     Guidance for Flow Matching Models, eq. 8 + zero-init
:class:`Autoguidance`   any (affine) Karras et al. 2024, Guiding a Diffusion Model with a Bad
                                     Version of Itself
:class:`CFGPlusPlus`    x0           Chung et al. 2024, CFG++: Manifold-Constrained
                                     Classifier Free Guidance for Diffusion Models
======================  ===========  =======================================================
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

import torch

Tensor = torch.Tensor
Space = Literal["x0", "eps", "v", "flow"]
SPACES: tuple[str, ...] = ("x0", "eps", "v", "flow")


# -- the formulas ---------------------------------------------------------------------------------
def _dims(t: Tensor) -> list[int]:
    return list(range(1, t.ndim))


def cfg(c: Tensor, u: Tensor, w: Tensor | float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): ``u + w (c - u)``, written ``c + (w - 1)(c - u)``
    so that ``w = 1`` returns ``c`` exactly."""
    return c + (w - 1.0) * (c - u)


def rescale(guided: Tensor, c: Tensor, phi: float) -> Tensor:
    """Guidance rescale (Lin et al. 2023, Algorithm 2): match the per-sample standard deviation of
    the guided prediction to the conditional one, mixed by ``phi``:
    ``phi * guided * std(c) / std(guided) + (1 - phi) * guided``."""
    dims = _dims(guided)
    factor = c.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return guided * (phi * factor + (1.0 - phi))


def apg(
    c: Tensor,
    u: Tensor,
    w: Tensor | float,
    *,
    eta: float = 0.0,
    norm_threshold: float = 0.0,
    running: Tensor | None = None,
    momentum: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Adaptive projected guidance (Sadat et al. 2024, Algorithm 1), on data predictions.

    ``diff = c - u`` accumulates reverse momentum (``diff + momentum * running``), is clipped to norm
    ``norm_threshold`` (0 = off) and split into the parts parallel and orthogonal to ``c``;
    the result is ``c + (w - 1) (diff_orth + eta * diff_par)``. Returns (guided, new running average).
    """
    dims = _dims(c)
    diff = c - u
    if momentum != 0.0 and running is not None:
        diff = diff + momentum * running
    new_running = diff
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=dims, keepdim=True)
        diff = diff * torch.clamp(norm_threshold / norm, max=1.0)
    v0, v1 = diff.double(), c.double()
    v1 = torch.nn.functional.normalize(v1, dim=dims)
    par = (v0 * v1).sum(dim=dims, keepdim=True) * v1
    orth = (v0 - par).to(diff.dtype)
    update = orth + eta * par.to(diff.dtype)
    return c + (w - 1.0) * update, new_running


def cfg_zero_star(c: Tensor, u: Tensor, w: Tensor | float, eps: float = 1e-8) -> Tensor:
    """CFG-Zero* optimized scale (Fan et al. 2025, eq. 8): ``s* = <c, u> / |u|^2`` per sample, then
    ``s* u + w (c - s* u)``."""
    cf, uf = c.reshape(c.shape[0], -1), u.reshape(u.shape[0], -1)
    s = (cf * uf).sum(1) / ((uf * uf).sum(1) + eps)
    su = u * s.reshape(-1, *([1] * (c.ndim - 1)))
    return su + w * (c - su)


def dynamic_threshold(x0: Tensor, percentile: float = 0.995, max_value: float | None = None) -> Tensor:
    """Dynamic thresholding (Saharia et al. 2022, Imagen, sec. 2.3): per sample, ``s`` = the
    ``percentile`` quantile of ``|x0|``, at least 1 (and at most ``max_value`` if given); clip ``x0`` to
    ``[-s, s]`` and divide by ``s``."""
    flat = x0.reshape(x0.shape[0], -1).abs()
    s = torch.quantile(flat.to(torch.float64 if flat.dtype == torch.float64 else torch.float32), percentile, dim=1)
    s = s.to(x0.dtype).clamp(min=1.0)
    if max_value is not None:
        s = s.clamp(max=max_value)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def cfgpp_scale(lam: Tensor | float, h: float) -> Tensor | float:
    """CFG++ (Chung et al. 2024) as CFG with a per-step scale: the CFG++ DDIM step
    ``x' = alpha' x0_lam + sigma' eps_uncond`` equals the plain DDIM step on
    ``x0_uncond + lam (x0_cond - x0_uncond) / (1 - e^{-h})`` (``h`` = the step in lambda), so CFG++ is
    CFG at ``w = lam / (1 - e^{-h})``; at ``h = inf`` (the final step) ``w = lam``."""
    return lam / (-math.expm1(-h)) if math.isfinite(h) else lam


# -- the options --------------------------------------------------------------------------------
@dataclass(frozen=True)
class GuidanceOption:
    """Base of the guidance options (``guidance=`` in :func:`noisewise.sample`)."""

    name: ClassVar[str] = ""
    kind: ClassVar[Literal["combiner", "modifier", "source"]] = "modifier"
    paper: ClassVar[str] = ""


def _check_space(space: str, who: str) -> None:
    if space not in SPACES:
        raise ValueError(f"{who}: space must be one of {', '.join(SPACES)}, got {space!r}")


def _check_real(v: Any, who: str, lo: float | None = None, hi: float | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{who} must be a finite number, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{who} must lie in [{lo}, {hi}], got {v!r}")


@dataclass(frozen=True)
class CFG(GuidanceOption):
    """Classifier-free guidance (Ho & Salimans 2022): ``D = u + w (c - u)``.

    ``space`` only chooses where the arithmetic happens: CFG is affine, so x0, eps, v and flow give
    the same sample (to rounding)."""

    space: Space = "x0"
    name: ClassVar[str] = "cfg"
    kind: ClassVar[str] = "combiner"
    paper: ClassVar[str] = "Ho & Salimans 2022, Classifier-Free Diffusion Guidance"

    def __post_init__(self) -> None:
        _check_space(self.space, "CFG")


@dataclass(frozen=True)
class Rescale(GuidanceOption):
    """Guidance rescale (Lin et al. 2023, sec. 3.4): pull the guided prediction's per-sample std back
    to the conditional one's, by ``phi`` (0 = off, paper: 0.7). Works in v space (the paper's model
    is v-prediction; diffusers applies it to whatever the network predicts)."""

    phi: float = 0.7
    space: Space = "v"
    name: ClassVar[str] = "rescale"
    paper: ClassVar[str] = "Lin et al. 2023, Common Diffusion Noise Schedules and Sample Steps are Flawed"

    def __post_init__(self) -> None:
        _check_real(self.phi, "Rescale.phi", 0.0, 1.0)
        _check_space(self.space, "Rescale")


@dataclass(frozen=True)
class Interval(GuidanceOption):
    """Guidance interval (Kynkäänniemi et al. 2024): guide only where the VE noise level
    ``sigma / alpha`` lies in ``(sigma_lo, sigma_hi]``; elsewhere the conditional prediction is used
    alone and the guiding branch is not evaluated (its network rows and NFE are saved).
    Defaults: the paper's SD-XL interval (0.28, 5.42]."""

    sigma_lo: float = 0.28
    sigma_hi: float = 5.42
    name: ClassVar[str] = "interval"
    paper: ClassVar[str] = (
        "Kynkäänniemi et al. 2024, Applying Guidance in a Limited Interval Improves Sample and Distribution Quality"
    )

    def __post_init__(self) -> None:
        for f, v in (("sigma_lo", self.sigma_lo), ("sigma_hi", self.sigma_hi)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
                raise ValueError(f"Interval.{f} must be a number >= 0 (inf allowed), got {v!r}")
        if not self.sigma_lo < self.sigma_hi:
            raise ValueError(f"Interval needs sigma_lo < sigma_hi, got ({self.sigma_lo}, {self.sigma_hi}]")

    def active(self, ve_sigma: float) -> bool:
        return self.sigma_lo < ve_sigma <= self.sigma_hi


@dataclass(frozen=True)
class DynamicThreshold(GuidanceOption):
    """Dynamic thresholding (Imagen, Saharia et al. 2022): clip the data prediction to its
    ``percentile`` absolute value ``s`` (when ``s > 1``) and divide by ``s``. For data in [-1, 1]
    (pixels); ``max_value`` caps ``s`` like diffusers' ``sample_max_value``. Works in x0 space."""

    percentile: float = 0.995
    max_value: float | None = None
    name: ClassVar[str] = "dynamic_threshold"
    paper: ClassVar[str] = "Saharia et al. 2022, Photorealistic Text-to-Image Diffusion Models (Imagen), sec. 2.3"

    def __post_init__(self) -> None:
        _check_real(self.percentile, "DynamicThreshold.percentile", 0.0, 1.0)
        if self.max_value is not None:
            _check_real(self.max_value, "DynamicThreshold.max_value", 1.0)


@dataclass(frozen=True)
class APG(GuidanceOption):
    """Adaptive projected guidance (Sadat et al. 2024): drop (``eta = 0``) the part of the guidance
    update parallel to the conditional prediction, which causes over-saturation, clip the update's
    norm to ``norm_threshold`` (0 = off) and add reverse momentum ``momentum`` (paper: -0.5; the
    running average lives for one sampling run). Works on data predictions (x0)."""

    eta: float = 0.0
    norm_threshold: float = 15.0
    momentum: float = -0.5
    space: Space = "x0"
    name: ClassVar[str] = "apg"
    kind: ClassVar[str] = "combiner"
    paper: ClassVar[str] = (
        "Sadat, Hilliges & Weber 2024, Eliminating Oversaturation and Artifacts of High Guidance Scales in "
        "Diffusion Models"
    )

    def __post_init__(self) -> None:
        _check_real(self.eta, "APG.eta")
        _check_real(self.norm_threshold, "APG.norm_threshold", 0.0)
        _check_real(self.momentum, "APG.momentum", -1.0, 1.0)
        _check_space(self.space, "APG")


@dataclass(frozen=True)
class CFGZeroStar(GuidanceOption):
    """CFG-Zero* (Fan et al. 2025): scale the unconditional velocity by the per-sample projection
    ``s* = <c, u> / |u|^2`` before guiding, and return zero velocity for the first
    ``zero_init_steps`` steps (no network call there). Works in flow-velocity space."""

    zero_init_steps: int = 1
    space: Space = "flow"
    name: ClassVar[str] = "cfg_zero_star"
    kind: ClassVar[str] = "combiner"
    paper: ClassVar[str] = "Fan et al. 2025, CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching Models"

    def __post_init__(self) -> None:
        n = self.zero_init_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"CFGZeroStar.zero_init_steps must be an integer >= 0, got {self.zero_init_steps!r}")
        _check_space(self.space, "CFGZeroStar")


@dataclass(frozen=True)
class CFGPlusPlus(GuidanceOption):
    """CFG++ (Chung et al. 2024): guide the data prediction by interpolation,
    ``x0_lam = u + lam (c - u)`` with ``lam = guidance_scale`` (the paper uses 0 < lam <= 1), and
    re-noise with the *unconditional* noise. Made sampler-agnostic as CFG at the per-step scale
    ``lam / (1 - e^{-h})`` (exactly the paper's update for DDIM/Euler; see :func:`cfgpp_scale`)."""

    name: ClassVar[str] = "cfg++"
    kind: ClassVar[str] = "combiner"
    paper: ClassVar[str] = (
        "Chung et al. 2024, CFG++: Manifold-Constrained Classifier Free Guidance for Diffusion Models"
    )


@dataclass(frozen=True)
class Autoguidance(GuidanceOption):
    """Autoguidance (Karras et al. 2024): the guiding branch is a weaker version of the model
    (smaller or less trained) with the *same* conditioning: ``D = D_weak + w (D - D_weak)``.

    ``guide`` is called like the main model: ``guide(x, model_time, cond)`` returning a raw
    prediction of ``prediction_type`` (default: the main model's) or, when sampling with a
    ``denoiser=``, ``guide(x, level, cond) -> x0``. It is a different network, so it costs a second
    forward pass per step."""

    guide: Callable[..., Tensor] | None = None
    prediction_type: str | None = None
    model_kwargs: Mapping[str, Any] | None = None
    name: ClassVar[str] = "autoguidance"
    kind: ClassVar[str] = "source"
    paper: ClassVar[str] = "Karras et al. 2024, Guiding a Diffusion Model with a Bad Version of Itself"

    def __post_init__(self) -> None:
        if self.guide is None or not callable(self.guide):
            raise ValueError(
                "Autoguidance needs the weaker model: guidance=noisewise.Autoguidance(guide=weak_model) "
                "(called like the main model)"
            )


OPTIONS: dict[str, type[GuidanceOption]] = {
    c.name: c for c in (CFG, Rescale, Interval, DynamicThreshold, APG, CFGZeroStar, CFGPlusPlus, Autoguidance)
}
_ALIASES = {
    "classifier_free": "cfg",
    "guidance_rescale": "rescale",
    "cfg_rescale": "rescale",
    "guidance_interval": "interval",
    "limited_interval": "interval",
    "dynamic_thresholding": "dynamic_threshold",
    "thresholding": "dynamic_threshold",
    "threshold": "dynamic_threshold",
    "adaptive_projected_guidance": "apg",
    "cfg_zero*": "cfg_zero_star",
    "cfg_zero": "cfg_zero_star",
    "cfgzero*": "cfg_zero_star",
    "zero_star": "cfg_zero_star",
    "cfgpp": "cfg++",
    "cfg_pp": "cfg++",
    "cfg_plus_plus": "cfg++",
    "autoguide": "autoguidance",
    "auto_guidance": "autoguidance",
}


def guidance_methods() -> list[str]:
    """Names accepted by ``guidance=`` (alone, in a list, or as keys of a dict of options)."""
    return sorted(OPTIONS)


def _option_by_name(name: str, kwargs: Mapping[str, Any] | None = None) -> GuidanceOption:
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key not in OPTIONS:
        close = difflib.get_close_matches(key, list(OPTIONS) + list(_ALIASES), n=1, cutoff=0.5)
        hint = f"; did you mean {_ALIASES.get(close[0], close[0])!r}?" if close else ""
        raise ValueError(f"unknown guidance option {name!r}{hint} Known: {', '.join(guidance_methods())}")
    cls = OPTIONS[key]
    kwargs = dict(kwargs or {})
    valid = [f.name for f in fields(cls)]
    for k in kwargs:
        if k not in valid:
            close = difflib.get_close_matches(k, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"guidance option {key!r} takes no setting {k!r}{hint} Its settings: {', '.join(valid) or 'none'}"
            )
    if cls is Autoguidance and "guide" not in kwargs:
        raise ValueError(
            "autoguidance needs the weaker model: pass guidance=noisewise.Autoguidance(guide=weak_model) or "
            "guidance={'autoguidance': {'guide': weak_model}}"
        )
    return cls(**kwargs)


def parse_guidance(guidance: Any) -> tuple[GuidanceOption, ...]:
    """Normalise ``guidance=`` into a tuple of options with exactly one combiner (CFG by default).

    Accepts ``None``, a name (``"apg"``), an option instance (``APG(eta=0)``), a dict
    ``{"rescale": {"phi": 0.7}, "interval": {}}`` or a list of any of these."""
    items: list[GuidanceOption] = []

    def add(g: Any) -> None:
        if g is None:
            return
        if isinstance(g, GuidanceOption):
            items.append(g)
        elif isinstance(g, str):
            items.append(_option_by_name(g))
        elif isinstance(g, Mapping):
            for k, v in g.items():
                if not isinstance(k, str):
                    raise ValueError(f"guidance dict keys must be option names, got {k!r}")
                if v is not None and not isinstance(v, Mapping):
                    raise ValueError(f"guidance={{{k!r}: ...}} needs a dict of settings (or None), got {v!r}")
                items.append(_option_by_name(k, v))
        elif isinstance(g, Sequence):
            for e in g:
                add(e)
        else:
            raise TypeError(
                f"guidance must be a name, an option (e.g. noisewise.APG()), a dict of options or a list, got "
                f"{type(g).__name__}. Known names: {', '.join(guidance_methods())}"
            )

    add(guidance)
    seen: set[str] = set()
    for o in items:
        if o.name in seen:
            raise ValueError(f"guidance option {o.name!r} is given twice")
        seen.add(o.name)
    combiners = [o for o in items if o.kind == "combiner"]
    if len(combiners) > 1:
        names = ", ".join(o.name for o in combiners)
        raise ValueError(
            f"choose one way to combine the branches, got {names}: cfg, apg, cfg_zero_star and cfg++ are "
            "alternatives (rescale, interval, dynamic_threshold and autoguidance compose with any of them)"
        )
    if not combiners:
        items.insert(0, CFG())
    return tuple(items)
