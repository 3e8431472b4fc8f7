"""Tests for networks.py and reparam_module.py."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from networks import MODELS, ConvNet, get_network, supports
from reparam_module import (ReparamModule, flatten_params, load_flat_,
                            unflatten_params)

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

SIZES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64)]
EXPECTED_NAMES = {
    "ConvNet", "ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4", "ConvNetD5",
    "ConvNetW32", "ConvNetW64", "ConvNetW128", "ConvNetW256",
    "ConvNetBN", "ConvNetLN", "ConvNetNN",
    "AlexNet", "VGG11", "ResNet18", "ResNet18BN", "ResNet18_AP", "ResNet18BN_AP",
}
# Big nets are slow at 128x128 on CPU; one of each family is enough there.
NETS_128 = [n for n in sorted(EXPECTED_NAMES)
            if n.startswith("ConvNet") and n != "ConvNetW256"] + ["AlexNet", "ResNet18"]
NUM_CLASSES = 7


def _build(name, shape, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return get_network(name, shape[0], NUM_CLASSES, shape[1:]).to(dtype)


def _supported_cases():
    return [(n, s) for s in SIZES for n in sorted(MODELS) if supports(n, s[1:])]


def _check_forward_backward(name, shape):
    net = _build(name, shape)
    x = torch.randn(2, *shape, requires_grad=True)
    out = net(x)
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert isinstance(net.classifier, nn.Linear)
    assert net.classifier.weight.grad.abs().sum() > 0
    emb = net.embed(x)
    assert emb.shape == (2, net.classifier.in_features)
    torch.testing.assert_close(net.classifier(emb), out)


# --------------------------------------------------------------------------
# Registry / size support
# --------------------------------------------------------------------------


def test_registry_names():
    assert set(MODELS) == EXPECTED_NAMES
    assert all(callable(b) for b in MODELS.values())


@pytest.mark.parametrize("name,shape", _supported_cases())
def test_forward_backward_supported_sizes(name, shape):
    _check_forward_backward(name, shape)


@pytest.mark.parametrize("name", NETS_128)
def test_forward_backward_128(name):
    assert supports(name, (128, 128))
    _check_forward_backward(name, (3, 128, 128))


def test_supports_matches_expectations():
    # Non-ConvNet nets: every size in the list; ConvNet of depth d: side >= 2**d.
    for name in MODELS:
        for c, h, w in SIZES:
            if name.startswith("ConvNetD"):
                expected = h >= 2 ** int(name[-1])
            else:
                expected = True
            assert supports(name, (h, w)) == expected, (name, h)
    assert not supports("ConvNetD5", (8, 8))
    assert not supports("ConvNetD5", (28, 28))
    assert supports("ConvNetD5", (32, 32))
    assert not supports("NoSuchNet", (32, 32))


def test_convnet_d5_at_8x8_raises():
    with pytest.raises(ValueError, match="32x32"):
        get_network("ConvNetD5", 1, 10, (8, 8))
    with pytest.raises(ValueError):
        ConvNet(1, 10, (8, 8), depth=4)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="ResNet18BN_AP"):
        get_network("ResNet50", 3, 10, (32, 32))


def test_seeded_build_is_deterministic():
    a = _build("ConvNet", (3, 32, 32), seed=3)
    b = _build("ConvNet", (3, 32, 32), seed=3)
    c = _build("ConvNet", (3, 32, 32), seed=4)
    fa, fb, fc = (flatten_params(n.parameters()) for n in (a, b, c))
    assert torch.equal(fa, fb)
    assert not torch.equal(fa, fc)


def test_norm_layers():
    def count(net, cls):
        return sum(isinstance(m, cls) for m in net.modules())

    inst = _build("ConvNet", (3, 32, 32))
    gns = [m for m in inst.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 3 and all(g.num_groups == g.num_channels == 128 for g in gns)
    ln = _build("ConvNetLN", (3, 32, 32))
    assert [m.num_groups for m in ln.modules() if isinstance(m, nn.GroupNorm)] == [1, 1, 1]
    assert count(_build("ConvNetBN", (3, 32, 32)), nn.BatchNorm2d) == 3
    nn_net = _build("ConvNetNN", (3, 32, 32))
    assert count(nn_net, nn.GroupNorm) + count(nn_net, nn.BatchNorm2d) == 0
    assert count(_build("ResNet18BN", (3, 32, 32)), nn.BatchNorm2d) > 0
    assert count(_build("ResNet18", (3, 32, 32)), nn.BatchNorm2d) == 0


def test_convnet_widths_and_depths():
    for w in (32, 64, 128, 256):
        net = _build(f"ConvNetW{w}", (3, 32, 32))
        # depth 3 on 32x32 leaves a 4x4 map of `w` channels
        assert net.classifier.in_features == w * 4 * 4
    for d in range(1, 6):
        net = _build(f"ConvNetD{d}", (3, 32, 32))
        assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == d
        assert net.classifier.in_features == 128 * (32 >> d) ** 2


def test_resnet_ap_downsamples_without_stride():
    ap = _build("ResNet18_AP", (3, 32, 32))
    plain = _build("ResNet18", (3, 32, 32))
    assert all(m.stride == (1, 1) for m in ap.modules() if isinstance(m, nn.Conv2d))
    assert any(m.stride == (2, 2) for m in plain.modules() if isinstance(m, nn.Conv2d))


# --------------------------------------------------------------------------
# ReparamModule equivalence (float64)
# --------------------------------------------------------------------------

# (name, image shape, batch); ResNet18 (11M params) is kept tiny: float64
# double-backward through it dominates the run time.
REPARAM_CASES = [("ConvNet", (3, 16, 16), 4), ("ConvNetBN", (3, 16, 16), 4),
                 ("ResNet18_AP", (1, 8, 8), 2)]


def _setup(name, shape, batch=4):
    net = _build(name, shape, dtype=torch.float64)
    rep = ReparamModule(net)
    torch.manual_seed(1)
    x = torch.randn(batch, *shape, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (batch,))
    return net, rep, x, y


@pytest.mark.parametrize("name,shape,batch", REPARAM_CASES)
def test_reparam_first_and_second_order(name, shape, batch):
    net, rep, x, y = _setup(name, shape, batch)
    params = list(net.parameters())

    # Module path.
    xm = x.clone().requires_grad_(True)
    out_m = net(xm)
    loss_m = F.cross_entropy(out_m, y)
    g_m = torch.autograd.grad(loss_m, params + [xm], create_graph=True)
    gnorm_m = sum(g.square().sum() for g in g_m[:-1])
    h_m = torch.autograd.grad(gnorm_m, params + [xm])

    # Flat path.
    flat = rep.flat_param().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    out_r = rep(xr, flat)
    loss_r = F.cross_entropy(out_r, y)
    g_flat, g_x = torch.autograd.grad(loss_r, [flat, xr], create_graph=True)
    gnorm_r = g_flat.square().sum()
    h_flat, h_x = torch.autograd.grad(gnorm_r, [flat, xr])

    torch.testing.assert_close(out_r, out_m)
    torch.testing.assert_close(g_flat, flatten_params(g_m[:-1]))
    torch.testing.assert_close(g_x, g_m[-1])
    torch.testing.assert_close(gnorm_r, gnorm_m)
    torch.testing.assert_close(h_flat, flatten_params(h_m[:-1]))
    torch.testing.assert_close(h_x, h_m[-1])
    # The second-order terms must be non-trivial for the check to mean anything.
    assert h_flat.abs().sum() > 0 and h_x.abs().sum() > 0


@pytest.mark.parametrize("name,shape,batch", REPARAM_CASES)
def test_reparam_layout_and_embed(name, shape, batch):
    net, rep, x, _ = _setup(name, shape, batch)
    flat = rep.flat_param()
    assert flat.shape == (rep.num_params,)
    assert rep.num_params == sum(p.numel() for p in net.parameters())
    assert not flat.requires_grad
    assert torch.equal(flat, torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    named = dict(net.named_parameters())
    views = rep.unflatten(flat)
    assert list(views) == list(named)
    for k, v in views.items():
        assert torch.equal(v, named[k])
    torch.testing.assert_close(rep.embed(x, flat), net.embed(x))
    # flat_param is a copy: editing it must not touch the module.
    flat.zero_()
    assert not torch.equal(rep.flat_param(), flat)


def test_flatten_unflatten_round_trip():
    torch.manual_seed(0)
    like = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 1, 3)]
    flat = flatten_params(like)
    assert flat.shape == (12 + 5 + 6,)
    back = unflatten_params(flat, like)
    assert [b.shape for b in back] == [t.shape for t in like]
    for b, t in zip(back, like):
        assert torch.equal(b, t)
    assert torch.equal(flatten_params(back), flat)
    with pytest.raises(ValueError):
        unflatten_params(flat[:-1], like)


def test_load_flat_into_module():
    net, rep, x, _ = _setup("ConvNet", (3, 16, 16))
    torch.manual_seed(5)
    new = torch.randn(rep.num_params, dtype=torch.float64)
    load_flat_(net, new)
    assert torch.equal(rep.flat_param(), new)
    torch.testing.assert_close(net(x), rep(x, new))
    with pytest.raises(ValueError):
        rep.unflatten(new[:-1])


def test_reparam_batchnorm_buffers():
    net, rep, x, _ = _setup("ConvNetBN", (3, 16, 16))
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    flat = rep.flat_param()
    rep(x, flat)  # train mode: batch statistics, running stats updated
    assert not torch.equal(bn.running_mean, before)
    assert int(bn.num_batches_tracked) == 1
    net.eval()
    torch.testing.assert_close(rep(x, flat), net(x))


def test_convnet_on_28x28_grey_images_has_mtts_parameter_shapes():
    """MTT pads the first conv by 3 for 1-channel 28x28 inputs (MNIST, FashionMNIST): 28 -> 32, so the
    classifier sees 128 x 4 x 4 and MTT's buffers for those datasets have these exact shapes."""
    net = get_network('ConvNet', 1, 10, (28, 28))
    expected = [(128, 1, 3, 3), (128,), (128,), (128,)] + [(128, 128, 3, 3), (128,), (128,), (128,)] * 2 \
        + [(10, 128 * 4 * 4), (10,)]
    assert [tuple(p.shape) for p in net.parameters()] == expected
    assert net.features[0].padding == (3, 3) and net.features[4].padding == (1, 1)
    assert net.embed(torch.randn(2, 1, 28, 28)).shape == (2, 128 * 4 * 4)
    w32 = get_network('ConvNetW32', 1, 10, (28, 28))
    assert w32.classifier.weight.shape == (10, 32 * 4 * 4)
    # only 1-channel 28x28 is padded: RGB 28x28 and grey 8x8 (Digits) keep padding 1
    assert get_network('ConvNet', 3, 10, (28, 28)).classifier.weight.shape == (10, 128 * 3 * 3)
    assert get_network('ConvNetD2', 1, 10, (8, 8)).features[0].padding == (1, 1)
