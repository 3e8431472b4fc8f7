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
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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
# Random draws (always on CPU, from the given generator)
# --------------------------------------------------------------------------


def _rand(n: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """n uniforms in [0, 1) drawn on CPU, returned on like's device/dtype."""
    r = torch.rand(n, generator=generator, dtype=torch.float32)
    return r.to(device=like.device, dtype=like.dtype)


def _randint(low: int, high: int, n: int, generator: torch.Generator | None) -> Tensor:
    """n integers in [low, high) drawn on CPU (int64, stays on CPU)."""
    return torch.randint(low, high, (n,), generator=generator)


# --------------------------------------------------------------------------
# Colour: brightness -> saturation -> contrast
# --------------------------------------------------------------------------


def rand_brightness(x: Tensor, params: DSAParams, generator) -> Tensor:
    r = _rand(x.shape[0], generator, x).view(-1, 1, 1, 1)
    return x + (r - 0.5) * params.brightness


def rand_saturation(x: Tensor, params: DSAParams, generator) -> Tensor:
    # Scale the deviation from the per-pixel channel mean (no-op for 1 channel).
    r = _rand(x.shape[0], generator, x).view(-1, 1, 1, 1)
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (r * params.saturation) + mean


def rand_contrast(x: Tensor, params: DSAParams, generator) -> Tensor:
    # Scale the deviation from the per-image mean.
    r = _rand(x.shape[0], generator, x).view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (r + params.contrast) + mean


def rand_color(x: Tensor, params: DSAParams, generator) -> Tensor:
    x = rand_brightness(x, params, generator)
    x = rand_saturation(x, params, generator)
    return rand_contrast(x, params, generator)


# --------------------------------------------------------------------------
# Integer-pixel ops: crop (translate with zero fill), cutout
# --------------------------------------------------------------------------


def rand_crop(x: Tensor, params: DSAParams, generator) -> Tensor:
    """Translate each image by up to ratio_crop_pad * size pixels, zero fill."""
    b, c, h, w = x.shape
    sh, sw = int(h * params.ratio_crop_pad + 0.5), int(w * params.ratio_crop_pad + 0.5)
    th = _randint(-sh, sh + 1, b, generator).to(x.device)
    tw = _randint(-sw, sw + 1, b, generator).to(x.device)
    # Pad by the maximum shift, then gather the shifted window (rows, then cols).
    xp = F.pad(x, [sw, sw, sh, sh])
    rows = torch.arange(h, device=x.device).view(1, h) + sh + th.view(b, 1)
    cols = torch.arange(w, device=x.device).view(1, w) + sw + tw.view(b, 1)
    out = xp.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, xp.shape[3]))
    return out.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


def cutout_mask(b: int, h: int, w: int, params: DSAParams, generator) -> Tensor:
    """[b, 1, h, w] CPU float mask with a (clipped) zero square per image."""
    ch, cw = int(h * params.ratio_cutout + 0.5), int(w * params.ratio_cutout + 0.5)
    # Centre range as in DSA: the square may hang over the border.
    oh = _randint(0, h + (1 - ch % 2), b, generator)
    ow = _randint(0, w + (1 - cw % 2), b, generator)
    top, left = (oh - ch // 2).view(b, 1), (ow - cw // 2).view(b, 1)
    r, c = torch.arange(h).view(1, h), torch.arange(w).view(1, w)
    in_r = (r >= top) & (r < top + ch)            # [b, h]
    in_c = (c >= left) & (c < left + cw)          # [b, w]
    hole = in_r.view(b, h, 1) & in_c.view(b, 1, w)
    return (~hole).float().view(b, 1, h, w)


def rand_cutout(x: Tensor, params: DSAParams, generator) -> Tensor:
    b, _, h, w = x.shape
    mask = cutout_mask(b, h, w, params, generator).to(device=x.device, dtype=x.dtype)
    return x * mask


# --------------------------------------------------------------------------
# Flip and affine ops (scale, rotate) via affine_grid / grid_sample
# --------------------------------------------------------------------------


def rand_flip(x: Tensor, params: DSAParams, generator) -> Tensor:
    r = _rand(x.shape[0], generator, x).view(-1, 1, 1, 1)
    return torch.where(r < params.prob_flip, x.flip(3), x)


def _warp(x: Tensor, theta: Tensor) -> Tensor:
    """Resample x with per-sample 2x3 affine matrices (zero padding)."""
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def rand_scale(x: Tensor, params: DSAParams, generator) -> Tensor:
    b, ratio = x.shape[0], params.ratio_scale
    sx = torch.rand(b, generator=generator) * (ratio - 1.0 / ratio) + 1.0 / ratio
    sy = torch.rand(b, generator=generator) * (ratio - 1.0 / ratio) + 1.0 / ratio
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = sx, sy
    return _warp(x, theta)


def rand_rotate(x: Tensor, params: DSAParams, generator) -> Tensor:
    b = x.shape[0]
    ang = (torch.rand(b, generator=generator) - 0.5) * 2 * params.ratio_rotate / 180 * math.pi
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    return _warp(x, theta)


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------

_OP_FNS = {
    "color": rand_color,
    "crop": rand_crop,
    "cutout": rand_cutout,
    "flip": rand_flip,
    "scale": rand_scale,
    "rotate": rand_rotate,
}


def apply_op(x: Tensor, op: str, params: DSAParams,
             generator: torch.Generator | None) -> Tensor:
    """Apply one augmentation group to the whole batch (per-sample params)."""
    if op not in _OP_FNS:
        raise ValueError(f"unknown DSA op {op!r}; expected one of {OPS}")
    if x.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
    return _OP_FNS[op](x, params, generator).contiguous()


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


def dsa(x: Tensor, strategy: str = DSA_STRATEGY, params: DSAParams | None = None,
        generator: torch.Generator | None = None) -> Tensor:
    """DSA 'S' mode: one randomly drawn group applied to the whole batch."""
    op = draw_group(strategy, generator)
    if op is None:
        return x
    return apply_op(x, op, params if params is not None else DSAParams(), generator)
