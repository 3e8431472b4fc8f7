"""Expert recipes (buffer.py): the optimiser, its one lr change and the momentum reset, per epoch."""
import pytest

import buffer
from trajmatch import training
from trajmatch.data import load_dataset


@pytest.fixture(scope='module')
def digits():
    return load_dataset('Digits')


def record_epochs(monkeypatch, digits, flags, epochs):
    """Train one expert and record, at the start of every epoch, the optimiser's lr, momentum, weight decay
    and whether its momentum buffers are empty (a fresh optimiser)."""
    seen = []
    real = training.train_epoch

    def spy(nets, images, labels, opt, **kw):
        group = opt.param_groups[0]
        seen.append((group['lr'], group['momentum'], group['weight_decay'], len(opt.state) == 0))
        return real(nets, images[:64], labels[:64], opt, **kw)  # a few real steps fill the momentum buffers

    monkeypatch.setattr(training, 'train_epoch', spy)
    args = buffer.build_parser().parse_args(flags + ['--train_epochs', str(epochs), '--model', 'ConvNetW32',
                                                     '--batch_train', '512'])
    args.model = 'ConvNetW32'
    args.lr_teacher = buffer.expert_lr(args.optim, args.lr_teacher)
    [(trajectory, meta)] = buffer.train_experts(args, digits, 'cpu', [0], progress=False)
    assert len(trajectory) == epochs + 1 and len(seen) == epochs
    return seen


@pytest.mark.parametrize('epochs', [6, 7])
def test_ast_code_recipe_is_the_authors_buffer_py(monkeypatch, digits, epochs):
    """The authors' defaults: SGD momentum 0.9, lr 0.003, weight decay 1e-3; after epoch index E//2+1 the lr
    is x0.6 and the optimiser is rebuilt, so the next epoch starts with no momentum buffer."""
    seen = record_epochs(monkeypatch, digits, ['--optim', 'sgdmom_code', '--loss_decay', 'code'], epochs)
    change = epochs // 2 + 1
    expected = [(0.003 if e <= change else 0.003 * 0.6, 0.9, 1e-3, e in (0, change + 1)) for e in range(epochs)]
    assert [(pytest.approx(lr, rel=1e-12), m, wd, fresh) for lr, m, wd, fresh in expected] == seen


def test_mtt_decay_and_paper_recipe(monkeypatch, digits):
    """MTT's --decay: x0.1 after E//2+1 (optimiser rebuilt, as MTT's buffer.py); the paper's sgdmom_paper:
    x0.5 after E//2; plain MTT SGD never changes its lr."""
    seen = record_epochs(monkeypatch, digits, ['--decay'], 6)
    assert [s[0] for s in seen] == pytest.approx([0.01] * 5 + [0.001])
    seen = record_epochs(monkeypatch, digits, ['--optim', 'sgdmom_paper'], 6)
    assert [s[0] for s in seen] == pytest.approx([0.01] * 4 + [0.005] * 2)
    assert [s[3] for s in seen] == [True, False, False, False, True, False]
    seen = record_epochs(monkeypatch, digits, [], 3)
    assert [s[:3] for s in seen] == [(0.01, 0.0, 0.0)] * 3
    explicit = record_epochs(monkeypatch, digits, ['--optim', 'sgdmom_code', '--lr_teacher', '0.004'], 2)
    assert explicit[0][0] == 0.004  # an explicit --lr_teacher wins over the recipe's default


def test_adam_experts_are_the_authors_optim_adam(monkeypatch, digits):
    """--optim ADAM (the authors' spelling): torch Adam with lr 0.003 and weight decay 1e-3, the lr x0.6 after
    epoch index E//2+1 whatever --decay says, and a fresh Adam there (its moments reset)."""
    built = []
    real = training.OneNet.sgd

    def spy(self, s):
        opt = real(self, s)
        built.append((type(opt).__name__, opt.param_groups[0]['lr'], opt.param_groups[0]['weight_decay']))
        return opt

    monkeypatch.setattr(training.OneNet, 'sgd', spy)
    seen = []
    real_epoch = training.train_epoch

    def epoch_spy(nets, images, labels, opt, **kw):
        seen.append(len(opt.state) == 0)
        return real_epoch(nets, images[:64], labels[:64], opt, **kw)

    monkeypatch.setattr(training, 'train_epoch', epoch_spy)
    args = buffer.build_parser().parse_args(['--optim', 'ADAM', '--train_epochs', '6', '--model', 'ConvNetW32',
                                             '--batch_train', '512'])
    assert args.optim == 'adam'
    args.lr_teacher = buffer.expert_lr(args.optim, args.lr_teacher)
    [(trajectory, meta)] = buffer.train_experts(args, digits, 'cpu', [0], progress=False)
    assert built == [('Adam', 0.003, 1e-3), ('Adam', pytest.approx(0.003 * 0.6, rel=1e-12), 1e-3)]
    assert seen == [True, False, False, False, False, True]  # rebuilt after epoch index 6//2+1 = 4
    assert meta['avg_var'] > 0 and len(meta['test_acc_per_epoch']) == 6  # Avg_Var logged as for the others


def test_parallel_experts_refuse_adam():
    from trajmatch.cli import UsageError
    net = buffer.get_network('ConvNetW32', 1, 10, (8, 8))
    with pytest.raises(UsageError, match='--optim adam is not vectorised'):
        buffer.check_parallel_experts(2, gp=False, model='ConvNetW32', net=net, optim='adam')
