"""Differentiable Siamese Augmentation (DSA), single-group ('S') mode as in MTT.

Each ``dsa`` call draws ONE augmentation group of the strategy uniformly and
applies it to the whole batch with independent per-sample parameters.  All
ops are differentiable w.r.t. the images (the synthetic data is learned
through them) and vectorised over the batch.

Reproducibility: every random number is drawn from a CPU ``torch.Generator``
(torch's default CPU generator when none is given) as float32 / int64 CPU
tensors, and only then moved to the images' device and dtype.  Two calls with
identically seeded generators therefore apply exactly the same augmentation,
on CPU and on GPU alike -- this is what lets a caller replay an augmentation.

A call is two halves: ``draw`` (all of a call's random numbers, on the CPU, a
``Draw``) and ``apply_draw`` (the differentiable op on the images' device).
The unroll draws all its steps' augmentations up front and moves them, with the
steps' index batches, in one copy (``to_device``): on CUDA one pinned,
non-blocking transfer per iteration instead of a blocking one per op.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass
class DSAParams:
    """Magnitudes of the DSA ops (defaults = DSA / MTT ParamDiffAug)."""
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


# --------------------------------------------------------------------------
# Draws: every random number of one call, on the CPU, from the given generator
# --------------------------------------------------------------------------


@dataclass
class Draw:
    """One DSA call's randomness: the op and its per-sample numbers (CPU until to_device moves them)."""
    op: str | None
    values: dict[str, Tensor] = field(default_factory=dict)


def _rand(n: int, generator: torch.Generator | None) -> Tensor:
    """n uniforms in [0, 1), float32 on the CPU."""
    return torch.rand(n, generator=generator, dtype=torch.float32)


def _randint(low: int, high: int, n: int, generator: torch.Generator | None) -> Tensor:
    """n integers in [low, high), int64 on the CPU."""
    return torch.randint(low, high, (n,), generator=generator)


def _draw_color(b, h, w, params, generator):  # brightness, saturation, contrast: in this order
    return {'brightness': _rand(b, generator), 'saturation': _rand(b, generator), 'contrast': _rand(b, generator)}


def _draw_crop(b, h, w, params, generator):
    sh, sw = int(h * params.ratio_crop_pad + 0.5), int(w * params.ratio_crop_pad + 0.5)
    return {'th': _randint(-sh, sh + 1, b, generator), 'tw': _randint(-sw, sw + 1, b, generator)}


def _draw_cutout(b, h, w, params, generator):
    ch, cw = int(h * params.ratio_cutout + 0.5), int(w * params.ratio_cutout + 0.5)
    # Centre range as in DSA: the square may hang over the border.
    return {'oh': _randint(0, h + (1 - ch % 2), b, generator), 'ow': _randint(0, w + (1 - cw % 2), b, generator)}


def _draw_flip(b, h, w, params, generator):
    return {'r': _rand(b, generator)}


def _draw_scale(b, h, w, params, generator):
    ratio = params.ratio_scale
    sx = torch.rand(b, generator=generator) * (ratio - 1.0 / ratio) + 1.0 / ratio
    sy = torch.rand(b, generator=generator) * (ratio - 1.0 / ratio) + 1.0 / ratio
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = sx, sy
    return {'theta': theta}


def _draw_rotate(b, h, w, params, generator):
    ang = (torch.rand(b, generator=generator) - 0.5) * 2 * params.ratio_rotate / 180 * math.pi
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    return {'theta': theta}


# --------------------------------------------------------------------------
# Applying a draw: differentiable in x, on x's device
# --------------------------------------------------------------------------


def _per_sample(r: Tensor, x: Tensor) -> Tensor:
    return r.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _brightness(x: Tensor, r: Tensor, params: DSAParams) -> Tensor:
    return x + (_per_sample(r, x) - 0.5) * params.brightness


def _saturation(x: Tensor, r: Tensor, params: DSAParams) -> Tensor:
    # Scale the deviation from the per-pixel channel mean (no-op for 1 channel).
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_per_sample(r, x) * params.saturation) + mean


def _contrast(x: Tensor, r: Tensor, params: DSAParams) -> Tensor:
    # Scale the deviation from the per-image mean.
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_per_sample(r, x) + params.contrast) + mean


def _apply_color(x, v, params):
    x = _brightness(x, v['brightness'], params)
    x = _saturation(x, v['saturation'], params)
    return _contrast(x, v['contrast'], params)


def _apply_crop(x, v, params):
    """Translate each image by up to ratio_crop_pad * size pixels, zero fill."""
    b, c, h, w = x.shape
    sh, sw = int(h * params.ratio_crop_pad + 0.5), int(w * params.ratio_crop_pad + 0.5)
    th, tw = v['th'].to(x.device), v['tw'].to(x.device)
    # Pad by the maximum shift, then gather the shifted window (rows, then cols).
    xp = F.pad(x, [sw, sw, sh, sh])
    rows = torch.arange(h, device=x.device).view(1, h) + sh + th.view(b, 1)
    cols = torch.arange(w, device=x.device).view(1, w) + sw + tw.view(b, 1)
    out = xp.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, xp.shape[3]))
    return out.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


def cutout_mask(oh: Tensor, ow: Tensor, h: int, w: int, params: DSAParams) -> Tensor:
    """[b, 1, h, w] float mask with a (clipped) zero square per image centred at (oh, ow), on oh's device."""
    b = oh.shape[0]
    ch, cw = int(h * params.ratio_cutout + 0.5), int(w * params.ratio_cutout + 0.5)
    top, left = (oh - ch // 2).view(b, 1), (ow - cw // 2).view(b, 1)
    r, c = torch.arange(h, device=oh.device).view(1, h), torch.arange(w, device=oh.device).view(1, w)
    in_r = (r >= top) & (r < top + ch)            # [b, h]
    in_c = (c >= left) & (c < left + cw)          # [b, w]
    hole = in_r.view(b, h, 1) & in_c.view(b, 1, w)
    return (~hole).float().view(b, 1, h, w)


def _apply_cutout(x, v, params):
    _, _, h, w = x.shape
    mask = cutout_mask(v['oh'].to(x.device), v['ow'].to(x.device), h, w, params)
    return x * mask.to(dtype=x.dtype)


def _apply_flip(x, v, params):
    return torch.where(_per_sample(v['r'], x) < params.prob_flip, x.flip(3), x)


def _warp(x: Tensor, theta: Tensor) -> Tensor:
    """Resample x with per-sample 2x3 affine matrices (zero padding)."""
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _apply_warp(x, v, params):
    return _warp(x, v['theta'])


_DRAW = {"color": _draw_color, "crop": _draw_crop, "cutout": _draw_cutout, "flip": _draw_flip,
         "scale": _draw_scale, "rotate": _draw_rotate}
_APPLY = {"color": _apply_color, "crop": _apply_crop, "cutout": _apply_cutout, "flip": _apply_flip,
          "scale": _apply_warp, "rotate": _apply_warp}
_OP_FNS = _DRAW  # the op names (parse_strategy checks against these)


# --------------------------------------------------------------------------
# One colour component alone (for tests and for composing by hand)
# --------------------------------------------------------------------------


def rand_brightness(x: Tensor, params: DSAParams, generator) -> Tensor:
    return _brightness(x, _rand(x.shape[0], generator), params)


def rand_saturation(x: Tensor, params: DSAParams, generator) -> Tensor:
    return _saturation(x, _rand(x.shape[0], generator), params)


def rand_contrast(x: Tensor, params: DSAParams, generator) -> Tensor:
    return _contrast(x, _rand(x.shape[0], generator), params)


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def _check_op(op: str) -> None:
    if op not in _DRAW:
        raise ValueError(f"unknown DSA op {op!r}; expected one of {OPS}")


def draw_op(op: str, shape, params: DSAParams, generator: torch.Generator | None) -> Draw:
    """The random numbers of `op` on a batch of `shape` [B, C, H, W] (CPU tensors)."""
    _check_op(op)
    if len(shape) != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(shape)}")
    b, _, h, w = shape
    return Draw(op, _DRAW[op](b, h, w, params, generator))


def apply_draw(x: Tensor, d: Draw, params: DSAParams | None = None) -> Tensor:
    """The augmentation `d` on x (identity when d.op is None); its numbers may live on any device."""
    if d.op is None:
        return x
    if x.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
    return _APPLY[d.op](x, d.values, params if params is not None else DSAParams()).contiguous()


def apply_op(x: Tensor, op: str, params: DSAParams,
             generator: torch.Generator | None) -> Tensor:
    """Apply one augmentation group to the whole batch (per-sample params)."""
    _check_op(op)
    d = draw_op(op, x.shape, params, generator)
    return apply_draw(x, to_device([d], x.device)[0][0], params)


def parse_strategy(strategy: str) -> list[str]:
    """'color_crop' -> ['color', 'crop']; '' / 'none' -> []."""
    if strategy in ("", "none", "None"):
        return []
    ops = strategy.split("_")
    bad = [op for op in ops if op not in _OP_FNS]
    if bad:
        raise ValueError(f"unknown DSA op(s) {bad} in strategy {strategy!r}; "
                         f"expected '_'-joined names from {OPS}")
    return ops


def draw_group(strategy: str, generator: torch.Generator | None) -> str | None:
    """Uniformly draw one group of the strategy (None for an empty strategy)."""
    ops = parse_strategy(strategy)
    if not ops:
        return None
    return ops[int(_randint(0, len(ops), 1, generator))]


def draw(shape, strategy: str = DSA_STRATEGY, params: DSAParams | None = None,
         generator: torch.Generator | None = None) -> Draw:
    """Every random number of one dsa call on a batch of `shape`, in dsa's order: the group, then its op's."""
    op = draw_group(strategy, generator)
    return Draw(None) if op is None else draw_op(op, shape, params if params is not None else DSAParams(), generator)


def dsa(x: Tensor, strategy: str = DSA_STRATEGY, params: DSAParams | None = None,
        generator: torch.Generator | None = None) -> Tensor:
    """DSA 'S' mode: one randomly drawn group applied to the whole batch (one host-to-device copy)."""
    d = draw(x.shape, strategy, params, generator)
    return apply_draw(x, to_device([d], x.device)[0][0], params)


# --------------------------------------------------------------------------
# Moving many draws (and other small CPU tensors) to a device in one copy
# --------------------------------------------------------------------------

_ALIGN = 8  # bytes: every packed tensor starts where any dtype can view it


def to_device_tensors(tensors: list[Tensor], device: torch.device) -> list[Tensor]:
    """The CPU `tensors` on `device`: unchanged on the CPU; elsewhere packed into one byte buffer, pinned
    where CUDA is available, and copied once without blocking the host, then viewed back."""
    device = torch.device(device)
    if device.type == 'cpu' or not tensors:
        return list(tensors)
    chunks, spans, at = [], [], 0
    for t in tensors:
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        pad = -raw.numel() % _ALIGN
        chunks += [raw, torch.zeros(pad, dtype=torch.uint8)] if pad else [raw]
        spans.append((at, raw.numel()))
        at += raw.numel() + pad
    packed = torch.cat(chunks)
    if device.type == 'cuda' and torch.cuda.is_available():
        packed = packed.pin_memory()
    packed = packed.to(device, non_blocking=True)
    return [packed[a:a + n].view(t.dtype).view(t.shape) for t, (a, n) in zip(tensors, spans)]


def to_device(draws: list[Draw], device: torch.device, extra: list[Tensor] = ()) -> tuple[list[Draw], list[Tensor]]:
    """(`draws`, `extra` tensors) moved to `device` together, in one copy."""
    flat = [(i, k) for i, d in enumerate(draws) for k in d.values]
    moved = to_device_tensors([draws[i].values[k] for i, k in flat] + list(extra), device)
    out = [Draw(d.op, {}) for d in draws]
    for (i, k), t in zip(flat, moved):
        out[i].values[k] = t
    return out, moved[len(flat):]
