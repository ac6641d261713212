"""Exact classifier-free guidance on a class-conditional Gaussian mixture (tests and benchmarks).

For :class:`noisewise.gmm.GaussianMixture` with ``component_class``, the conditional and
unconditional posterior means are closed-form, so the guided denoiser
``D_w = D_g + w (D_c - D_g)`` and the solution of its probability-flow ODE are known to ~1e-10:
the ground truth every guided sampler is measured against.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core.grid import Level
from ..gmm import GaussianMixture

Tensor = torch.Tensor
_F64 = torch.float64


def _w(w: Any, n: int) -> Tensor:
    return torch.as_tensor(w, dtype=_F64).reshape(-1, 1).expand(n, 1)


def guided_posterior_mean(
    gmm: GaussianMixture, x: Tensor, alpha: float, sigma: float, cls: Tensor, guide_cls: Tensor, w: Any
) -> Tensor:
    """``D_g + w (D_c - D_g)`` with ``D_c`` conditioned on ``cls`` and ``D_g`` on ``guide_cls``
    (-1 = unconditional); ``w`` a number or one per sample."""
    c = gmm.posterior_mean(x, alpha, sigma, cls)
    g = gmm.posterior_mean(x, alpha, sigma, guide_cls)
    return g + _w(w, x.shape[0]).to(x.dtype) * (c - g)


def guided_ode_solution(
    gmm: GaussianMixture,
    x: Tensor,
    start: Level,
    end: Level,
    cls: Tensor,
    guide_cls: Tensor,
    w: Any,
    rtol: float = 1e-10,
    atol: float = 1e-11,
) -> Tensor:
    """Solve the guided probability-flow ODE from ``x`` at ``start`` to ``end`` (sigma = 0 allowed)
    with DOP853, in the two coordinate systems of :meth:`GaussianMixture.ode_solution`."""
    from scipy.integrate import solve_ivp

    xs = x.reshape(x.shape[0], -1).to(_F64)
    B, D = xs.shape
    wb = _w(w, B)
    u0 = start.alpha / start.sigma
    u1 = math.inf if end.sigma == 0 else end.alpha / end.sigma
    if not u1 > u0:
        raise ValueError("end must be cleaner than start")
    z = xs / start.sigma
    u_mid = min(u1, 1.0)
    if u0 < u_mid:

        def f1(u: float, zf: Any) -> Any:
            zt = torch.from_numpy(zf).reshape(B, D)
            c = gmm.posterior_mean(zt, u, 1.0, cls)
            g = gmm.posterior_mean(zt, u, 1.0, guide_cls)
            return (g + wb * (c - g)).reshape(-1).numpy()

        sol = solve_ivp(f1, (u0, u_mid), z.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"ODE integration failed: {sol.message}")
        z = torch.from_numpy(sol.y[:, -1]).reshape(B, D)
        u0 = u_mid
    if u1 <= 1.0:
        return (z * end.sigma).reshape(x.shape)
    y = z / u0
    s0, s1 = 1.0 / u0, (0.0 if math.isinf(u1) else 1.0 / u1)

    def f2(s: float, yf: Any) -> Any:
        yt = torch.from_numpy(yf).reshape(B, D)
        vc = gmm._ve_velocity(yt, s, cls)
        vg = gmm._ve_velocity(yt, s, guide_cls)
        return (vg + wb * (vc - vg)).reshape(-1).numpy()

    sol = solve_ivp(f2, (s0, s1), y.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"ODE integration failed: {sol.message}")
    y = torch.from_numpy(sol.y[:, -1]).reshape(B, D)
    return (y * end.alpha).reshape(x.shape)


def class_of(gmm: GaussianMixture, x: Tensor) -> Tensor:
    """The class of each sample's most likely component (at the data level, sigma = 0)."""
    if gmm.component_class is None:
        raise ValueError("this mixture has no classes")
    xs = x.reshape(x.shape[0], -1).to(_F64)
    var = gmm.stds**2
    logp = -0.5 * (((xs[:, None, :] - gmm.means[None]) ** 2) / var[None]).sum(-1) - 0.5 * torch.log(var).sum(-1)[None]
    comp = (torch.log(gmm.weights)[None] + logp).argmax(1)
    return gmm.component_class[comp]
