"""Structured pruning of a diffusers ``UNet2DConditionModel``, chosen by measured importance.

Units:

- ``head``: one attention head of a transformer block's self- (``attn1``) or cross-attention
  (``attn2``). Pruning shrinks ``to_q``/``to_k``/``to_v`` (rows) and ``to_out[0]`` (columns) and
  lowers ``heads``, so the pruned network does less work; an attention left with no head becomes
  its output bias (what the removed heads leave behind).
- ``transformer``: a whole ``Transformer2DModel`` (norm, projections, attention, feed-forward) of a
  down, mid or up block. It is residual (``output = input + f(input)``), so removing it is the
  identity.

Importance of a unit = how much removing it alone changes the network on a calibration batch:
``metric="x0"`` (default): mean squared change of the denoised estimate the sampler uses (the
prediction's change weighted per row by ``(sigma/alpha)^2`` for epsilon, ``sigma^2`` for flow), so
the high-noise levels where the layout is decided count fully; ``metric="output"``: the plain
prediction's change; ``metric="loss"``: increase of the denoising loss against the training target.
On the shipped models x0 chose far better heads than output (docs/benchmarks/prune_cache.md).
Removal during measurement is exact masking (the head's ``to_out`` input columns zeroed, the
transformer bypassed); :func:`prune_unet` then removes the least important units, and
:func:`greedy_select` re-measures in rounds.

    calib = calibration_batch(pipe, n=32)
    scores = measure_importance(pipe.unet, prunable_units(pipe.unet), calib)
    small = prune_unet(pipe.unet, select_units(scores, heads=0.25))
    pipe(prompts, model=model_fn_for(small))
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

Tensor = torch.Tensor
Kind = Literal["head", "transformer"]


@dataclass(frozen=True, order=True)
class Unit:
    """A prunable unit: ``kind`` ``'head'`` (``path`` = the ``Attention`` module, ``head`` its index in
    the *original* model) or ``'transformer'`` (``path`` = the ``Transformer2DModel``)."""

    kind: str
    path: str
    head: int = -1

    def __str__(self) -> str:
        return f"{self.path}[head {self.head}]" if self.kind == "head" else self.path


@dataclass
class Calibration:
    """Network inputs ``x``, ``t`` (model time), ``cond`` and the training ``target`` for each row;
    ``x0_weight``: per row, the factor from a squared change of the prediction to the squared change
    of the denoised estimate ``x0`` the sampler uses (``(sigma / alpha)^2`` for epsilon prediction,
    ``sigma^2`` for flow and v, 1 for sample); ones when not given."""

    x: Tensor
    t: Tensor
    cond: Tensor
    target: Tensor
    x0_weight: Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]


class _SkippedTransformer(nn.Module):
    """Stands in for a removed ``Transformer2DModel``: the identity (the block is residual)."""

    def forward(self, hidden_states: Tensor, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        return (hidden_states,) if not return_dict else _Out(hidden_states)


@dataclass
class _Out:
    sample: Tensor


class _HeadlessAttention(nn.Module):
    """Stands in for an attention with every head removed: its output projection's bias."""

    def __init__(self, bias: Tensor | None, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        shape = (*hidden_states.shape[:-1], self.out_dim)
        if self.bias is None:
            return hidden_states.new_zeros(shape)
        return self.bias.to(hidden_states.dtype).expand(shape)


def _attention_modules(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """Self- and cross-attentions of the transformer blocks, in module order."""
    out = []
    for name, mod in unet.named_modules():
        if type(mod).__name__ == "BasicTransformerBlock":
            for a in ("attn1", "attn2"):
                att = getattr(mod, a, None)
                if att is not None and type(att).__name__ == "Attention":
                    out.append((f"{name}.{a}", att))
    return out


def _transformers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in unet.named_modules() if type(m).__name__ == "Transformer2DModel"]


def prunable_units(unet: nn.Module, kinds: Iterable[str] = ("head", "transformer")) -> list[Unit]:
    """Every head of every transformer attention and every transformer of the UNet."""
    kinds = tuple(kinds)
    bad = set(kinds) - {"head", "transformer"}
    if bad:
        raise ValueError(f"unknown unit kinds {sorted(bad)}; known: 'head', 'transformer'")
    units: list[Unit] = []
    if "head" in kinds:
        for name, att in _attention_modules(unet):
            units += [Unit("head", name, h) for h in range(int(att.heads))]
    if "transformer" in kinds:
        units += [Unit("transformer", name) for name, _ in _transformers(unet)]
    if not units:
        raise ValueError("this network has no transformer blocks to prune (a diffusers UNet2DConditionModel has)")
    return units


# -- calibration --------------------------------------------------------------------------------


def calibration_batch(
    pipe: Any, n: int = 64, *, seed: int = 31_337, uncond_fraction: float = 0.5,
) -> Calibration:
    """``n`` rows from shapes renders (a dataset seed disjoint from training and the benchmark
    prompts): VAE-encoded latents noised at model times spread evenly over the schedule's range,
    conditioned on their caption, or on the pipeline's negative prompt for ``uncond_fraction`` of the
    rows (the unconditional branch of guidance runs through the same network)."""
    from ..shapes import build_dataset

    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    data = build_dataset(n, seed=seed, n_captions=1, clean=True)
    z0 = pipe.codec.encode(data.images).to(pipe.device)
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(z0.shape, generator=g).to(z0.device)
    sched = pipe.schedule
    lo, hi = float(sched.t_min), float(sched.t_max)
    u = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=g, dtype=torch.float64)) / n
    t = lo + (hi - lo) * u[torch.randperm(n, generator=g)]
    if getattr(sched, "discrete", False):
        t = t.floor().clamp(lo, hi)
    else:  # keep away from the exact ends (alpha or sigma = 0)
        t = t.clamp(lo + 1e-3 * (hi - lo), hi - 1e-3 * (hi - lo))
    a = sched.alpha(t).float().view(-1, 1, 1, 1).to(z0.device)
    s = sched.sigma(t).float().view(-1, 1, 1, 1).to(z0.device)
    x = a * z0 + s * eps
    pt = sched.prediction_type
    targets = {"epsilon": eps, "flow": eps - z0, "v_prediction": a * eps - s * z0, "sample": z0}
    if pt not in targets:
        raise ValueError(f"unsupported prediction_type {pt!r}")
    prompts = [c[0] for c in data.captions]
    k = int(round(uncond_fraction * n))
    neg = pipe.defaults.get("negative_prompt", "") or ""
    uncond_rows = torch.randperm(n, generator=g)[:k].tolist()
    for i in uncond_rows:
        prompts[i] = neg
    cond = pipe.encode_prompt(prompts)
    w = {"epsilon": (s / a) ** 2, "flow": s**2, "v_prediction": s**2, "sample": torch.ones_like(s)}[pt]
    return Calibration(x.float(), t.float().to(z0.device), cond.float(), targets[pt].float(), w.reshape(-1).float())


# -- measurement --------------------------------------------------------------------------------


def _module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


@contextmanager
def removed(unet: nn.Module, units: Sequence[Unit]):
    """Within the block the given units of ``unet`` are removed by masking (exact: a head's output
    columns are zeroed before ``to_out``, a transformer is bypassed); nothing is changed after."""
    handles = []
    heads: dict[str, list[int]] = {}
    for u in units:
        if u.kind == "head":
            heads.setdefault(u.path, []).append(u.head)
        elif u.kind == "transformer":
            handles.append(_module(unet, u.path).register_forward_hook(_bypass, with_kwargs=True))
        else:
            raise ValueError(f"unknown unit kind {u.kind!r}")
    for path, hs in heads.items():
        att = _module(unet, path)
        if not hasattr(att, "to_out"):
            raise ValueError(f"{path} is not an attention with heads (already pruned?)")
        inner = att.to_out[0].in_features
        d = inner // int(att.heads)
        mask = torch.ones(inner)
        for h in hs:
            if not 0 <= h < att.heads:
                raise ValueError(f"{path} has {att.heads} heads, no head {h}")
            mask[h * d:(h + 1) * d] = 0.0
        handles.append(att.to_out[0].register_forward_pre_hook(_masker(mask)))
    try:
        yield unet
    finally:
        for h in handles:
            h.remove()


def _masker(mask: Tensor) -> Callable[..., Any]:
    def hook(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        return (x * mask.to(x.device, x.dtype),) + tuple(args[1:])

    return hook


def _bypass(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    h = args[0] if args else kwargs["hidden_states"]
    return (h,) if isinstance(out, tuple) else type(out)(sample=h)


def _predict(unet: nn.Module, calib: Calibration, batch: int) -> Tensor:
    dt = next(unet.parameters()).dtype
    outs = []
    with torch.no_grad():
        for i in range(0, len(calib), batch):
            sl = slice(i, i + batch)
            outs.append(unet(calib.x[sl].to(dt), calib.t[sl], encoder_hidden_states=calib.cond[sl].to(dt))
                        .sample.float())
    return torch.cat(outs)


def measure_importance(
    unet: nn.Module, units: Sequence[Unit], calib: Calibration, *,
    metric: Literal["output", "x0", "loss"] = "x0", batch: int = 64, given: Sequence[Unit] = (),
    progress: Callable[[int, int], Any] | None = None,
) -> list[tuple[Unit, float]]:
    """Importance of each unit removed alone (on top of the units ``given`` as removed already),
    least important first.

    ``output``: ``mean((f_without - f)^2) / mean(f^2)``; ``x0``: the same change carried to the
    denoised estimate (``calib.x0_weight`` per row, so errors at high noise, where the image layout is
    decided, weigh more), relative to ``mean(x0_weight * f^2)``; ``loss``: ``mean((f_without - y)^2) -
    mean((f - y)^2)`` with ``y`` the training target (may be negative: removing the unit helps)."""
    if metric not in ("output", "x0", "loss"):
        raise ValueError(f"metric must be 'output', 'x0' or 'loss', got {metric!r}")
    w = torch.ones(len(calib)) if metric != "x0" or calib.x0_weight is None else calib.x0_weight
    w = w.reshape(-1, *([1] * (calib.x.ndim - 1))).to(calib.x.device)
    with removed(unet, given):
        base = _predict(unet, calib, batch)
    ref = (w * base.pow(2)).mean()
    base_loss = (base - calib.target).pow(2).mean()
    scores = []
    for i, u in enumerate(units):
        with removed(unet, [*given, u]):
            out = _predict(unet, calib, batch)
        if metric == "loss":
            s = float((out - calib.target).pow(2).mean() - base_loss)
        else:
            s = float((w * (out - base).pow(2)).mean() / ref)
        scores.append((u, s))
        if progress is not None:
            progress(i + 1, len(units))
    return sorted(scores, key=lambda us: (us[1], us[0]))


def greedy_select(
    unet: nn.Module, calib: Calibration, *, heads: int = 0, transformers: int = 0, rounds: int = 4,
    metric: Literal["output", "x0", "loss"] = "x0", batch: int = 64,
) -> list[Unit]:
    """Choose ``heads`` heads and ``transformers`` transformers to remove in ``rounds`` rounds: each
    round re-measures the remaining units on the model with the earlier choices removed and takes the
    least important share, so that units that stand in for each other are not all removed on the
    strength of each one alone (costs ``rounds`` times :func:`measure_importance`)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    chosen: list[Unit] = []
    want = {"head": int(heads), "transformer": int(transformers)}
    for r in range(rounds):
        gone_t = tuple(u.path + "." for u in chosen if u.kind == "transformer")
        left = [u for u in prunable_units(unet) if u not in chosen and not u.path.startswith(gone_t)]
        left = [u for u in left if want[u.kind] > 0]
        if not left:
            break
        scores = measure_importance(unet, left, calib, metric=metric, batch=batch, given=chosen)
        for kind in ("transformer", "head"):
            have = sum(u.kind == kind for u in chosen)
            take = -(-(want[kind] - have) // (rounds - r))  # ceil: the remaining share of this round
            picks = [u for u, _ in scores if u.kind == kind]
            if kind == "head":
                gone_t = tuple(u.path + "." for u in chosen if u.kind == "transformer")
                picks = [u for u in picks if not u.path.startswith(gone_t)]
            chosen += picks[:max(0, take)]
    return chosen


def select_units(
    scores: Sequence[tuple[Unit, float]], *, heads: int | float = 0, transformers: int | float = 0,
) -> list[Unit]:
    """The least important ``heads`` heads and ``transformers`` transformers (an int: a count; a float
    in [0, 1): a fraction of those measured). Heads inside a selected transformer are not counted."""
    def count(v: int | float, total: int, what: str) -> int:
        if isinstance(v, bool) or v < 0:
            raise ValueError(f"{what} must be >= 0, got {v!r}")
        if isinstance(v, float) and v < 1:
            return int(round(v * total))
        if int(v) != v or v > total:
            raise ValueError(f"{what}={v!r}: give a count from 0 to {total} or a fraction below 1")
        return int(v)

    hs = [u for u, _ in scores if u.kind == "head"]
    ts = [u for u, _ in scores if u.kind == "transformer"]
    chosen_t = ts[: count(transformers, len(ts), "transformers")]
    gone = tuple(t.path + "." for t in chosen_t)
    live_heads = [u for u in hs if not u.path.startswith(gone)]
    return chosen_t + live_heads[: count(heads, len(hs), "heads")]


# -- the surgery --------------------------------------------------------------------------------


def _shrink_attention(att: nn.Module, drop: Iterable[int]) -> nn.Module:
    heads = int(att.heads)
    drop = sorted(set(drop))
    keep = [h for h in range(heads) if h not in drop]
    out_lin = att.to_out[0]
    if not keep:
        return _HeadlessAttention(out_lin.bias, out_lin.out_features)
    d = out_lin.in_features // heads
    idx = torch.cat([torch.arange(h * d, (h + 1) * d) for h in keep]).to(out_lin.weight.device)

    def rows(lin: nn.Linear) -> nn.Linear:
        new = nn.Linear(lin.in_features, len(idx), bias=lin.bias is not None, device=lin.weight.device,
                        dtype=lin.weight.dtype)
        new.weight.data.copy_(lin.weight.data[idx])
        if lin.bias is not None:
            new.bias.data.copy_(lin.bias.data[idx])
        return new.requires_grad_(lin.weight.requires_grad)

    att.to_q, att.to_k, att.to_v = rows(att.to_q), rows(att.to_k), rows(att.to_v)
    new_out = nn.Linear(len(idx), out_lin.out_features, bias=out_lin.bias is not None, device=out_lin.weight.device,
                        dtype=out_lin.weight.dtype)
    new_out.weight.data.copy_(out_lin.weight.data[:, idx])
    if out_lin.bias is not None:
        new_out.bias.data.copy_(out_lin.bias.data)
    att.to_out[0] = new_out.requires_grad_(out_lin.weight.requires_grad)
    att.heads = len(keep)
    att.inner_dim = len(idx)
    if hasattr(att, "inner_kv_dim"):
        att.inner_kv_dim = len(idx)
    return att


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    p = root.get_submodule(parent) if parent else root
    if isinstance(p, (nn.ModuleList, nn.Sequential)):
        p[int(name)] = new
    else:
        setattr(p, name, new)


def prune_unet(unet: nn.Module, units: Sequence[Unit], *, inplace: bool = False) -> nn.Module:
    """A copy of ``unet`` (or ``unet`` itself) with ``units`` physically removed: smaller Linear
    layers for heads, the identity for transformers. Head indices refer to the unpruned model."""
    net = unet if inplace else copy.deepcopy(unet)
    gone = [u.path for u in units if u.kind == "transformer"]
    heads: dict[str, list[int]] = {}
    for u in units:
        if u.kind == "head":
            if any(u.path.startswith(g + ".") for g in gone):
                continue
            heads.setdefault(u.path, []).append(u.head)
        elif u.kind != "transformer":
            raise ValueError(f"unknown unit kind {u.kind!r}")
    for path, hs in heads.items():
        att = _module(net, path)
        if type(att).__name__ != "Attention":
            raise ValueError(f"{path} is not a diffusers Attention (pruned already?); prune from the original model")
        if getattr(att, "residual_connection", False) or getattr(att, "rescale_output_factor", 1.0) != 1.0:
            raise ValueError(f"{path}: head pruning supports attentions without residual/rescale (transformer blocks)")
        for h in hs:
            if not 0 <= h < att.heads:
                raise ValueError(f"{path} has {att.heads} heads, no head {h}")
        _set_module(net, path, _shrink_attention(att, hs))
    for path in gone:
        _module(net, path)  # a clear error for a bad path
        _set_module(net, path, _SkippedTransformer())
    return net


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_fn_for(unet: nn.Module) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``model(x, t, cond)`` for a (pruned) UNet, for ``Pipeline.__call__(..., model=...)``."""
    dt = next(unet.parameters()).dtype

    def model(x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return unet(x.to(dt), t, encoder_hidden_states=cond.to(dt)).sample

    return model


# -- saving and loading a pruned UNet ---------------------------------------------------------------
PRUNING_FILE = "pruning.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def is_pruned(folder: Any) -> bool:
    """Whether a ``unet/`` folder holds a pruned UNet written by :func:`save_pruned`."""
    from pathlib import Path

    return (Path(folder) / PRUNING_FILE).is_file()


def save_pruned(unet: nn.Module, units: Sequence[Unit], folder: Any) -> None:
    """Write a pruned UNet (``prune_unet(original, units)``) to ``folder`` as a diffusers-style
    component: ``config.json`` (the original architecture), ``pruning.json`` (the removed units) and
    ``diffusion_pytorch_model.safetensors`` (the pruned weights). Put it in a model folder's
    ``unet/`` and ``Pipeline.from_pretrained`` loads the pruned network (:func:`load_pruned`).
    Refuses a folder holding other weight files, which a loader could pick up instead."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    if not hasattr(unet, "save_config"):
        raise TypeError("save_pruned needs the pruned diffusers UNet2DConditionModel (from prune_unet)")
    units = sorted(set(units))
    if not units:
        raise ValueError("no units removed: save the unpruned model with unet.save_pretrained(folder) instead")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    other = sorted(p.name for p in folder.iterdir()
                   if p.name != WEIGHTS_FILE and p.suffix in (".safetensors", ".bin", ".pt", ".ckpt"))
    if other:
        raise ValueError(f"{folder} already holds other weights ({', '.join(other)}); save into an empty folder "
                         "(or the unet/ folder of a copied model, with those files moved away)")
    state = {k: v.detach().contiguous().cpu() for k, v in unet.state_dict().items()}
    unet.save_config(str(folder))
    plan = {"format": "noisewise-pruned-unet", "version": 1,
            "units": [{"kind": u.kind, "path": u.path, "head": u.head} for u in units]}
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(folder / WEIGHTS_FILE)
    (folder / PRUNING_FILE).write_text(json.dumps(plan, indent=1) + "\n")


def load_pruned(folder: Any, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """The pruned UNet :func:`save_pruned` wrote: the original architecture from ``config.json``,
    the same units removed, then the saved weights (every tensor must match: a clear error otherwise)."""
    import json
    from pathlib import Path

    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    folder = Path(folder)
    plan = json.loads((folder / PRUNING_FILE).read_text())
    if plan.get("format") != "noisewise-pruned-unet" or plan.get("version") != 1:
        raise ValueError(f"{folder / PRUNING_FILE} is not a pruning plan this noisewise reads "
                         f"(format {plan.get('format')!r}, version {plan.get('version')!r})")
    units = [Unit(str(u["kind"]), str(u["path"]), int(u.get("head", -1))) for u in plan["units"]]
    with torch.device("meta"):
        net = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder)))
    net = prune_unet(net, units, inplace=True)
    state = load_file(str(folder / WEIGHTS_FILE))
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{folder}: the saved weights do not fit the pruned architecture ({e})") from None
    if any(t.is_meta for t in (*net.parameters(), *net.buffers())):
        raise ValueError(f"{folder}: the saved weights leave part of the pruned UNet unset")
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)
