"""Training-time noise schedules.

Every schedule here describes ``x_t = alpha(t) * x0 + sigma(t) * eps`` as a function of the value
the network is conditioned on (``model_time``): a training-step index for discrete VP schedules,
``1000 * t`` for diffusers-style flow models, ``t`` for continuous VP, ``sigma`` for VE/EDM.

All maths is done in float64 on the host (torch CPU tensors). Each schedule exposes
``alpha``, ``sigma``, ``lam`` (half log-SNR, ``log(alpha / sigma)``) and ``inverse_lambda``
(lambda -> model_time), plus the model_time range ``t_min .. t_max`` it was trained on.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

PredictionType = Literal["epsilon", "v_prediction", "sample", "flow"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample", "flow")

_F64 = torch.float64


def _t(x: Any) -> torch.Tensor:
    return torch.as_tensor(x, dtype=_F64)


class Schedule:
    """Base class. Subclasses implement ``log_alpha_sigma(t)`` and ``inverse_lambda(lam)``.

    Attributes:
        t_min, t_max: the model_time range, ``t_max`` being the noisiest level.
        prediction_type: what the network trained on this schedule predicts (a default that
            :func:`noisewise.sample` uses when the caller gives none).
        shift: inference-time shift (a constant offset ``-log(shift)`` of lambda applied to the
            step grid; 1.0 = none). Flow models use it (SD3: 3.0).
        default_spacing: the spacing :func:`noisewise.sample` uses when none is given.
    """

    t_min: float
    t_max: float
    prediction_type: str = "epsilon"
    shift: float = 1.0
    default_spacing: str = "uniform_lambda"
    discrete: bool = False

    # -- core maths ---------------------------------------------------------------------------
    def alpha(self, t: Any) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: Any) -> torch.Tensor:
        raise NotImplementedError

    def lam(self, t: Any) -> torch.Tensor:
        """Half log-SNR ``log(alpha / sigma)``; ``-inf`` where alpha = 0, ``+inf`` where sigma = 0."""
        a, s = self.alpha(t), self.sigma(t)
        return torch.log(a) - torch.log(s)

    def inverse_lambda(self, lam: Any) -> torch.Tensor:
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------------
    @property
    def lam_min(self) -> float:
        """lambda at the noisiest trained level (may be -inf)."""
        return float(self.lam(self.t_max))

    @property
    def lam_max(self) -> float:
        """lambda at the cleanest trained level."""
        return float(self.lam(self.t_min))

    def ve_sigma(self, t: Any) -> torch.Tensor:
        """``sigma / alpha``, the noise level of the equivalent variance-exploding process."""
        return self.sigma(t) / self.alpha(t)

    def t_from_ve_sigma(self, s: Any) -> torch.Tensor:
        return self.inverse_lambda(-torch.log(_t(s)))

    def shift_for(self, image_seq_len: int | None = None) -> float:
        """The inference shift to use; dynamic-shift schedules derive it from the sequence length."""
        return self.shift

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._repr_fields().items())
        return f"{type(self).__name__}({fields})"

    def _repr_fields(self) -> dict[str, Any]:
        return {"prediction_type": self.prediction_type}

    # -- construction from a diffusers config -------------------------------------------------
    @staticmethod
    def from_diffusers(config: dict[str, Any] | str | os.PathLike[str]) -> Schedule:
        """Build a schedule from a diffusers scheduler config (a dict, a ``scheduler_config.json``
        path, or a folder holding one).

        Discrete VP configs (DDPM/DDIM/DPMSolver/Euler/UniPC...) read ``num_train_timesteps``,
        ``beta_start``, ``beta_end``, ``beta_schedule``, ``trained_betas``,
        ``rescale_betas_zero_snr``, ``prediction_type``. Flow-matching configs (class names
        starting with ``FlowMatch`` or having ``shift``/``use_dynamic_shifting`` without betas)
        read ``shift``, ``use_dynamic_shifting``, ``base_shift``, ``max_shift``,
        ``base_image_seq_len``, ``max_image_seq_len``, ``time_shift_type``; their model_time is
        ``1000 * t`` as in diffusers.
        """
        cfg = _load_config(config)
        cls_name = str(cfg.get("_class_name", ""))
        is_flow = cls_name.startswith("FlowMatch") or (
            "beta_schedule" not in cfg and ("shift" in cfg or "use_dynamic_shifting" in cfg)
        )
        if is_flow:
            n = int(cfg.get("num_train_timesteps", 1000))
            return RectifiedFlow(
                time_scale=float(n),
                shift=float(cfg.get("shift", 1.0)),
                use_dynamic_shifting=bool(cfg.get("use_dynamic_shifting", False)),
                base_shift=float(cfg.get("base_shift", 0.5) or 0.5),
                max_shift=float(cfg.get("max_shift", 1.15) or 1.15),
                base_image_seq_len=int(cfg.get("base_image_seq_len", 256) or 256),
                max_image_seq_len=int(cfg.get("max_image_seq_len", 4096) or 4096),
                time_shift_type=str(cfg.get("time_shift_type", "exponential") or "exponential"),
            )
        if cls_name.startswith("EDM") or cfg.get("sigma_data") is not None and "beta_schedule" not in cfg:
            return EDM(
                sigma_min=float(cfg.get("sigma_min", 0.002)),
                sigma_max=float(cfg.get("sigma_max", 80.0)),
                sigma_data=float(cfg.get("sigma_data", 0.5)),
                prediction_type="sample",
            )
        trained = cfg.get("trained_betas")
        pred = str(cfg.get("prediction_type", "epsilon"))
        if pred not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"unsupported prediction_type {pred!r} in scheduler config; expected one of "
                "'epsilon', 'v_prediction', 'sample'"
            )
        return DiscreteVP(
            num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
            beta_start=float(cfg.get("beta_start", 0.0001)),
            beta_end=float(cfg.get("beta_end", 0.02)),
            beta_schedule=str(cfg.get("beta_schedule", "linear")),
            trained_betas=trained if trained else None,
            rescale_betas_zero_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
            prediction_type=pred,
        )


def _load_config(config: dict[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    if isinstance(config, dict):
        return dict(config)
    path = os.fspath(config)
    if os.path.isdir(path):
        for name in ("scheduler_config.json", os.path.join("scheduler", "scheduler_config.json")):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(
                f"no scheduler_config.json in {path!r} (looked in the folder and its scheduler/ subfolder)"
            )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"scheduler config {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------
# Discrete VP
# ------------------------------------------------------------------------------------------------

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]


def make_betas(
    num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str
) -> torch.Tensor:
    """Betas with diffusers' semantics, in float64."""
    n = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=_F64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=_F64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal 2021, betas capped at 0.999.
        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        b = [min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)]
        return torch.tensor(b, dtype=_F64)
    raise ValueError(
        f"unknown beta_schedule {beta_schedule!r}; known: 'linear', 'scaled_linear', 'squaredcos_cap_v2' "
        "(or pass trained_betas / alphas_cumprod)"
    )


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alphas_cumprod) so the last step has SNR 0."""
    a = alphas_cumprod.sqrt()
    a0, aT = a[0].clone(), a[-1].clone()
    a = (a - aT) * a0 / (a0 - aT)
    return a**2


@dataclass(repr=False)
class DiscreteVP(Schedule):
    """Variance-preserving schedule defined at integer training steps ``0 .. T-1``.

    ``alpha_t = sqrt(alphas_cumprod[t])``, ``sigma_t = sqrt(1 - alphas_cumprod[t])``.

    Between integer steps (karras/exponential/uniform-lambda spacings land there), lambda is
    interpolated *linearly in t* (equivalently log(sigma/alpha) linear in t, which is what
    diffusers' ``_sigma_to_t`` does). A segment touching an infinite lambda (zero terminal SNR)
    interpolates the angle ``atan2(sigma, alpha)`` linearly instead, which stays finite.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Sequence[float] | None = None
    alphas_cumprod: Sequence[float] | torch.Tensor | None = None
    rescale_betas_zero_snr: bool = False
    prediction_type: str = "epsilon"
    shift: float = 1.0
    default_spacing: str = "trailing"
    discrete: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}; known: {PREDICTION_TYPES}")
        if self.alphas_cumprod is not None:
            acp = _t(self.alphas_cumprod).clone()
        else:
            if self.trained_betas is not None:
                betas = _t(self.trained_betas)
            else:
                betas = make_betas(self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule)
            acp = torch.cumprod(1.0 - betas, dim=0)
        if acp.ndim != 1 or len(acp) < 2:
            raise ValueError("alphas_cumprod must be a 1-D sequence of at least 2 values")
        if not bool(((acp > 0) | (torch.arange(len(acp)) == len(acp) - 1)).all()) or not bool((acp <= 1).all()):
            raise ValueError("alphas_cumprod must lie in (0, 1] (only the last may be 0)")
        if not bool((acp[1:] <= acp[:-1]).all()):
            raise ValueError("alphas_cumprod must be non-increasing in t")
        if self.rescale_betas_zero_snr:
            acp = rescale_zero_terminal_snr(acp)
        self._acp = acp
        self.num_train_timesteps = len(acp)
        self._alpha = acp.sqrt()
        self._sigma = (1 - acp).sqrt()
        self._lam = torch.log(self._alpha) - torch.log(self._sigma)
        self._phi = torch.atan2(self._sigma, self._alpha)
        self.t_min = 0.0
        self.t_max = float(len(acp) - 1)

    @property
    def alphas_cumprod_table(self) -> torch.Tensor:
        return self._acp.clone()

    def _repr_fields(self) -> dict[str, Any]:
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule if self.trained_betas is None else "trained",
            "zero_snr": self.rescale_betas_zero_snr,
            "prediction_type": self.prediction_type,
        }

    def _phi_at(self, t: Any) -> torch.Tensor:
        t = _t(t).clamp(self.t_min, self.t_max)
        lo = t.floor().clamp(max=self.t_max - 1).long()
        w = t - lo
        lam_lo, lam_hi = self._lam[lo], self._lam[lo + 1]
        finite = torch.isfinite(lam_lo) & torch.isfinite(lam_hi)
        lam = torch.where(finite, (1 - w) * lam_lo + w * lam_hi, torch.zeros_like(w))
        phi_lin = (1 - w) * self._phi[lo] + w * self._phi[lo + 1]
        phi_from_lam = torch.atan(torch.exp(-lam))
        phi = torch.where(finite, phi_from_lam, phi_lin)
        # exact values at integer steps (no round-off from the detour through lambda)
        phi = torch.where(w == 1, self._phi[lo + 1], phi)
        return torch.where(w == 0, self._phi[lo], phi)

    def alpha(self, t: Any) -> torch.Tensor:
        phi = self._phi_at(t)
        a = torch.cos(phi)
        return torch.where(phi >= math.pi / 2, torch.zeros_like(a), a)

    def sigma(self, t: Any) -> torch.Tensor:
        return torch.sin(self._phi_at(t))

    def lam(self, t: Any) -> torch.Tensor:
        t = _t(t).clamp(self.t_min, self.t_max)
        lo = t.floor().clamp(max=self.t_max - 1).long()
        w = t - lo
        lam_lo, lam_hi = self._lam[lo], self._lam[lo + 1]
        finite = torch.isfinite(lam_lo) & torch.isfinite(lam_hi)
        lin = torch.where(finite, (1 - w) * lam_lo + w * lam_hi, torch.zeros_like(w))
        phi = self._phi_at(t)
        via_phi = torch.log(torch.cos(phi).clamp(min=0)) - torch.log(torch.sin(phi))
        out = torch.where(finite, lin, via_phi)
        out = torch.where(w == 1, self._lam[lo + 1], out)
        return torch.where(w == 0, self._lam[lo], out)

    def inverse_lambda(self, lam: Any) -> torch.Tensor:
        """Exact inverse of :meth:`lam` (vectorised): lambda-linear segments invert linearly, a
        segment touching lambda = -inf inverts through the angle."""
        lam = _t(lam)
        table = self._lam  # decreasing in t
        flat = lam.reshape(-1)
        # idx: first table entry below l (table decreasing) -> segment [idx - 1, idx]
        idx = torch.searchsorted(-table, -flat, right=True).clamp(1, len(table) - 1)
        lo = idx - 1
        a, b = table[lo], table[idx]
        seg_finite = torch.isfinite(a) & torch.isfinite(b)
        w_lin = (a - flat) / torch.where(seg_finite, a - b, torch.ones_like(a))
        phi = torch.atan(torch.exp(-flat.clamp(min=-700.0)))
        phi = torch.where(flat <= -700.0, torch.full_like(phi, math.pi / 2), phi)
        pa, pb = self._phi[lo], self._phi[idx]
        w_phi = (phi - pa) / (pb - pa)
        out = lo.to(_F64) + torch.where(seg_finite, w_lin, w_phi)
        out = torch.where(flat >= table[0], torch.zeros_like(out), out)
        out = torch.where(flat <= table[-1], torch.full_like(out, self.t_max), out)
        return out.reshape(lam.shape)


# ------------------------------------------------------------------------------------------------
# Continuous VP
# ------------------------------------------------------------------------------------------------


@dataclass(repr=False)
class LinearVP(Schedule):
    """Continuous VP with linear beta(t) = beta_0 + t (beta_1 - beta_0), t in [t_min, 1]
    (Song et al. 2021; ``log alpha = -(beta_1 - beta_0) t^2 / 4 - beta_0 t / 2``).

    model_time = ``time_scale * t``.
    """

    beta_0: float = 0.1
    beta_1: float = 20.0
    eps: float = 1e-3
    time_scale: float = 1.0
    prediction_type: str = "epsilon"
    shift: float = 1.0
    default_spacing: str = "uniform_lambda"

    def __post_init__(self) -> None:
        self.t_min = self.eps * self.time_scale
        self.t_max = 1.0 * self.time_scale

    def _log_alpha(self, t: Any) -> torch.Tensor:
        t = _t(t) / self.time_scale
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def alpha(self, t: Any) -> torch.Tensor:
        return torch.exp(self._log_alpha(t))

    def sigma(self, t: Any) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(t)))

    def lam(self, t: Any) -> torch.Tensor:
        la = self._log_alpha(t)
        return la - 0.5 * torch.log(-torch.expm1(2 * la))

    def inverse_lambda(self, lam: Any) -> torch.Tensor:
        lam = _t(lam)
        tmp = 2.0 * (self.beta_1 - self.beta_0) * torch.logaddexp(-2.0 * lam, torch.zeros_like(lam))
        delta = self.beta_0**2 + tmp
        t = tmp / (torch.sqrt(delta) + self.beta_0) / (self.beta_1 - self.beta_0)
        return t * self.time_scale


@dataclass(repr=False)
class CosineVP(Schedule):
    """Continuous cosine schedule (Nichol & Dhariwal 2021):
    ``alpha(t) = cos((t + s) / (1 + s) * pi / 2) / cos(s / (1 + s) * pi / 2)``, t in [t_min, t_max];
    t_max < 1 keeps alpha > 0 (as in DPM-Solver's ``NoiseScheduleVP('cosine')``).
    """

    s: float = 0.008
    t_eps: float = 1e-4
    t_end: float = 0.9946
    time_scale: float = 1.0
    prediction_type: str = "epsilon"
    shift: float = 1.0
    default_spacing: str = "uniform_lambda"

    def __post_init__(self) -> None:
        self.t_min = self.t_eps * self.time_scale
        self.t_max = self.t_end * self.time_scale
        self._log_alpha_0 = math.log(math.cos(self.s / (1 + self.s) * math.pi / 2))

    def _log_alpha(self, t: Any) -> torch.Tensor:
        t = _t(t) / self.time_scale
        return torch.log(torch.cos((t + self.s) / (1 + self.s) * math.pi / 2)) - self._log_alpha_0

    def alpha(self, t: Any) -> torch.Tensor:
        return torch.exp(self._log_alpha(t))

    def sigma(self, t: Any) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(t)))

    def lam(self, t: Any) -> torch.Tensor:
        la = self._log_alpha(t)
        return la - 0.5 * torch.log(-torch.expm1(2 * la))

    def inverse_lambda(self, lam: Any) -> torch.Tensor:
        lam = _t(lam)
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        t = torch.arccos(torch.exp(log_alpha + self._log_alpha_0)) * 2.0 * (1.0 + self.s) / math.pi - self.s
        return t * self.time_scale


# ------------------------------------------------------------------------------------------------
# Rectified flow
# ------------------------------------------------------------------------------------------------


@dataclass(repr=False)
class RectifiedFlow(Schedule):
    """Rectified flow / flow matching: ``x_t = (1 - t) x0 + t eps``, t in [0, 1].

    model_time = ``time_scale * t`` (diffusers' flow models: 1000 * t). ``shift`` is the static
    inference shift ``t' = s t / (1 + (s - 1) t)`` (SD3: 3.0), i.e. ``lambda' = lambda - log s``.
    With ``use_dynamic_shifting`` the shift comes from the image sequence length (Flux):
    ``mu = base_shift + (max_shift - base_shift) * (L - base_len) / (max_len - base_len)`` and
    ``shift = exp(mu)`` (``time_shift_type='exponential'``) or ``mu`` (``'linear'``).
    """

    time_scale: float = 1000.0
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    prediction_type: str = "flow"
    default_spacing: str = "linspace"

    def __post_init__(self) -> None:
        self.t_min = 0.0
        self.t_max = 1.0 * self.time_scale
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {self.time_shift_type!r}")

    def _repr_fields(self) -> dict[str, Any]:
        return {"time_scale": self.time_scale, "shift": self.shift, "dynamic": self.use_dynamic_shifting}

    def alpha(self, t: Any) -> torch.Tensor:
        return 1.0 - _t(t) / self.time_scale

    def sigma(self, t: Any) -> torch.Tensor:
        return _t(t) / self.time_scale

    def lam(self, t: Any) -> torch.Tensor:
        u = _t(t) / self.time_scale
        return torch.log1p(-u) - torch.log(u)

    def inverse_lambda(self, lam: Any) -> torch.Tensor:
        return torch.sigmoid(-_t(lam)) * self.time_scale

    @property
    def lam_max(self) -> float:
        return math.inf

    def shift_for(self, image_seq_len: int | None = None) -> float:
        if not self.use_dynamic_shifting:
            return self.shift
        if image_seq_len is None:
            raise ValueError(
                "this flow schedule uses dynamic shifting: pass image_seq_len= (latent tokens, e.g. "
                "(H/16)*(W/16) for Flux) or shift= explicitly"
            )
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        mu = self.base_shift + m * (image_seq_len - self.base_image_seq_len)
        return math.exp(mu) if self.time_shift_type == "exponential" else mu


# ------------------------------------------------------------------------------------------------
# VE / EDM
# ------------------------------------------------------------------------------------------------


@dataclass(repr=False)
class EDM(Schedule):
    """Variance-exploding ``x = x0 + sigma * eps`` (Song et al. 2021 VE; Karras et al. 2022 EDM).

    model_time = sigma (the network wrapper applies any ``c_noise`` preconditioning itself).
    EDM denoisers predict x0, hence ``prediction_type='sample'`` by default.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    prediction_type: str = "sample"
    shift: float = 1.0
    default_spacing: str = "karras"

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError("need 0 < sigma_min < sigma_max")
        self.t_min = self.sigma_min
        self.t_max = self.sigma_max

    def _repr_fields(self) -> dict[str, Any]:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def alpha(self, t: Any) -> torch.Tensor:
        return torch.ones_like(_t(t))

    def sigma(self, t: Any) -> torch.Tensor:
        return _t(t).clone()

    def lam(self, t: Any) -> torch.Tensor:
        return -torch.log(_t(t))

    def inverse_lambda(self, lam: Any) -> torch.Tensor:
        return torch.exp(-_t(lam))


VE = EDM
