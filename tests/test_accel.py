"""GPU speed paths (accel.py) on the CPU: off by default, and harmless when forced on."""
import argparse

import pytest
import torch

from trajmatch.accel import FP32, Accel, accel_for, add_accel_flags, set_tf32, switch_on


def accel_from_flags(args, device):
    """What the scripts do: the parsed switches, passed by value."""
    return accel_for(device, channels_last=args.channels_last, bf16=args.bf16, tf32=args.tf32)
from trajmatch.data import load_dataset
from trajmatch.evaluation import fresh_network, random_real, train_and_score
from trajmatch.matching import Targets, Unroll, match_and_backward
from networks import get_network
from reparam_module import ReparamModule
from trajmatch.training import OneNet, accuracy, train_epoch

CPU = torch.device('cpu')
SHAPE = (1, 10, (8, 8))


@pytest.fixture(scope='module')
def digits():
    return load_dataset('Digits')


def parse(*argv):
    p = argparse.ArgumentParser()
    add_accel_flags(p)
    return p.parse_args(list(argv))


def test_defaults_are_fp32_on_cpu_and_on_cuda():
    """The papers ran fp32: with no flag given, a CUDA device gets no bf16, no channels_last and no TF32.
    Resolving the flags for a cuda device needs no GPU (it only reads the device type)."""
    for device in (CPU, torch.device('cuda')):
        set_tf32(True)
        assert accel_from_flags(parse(), device) == FP32
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    defaults = parse()
    assert (defaults.channels_last, defaults.bf16, defaults.tf32) == ('off', 'off', 'off')


def test_auto_and_on_are_opt_in():
    cuda = torch.device('cuda')
    assert switch_on('auto', cuda) and not switch_on('auto', CPU)
    assert accel_from_flags(parse('--channels_last', 'auto', '--bf16', 'auto'), cuda) == Accel(True, True)
    assert accel_from_flags(parse('--channels_last', 'auto', '--bf16', 'auto'), CPU) == FP32
    assert accel_from_flags(parse('--channels_last', 'on', '--bf16', 'on'), CPU) == Accel(True, True)
    accel_from_flags(parse('--tf32', 'auto'), cuda)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    accel_from_flags(parse(), CPU)  # --tf32 defaults to off, and off also clears cuDNN's TF32 default
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def _train(images, labels, accel, epochs=3):
    net = accel.net(fresh_network('ConvNetD2', SHAPE, 0, CPU))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    losses = [train_epoch(OneNet(net), images, labels, opt, batch_size=32, generators=[gen], accel=accel)[0].item()
              for _ in range(epochs)]
    return net, losses


def test_channels_last_on_cpu_trains_the_same_network(digits):
    images, labels = random_real(digits, 5, torch.Generator().manual_seed(0))
    plain, plain_losses = _train(images, labels, FP32)
    nhwc, nhwc_losses = _train(images, labels, Accel(channels_last=True))
    assert nhwc.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert nhwc_losses == pytest.approx(plain_losses, rel=1e-5)
    for p, q in zip(plain.parameters(), nhwc.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_on_cpu_runs_and_stays_close(digits):
    images, labels = random_real(digits, 5, torch.Generator().manual_seed(0))
    plain, plain_losses = _train(images, labels, FP32)
    half, half_losses = _train(images, labels, Accel(bf16=True))
    assert all(p.dtype == torch.float32 for p in half.parameters())  # weights and optimiser stay fp32
    assert half_losses != plain_losses  # bf16 really ran
    assert half_losses == pytest.approx(plain_losses, rel=0.05)
    acc = accuracy(half, digits.images_test, digits.labels_test, accel=Accel(bf16=True))
    # bf16 against fp32 test accuracy: measured 2 (AVX-512, AVX2) to 4 (scalar kernels) of 360 images apart, bound 54
    assert acc == pytest.approx(accuracy(plain, digits.images_test, digits.labels_test), abs=0.15)


def test_eval_protocol_with_both_paths_on_cpu_is_close(digits):
    images, labels = random_real(digits, 2, torch.Generator().manual_seed(3))
    test = (digits.images_test, digits.labels_test)
    kw = dict(lr=0.01, epochs=20, seeds=[4])
    plain = train_and_score('ConvNetD2', SHAPE, images, labels, *test, **kw)[0].final
    both = train_and_score('ConvNetD2', SHAPE, images, labels, *test, accel=Accel(True, True), **kw)[0].final
    assert both == pytest.approx(plain, abs=0.1)  # measured 2 of 360 test images apart; bound 36


def test_unroll_stays_fp32_inside_an_autocast_context(digits):
    images, labels = random_real(digits, 2, torch.Generator().manual_seed(0))
    student = ReparamModule(get_network('ConvNetD2', 1, 10, (8, 8)))
    w0 = student.flat_param()
    targets = Targets(w0, w0 + 0.01)

    def grads():
        x = images.clone().requires_grad_(True)
        lr = torch.tensor(0.01, requires_grad=True)
        loss, _ = match_and_backward(student, x, labels, lr, w0, targets, Unroll(syn_steps=3, batch_syn=20), generator=torch.Generator().manual_seed(1))
        return loss, x.grad, lr.grad

    ref = grads()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        inside = grads()
    for a, b in zip(ref, inside):
        assert a.dtype == torch.float32 and torch.equal(a, b)
