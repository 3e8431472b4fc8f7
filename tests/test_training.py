"""training.py: the one lr schedule (experts and evaluation), and the one-network epoch as a plain PyTorch loop.

The schedules are written out by hand from the loops they replace: the experts' buffer.py (MTT's and the
AST authors': lr change and a new optimiser after epoch index E//2 or E//2+1) and evaluate_synset (MTT's
and AST's utils.py: E+1 epochs, a new optimiser after epoch E//2+1). One entry per trained epoch: the SGD
built before it, or None where the optimiser (and its momentum buffers) carries on.
"""
import pytest
import torch
import torch.nn.functional as F

from trajmatch.augment import dsa
from buffer import expert_schedule
from trajmatch.data import load_dataset
from trajmatch.evaluation import check_epochs, eval_schedule, fresh_network, random_real
from trajmatch.stacked import NetStack
from trajmatch.training import OneNet, SGDSettings as S, step_schedule, train_epoch

SHAPE = (1, 10, (8, 8))  # Digits: channel, classes, im_size
_ = None


@pytest.mark.parametrize('epochs,want', [
    # E = 6: E//2 = 3, E//2+1 = 4
    (6, {'sgd': [S(0.01, 0.5, 1e-4), _, _, _, _, _],
         'sgd --decay': [S(0.01, 0.5, 1e-4), _, _, _, _, S(0.01 * 0.1, 0.5, 1e-4)],
         'sgdmom_paper': [S(0.01, 0.9, 0.0), _, _, _, S(0.01 * 0.5, 0.9, 0.0), _],
         'sgdmom_code': [S(0.003, 0.9, 1e-3), _, _, _, _, S(0.003 * 0.6, 0.9, 1e-3)],
         'adam': [S(0.003, 0.0, 1e-3, 'adam'), _, _, _, _, S(0.003 * 0.6, 0.0, 1e-3, 'adam')]}),
    # E = 7: E//2 = 3, E//2+1 = 4
    (7, {'sgd': [S(0.01, 0.5, 1e-4), _, _, _, _, _, _],
         'sgd --decay': [S(0.01, 0.5, 1e-4), _, _, _, _, S(0.01 * 0.1, 0.5, 1e-4), _],
         'sgdmom_paper': [S(0.01, 0.9, 0.0), _, _, _, S(0.01 * 0.5, 0.9, 0.0), _, _],
         'sgdmom_code': [S(0.003, 0.9, 1e-3), _, _, _, _, S(0.003 * 0.6, 0.9, 1e-3), _]}),
    # E = 1 or 2: the change would come after the last epoch
    (1, {'sgd --decay': [S(0.01, 0.5, 1e-4)], 'sgdmom_paper': [S(0.01, 0.9, 0.0)]}),
    (2, {'sgd --decay': [S(0.01, 0.5, 1e-4), _], 'sgdmom_paper': [S(0.01, 0.9, 0.0), _]}),
])
def test_expert_recipes_written_out(epochs, want):
    """--mom 0.5 --l2 1e-4 reach only --optim sgd; the recipes' default lrs (no --lr_teacher)."""
    for name, schedule in want.items():
        optim, decay = name.split(' ')[0], name.endswith('--decay')
        assert expert_schedule(optim, None, 0.5, 1e-4, decay, epochs) == schedule, name
    assert expert_schedule('sgdmom_code', 0.004, 0.5, 1e-4, False, 6)[::5] == [S(0.004, 0.9, 1e-3),
                                                                              S(0.004 * 0.6, 0.9, 1e-3)]
    # the AST authors' spelling SGDMOM (sgdmom) is their code's recipe, not the paper's (before issue 26: the paper's)
    assert expert_schedule('sgdmom', None, 0.5, 1e-4, False, 6) == expert_schedule('sgdmom_code', None, 0, 0, False, 6)


@pytest.mark.parametrize('epochs,want', [
    # E = 6: epochs 0..6, E//2+1 = 4
    (6, {'mtt': [S(0.01, 0.9, 5e-4), _, _, _, _, S(0.01 * 0.1, 0.9, 5e-4), _],
         'ast': [S(0.01, 0.9, 1e-3), _, _, _, _, S(0.01 * 0.5, 0.8, 1e-3), _]}),
    # E = 7: epochs 0..7, E//2+1 = 4
    (7, {'mtt': [S(0.01, 0.9, 5e-4), _, _, _, _, S(0.01 * 0.1, 0.9, 5e-4), _, _],
         'ast': [S(0.01, 0.9, 1e-3), _, _, _, _, S(0.01 * 0.5, 0.8, 1e-3), _, _]}),
    # E = 8: epochs 0..8, E//2+1 = 5
    (8, {'mtt': [S(0.01, 0.9, 5e-4), _, _, _, _, _, S(0.01 * 0.1, 0.9, 5e-4), _, _],
         'ast': [S(0.01, 0.9, 1e-3), _, _, _, _, _, S(0.01 * 0.5, 0.8, 1e-3), _, _]}),
    # E = 0 and 1: the change (after epoch 1 or 2) comes after the last epoch
    (0, {'mtt': [S(0.01, 0.9, 5e-4)], 'ast': [S(0.01, 0.9, 1e-3)]}),
    (1, {'mtt': [S(0.01, 0.9, 5e-4), _], 'ast': [S(0.01, 0.9, 1e-3), _]}),
])
def test_evaluation_schedules_written_out(epochs, want):
    for lr_decay, schedule in want.items():
        assert eval_schedule(lr_decay, 0.01, epochs) == schedule, lr_decay


def test_ast_checks_and_schedule_limits():
    assert check_epochs('ast', 41) == [0, 20, 40] and check_epochs('ast', 40) == [0, 20, 40]
    assert check_epochs('mtt', 41) == []
    assert step_schedule(0, S(0.1, 0.0, 0.0), change_after=0, lr_factor=0.5, momentum_after=0.0) == []
    with pytest.raises(ValueError, match='epochs'):
        step_schedule(-1, S(0.1, 0.0, 0.0), change_after=None, lr_factor=1.0, momentum_after=0.0)


@pytest.fixture(scope='module')
def digits():
    return load_dataset('Digits')


def test_one_network_epoch_is_the_plain_pytorch_loop(digits):
    """K = 1: the same operations, in the same order, drawing the same random numbers as a loop written
    out with torch.optim.SGD (loss scale and an extra loss on the clean batch included): bit-identical."""
    images, labels = random_real(digits, 3, torch.Generator().manual_seed(0))  # 30 images: batches 16 + 14

    def penalty(net, x):
        return 0.1 * net(x).pow(2).mean()

    ref = fresh_network('ConvNetD2', SHAPE, 0, torch.device('cpu'))
    opt = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        order = torch.randperm(len(labels), generator=gen)
        for start in range(0, len(labels), 16):
            idx = order[start:start + 16]
            x, y = images[idx], labels[idx]
            loss = F.cross_entropy(ref(dsa(x, generator=gen)), y) * 0.7 + penalty(ref, x)
            opt.zero_grad()
            loss.backward()
            opt.step()

    group = OneNet(fresh_network('ConvNetD2', SHAPE, 0, torch.device('cpu')))
    opt = group.sgd(S(0.01, 0.9, 5e-4))
    gens = [torch.Generator().manual_seed(0)]
    for _ in range(2):
        losses, accs = train_epoch(group, images, labels, opt, batch_size=16, generators=gens, loss_scale=0.7,
                                   extra_loss=penalty)
    assert losses.shape == accs.shape == (1,) and 0 <= accs.item() <= 1
    start = fresh_network('ConvNetD2', SHAPE, 0, torch.device('cpu'))
    assert any(not torch.equal(p, q) for p, q in zip(ref.parameters(), start.parameters()))  # it trained
    for p, q in zip(ref.parameters(), group.net.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(gen.get_state(), gens[0].get_state())  # the same random draws


def test_group_refuses_what_it_cannot_train(digits):
    images, labels = random_real(digits, 1, torch.Generator().manual_seed(0))
    stack = NetStack([fresh_network('ConvNetD2', SHAPE, s, torch.device('cpu')) for s in (0, 1)])
    opt = stack.sgd(S(0.01, 0.0, 0.0))
    with pytest.raises(ValueError, match='2 networks'):
        train_epoch(stack, images, labels, opt, batch_size=8, generators=[torch.Generator()])
    with pytest.raises(ValueError, match='not vectorised'):
        train_epoch(stack, images, labels, opt, batch_size=8, generators=[torch.Generator(), torch.Generator()],
                    extra_loss=lambda net, x: x.sum())
