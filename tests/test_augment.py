"""Tests for augment.py (DSA, single-group mode)."""
import dataclasses

import pytest
import torch

from trajmatch.augment import (DSA_STRATEGY, OPS, DSAParams, apply_op, draw_group, dsa,
                     rand_brightness, rand_contrast, rand_saturation)

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

SHAPES = [(4, 1, 8, 8), (3, 3, 32, 32), (2, 3, 12, 20)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _images(shape, seed=0, dtype=torch.float32):
    # Strictly positive so that zeros in the output can only come from the op.
    g = _gen(seed)
    return (torch.rand(shape, generator=g) + 0.5).to(dtype)


# --------------------------------------------------------------------------
# Generic properties of every op
# --------------------------------------------------------------------------


def test_strategy_lists_all_ops():
    assert set(DSA_STRATEGY.split("_")) == set(OPS)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES)
def test_shape_finite_and_gradient(op, shape):
    x = _images(shape).requires_grad_(True)
    out = apply_op(x, op, DSAParams(), _gen(1))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    weights = torch.randn(shape, generator=_gen(2))
    (out * weights).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("op", OPS)
def test_same_seed_same_output_different_seed_differs(op):
    x = _images((8, 3, 16, 16))
    a = apply_op(x, op, DSAParams(), _gen(10))
    b = apply_op(x, op, DSAParams(), _gen(10))
    c = apply_op(x, op, DSAParams(), _gen(11))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dsa_replay_and_default_generator():
    x = _images((6, 3, 16, 16))
    outs = [dsa(x, generator=_gen(s)) for s in (3, 3, 4)]
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])
    # generator=None -> torch's global CPU generator, so manual_seed replays it.
    torch.manual_seed(123)
    a = dsa(x)
    torch.manual_seed(123)
    assert torch.equal(dsa(x), a)


def test_draws_do_not_depend_on_dtype():
    # Numbers are drawn as float32 on CPU whatever x is (hence also device-free).
    x = _images((4, 3, 16, 16))
    for op in OPS:
        a = apply_op(x, op, DSAParams(), _gen(7))
        b = apply_op(x.double(), op, DSAParams(), _gen(7))
        assert b.dtype == torch.float64
        # float32 against float64 rounding of the op itself: measured 2.1e-6 (AVX-512, AVX2, scalar kernels);
        # different draws would differ by O(0.1)
        torch.testing.assert_close(b.float(), a, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree():
    x = _images((4, 3, 16, 16))
    for op in OPS:
        a = apply_op(x, op, DSAParams(), _gen(5))
        b = apply_op(x.cuda(), op, DSAParams(), _gen(5))
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-4)


def test_empty_strategy_is_identity_and_unknown_op_raises():
    x = _images((2, 3, 8, 8))
    assert dsa(x, "") is x
    assert dsa(x, "none") is x
    with pytest.raises(ValueError):
        dsa(x, "color_blur", generator=_gen(0))
    with pytest.raises(ValueError):
        apply_op(x, "blur", DSAParams(), _gen(0))


# --------------------------------------------------------------------------
# Group selection
# --------------------------------------------------------------------------


def test_dsa_draws_different_groups():
    g = _gen(0)
    drawn = [draw_group(DSA_STRATEGY, g) for _ in range(100)]
    assert set(drawn) == set(OPS)
    assert draw_group("flip", g) == "flip"
    assert draw_group("none", g) is None


def test_dsa_is_draw_then_apply():
    x = _images((5, 3, 16, 16))
    for seed in range(6):
        g = _gen(seed)
        op = draw_group(DSA_STRATEGY, g)
        expected = apply_op(x, op, DSAParams(), g)
        assert torch.equal(dsa(x, DSA_STRATEGY, DSAParams(), _gen(seed)), expected)


# --------------------------------------------------------------------------
# Op-specific semantics
# --------------------------------------------------------------------------


def test_flip_probability_one_and_zero():
    x = _images((4, 3, 8, 10))
    always = apply_op(x, "flip", DSAParams(prob_flip=1.0), _gen(0))
    never = apply_op(x, "flip", DSAParams(prob_flip=0.0), _gen(0))
    assert torch.equal(always, torch.flip(x, dims=[3]))
    assert torch.equal(never, x)


def test_flip_default_flips_some_not_all():
    x = _images((64, 1, 8, 8))
    out = apply_op(x, "flip", DSAParams(), _gen(0))
    flipped = (out == torch.flip(x, dims=[3])).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert torch.all(flipped | kept)
    assert 10 < int(flipped.sum()) < 54


def test_scale_one_and_rotate_zero_are_identity():
    x = _images((3, 3, 16, 16), dtype=torch.float64)  # float64: grid_sample's rounding stays far below the bound
    scaled = apply_op(x, "scale", DSAParams(ratio_scale=1.0), _gen(0))
    rotated = apply_op(x, "rotate", DSAParams(ratio_rotate=0.0), _gen(0))
    torch.testing.assert_close(scaled, x, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(rotated, x, atol=1e-12, rtol=1e-12)
    # ... while the default magnitudes really change the images.
    assert not torch.allclose(apply_op(x, "scale", DSAParams(), _gen(0)), x, atol=1e-3)
    assert not torch.allclose(apply_op(x, "rotate", DSAParams(), _gen(0)), x, atol=1e-3)


def test_rotate_preserves_centre_pixel():
    # Rotation about the image centre keeps the centre of an odd-sized image.
    x = _images((4, 2, 9, 9))
    out = apply_op(x, "rotate", DSAParams(), _gen(0))
    torch.testing.assert_close(out[..., 4, 4], x[..., 4, 4])


def test_cutout_zeroes_about_ratio_squared():
    ratio = 0.5
    x = _images((64, 3, 16, 16))
    out = apply_op(x, "cutout", DSAParams(ratio_cutout=ratio), _gen(0))
    zero = (out == 0)
    # Same hole in every channel.
    assert torch.equal(zero, zero[:, :1].expand_as(zero))
    frac = zero[:, 0].flatten(1).float().mean(1)
    # Each image loses a square of side ratio*size, clipped at the border.
    assert torch.all(frac > 0)
    assert torch.all(frac <= ratio ** 2 + 1e-6)
    assert torch.isclose(frac.max(), torch.tensor(ratio ** 2))
    assert frac.mean() > 0.5 * ratio ** 2
    # Pixels outside the hole are untouched.
    assert torch.equal(out[~zero], x[~zero])


def test_crop_is_an_integer_translation_with_zero_fill():
    b, c, h, w = 16, 2, 8, 8
    x = _images((b, c, h, w))
    params = DSAParams(ratio_crop_pad=0.125)  # shift of at most 1 pixel
    out = apply_op(x, "crop", params, _gen(0))
    padded = torch.nn.functional.pad(x, [1, 1, 1, 1])
    shifts = set()
    for i in range(b):
        matches = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                   if torch.equal(out[i], padded[i, :, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w])]
        assert len(matches) == 1
        shifts.add(matches[0])
    assert len(shifts) > 1
    no_pad = apply_op(x, "crop", DSAParams(ratio_crop_pad=0.0), _gen(0))
    assert torch.equal(no_pad, x)


def test_color_components():
    x = _images((8, 3, 8, 8), dtype=torch.float64)  # float64: the means below agree to rounding on any CPU
    p = DSAParams()
    # brightness: one additive offset per image, within +-brightness/2
    d = rand_brightness(x, p, _gen(0)) - x
    off = d[:, :1, :1, :1]
    torch.testing.assert_close(d, off.expand_as(d))
    assert torch.all(off.abs() <= p.brightness / 2)
    assert off.std() > 0
    # saturation keeps the per-pixel channel mean; contrast the per-image mean
    s = rand_saturation(x, p, _gen(0))
    torch.testing.assert_close(s.mean(1), x.mean(1))
    assert not torch.allclose(s, x)
    k = rand_contrast(x, p, _gen(0))
    torch.testing.assert_close(k.mean((1, 2, 3)), x.mean((1, 2, 3)))
    assert not torch.allclose(k, x)


def test_color_is_brightness_then_saturation_then_contrast():
    x = _images((4, 3, 8, 8))
    p = DSAParams()
    g = _gen(9)
    manual = rand_contrast(rand_saturation(rand_brightness(x, p, g), p, g), p, g)
    torch.testing.assert_close(apply_op(x, "color", p, _gen(9)), manual)


def test_params_dataclass_defaults():
    p = DSAParams()
    assert dataclasses.asdict(p) == dict(
        prob_flip=0.5, ratio_scale=1.2, ratio_rotate=15.0, ratio_crop_pad=0.125,
        ratio_cutout=0.5, brightness=1.0, saturation=2.0, contrast=0.5)
