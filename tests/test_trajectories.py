"""--trajectories K: K students in one vectorised unroll. Their update is the mean of the K single-trajectory
gradients (both unroll modes, float64); K = 1 takes the unchanged path; a K-student run resumes bit for bit
and steps as K torchrun ranks do; the memory plan counts K."""
import glob
import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import distill
from networks import ConvNet
from reparam_module import ReparamModule
from trajmatch import matching, memplan
from trajmatch.checkpoint import CursorGroup, GeneratorGroup, student_streams
from trajmatch.matching import RECOMPUTE_STATES_MIB, Targets, Unroll, match_and_backward
from trajmatch.memplan import RunShape, make_plan
from conftest import kill_at_unroll, tiny_buffers

K = 3
SEEDS = (11, 12, 13)  # student k's plan: batches and DSA draws from a generator of its own


def tiny_students(norm='instancenorm'):
    """A two-layer ConvNet on 8x8 images (Digits-sized), and K different (w0, targets, ν) in float64."""
    torch.manual_seed(0)
    net = ConvNet(channel=1, num_classes=3, im_size=(8, 8), width=4, depth=2, norm=norm).double()
    student = ReparamModule(net)
    images = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    labels = torch.arange(3).repeat_interleave(2)
    start = student.flat_param()
    w0s = [start + 0.05 * torch.randn_like(start) for _ in range(K)]
    finals = [w + 0.05 * torch.randn_like(w) for w in w0s]
    mids = [w + 0.5 * (f - w) + 0.01 * torch.randn_like(w) for w, f in zip(w0s, finals)]
    nus = [1.0, 0.7, 1.3]
    return student, images, labels, w0s, finals, mids, nus


def one_call(student, images, labels, w0, targets, u, generator, loss_weight):
    imgs = images.clone().requires_grad_(True)
    alpha = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    loss, info = match_and_backward(student, imgs, labels, alpha, w0, targets, u, generator=generator,
                                    loss_weight=loss_weight)
    return loss, info, imgs.grad, alpha.grad


@pytest.mark.parametrize('mode, states_mib', [('bptt', RECOMPUTE_STATES_MIB), ('recompute', RECOMPUTE_STATES_MIB),
                                              ('recompute', 0.0)])  # recompute: every state kept; checkpoints
@pytest.mark.parametrize('syn_mom', [0.0, 0.9])
def test_k_students_step_with_the_mean_of_k_single_trajectory_gradients(mode, states_mib, syn_mom):
    """Three different (w0, targets, ν) pairs, each with its own batch plan and DSA draws (6 images in
    batches of 4: a partial batch every other step), an intermediate term: the K-student call's image and
    syn_lr gradients are the mean of the three single calls' (measured: at most 6.7e-16 relative, float64)."""
    student, images, labels, w0s, finals, mids, nus = tiny_students()
    u = Unroll(syn_steps=5, batch_syn=4, syn_mom=syn_mom, mode=mode, states_mib=states_mib)
    singles = [one_call(student, images, labels, w0, Targets(w0, f, [(2, m, 0.5)]), u,
                        torch.Generator().manual_seed(s), nu)
               for w0, f, m, s, nu in zip(w0s, finals, mids, SEEDS, nus)]
    stacked = Targets(torch.stack(w0s), torch.stack(finals), [(2, torch.stack(mids), 0.5)])
    loss, info, g_img, g_lr = one_call(student, images, labels, torch.stack(w0s), stacked, u,
                                       [torch.Generator().manual_seed(s) for s in SEEDS],
                                       torch.tensor(nus, dtype=torch.float64))
    mean_img = sum(s[2] for s in singles) / K
    mean_lr = sum(s[3] for s in singles) / K
    assert not torch.allclose(singles[0][2], singles[1][2])  # three different trajectories
    torch.testing.assert_close(g_img, mean_img, rtol=1e-9, atol=0)
    torch.testing.assert_close(g_lr, mean_lr, rtol=1e-9, atol=0)
    torch.testing.assert_close(info['loss_students'], torch.stack([s[0] for s in singles]), rtol=1e-9, atol=0)
    torch.testing.assert_close(loss, sum(s[0] for s in singles) / K, rtol=1e-9, atol=0)
    torch.testing.assert_close(info['loss_mid1'], sum(s[1]['loss_mid1'] for s in singles) / K, rtol=1e-9, atol=0)
    assert info['n_final'] == 5
    diff = max(((g_img - mean_img).abs().max() / mean_img.abs().max()).item(),
               ((g_lr - mean_lr).abs() / mean_lr.abs()).item())
    print(f"{mode} syn_mom {syn_mom}: max relative difference {diff:.2e}")


def test_each_student_draws_what_one_student_with_its_generator_draws():
    images = torch.randn(6, 1, 8, 8)
    alone = [matching.plan_steps(images, 4, 5, torch.Generator().manual_seed(s), True) for s in SEEDS]
    plan = matching.plan_steps(images, 4, 5, [torch.Generator().manual_seed(s) for s in SEEDS], True)
    for n in range(5):
        assert plan.batches[n].shape == (K, len(alone[0].batches[n]))
        for k in range(K):
            assert torch.equal(plan.batches[n][k], alone[k].batches[n])
            assert plan.augs[n][k].op == alone[k].augs[n].op
            assert all(torch.equal(v, alone[k].augs[n].values[key]) for key, v in plan.augs[n][k].values.items())


def test_att_and_batchnorm_are_refused_for_k_students():
    student, images, labels, w0s, finals, _, _ = tiny_students()
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    targets = Targets(torch.stack(w0s), torch.stack(finals))
    with pytest.raises(ValueError, match='ATT'):
        one_call(student, images, labels, torch.stack(w0s), targets, Unroll(syn_steps=2, batch_syn=4, auto_steps=True),
                 gens, 1.0)
    bn = tiny_students(norm='batchnorm')
    with pytest.raises(ValueError, match='BatchNorm'):
        one_call(bn[0], images, labels, torch.stack(bn[3]), Targets(torch.stack(bn[3]), torch.stack(bn[4])),
                 Unroll(syn_steps=2, batch_syn=4), gens, 1.0)


# ---------------------------------------------------------------- the streams, the memory plan

def test_student_streams_are_the_ranks_streams_and_round_trip(tmp_path):
    """Student k of rank r is virtual rank r K + k: its cursor and generator are that torchrun rank's (rank
    0's generator is the one that drew the images); one K = 1 stream is the plain objects."""
    files = [str(tmp_path / 'unused.pt')]
    init = torch.Generator().manual_seed(0)
    gen, cursor = student_streams(0, 0, 1, init, files, mct=False)
    assert gen is init and not isinstance(cursor, CursorGroup)
    gens, cursors = student_streams(5, 1, 3, init, files, mct=False)
    assert isinstance(gens, GeneratorGroup) and isinstance(cursors, CursorGroup)
    from trajmatch.distributed import rank_seed
    assert [c.seed for c in cursors.cursors] == [rank_seed(5, v) for v in (3, 4, 5)]
    assert all(torch.equal(g.get_state(), torch.Generator().manual_seed(rank_seed(5, v)).get_state())
               for g, v in zip(gens.generators, (3, 4, 5)))
    state = gens.get_state()
    first = [torch.rand(2, generator=g) for g in gens.generators]
    gens.set_state(state)
    assert all(torch.equal(torch.rand(2, generator=g), f) for g, f in zip(gens.generators, first))
    with pytest.raises(ValueError):
        gens.set_state(state[:2])
    with pytest.raises(ValueError):
        cursors.load_state_dict({'students': [{}]})


def test_the_plan_counts_k_students():
    """The K-scaled parts are K x one student's; the probed step is affine in K and, vmapped, keeps some
    activations in a second layout: K = 4 plans about 4x K = 1's unroll (here 5.7x bptt, 4.6x recompute)."""
    shape = RunShape('ConvNetD2', 1, 10, (8, 8), ipc=1, batch_syn=10, syn_steps=20, num_test=360, eval_networks=5)
    plans = {k: make_plan(replace(shape, trajectories=k)) for k in (1, 2, 4, 8)}
    part = lambda k, name: next(p for p in plans[k].parts if p.name.startswith(name))  # noqa: E731
    for mode in ('bptt', 'recompute'):
        assert getattr(part(4, 'student states'), mode) == 4 * getattr(part(1, 'student states'), mode)
        saved = {k: getattr(part(k, 'saved by autograd'), mode) for k in plans}
        assert saved[8] - saved[4] == pytest.approx(2 * (saved[4] - saved[2]), rel=1e-9)  # affine in K
        assert 4 <= plans[4].growth(mode) / plans[1].growth(mode) <= 6.5
    held = lambda plan: sum(p.bptt for p in plan.parts if p.held)  # noqa: E731
    assert held(plans[4]) < 1.5 * held(plans[1])  # the set, the test set, the evaluation networks: once


@pytest.mark.parametrize('group', [None, 'crop', 'rotate'])
def test_the_stacked_probe_extrapolates_exactly_in_students(group):
    from test_memplan import student as memplan_student
    net = memplan_student()
    args = (1, 4, (8, 8), 3)
    two, three, four, five = (memplan.probe_step(net, *args, group=group, syn_mom=0.9, students=k)
                              for k in (2, 3, 4, 5))
    for k, direct in ((4, four), (5, five)):
        assert memplan._at_students([two], [three], k) == [pytest.approx(direct, rel=0, abs=0)]


@pytest.mark.parametrize('mode', ['bptt', 'recompute'])
@pytest.mark.parametrize('k', [2, 4])
def test_predicted_growth_matches_the_live_tensor_bytes_of_k_students(mode, k):
    """As tests/test_memplan.py for one student (measured: predicted / live 1.02 to 1.07; recompute
    plans every student on DSA's largest group)."""
    from test_memplan import CHANNEL, CLASSES, IM, LiveTensorBytes, tiny
    from test_memplan import student as memplan_student
    shape = tiny(ipc=4, syn_steps=9, syn_mom=0.9, middle_steps=(4,), trajectories=k)
    net = memplan_student()
    w0 = net.flat_param().repeat(k, 1)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(shape.num_syn, CHANNEL, *IM, generator=gen).requires_grad_(True)
    labels = torch.arange(CLASSES).repeat_interleave(shape.ipc)
    lr = torch.tensor(0.01, requires_grad=True)
    targets = Targets(w0, w0 + 0.01 * torch.randn(w0.shape, generator=gen), [(4, w0 + 0.005, 1.0)])
    live = LiveTensorBytes()
    with live:
        match_and_backward(net, images, labels, lr, w0, targets, Unroll(syn_steps=9, batch_syn=shape.batch,
                           syn_mom=0.9, mode=mode), generator=[torch.Generator().manual_seed(s) for s in range(k)])
    assert make_plan(shape).growth(mode) == pytest.approx(live.peak, rel=0.12)


# ---------------------------------------------------------------- distill.py --trajectories

MODEL = 'ConvNetW32'


@pytest.fixture(scope='module')
def buffers(tmp_path_factory):
    return tiny_buffers(tmp_path_factory, 4, MODEL)  # the experts of tests/test_distributed.py's 2-rank runs


def checkpoint(run_dir):
    return torch.load(os.path.join(run_dir, 'checkpoint.pt'), weights_only=True)


def metrics(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def iteration_before_trajectories(syn, student, trajectory, gen, m):
    """distill.iteration as it was before --trajectories (its sampling, match and step, single process)."""
    t = distill.sample_start(m.max_start_epoch, trajectory.continuous_time, gen)
    targets = distill.expert_targets(trajectory, t, syn_steps=m.unroll.syn_steps, expert_epochs=m.expert_epochs,
                                     middle=m.middle, adaptive=m.adaptive, rule=m.middle_rule)
    w0, targets = distill.student_start(targets, student.param_shapes, perturb=m.perturb, variant=m.perturb_variant,
                                        rho=m.perturb_rho, generator=gen)
    nu = distill.balance_weight(t, m.max_start_epoch, base=m.balance_base) if m.balance else 1.0
    syn.zero_grad()
    loss, info = match_and_backward(student, syn.images, syn.labels, syn.lr, w0, targets, m.unroll, generator=gen,
                                    loss_weight=nu)
    loss_value = loss.item()
    finite = math.isfinite(loss_value) and syn.grads_finite()
    stepped = finite and loss_value <= m.max_loss and syn.step()
    return t, nu, loss, info, stepped


def initial_images():
    """The images the run started from (drawn again from --seed: init_synthetic is deterministic)."""
    from trajmatch.runtime import seed_everything
    from trajmatch.synthetic import init_synthetic
    from trajmatch.data import load_dataset
    images, _ = init_synthetic(load_dataset('Digits', 'data'), 2, 'real', seed_everything(0))
    return images


EVERY_COMPONENT = ['--unroll', 'recompute', '--balance_loss', '--agg_middle_loss', '--weight_perturb', '--syn_mom', '0.9',
                   '--auto_steps', '--expert_epochs', '2', '--max_start_epoch', '1']


@pytest.mark.parametrize('flags', [['--unroll', 'bptt'], EVERY_COMPONENT])
def test_one_trajectory_is_the_iteration_from_before_bit_for_bit(buffers, flags):
    """--trajectories 1 (the default) keeps the plain streams and steps exactly as the code before it: two
    copies of the same run's setup, one stepped by distill.iteration, one by the old iteration's body."""
    argv = ['--model', MODEL, '--ipc', '2', '--syn_steps', '3', '--expert_epochs', '1', '--max_start_epoch', '2',
            '--lr_img', '10', '--buffer_path', buffers, '--device', 'cpu', *flags]
    args, _, _, _ = distill.read_flags(argv)
    runs = [distill.setup(args, None, torch.device('cpu'), {}) for _ in range(2)]
    assert all(type(r.gen) is torch.Generator and type(r.cursor).__name__ == 'ExpertCursor' for r in runs)
    for _ in range(3):
        new = distill.iteration(runs[0].syn, runs[0].student, runs[0].cursor.next(), runs[0].gen, runs[0].matching)
        t, nu, loss, info, stepped = iteration_before_trajectories(runs[1].syn, runs[1].student, runs[1].cursor.next(),
                                                                   runs[1].gen, runs[1].matching)
        assert (new.t, new.nu, new.skip is None) == (t, nu, stepped) and torch.equal(new.loss, loss)
        assert new.info.keys() == info.keys() and 'loss_students' not in new.info
    a, b = runs[0].syn, runs[1].syn
    assert torch.equal(a.images, b.images) and torch.equal(a.lr, b.lr)
    assert not torch.equal(a.images, initial_images())  # the steps moved the images
    assert torch.equal(runs[0].gen.get_state(), runs[1].gen.get_state())


TINY = ['--model', MODEL, '--ipc', '2', '--syn_steps', '3', '--expert_epochs', '1', '--max_start_epoch', '2',
        '--num_eval', '1', '--epoch_eval_train', '3', '--lr_img', '10', '--lr_lr', '1e-5', '--lr_teacher', '0.01',
        '--seed', '0', '--device', 'cpu', '--wandb', 'disabled']


def mean_of_single_calls(real):
    """match_and_backward for K stacked students done as K torchrun ranks do it: one single-trajectory call
    per student with its own generator, the gradients summed and divided by K."""
    def match(student, images, labels, syn_lr, w0, targets, u, *, generator, loss_weight):
        out = []
        for k, gen in enumerate(generator):
            x, a = images.detach().clone().requires_grad_(True), syn_lr.detach().clone().requires_grad_(True)
            mine = Targets(targets.start[k], targets.final[k], [(n, t[k], beta) for n, t, beta in targets.middle])
            loss, info = real(student, x, labels, a, w0[k], mine, u, generator=gen,
                              loss_weight=loss_weight[k].item())
            out.append((loss, info, x.grad, a.grad))
        images.grad = sum(o[2] for o in out) / len(out)
        syn_lr.grad = sum(o[3] for o in out) / len(out)
        losses = torch.stack([o[0] for o in out])
        return losses.mean(), {'loss_final': losses.mean(), 'n_final': out[0][1]['n_final'], 'loss_students': losses}
    return match


def test_two_trajectories_draw_and_step_as_two_torchrun_ranks(buffers, tmp_path, monkeypatch):
    """--trajectories 2 in one process takes rank 0's and rank 1's streams (experts, start epochs, batches,
    DSA) and steps with the mean of both gradients: with each stacked unroll done as two single calls it
    is the in-process 2-rank replay of tests/test_distributed.py over 4 iterations. The stacked unroll
    itself rounds differently in float32 (its float64 equality is the test above; here 7e-15 in float64,
    8e-6 in float32: ConvNetW32's last instance norm sees 1x1 maps, x - mean is rounding noise over
    sqrt(eps)), and this run amplifies any rounding (measured: 3e-4 after 1 step, 0.4 after 4): its first
    step is compared (measured 4.1e-5 of the update)."""
    from test_distributed import replay_two_ranks
    flags = TINY + ['--buffer_path', buffers, '--eval_it', '100', '--trajectories', '2']
    monkeypatch.setattr(distill, 'match_and_backward', mean_of_single_calls(matching.match_and_backward))
    looped = checkpoint(distill.main(flags + ['--run_dir', str(tmp_path / 'looped'), '--Iteration', '4']))
    initial, images, syn_lr, pairs = replay_two_ranks(buffers, 4)
    assert not torch.allclose(pairs[0][0][0], pairs[0][1][0]) and not torch.allclose(looped['images'], initial)
    torch.testing.assert_close(looped['images'], images, rtol=0, atol=1e-5)
    torch.testing.assert_close(looped['syn_lr'], syn_lr, rtol=1e-6, atol=1e-9)
    monkeypatch.undo()
    run_dir = distill.main(flags + ['--run_dir', str(tmp_path / 'stacked'), '--Iteration', '1'])
    stacked = checkpoint(run_dir)
    _, one_step, _, _ = replay_two_ranks(buffers, 1)
    moved = one_step - initial
    relative = ((stacked['images'] - one_step).norm() / moved.norm()).item()
    print(f"first step, stacked vs 2-rank replay: |difference| / |update| = {relative:.1e}")
    assert relative < 1e-3
    assert stacked['generator'].shape[0] == 2 and len(stacked['cursor']['students']) == 2
    rows = [r for r in metrics(run_dir) if 'loss' in r]
    assert len(rows) == 1 and all('loss_students' not in r and r['skipped'] == 0 for r in rows)


def test_two_trajectories_resume_bit_for_bit(buffers, tmp_path, monkeypatch):
    common = TINY + ['--buffer_path', buffers, '--Iteration', '6', '--eval_it', '3', '--save_every', '2',
                     '--trajectories', '2', '--weight_perturb', '--balance_loss', '--agg_middle_loss',
                     '--expert_epochs', '2', '--max_start_epoch', '1', '--unroll', 'recompute']
    straight = distill.main(common + ['--run_dir', str(tmp_path / 'a')])
    real = kill_at_unroll(monkeypatch, 5)  # as if the job were killed during iteration 4
    with pytest.raises(KeyboardInterrupt):
        distill.main(common + ['--run_dir', str(tmp_path / 'b')])
    interrupted = glob.glob(str(tmp_path / 'b' / '000-*'))[0]
    assert checkpoint(interrupted)['state']['it'] == 4
    monkeypatch.setattr(distill, 'match_and_backward', real)
    distill.main(['--resume', 'latest', '--run_dir', str(tmp_path / 'b')])
    a, b = checkpoint(straight), checkpoint(interrupted)
    assert a['state'] == b['state'] and a['state']['it'] == 6
    for key in ('images', 'syn_lr', 'generator'):
        assert torch.equal(a[key], b[key]), key
    assert a['cursor'] == b['cursor'] and a['generator'].shape[0] == 2
    drop_time = lambda rows: [{k: v for k, v in r.items() if 'time' not in k} for r in rows]  # noqa: E731
    assert drop_time(metrics(interrupted)) == drop_time(metrics(straight))
    assert all('loss_mid1' in r and 'nu' in r for r in metrics(straight) if 'loss' in r)


@pytest.mark.parametrize('flags, culprit', [
    (['--trajectories', '0'], '--trajectories'),
    (['--trajectories', '65'], '--trajectories'),
    (['--trajectories', '2', '--auto_steps'], '--auto_steps'),
])
def test_bad_trajectories_fail_with_one_line_before_any_work(buffers, tmp_path, capsys, flags, culprit):
    with pytest.raises(SystemExit) as stop:
        distill.main(TINY + ['--buffer_path', buffers, '--run_dir', str(tmp_path), *flags])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert culprit in err and len(err.splitlines()) == 1
    assert not os.listdir(tmp_path)


def test_a_batchnorm_model_is_refused_for_k_students(tmp_path_factory, tmp_path, capsys):
    bn = tiny_buffers(tmp_path_factory, 1, 'ConvNetBN')
    flags = [f if f != MODEL else 'ConvNetBN' for f in TINY]
    capsys.readouterr()  # buffer.py's output
    with pytest.raises(SystemExit) as stop:
        distill.main(flags + ['--buffer_path', bn, '--run_dir', str(tmp_path), '--trajectories', '2'])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and 'BatchNorm' in err and len(err.splitlines()) == 1
    assert not os.listdir(tmp_path)


def test_plan_prints_k_students(tmp_path):
    out = subprocess.run([sys.executable, 'distill.py', '--plan', '--ipc', '1', '--trajectories', '4'],
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                         text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert out.returncode == 0, out.stderr
    assert '4 trajectories per iteration' in out.stdout and 'saved by autograd (4 students): bptt 20 steps' in out.stdout
