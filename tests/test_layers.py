"""trajmatch/layers.py: instance norm, ReLU and 2x2 average pooling with a hand-written second derivative.
Everything here runs in float64 and compares with PyTorch's stock layers (or finite differences), so the
bounds hold on any CPU: the differences measured are float64 rounding (1e-16 relative)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import vmap

from networks import get_network
from reparam_module import ReparamModule
import trajmatch.layers as layers
from trajmatch.layers import (AvgPool2, Conv2d, InstanceNorm, ReLU, ThirdDerivativeError, _AvgPool2, _Conv,
                              _InstanceNorm, _ReLU, fused_path, pool2, stock_layers, unpool2)
from trajmatch.matching import Targets, Unroll, match_and_backward

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _norm(x, w, b):
    return _InstanceNorm.apply(x, w, b, 1e-5)


@pytest.mark.parametrize('shape', [(3, 4, 6, 6), (1, 2, 5, 3), (2, 3, 2, 2)])
def test_instance_norm_first_and_second_derivatives_match_finite_differences(shape):
    x = torch.randn(*shape, generator=_gen(), dtype=F64).requires_grad_(True)
    w = torch.randn(shape[1], generator=_gen(1), dtype=F64).requires_grad_(True)
    b = torch.randn(shape[1], generator=_gen(2), dtype=F64).requires_grad_(True)
    assert torch.autograd.gradcheck(_norm, (x, w, b))
    assert torch.autograd.gradgradcheck(_norm, (x, w, b))


@pytest.mark.parametrize('shape', [(2, 3, 6, 4), (1, 2, 7, 5), (2, 1, 3, 3)])
def test_relu_and_pool_first_and_second_derivatives_match_finite_differences(shape):
    # away from ReLU's kink, where finite differences are meaningless
    x = torch.randn(*shape, generator=_gen(), dtype=F64)
    x = (x + 0.1 * x.sign()).requires_grad_(True)
    for fn in (_ReLU.apply, _AvgPool2.apply):
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize('stride, padding, groups, bias', [(1, 1, 1, True), (2, 0, 2, False), (1, 3, 1, True)])
def test_conv_first_and_second_derivatives_match_finite_differences(stride, padding, groups, bias):
    x = torch.randn(2, 4, 7, 5, generator=_gen(), dtype=F64).requires_grad_(True)
    w = torch.randn(6, 4 // groups, 3, 3, generator=_gen(1), dtype=F64).requires_grad_(True)
    b = torch.randn(6, generator=_gen(2), dtype=F64).requires_grad_(True) if bias else None
    conf = ((stride, stride), (padding, padding), (1, 1), groups)

    def conv(x, w, b):
        return _Conv.apply(x, w, b, conf)

    assert torch.autograd.gradcheck(conv, (x, w, b))
    assert torch.autograd.gradgradcheck(conv, (x, w, b))


def test_conv_computes_only_the_gradients_the_pass_needs(monkeypatch):
    """As the stock convolution: the inner step's autograd.grad(loss, w) does not compute the gradient of
    the first layer's input (the images), the outer backward does; each part of the second derivative
    only where asked."""
    masks = []
    real = layers._conv_backward
    monkeypatch.setattr(layers, '_conv_backward', lambda *a: masks.append(a[-1]) or real(*a))
    conv = Conv2d(3, 4, 3, padding=1).double()
    images = torch.randn(2, 3, 6, 6, generator=_gen(), dtype=F64).requires_grad_(True)
    x = images * 1.0  # an augmented copy, as in the unroll
    g = torch.autograd.grad(conv(x).square().sum(), list(conv.parameters()), create_graph=True)
    assert masks == [(False, True, True)]
    masks.clear()
    torch.autograd.grad(sum(t.sum() for t in g), images)
    # the outer pass: d x from the second derivative (mask of the data part), none of the weight part
    # (the input's gradient was not computed in the inner step), and the forward conv's own backward
    assert (True, False, False) in masks and (False, True, False) not in masks


def _second_order(module, x, seed=3):
    """Values, gradients and the derivative of <gradient, v> in every input: the products the unroll uses."""
    x = x.clone().requires_grad_(True)
    params = list(module.parameters())
    y = module(x)
    gy = torch.randn(y.shape, generator=_gen(seed), dtype=F64).to(x.device).requires_grad_(True)
    grads = torch.autograd.grad(y, [x, *params], gy, create_graph=True)
    vs = [torch.randn(g.shape, generator=_gen(seed + 1 + i), dtype=F64).to(x.device) for i, g in enumerate(grads)]
    second = torch.autograd.grad(grads, [x, gy, *params], vs, allow_unused=True, materialize_grads=True)
    return [y, *grads, *second]


LAYERS = [
    (lambda: InstanceNorm(4), lambda: nn.GroupNorm(4, 4, affine=True)),
    (ReLU, nn.ReLU),
    (AvgPool2, lambda: nn.AvgPool2d(kernel_size=2, stride=2)),
    (lambda: Conv2d(4, 5, 3, padding=1), lambda: nn.Conv2d(4, 5, 3, padding=1)),
    (lambda: Conv2d(4, 6, 3, stride=2, groups=2, bias=False), lambda: nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=False)),
]


@pytest.mark.parametrize('fast, stock', LAYERS)
@pytest.mark.parametrize('hw', [(8, 8), (7, 5)])
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_layers_equal_the_stock_layers_to_second_order(fast, stock, hw, layout, device='cpu'):
    torch.manual_seed(0)
    a = fast().double()
    if isinstance(a, InstanceNorm):  # non-trivial affine parameters
        with torch.no_grad():
            a.weight.normal_(generator=_gen(5))
            a.bias.normal_(generator=_gen(6))
    b = stock().double()
    b.load_state_dict(a.state_dict())
    a, b = a.to(device), b.to(device)
    x = torch.randn(3, 4, *hw, generator=_gen(), dtype=F64).to(device).contiguous(memory_format=layout)
    got, want = _second_order(a, x), _second_order(b, x)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert torch.allclose(g, w, rtol=1e-12, atol=1e-13), (g - w).abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize('fast, stock', LAYERS)
def test_layers_equal_the_stock_layers_on_cuda(fast, stock):
    test_layers_equal_the_stock_layers_to_second_order(fast, stock, (8, 8), torch.contiguous_format, device='cuda')


def test_forward_is_the_stock_kernel_in_float32():
    """Instance norm and ReLU call the very kernels the stock layers call: bit-identical values; the pooling
    sums its four pixels in another order (float rounding)."""
    x = torch.randn(4, 8, 12, 12, generator=_gen()).requires_grad_(True)
    norm = InstanceNorm(8)
    stock = nn.GroupNorm(8, 8, affine=True)
    stock.load_state_dict(norm.state_dict())
    assert torch.equal(norm(x), stock(x))
    assert torch.equal(ReLU()(x), torch.relu(x))
    assert torch.allclose(AvgPool2()(x), F.avg_pool2d(x, 2, 2), rtol=1e-5, atol=1e-5)  # measured 2.4e-7
    g = torch.randn(4, 8, 6, 6, generator=_gen(1))
    ref = torch.ops.aten.avg_pool2d_backward(g, x.detach(), [2, 2], [2, 2], [0, 0], False, True, None)
    assert torch.equal(unpool2(g, x.shape), ref)  # a quarter of each value, repeated: exact


def test_pool_helpers_on_odd_sizes():
    x = torch.randn(2, 3, 7, 5, generator=_gen(), dtype=F64)
    assert torch.allclose(pool2(x), F.avg_pool2d(x, 2, 2), rtol=1e-14, atol=1e-15)
    g = torch.randn(2, 3, 3, 2, generator=_gen(1), dtype=F64)
    out = unpool2(g, x.shape)
    assert out.shape == x.shape and torch.equal(out[:, :, 6], torch.zeros(2, 3, 5)) and (out[:, :, :, 4] == 0).all()
    # adjoint: <pool2(x), g> = <x, unpool2(g)>
    assert torch.allclose((pool2(x) * g).sum(), (x * out).sum(), rtol=1e-13)


def test_third_derivative_refuses():
    """Differentiating the hand-written second derivative again raises instead of silently dropping the
    terms through the saved tensors."""
    x = torch.randn(2, 3, 4, 4, generator=_gen(), dtype=F64).requires_grad_(True)
    w, b = torch.ones(3, dtype=F64, requires_grad=True), torch.zeros(3, dtype=F64, requires_grad=True)
    c = torch.randn(2, 3, 4, 4, generator=_gen(1), dtype=F64)
    g, = torch.autograd.grad((_norm(x, w, b) * c).sum(), x, create_graph=True)
    with pytest.raises(ThirdDerivativeError, match='stock_layers'):
        torch.autograd.grad(g.square().sum(), x, create_graph=True)
    h, = torch.autograd.grad(g.square().sum(), x)  # the second derivative itself is fine
    assert h.abs().sum() > 0


def test_fused_path_only_where_supported():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    assert fused_path(x)
    with torch.no_grad():
        assert not fused_path(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not fused_path(x)
    assert not fused_path(x.flatten(2))
    assert not fused_path(x.half())
    seen = []
    vmap(lambda t: seen.append(fused_path(t)) or t)(x)
    assert seen == [False]


def test_stacked_students_under_vmap_fall_back_to_the_stock_layers():
    """vmap (the stacked evaluation networks and --trajectories K) runs the stock functional: same values
    and gradients as one network at a time."""
    torch.manual_seed(0)
    net = get_network('ConvNetD2', 1, 10, (8, 8)).double()
    student = ReparamModule(net)
    w = torch.stack([student.flat_param(), student.flat_param() * 1.01]).requires_grad_(True)
    x = torch.randn(2, 5, 1, 8, 8, generator=_gen(), dtype=F64)
    out = vmap(student)(x, w)
    for k in range(2):
        assert torch.allclose(out[k], student(x[k], w[k]), rtol=1e-12, atol=1e-13)
    g, = torch.autograd.grad(out.square().sum(), w)
    for k in range(2):
        gk, = torch.autograd.grad(student(x[k], w[k]).square().sum(), w)
        assert torch.allclose(g[k], gk[k], rtol=1e-10, atol=1e-13)


def test_stock_layers_gives_the_stock_network_with_the_same_parameters():
    torch.manual_seed(0)
    net = get_network('ConvNet', 3, 10, (32, 32))
    kinds = {type(m) for m in net.modules()}
    assert {InstanceNorm, ReLU, AvgPool2, Conv2d} <= kinds
    keys = list(net.state_dict())
    weight = net.features[1].weight
    stock = stock_layers(copy.deepcopy(net))
    kinds = {type(m) for m in stock.modules()}
    assert not kinds & {InstanceNorm, ReLU, AvgPool2, Conv2d} and {nn.GroupNorm, nn.ReLU, nn.AvgPool2d, nn.Conv2d} <= kinds
    assert list(stock.state_dict()) == keys
    assert stock_layers(net).features[1].weight is weight  # in place, parameters shared


@pytest.mark.parametrize('model, shape', [('ConvNet', (3, 10, (16, 16))), ('ConvNetW32', (1, 10, (28, 28))),
                                          ('ConvNetLN', (3, 10, (16, 16))), ('ConvNetNN', (3, 10, (16, 16))),
                                          ('ConvNetBN', (3, 10, (16, 16)))])
@pytest.mark.parametrize('mode', ['bptt', 'recompute'])
@pytest.mark.parametrize('syn_mom', [0.0, 0.5])
def test_matching_gradient_equals_the_stock_networks(model, shape, mode, syn_mom):
    """The hypergradient dL/dS, dL/dα through a ConvNet of these layers equals the one through the stock
    layers (measured 5e-16 relative in float64)."""
    torch.manual_seed(0)
    net = get_network(model, *shape).double()
    fast, stock = ReparamModule(net), ReparamModule(stock_layers(copy.deepcopy(net)))
    images = torch.randn(6, shape[0], *shape[2], generator=_gen(), dtype=F64)
    labels = torch.arange(6) % 10
    w0 = fast.flat_param()
    targets = Targets(w0, w0 + 0.05 * torch.randn(w0.shape, generator=_gen(1), dtype=F64))
    got = []
    for student in (fast, stock):
        s = images.clone().requires_grad_(True)
        lr = torch.tensor(0.05, dtype=F64, requires_grad=True)
        loss, _ = match_and_backward(student, s, labels, lr, w0, targets,
                                     Unroll(syn_steps=4, batch_syn=4, syn_mom=syn_mom, mode=mode),
                                     generator=_gen(2))
        got.append((loss, s.grad, lr.grad))
    (l1, s1, a1), (l2, s2, a2) = got
    assert s1.norm() > 0 and a1 != 0
    assert abs(l1 - l2) <= 1e-12 * abs(l2)
    assert (s1 - s2).norm() <= 1e-10 * s2.norm()
    assert abs(a1 - a2) <= 1e-10 * abs(a2)


def test_the_tape_is_no_larger():
    """One create_graph inner step saves no more bytes with these layers than with the stock ones (the pooling
    saves nothing; measured 30.68 vs 30.83 MB here): the memory plan's probe and bptt's memory stand."""
    def saved_bytes(net):
        student = ReparamModule(net)
        w = student.flat_param().requires_grad_(True)
        x = torch.randn(10, 3, 32, 32, generator=_gen())
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(student(x, w), torch.arange(10))
            torch.autograd.grad(loss, w, create_graph=True)
        return sum(seen.values())

    torch.manual_seed(0)
    net = get_network('ConvNet', 3, 10, (32, 32))
    fast = saved_bytes(net)
    stock = saved_bytes(stock_layers(copy.deepcopy(net)))
    assert 0 < fast <= stock, (fast, stock)
