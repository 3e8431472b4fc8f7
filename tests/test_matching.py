"""The maths of the inner loop: one step is SGD, and the hypergradient matches finite differences."""
import pytest
import torch
import torch.nn.functional as F

from trajmatch.matching import param_distance_ratio, syn_batches, unroll
from networks import ConvNet
from reparam_module import ReparamModule


def matching_loss(student, syn_images, syn_labels, syn_lr, start, target, *, syn_steps, batch_syn, generator,
                  syn_mom=0.0, use_dsa=True, loss_weight=1.0):
    """The reference: MTT's loss with its whole graph, ||w_N - θ*_{t+M}||² / ||θ*_t - θ*_{t+M}||²."""
    ws = unroll(student, syn_images, syn_labels, syn_lr, start, syn_steps=syn_steps, batch_syn=batch_syn,
                generator=generator, syn_mom=syn_mom, use_dsa=use_dsa, loss_weight=loss_weight)
    return param_distance_ratio(ws[-1], start, target)


def tiny_problem(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = ConvNet(channel=1, num_classes=3, im_size=(8, 8), width=4, depth=1).to(dtype)
    student = ReparamModule(net)
    images = torch.randn(6, 1, 8, 8, dtype=dtype)
    labels = torch.arange(3).repeat_interleave(2)
    start = student.flat_param()
    target = start + 0.05 * torch.randn_like(start)
    return net, student, images, labels, start, target


def test_one_inner_step_is_a_hand_written_sgd_step():
    net, student, images, labels, start, _ = tiny_problem()
    lr = 0.1
    ws = unroll(student, images, labels, torch.tensor(lr, dtype=torch.float64), start, syn_steps=1,
                batch_syn=6, generator=torch.Generator().manual_seed(0), use_dsa=False)
    loss = F.cross_entropy(net(images), labels)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    by_hand = torch.cat([(p - lr * g).reshape(-1) for p, g in zip(net.parameters(), grads)])
    torch.testing.assert_close(ws[1], by_hand, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(ws[1], ws[0])


def test_momentum_step_matches_heavy_ball():
    _, student, images, labels, start, _ = tiny_problem()
    lr, mu = 0.1, 0.9
    gen = lambda: torch.Generator().manual_seed(0)
    ws = unroll(student, images, labels, torch.tensor(lr, dtype=torch.float64), start, syn_steps=2,
                batch_syn=6, generator=gen(), syn_mom=mu, use_dsa=False)
    g1 = torch.autograd.grad(F.cross_entropy(student(images, start.requires_grad_()), labels), start)[0]
    w1 = start.detach() - lr * g1
    w1r = w1.clone().requires_grad_()
    g2 = torch.autograd.grad(F.cross_entropy(student(images, w1r), labels), w1r)[0]
    w2 = w1 - lr * (mu * g1 + g2)
    torch.testing.assert_close(ws[2], w2, rtol=1e-10, atol=1e-12)


def test_batches_cover_a_permutation_before_repeating():
    batches = syn_batches(10, 4, 5, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4]
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(10))


@pytest.mark.parametrize('use_dsa', [False, True])
def test_hypergradient_matches_central_finite_differences(use_dsa):
    """dL/dS and dL/dα from back-propagation through N = 3 steps vs central differences (float64)."""
    _, student, images, labels, start, target = tiny_problem()
    lr = torch.tensor(0.05, dtype=torch.float64)

    def loss_at(imgs, alpha):  # reseeded generator: the same batches and augmentation every call
        return matching_loss(student, imgs, labels, alpha, start, target, syn_steps=3, batch_syn=4,
                             generator=torch.Generator().manual_seed(1), use_dsa=use_dsa)

    imgs = images.clone().requires_grad_(True)
    alpha = lr.clone().requires_grad_(True)
    loss_at(imgs, alpha).backward()
    assert imgs.grad.abs().sum() > 0

    eps = 1e-6
    torch.manual_seed(3)
    for _ in range(3):  # random directions in image space (the unroll itself needs autograd on)
        d = torch.randn_like(images)
        fd = (loss_at(images + eps * d, lr) - loss_at(images - eps * d, lr)) / (2 * eps)
        torch.testing.assert_close((imgs.grad * d).sum(), fd.detach(), rtol=1e-5, atol=1e-9)
    fd_lr = (loss_at(images, lr + eps) - loss_at(images, lr - eps)) / (2 * eps)
    torch.testing.assert_close(alpha.grad, fd_lr.detach(), rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------- recompute == bptt, ATT

from trajmatch.matching import (RECOMPUTE_STATES_MIB, Targets, Unroll, checkpoint_every, final_step,  # noqa: E402
                                match_and_backward, record_steps, state_pair_bytes)


def grads_of(mode, *, syn_mom=0.0, auto_steps=False, middle=True, loss_weight=1.0, use_dsa=True,
             states_mib=RECOMPUTE_STATES_MIB):
    _, student, images, labels, start, target = tiny_problem()
    imgs = images.clone().requires_grad_(True)
    alpha = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    mid = [(2, start + 0.5 * (target - start), 1.0)] if middle else []
    loss, info = match_and_backward(student, imgs, labels, alpha, start, Targets(start, target, mid), Unroll(syn_steps=5, batch_syn=4, syn_mom=syn_mom, use_dsa=use_dsa, mode=mode, auto_steps=auto_steps, states_mib=states_mib), generator=torch.Generator().manual_seed(2), loss_weight=loss_weight)
    return loss, info, imgs.grad, alpha.grad


@pytest.mark.parametrize('states_mib', [RECOMPUTE_STATES_MIB, 0.0])
@pytest.mark.parametrize('auto_steps', [False, True])
def test_recompute_tapes_the_last_step_once(monkeypatch, states_mib, auto_steps):
    """record_steps tapes step N and the walk starts from that graph: N forward passes, then N - 1 re-tapes
    (plus the segments' regeneration when checkpointing). ATT knows N_opt only after step N: it re-tapes."""
    import trajmatch.matching as matching
    calls = []
    real = matching.inner_loss
    monkeypatch.setattr(matching, 'inner_loss', lambda *a, **k: calls.append(1) or real(*a, **k))
    _, info, _, _ = grads_of('recompute', auto_steps=auto_steps, states_mib=states_mib, middle=False)
    n, top = 5, info['n_final']  # the walk starts at N_opt (ATT) or N
    every = 1 if states_mib else 3  # ceil(sqrt(5))
    regenerate = sum(min(s + every, top) - s - 1 for s in range(0, top, every))
    retape = top if auto_steps else n - 1
    assert len(calls) == n + retape + regenerate


# recompute's two schedules: every state kept (the default budget, these tiny problems fit) and
# checkpoints every ceil(sqrt(N)) steps with the segments regenerated (budget 0)
SCHEDULES = [RECOMPUTE_STATES_MIB, 0.0]


@pytest.mark.parametrize('states_mib', SCHEDULES)
@pytest.mark.parametrize('syn_mom', [0.0, 0.9])
@pytest.mark.parametrize('auto_steps', [False, True])
def test_recompute_equals_bptt(syn_mom, auto_steps, states_mib):
    lb, ib, gb, ab = grads_of('bptt', syn_mom=syn_mom, auto_steps=auto_steps, loss_weight=1.3)
    lr_, ir, gr, ar = grads_of('recompute', syn_mom=syn_mom, auto_steps=auto_steps, loss_weight=1.3,
                               states_mib=states_mib)
    assert ib['n_final'] == ir['n_final']
    torch.testing.assert_close(lr_, lb, rtol=1e-10, atol=0)
    assert gb.abs().sum() > 0 and ab.abs() > 0
    torch.testing.assert_close(gr, gb, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(ar, ab, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize('syn_mom', [0.0, 0.9])
def test_recompute_schedules_agree(syn_mom):
    """Keeping every state and regenerating segments from checkpoints replay the same free steps: the
    same gradients (float64), and the budget picks the schedule."""
    start = tiny_problem()[4]
    pair = state_pair_bytes(start)
    assert checkpoint_every(5, pair, 5 * pair) == 1 and checkpoint_every(5, pair, 5 * pair - 1) == 3
    assert checkpoint_every(5, pair, 0) == 3 and checkpoint_every(16, pair, 0) == 4
    (l1, _, g1, a1), (l2, _, g2, a2) = (grads_of('recompute', syn_mom=syn_mom, states_mib=m) for m in SCHEDULES)
    assert g1.abs().sum() > 0
    torch.testing.assert_close(l2, l1, rtol=1e-13, atol=0)
    torch.testing.assert_close(g2, g1, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(a2, a1, rtol=1e-12, atol=1e-15)


def test_bptt_with_every_term_matches_finite_differences():
    """Every AST component on (perturbed start, balanced-loss ν, intermediate term with adaptive β, student
    momentum) and DSA: dL/dS and dL/dα still equal central differences, in both unroll modes."""
    from trajmatch.ast_components import balance_weight, intermediate_betas, perturb_start
    _, student, images, labels, start, target = tiny_problem()
    mid = [(2, start + 0.5 * (target - start), intermediate_betas(2, adaptive=True)[0])]
    w0 = perturb_start(start, student.param_shapes, rho=0.1, generator=torch.Generator().manual_seed(7))
    nu = balance_weight(3, 20)
    assert not torch.equal(w0, start) and nu != 1.0

    def loss_at(imgs, alpha, grad=False, mode='bptt', states_mib=RECOMPUTE_STATES_MIB):
        imgs = imgs.clone().requires_grad_(grad)
        a = torch.tensor(alpha, dtype=torch.float64, requires_grad=grad)
        loss, _ = match_and_backward(student, imgs, labels, a, w0, Targets(start, target, mid), Unroll(syn_steps=4, batch_syn=4, syn_mom=0.9, mode=mode, states_mib=states_mib), generator=torch.Generator().manual_seed(4), loss_weight=nu)
        return loss, imgs.grad, a.grad

    _, g_img, g_lr = loss_at(images, 0.05, grad=True)
    for states_mib in SCHEDULES:
        _, g_img_rc, g_lr_rc = loss_at(images, 0.05, grad=True, mode='recompute', states_mib=states_mib)
        torch.testing.assert_close(g_img_rc, g_img, rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(g_lr_rc, g_lr, rtol=1e-5, atol=1e-12)
    eps = 1e-6
    d = torch.randn_like(images)
    fd = (loss_at(images + eps * d, 0.05)[0] - loss_at(images - eps * d, 0.05)[0]) / (2 * eps)
    torch.testing.assert_close((g_img * d).sum(), fd, rtol=1e-5, atol=1e-9)
    fd_lr = (loss_at(images, 0.05 + eps)[0] - loss_at(images, 0.05 - eps)[0]) / (2 * eps)
    torch.testing.assert_close(g_lr, fd_lr, rtol=1e-5, atol=1e-9)


def test_att_picks_the_step_where_the_target_was_planted():
    _, student, images, labels, start, _ = tiny_problem()
    ws = unroll(student, images, labels, torch.tensor(0.3, dtype=torch.float64), start, syn_steps=8, batch_syn=6,
                generator=torch.Generator().manual_seed(0), use_dsa=False)
    ws = [w.detach() for w in ws]
    for k in (1, 3, 8):
        assert final_step(ws, ws[k], auto_steps=True, metric='l1') == k
        assert final_step(ws, ws[k], auto_steps=True, metric='l2') == k
    assert final_step(ws, ws[3], auto_steps=False) == 8
    # the recompute forward tracks the same first minimum on the fly, and keeps that step's weights
    for k in (1, 3, 8):
        for metric in ('l1', 'l2'):
            tape = record_steps(student, images, labels, torch.tensor(0.3, dtype=torch.float64), start, syn_steps=8,
                                batch_syn=6, generator=torch.Generator().manual_seed(0), keep=set(), target=ws[k],
                                auto_steps=True, att_metric=metric, use_dsa=False)
            assert tape.n_final == k
            torch.testing.assert_close(tape.kept[k], ws[k], rtol=1e-10, atol=0)  # float64; measured 2.2e-16


@pytest.mark.parametrize('syn_steps,expert_epochs', [(2, 3), (1, 3), (3, 4), (2, 5)])
@pytest.mark.parametrize('auto_steps', [False, True])
def test_both_unrolls_agree_when_intermediate_steps_fall_on_step_0_or_repeat(syn_steps, expert_epochs, auto_steps):
    """N < M puts intermediate terms at step 0 (the start itself) or on the same step twice; bptt and
    recompute must take the same loss and the same gradients there (recompute once raised KeyError)."""
    from trajmatch.ast_components import intermediate_betas, intermediate_steps
    _, student, images, labels, start, target = tiny_problem()
    steps = intermediate_steps(syn_steps, expert_epochs)
    assert 0 in steps or len(set(steps)) < len(steps)
    betas = intermediate_betas(expert_epochs, adaptive=True)
    mid = [(n, start + (i / expert_epochs) * (target - start) + 0.01 * i, beta)
           for i, (n, beta) in enumerate(zip(steps, betas), start=1)]
    out = {}
    for mode in ('bptt', 'recompute'):
        imgs = images.clone().requires_grad_(True)
        alpha = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
        loss, info = match_and_backward(student, imgs, labels, alpha, start, Targets(start, target, mid), Unroll(syn_steps=syn_steps, batch_syn=4, syn_mom=0.9, mode=mode, auto_steps=auto_steps), generator=torch.Generator().manual_seed(5))
        out[mode] = (loss, info, imgs.grad, alpha.grad)
    (lb, ib, gb, ab), (lr_, ir, gr, ar) = out['bptt'], out['recompute']
    assert ib['n_final'] == ir['n_final']
    assert set(ib) == set(ir) and len([k for k in ib if k.startswith('loss_mid')]) == expert_epochs - 1
    for k in ib:
        torch.testing.assert_close(torch.as_tensor(ir[k]), torch.as_tensor(ib[k]), rtol=1e-10, atol=0)
    torch.testing.assert_close(lr_, lb, rtol=1e-10, atol=0)
    assert gb.abs().sum() > 0
    torch.testing.assert_close(gr, gb, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(ar, ab, rtol=1e-5, atol=1e-12)
