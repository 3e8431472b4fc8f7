"""Vectorised training of K networks (stacked.py) against training each network alone."""
import pytest
import torch

from trajmatch import evaluation
from trajmatch.data import load_dataset
from trajmatch.evaluation import evaluate_set, fresh_network, random_real, stack_groups, train_and_score
from networks import get_network
from trajmatch.stacked import NetStack, StackedSGD, stackable
from trajmatch.training import OneNet, accuracy, train_epoch

SHAPE = (1, 10, (8, 8))  # Digits: channel, classes, im_size


@pytest.fixture(scope='module')
def digits():
    return load_dataset('Digits')


def nets(model, seeds, dtype=torch.float32):
    return [fresh_network(model, SHAPE, s, torch.device('cpu')).to(dtype) for s in seeds]


# Stacked and one-at-a-time networks sum in different orders (a grouped convolution against K plain ones),
# and which order a CPU takes depends on its vector kernels: on an AVX2-only oneDNN the float32 weights of
# the train-epoch test below drifted 2.7e-5 apart. The comparisons of the same computation therefore run
# in float64 (measured differences 1e-16 on AVX-512, AVX2 and the scalar kernels), with bounds 1e-9 / 1e-12.
F64 = dict(rtol=1e-9, atol=1e-12)


def test_stacked_forward_equals_each_network():
    models = nets('ConvNetD2', [0, 1, 2], torch.float64)
    stack = NetStack(models)
    x = torch.randn(3, 7, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = stack(x)
    shared = stack.shared_input(x[0])
    for k, m in enumerate(models):
        torch.testing.assert_close(out[k], m(x[k]), **F64)
        torch.testing.assert_close(shared[k], m(x[0]), **F64)
    assert not torch.allclose(out[0], out[1])  # the copies really are different networks


def test_stacked_sgd_is_torch_sgd():
    torch.manual_seed(0)
    ps = [torch.randn(4, 3) for _ in range(2)]
    ref = [p.clone().requires_grad_(True) for p in ps]
    stacked = {'w': torch.stack(ps).requires_grad_(True)}
    ref_opt = [torch.optim.SGD([r], lr=0.1, momentum=0.9, weight_decay=5e-4) for r in ref]
    opt = StackedSGD(stacked, lr=0.1, momentum=0.9, weight_decay=5e-4)
    for step in range(4):
        grads = [torch.randn(4, 3) for _ in range(2)]
        for r, g, o in zip(ref, grads, ref_opt):
            r.grad = g.clone()
            o.step()
        stacked['w'].grad = torch.stack(grads)
        opt.step()
    assert torch.equal(stacked['w'].detach(), torch.stack([r.detach() for r in ref]))


def test_stacked_train_epoch_follows_each_network_alone(digits):
    images, labels = random_real(digits, 3, torch.Generator().manual_seed(0))
    images, test_images = images.double(), digits.images_test.double()
    seeds = [5, 6, 7]
    alone = nets('ConvNetD2', seeds, torch.float64)
    for net, s in zip(alone, seeds):
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(s)
        for _ in range(4):
            train_epoch(OneNet(net), images, labels, opt, batch_size=16, generators=[gen], loss_scale=0.7)
    stack = NetStack(nets('ConvNetD2', seeds, torch.float64))
    opt = StackedSGD(stack.params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    for _ in range(4):  # 30 images, batch 16: a full and a partial batch per epoch
        train_epoch(stack, images, labels, opt, batch_size=16, generators=gens, loss_scale=0.7)
    for k, net in enumerate(alone):
        start = nets('ConvNetD2', [seeds[k]], torch.float64)[0]
        moved = sum((p - q).abs().sum() for p, q in zip(net.parameters(), start.parameters()))
        assert moved > 0
        for name, p in net.named_parameters():
            torch.testing.assert_close(stack.params[name][k].detach(), p.detach(), **F64)
        copy = stack.load_into(k, get_network('ConvNetD2', 1, 10, (8, 8)).double())
        assert accuracy(copy, test_images, digits.labels_test) == accuracy(net, test_images, digits.labels_test)
    accs = stack.accuracies(test_images, digits.labels_test)
    assert accs == [accuracy(n, test_images, digits.labels_test) for n in alone]


@pytest.fixture
def float64_networks(monkeypatch):
    """evaluate_set and train_and_score build their networks in float64 (with float64 images): stacked and
    one at a time then agree to rounding, so their accuracies are equal on any CPU."""
    build = evaluation.fresh_network
    monkeypatch.setattr(evaluation, 'fresh_network', lambda *a, **k: build(*a, **k).double())


def test_evaluate_set_stack_equals_loop(digits, float64_networks):
    images, labels = random_real(digits, 1, torch.Generator().manual_seed(1))
    images = images.double()
    kw = dict(lr=0.01, epochs=30, num_eval=3, seed=11, progress=False)
    test = (digits.images_test.double(), digits.labels_test)
    loop = evaluate_set(['ConvNetD2'], SHAPE, images, labels, *test, parallel='loop', **kw)[0].accs
    stacked = evaluate_set(['ConvNetD2'], SHAPE, images, labels, *test, parallel='stack', **kw)[0].accs
    alone = [train_and_score('ConvNetD2', SHAPE, images, labels, *test, lr=0.01, epochs=30, seeds=[11 + i])[0].final
             for i in range(3)]
    assert loop == alone
    assert stacked == alone
    assert len(set(loop)) > 1  # three different networks, not one copied


def test_stack_groups_rules():
    cpu, seeds = torch.device('cpu'), list(range(5))
    assert stack_groups(seeds, 'ConvNetD2', SHAPE, 10, 256, cpu, 'loop') == [[0], [1], [2], [3], [4]]
    assert stack_groups(seeds, 'ConvNetD2', SHAPE, 100, 256, cpu, 'stack') == [seeds]
    assert stack_groups(seeds, 'ConvNetD2', SHAPE, 10, 256, cpu, 'auto') == [seeds]      # ipc 1: stack
    assert stack_groups(seeds, 'ConvNetD2', SHAPE, 100, 256, cpu, 'auto') == [[s] for s in seeds]  # ipc 10
    assert stack_groups(seeds, 'ConvNetD2', SHAPE, 100, 256, torch.device('cuda'), 'auto') == [seeds]
    assert not stackable(get_network('ConvNetBN', 1, 10, (8, 8)))  # running stats: one at a time
    assert stack_groups(seeds, 'ConvNetBN', SHAPE, 10, 256, cpu, 'stack') == [[s] for s in seeds]


def test_evaluation_leaves_the_callers_random_stream_alone(digits):
    images, labels = random_real(digits, 1, torch.Generator().manual_seed(1))
    before = torch.random.get_rng_state()
    for parallel in ('auto', 'loop', 'stack'):
        evaluate_set(['ConvNetD2', 'ConvNetBN'], SHAPE, images, labels, digits.images_test[:50],
                     digits.labels_test[:50], lr=0.01, epochs=2, num_eval=2, seed=0, progress=False, parallel=parallel)
    assert torch.equal(torch.random.get_rng_state(), before)


def _experts(folder):
    from trajmatch.trajectory_io import buffer_dir, expert_files, load_trajectories
    return [load_trajectories(f)[0] for f in expert_files(buffer_dir(str(folder), 'Digits', 'ConvNetW32', zca=False))]


def test_parallel_experts_writes_the_same_experts(tmp_path):
    import buffer
    flags = ['--num_experts', '3', '--train_epochs', '3', '--model', 'ConvNetW32', '--optim', 'sgdmom',
             '--loss_decay', '--batch_train', '512']
    buffer.main(flags + ['--buffer_path', str(tmp_path / 'one')])
    buffer.main(flags + ['--buffer_path', str(tmp_path / 'stacked'), '--parallel_experts', '2'])  # groups 2 + 1
    one, stacked = _experts(tmp_path / 'one'), _experts(tmp_path / 'stacked')
    assert len(one) == len(stacked) == 3
    for a, b in zip(one, stacked):
        assert len(a) == len(b) == 4
        for snap_a, snap_b in zip(a, b):
            for t, u in zip(snap_a, snap_b):
                # float32 through buffer.py (no float64 path): measured up to 2.1e-6 apart (AVX2 kernels)
                torch.testing.assert_close(u, t, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(one[0][-1][0], one[1][-1][0])  # different experts


def test_parallel_experts_refuses_what_it_cannot_stack(tmp_path, capsys):
    import buffer
    base = ['--num_experts', '2', '--train_epochs', '1', '--buffer_path', str(tmp_path), '--parallel_experts', '2']
    for extra, words in ((['--gp'], '--gp is not vectorised'), (['--model', 'ConvNetBN'], 'BatchNorm')):
        with pytest.raises(SystemExit) as e:
            buffer.main(base + extra)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0]
    assert not list(tmp_path.rglob('*.pt'))
