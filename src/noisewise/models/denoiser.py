"""ModelDenoiser: any network + its prediction type -> ``D(x, level) -> x0_hat``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..core.grid import Level
from .parameterization import check_prediction_type, to_x0

Tensor = torch.Tensor


class NonFiniteError(FloatingPointError):
    """The network returned NaN or Inf."""


def infer_model_dtype(model: Any) -> torch.dtype | None:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


class ModelDenoiser:
    """Wraps ``model(x, model_time, *args, **kwargs) -> raw prediction`` as a data-prediction denoiser.

    - ``model_time`` is a 1-D tensor with one value per sample (float32, or float64 when x is).
    - ``model_dtype``: the dtype the network runs in (inferred from an ``nn.Module``'s parameters);
      the solver keeps working in float32/float64 and only the network input is cast.
    - ``check_finite``: raise :class:`NonFiniteError` when the network returns NaN/Inf. On CPU this
      is checked every call; on accelerators the check is accumulated without synchronising and
      reported by :meth:`raise_if_nonfinite` (called by :func:`noisewise.sample` at the end).
    - ``nfe`` / ``rows`` count calls and batch rows sent through the network.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        prediction_type: str,
        *,
        model_args: tuple[Any, ...] = (),
        model_kwargs: dict[str, Any] | None = None,
        model_dtype: torch.dtype | None = None,
        check_finite: bool = True,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, model_time, ...), got {type(model).__name__}")
        self.model = model
        self.prediction_type = check_prediction_type(prediction_type)
        self.model_args = model_args
        self.model_kwargs = dict(model_kwargs or {})
        self.model_dtype = model_dtype if model_dtype is not None else infer_model_dtype(model)
        self.check_finite = check_finite
        self.nfe = 0
        self.rows = 0
        self._bad: Tensor | None = None

    def raw(self, x: Tensor, model_time: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """One network call; returns the raw prediction in x's dtype."""
        xin = x if self.model_dtype is None or not x.is_floating_point() else x.to(self.model_dtype)
        out = self.model(xin, model_time, *args, **kwargs)
        if hasattr(out, "sample") and not isinstance(out, Tensor):  # diffusers model outputs
            out = out.sample
        elif isinstance(out, tuple):
            out = out[0]
        if not isinstance(out, Tensor):
            raise TypeError(f"model must return a tensor, got {type(out).__name__}")
        if out.shape != x.shape:
            raise ValueError(
                f"model output shape {tuple(out.shape)} does not match its input {tuple(x.shape)}; a denoiser "
                "must predict one value per input value (check channels and prediction_type)"
            )
        self.nfe += 1
        self.rows += x.shape[0]
        out = out.to(x.dtype)
        if self.check_finite:
            self._check(out)
        return out

    def _check(self, out: Tensor) -> None:
        # One reduction: NaN and Inf propagate through a sum (a finite output whose sum overflows
        # would be reported too, and is as unusable).
        total = out.sum()
        if out.device.type == "cpu":
            if not math.isfinite(float(total)):
                raise NonFiniteError(
                    f"the model returned NaN/Inf at call {self.nfe}; check the model, its dtype (fp16 overflow?) "
                    "and its inputs"
                )
        else:
            bad = ~torch.isfinite(total)
            self._bad = bad if self._bad is None else (self._bad | bad)

    def raise_if_nonfinite(self) -> None:
        if self._bad is not None and bool(self._bad):
            raise NonFiniteError("the model returned NaN/Inf during sampling; check the model and its dtype")

    def model_time(self, x: Tensor, level: Level) -> Tensor:
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        return torch.full((x.shape[0],), level.model_time, dtype=dt, device=x.device)

    def __call__(self, x: Tensor, level: Level) -> Tensor:
        pred = self.raw(x, self.model_time(x, level), *self.model_args, **self.model_kwargs)
        return to_x0(pred, x, level.alpha, level.sigma, self.prediction_type)
