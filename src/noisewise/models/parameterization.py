"""Prediction types <-> data prediction ``x0_hat``.

For ``x = alpha * x0 + sigma * eps`` (any schedule):

- ``epsilon``:      ``x0 = (x - sigma * eps) / alpha``                (undefined at alpha = 0)
- ``v_prediction``: ``v = alpha * eps - sigma * x0``  =>  ``x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)``
- ``sample``:       the network predicts x0 itself
- ``flow``:         the rectified-flow velocity ``u = eps - x0``  =>  ``x0 = (x - sigma u) / (alpha + sigma)``
  (on a flow schedule ``alpha + sigma = 1``: ``x0 = x - t u``)

This is the only place in noisewise that knows about prediction types; solvers see x0 only.
"""

from __future__ import annotations

import torch

from ..core.schedules import PREDICTION_TYPES

Tensor = torch.Tensor


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        aliases = {"eps": "epsilon", "v": "v_prediction", "x0": "sample", "velocity": "flow", "flow_prediction": "flow"}
        hint = f"; did you mean {aliases[prediction_type]!r}?" if prediction_type in aliases else ""
        raise ValueError(f"unknown prediction_type {prediction_type!r}{hint} Known: {', '.join(PREDICTION_TYPES)}")
    return prediction_type


def to_x0(pred: Tensor, x: Tensor, alpha: float, sigma: float, prediction_type: str) -> Tensor:
    """Data prediction from the network's raw output."""
    if prediction_type == "epsilon":
        if alpha == 0.0:
            raise ValueError(
                "an epsilon-prediction model cannot predict x0 where alpha = 0 (pure noise, e.g. zero-terminal-SNR "
                "t = T-1): start below that level (spacing 'leading'/'linspace', or a sigma spacing) or use a "
                "v_prediction model"
            )
        return torch.add(x, pred, alpha=-sigma).mul_(1.0 / alpha)
    if prediction_type == "v_prediction":
        n = alpha * alpha + sigma * sigma
        return torch.add(x * (alpha / n), pred, alpha=-sigma / n)
    if prediction_type == "sample":
        return pred
    if prediction_type == "flow":
        return torch.add(x, pred, alpha=-sigma).mul_(1.0 / (alpha + sigma))
    raise ValueError(check_prediction_type(prediction_type))


def from_x0(x0: Tensor, x: Tensor, alpha: float, sigma: float, prediction_type: str) -> Tensor:
    """The raw prediction a network of ``prediction_type`` would output for data prediction ``x0``
    (inverse of :func:`to_x0`; eps needs sigma > 0)."""
    if prediction_type == "sample":
        return x0
    eps = (x - alpha * x0) / sigma
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "flow":
        return eps - x0
    raise ValueError(check_prediction_type(prediction_type))


def x0_to_eps(x0: Tensor, x: Tensor, alpha: float, sigma: float) -> Tensor:
    return (x - alpha * x0) / sigma
