"""The evaluation schedules against the authors' evaluate_synset (MTT's and AST's utils.py).

Both authors' loops read: for ep in range(E + 1): train one epoch; [test]; if ep == E//2 + 1: lr *= f and
build a new SGD. The expected schedules below are written out from that loop by hand.
"""
import pytest
import torch

from trajmatch import evaluation, stacked
from trajmatch import training
from trajmatch.data import load_dataset
from trajmatch.evaluation import eval_schedule, evaluate_set, fresh_network, random_real, train_and_score
from trajmatch.training import OneNet, train_epoch

SHAPE = (1, 10, (8, 8))  # Digits: channel, classes, im_size
LR = 0.01


@pytest.fixture(scope='module')
def digits():
    return load_dataset('Digits')


@pytest.fixture(scope='module')
def ipc1(digits):
    return random_real(digits, 1, torch.Generator().manual_seed(2))


# per trained epoch: (lr, momentum, weight decay, momentum buffer starts from zero)
A, B = LR, LR * 0.1
MTT = {
    6: [(A, .9, 5e-4, True)] + [(A, .9, 5e-4, False)] * 4      # epochs 0..4 (decay after 6//2+1 = 4)
       + [(B, .9, 5e-4, True), (B, .9, 5e-4, False)],           # epochs 5, 6
    8: [(A, .9, 5e-4, True)] + [(A, .9, 5e-4, False)] * 5      # epochs 0..5 (decay after 8//2+1 = 5)
       + [(B, .9, 5e-4, True)] + [(B, .9, 5e-4, False)] * 2,    # epochs 6..8
}
C = LR * 0.5
AST = {
    6: [(A, .9, 1e-3, True)] + [(A, .9, 1e-3, False)] * 4
       + [(C, .8, 1e-3, True), (C, .8, 1e-3, False)],
    8: [(A, .9, 1e-3, True)] + [(A, .9, 1e-3, False)] * 5
       + [(C, .8, 1e-3, True)] + [(C, .8, 1e-3, False)] * 2,
}
# epochs after which test accuracy is measured: MTT only after the last; AST at ep % 20 == 0 (its
# checks) and, for our final-epoch result, after the last
TESTED = {('mtt', 6): [6], ('mtt', 8): [8], ('ast', 6): [0, 6], ('ast', 8): [0, 8]}


class Recorder:
    """Wraps the training and test calls evaluation.py makes, logging the optimiser each epoch sees."""

    def __init__(self, monkeypatch, fake_acc=None):
        self.epochs, self.tested, self.nets = [], [], []
        self.fake_acc = fake_acc  # epoch -> accuracy (or list per network) instead of measuring
        real_epoch = training.train_epoch
        real_acc, real_accs = training.OneNet.accuracies, stacked.NetStack.accuracies

        def epoch(group, images, labels, opt, **kw):
            if isinstance(opt, torch.optim.SGD):  # one network
                assert len(opt.param_groups) == 1
                g = opt.param_groups[0]
                fresh = all('momentum_buffer' not in opt.state[p] for p in g['params'])
                self.epochs.append((g['lr'], g['momentum'], g['weight_decay'], fresh))
            else:  # stacked.StackedSGD
                self.epochs.append((opt.lr, opt.momentum, opt.weight_decay, not opt.bufs))
            return real_epoch(group, images, labels, opt, **kw)

        def acc(group, *a, **kw):
            self.tested.append(len(self.epochs) - 1)
            self.nets.append({k: v.detach().clone() for k, v in group.net.state_dict().items()})
            return [self.fake_acc[self.tested[-1]]] if self.fake_acc else real_acc(group, *a, **kw)

        def accs(group, *a, **kw):
            self.tested.append(len(self.epochs) - 1)
            return self.fake_acc[self.tested[-1]] if self.fake_acc else real_accs(group, *a, **kw)

        monkeypatch.setattr(training, 'train_epoch', epoch)
        monkeypatch.setattr(training.OneNet, 'accuracies', acc)
        monkeypatch.setattr(stacked.NetStack, 'accuracies', accs)


def _assert_rows(got, want):
    assert len(got) == len(want)  # epochs actually trained
    for ep, (g, w) in enumerate(zip(got, want)):
        assert g[0] == pytest.approx(w[0], rel=1e-12), ep
        assert g[1:] == w[1:], ep


@pytest.mark.parametrize('lr_decay', ['mtt', 'ast'])
@pytest.mark.parametrize('epochs', [6, 8])
@pytest.mark.parametrize('path', ['one', 'stacked'])
def test_each_trained_epoch_uses_the_authors_optimiser(monkeypatch, digits, ipc1, lr_decay, epochs, path):
    rec = Recorder(monkeypatch)
    test = (digits.images_test[:100], digits.labels_test[:100])
    kw = dict(lr=LR, epochs=epochs, lr_decay=lr_decay)
    train_and_score('ConvNetD2', SHAPE, *ipc1, *test, seeds=[0] if path == 'one' else [0, 1], **kw)
    _assert_rows(rec.epochs, (MTT if lr_decay == 'mtt' else AST)[epochs])
    assert rec.tested == TESTED[lr_decay, epochs]


@pytest.mark.parametrize('lr_decay,factor,mom_after,wd', [('mtt', 0.1, 0.9, 5e-4), ('ast', 0.5, 0.8, 1e-3)])
def test_the_tested_network_is_the_authors_loop_after_its_last_epoch(monkeypatch, ipc1, digits, lr_decay, factor,
                                                                      mom_after, wd):
    epochs, seed = 6, 3
    net = fresh_network('ConvNetD2', SHAPE, seed, torch.device('cpu'))
    gen = torch.Generator().manual_seed(seed)
    lr = LR
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    for ep in range(epochs + 1):
        train_epoch(OneNet(net), *ipc1, opt, batch_size=256, generators=[gen])
        if ep == epochs // 2 + 1:
            lr *= factor
            opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=mom_after, weight_decay=wd)
    rec = Recorder(monkeypatch)
    train_and_score('ConvNetD2', SHAPE, *ipc1, digits.images_test[:50], digits.labels_test[:50], lr=LR,
                    epochs=epochs, seeds=[seed], lr_decay=lr_decay)
    final = rec.nets[-1]
    start = fresh_network('ConvNetD2', SHAPE, seed, torch.device('cpu')).state_dict()
    assert any(not torch.equal(final[k], start[k]) for k in start)  # it trained
    for k, v in net.state_dict().items():
        assert torch.equal(final[k], v), k  # same ops in the same order: bit-identical on one machine


def test_ast_checks_every_20_epochs_and_reports_the_last_epoch(monkeypatch, digits, ipc1):
    # fake accuracies make the bookkeeping visible: the best check (epoch 20) is not the last epoch
    one = {0: 0.30, 20: 0.90, 40: 0.50, 41: 0.40}
    rec = Recorder(monkeypatch, fake_acc=one)
    test = (digits.images_test[:50], digits.labels_test[:50])
    [s] = train_and_score('ConvNetD2', SHAPE, *ipc1, *test, lr=LR, epochs=41, seeds=[0], lr_decay='ast')
    assert rec.tested == [0, 20, 40, 41]
    assert len(rec.epochs) == 42
    assert s.final == 0.40 and s.max_selected_on_test == 0.90

    rec.fake_acc = {0: [0.3, 0.6], 20: [0.9, 0.2], 40: [0.5, 0.1], 41: [0.4, 0.7]}
    rec.epochs, rec.tested = [], []
    got = train_and_score('ConvNetD2', SHAPE, *ipc1, *test, lr=LR, epochs=41, seeds=[0, 1], lr_decay='ast')
    assert rec.tested == [0, 20, 40, 41]
    assert [(g.final, g.max_selected_on_test) for g in got] == [(0.4, 0.9), (0.7, 0.6)]  # the last epoch is no check

    rec.fake_acc, rec.epochs, rec.tested = one, [], []
    res = evaluate_set(['ConvNetD2'], SHAPE, *ipc1, *test, lr=LR, epochs=41, num_eval=1, seed=0, lr_decay='ast',
                       progress=False, parallel='loop')[0]
    assert res.accs == [0.40] and res.max_acc_selected_on_test == [0.90]
    rec.epochs, rec.tested = [], []
    res = evaluate_set(['ConvNetD2'], SHAPE, *ipc1, *test, lr=LR, epochs=41, num_eval=1, seed=0, lr_decay='mtt',
                       progress=False, parallel='loop')[0]
    assert rec.tested == [41] and res.accs == [0.40] and res.max_acc_selected_on_test == []


def test_evaluate_set_ast_stack_equals_loop(monkeypatch, digits, ipc1):
    # in float64 (networks and images): stacked and one at a time agree to rounding, so their accuracies are
    # equal on any CPU (float32 sums in a CPU-dependent order, and 41 epochs could flip a test image)
    build = evaluation.fresh_network
    monkeypatch.setattr(evaluation, 'fresh_network', lambda *a, **k: build(*a, **k).double())
    ipc1 = (ipc1[0].double(), ipc1[1])
    kw = dict(lr=LR, epochs=41, num_eval=3, seed=11, progress=False, lr_decay='ast')
    test = (digits.images_test.double(), digits.labels_test)
    loop = evaluate_set(['ConvNetD2'], SHAPE, *ipc1, *test, parallel='loop', **kw)[0]
    stacked = evaluate_set(['ConvNetD2'], SHAPE, *ipc1, *test, parallel='stack', **kw)[0]
    alone = [train_and_score('ConvNetD2', SHAPE, *ipc1, *test, lr=LR, epochs=41, seeds=[11 + i], lr_decay='ast')[0]
             for i in range(3)]
    assert loop.accs == [s.final for s in alone]
    assert loop.max_acc_selected_on_test == [s.max_selected_on_test for s in alone]
    assert stacked.accs == loop.accs
    assert stacked.max_acc_selected_on_test == loop.max_acc_selected_on_test
    assert len(set(loop.accs)) > 1  # three different networks, not one copied


@pytest.mark.parametrize('parallel', ['loop', 'stack'])
def test_validation_scores_the_same_trained_networks(digits, ipc1, parallel):
    """val= only adds a score: the networks train exactly as without it, and scored on the test set
    itself as 'validation' they give their test accuracy."""
    kw = dict(lr=LR, epochs=20, num_eval=2, seed=3, progress=False, parallel=parallel)
    test = (digits.images_test, digits.labels_test)
    plain = evaluate_set(['ConvNetD2'], SHAPE, *ipc1, *test, **kw)[0]
    scored = evaluate_set(['ConvNetD2'], SHAPE, *ipc1, *test, val=test, **kw)[0]
    half = (digits.images_test[:100], digits.labels_test[:100])
    other = evaluate_set(['ConvNetD2'], SHAPE, *ipc1, *test, val=half, **kw)[0]
    assert scored.accs == plain.accs and scored.val_accs == plain.accs and plain.val_accs == []
    assert other.accs == plain.accs and len(other.val_accs) == 2 and all(0 <= a <= 1 for a in other.val_accs)
    assert other.val_mean == sum(other.val_accs) / 2 and plain.val_mean is None


def test_schedule_refuses_what_it_does_not_know():
    with pytest.raises(ValueError, match='lr_decay'):
        eval_schedule('cosine', LR, 10)
    with pytest.raises(ValueError, match='epochs'):
        eval_schedule('mtt', LR, -1)
    assert len(eval_schedule('mtt', LR, 0)) == 1  # E = 0 still trains epoch 0, as the authors' loop
