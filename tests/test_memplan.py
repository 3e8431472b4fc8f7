"""memplan.py: the probe counts what the unroll saves, the plan scales in syn_steps as each unroll mode
should and matches the live tensor bytes of a real iteration, auto's choice, distill.py --plan and
--unroll auto."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import distill
from trajmatch import memplan
from trajmatch.augment import DSA_STRATEGY, draw_group, parse_strategy
from trajmatch.matching import (RECOMPUTE_STATES_MIB, Targets, Unroll, checkpoint_every, match_and_backward,
                                record_steps, state_pair_bytes, syn_batches, unroll)
from trajmatch.memplan import (RunShape, SavedBytes, choose_unroll, make_plan, probe_step, recompute_every,
                               recompute_vectors)
from networks import get_network
from reparam_module import ReparamModule
from conftest import tiny_buffers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL, CHANNEL, IM, CLASSES = 'ConvNetW32', 1, (8, 8), 4
GROUPS = parse_strategy(DSA_STRATEGY)


def tiny(ipc=2, syn_steps=6, **kw) -> RunShape:
    return RunShape(MODEL, CHANNEL, CLASSES, IM, ipc, kw.pop('batch_syn', CLASSES * ipc), syn_steps, **kw)


def student():
    torch.manual_seed(0)
    return ReparamModule(get_network(MODEL, CHANNEL, CLASSES, IM))


def unroll_seed(group: str, num_syn: int) -> int:
    """A seed whose one-step unroll (batch draw first, then DSA) draws `group`."""
    for seed in range(1000):
        g = torch.Generator().manual_seed(seed)
        syn_batches(num_syn, num_syn, 1, g)
        if draw_group(DSA_STRATEGY, g) == group:
            return seed
    raise AssertionError(group)


@pytest.mark.parametrize('group', GROUPS)
def test_probe_counts_what_one_bptt_step_of_the_unroll_saves(group):
    net, n = student(), 5
    forward, backward, update = probe_step(net, CHANNEL, CLASSES, IM, n, group=group, syn_mom=0.0)
    w0 = net.flat_param()
    images = torch.randn(n, CHANNEL, *IM).requires_grad_(True)
    lr = torch.tensor(0.01, requires_grad=True)
    with SavedBytes(exclude=[w0, images, lr]) as saved:
        unroll(net, images, torch.arange(n) % CLASSES, lr, w0, syn_steps=1, batch_syn=n,
               generator=torch.Generator().manual_seed(unroll_seed(group, n)))
    assert forward > 0 and backward > 0 and update > 0
    assert forward + backward + update == saved.nbytes


def test_saved_bytes_count_a_shared_storage_once():
    x = torch.randn(1000, requires_grad=True)
    with SavedBytes(exclude=[x]) as saved:
        y = x * 2  # a product with a number saves nothing
        (y[:500] * y[500:]).sum()  # saves two views of y: one storage
    assert saved.nbytes == 1000 * 4


@pytest.mark.parametrize('group', GROUPS)
def test_probe_extrapolates_exactly_from_batches_1_and_2(group):
    net = student()
    per = [probe_step(net, CHANNEL, CLASSES, IM, b, group=group, syn_mom=0.9) for b in memplan.PROBE_BATCHES]
    direct = probe_step(net, CHANNEL, CLASSES, IM, 7, group=group, syn_mom=0.9)
    assert memplan._at_batch(per, 7) == pytest.approx(direct, rel=0, abs=0)


def test_bptt_grows_linearly_in_syn_steps_and_recompute_like_its_square_root():
    steps = (4, 9, 16, 36, 64)
    plans = {n: make_plan(tiny(syn_steps=n, states_mib=0.0)) for n in steps}  # checkpoints whatever N
    p = plans[4].step
    vec = p.num_params * 4
    saved = {n: next(part for part in pl.parts if part.name.startswith('saved by autograd')) for n, pl in plans.items()}
    for a, b in zip(steps, steps[1:]):
        # bptt: every step adds its saved tensors and its w_n
        extra = (b - a) * (p.saved_bptt + vec + tiny().batch * (8 + memplan.DRAW_BYTES_PER_IMAGE))
        assert plans[b].growth('bptt') - plans[a].growth('bptt') == pytest.approx(extra, rel=1e-9)
        assert saved[b].bptt == pytest.approx(b / a * saved[a].bptt, rel=1e-9)
        assert saved[b].recompute == saved[a].recompute  # one step's graph, whatever N
    for n in steps:  # N = k^2: k checkpoint pairs and k - 1 regenerated pairs
        k = math.isqrt(n)
        rec = recompute_vectors(tiny(syn_steps=n, states_mib=0.0), p.num_params)
        assert rec['checkpoints'] + rec['segment'] == 4 * k - 2
    assert plans[64].growth('bptt') / plans[4].growth('bptt') > 8
    for n in steps:  # recompute: O(sqrt(N)) vectors over N = 4, plus each step's index batch and DSA draw
        per_step = tiny().batch * (8 + memplan.DRAW_BYTES_PER_IMAGE)
        bound = plans[4].growth('recompute') + 4 * math.isqrt(n) * vec + n * per_step
        assert plans[n].growth('recompute') <= bound


def test_recompute_keeps_every_state_within_its_budget_then_checkpoints():
    """Up to the budget every (w_n, b_n) pair is kept and nothing regenerated; past it, the sqrt(N)
    checkpoints: recompute's states never exceed the budget or the checkpoints' O(sqrt(N))."""
    num_params = make_plan(tiny()).step.num_params
    pair = 2 * num_params * 4
    budget = 10 * pair / 2**20  # MiB: ten pairs
    for n in (1, 4, 10, 11, 16, 40):
        rec = recompute_vectors(tiny(syn_steps=n, states_mib=budget), num_params)
        if n <= 10:
            assert rec['checkpoints'] == 2 * n and rec['segment'] == 0
        else:
            assert rec == recompute_vectors(tiny(syn_steps=n, states_mib=0.0), num_params)
        assert (rec['checkpoints'] + rec['segment']) * num_params * 4 <= max(budget * 2**20, 4 * math.isqrt(n) * pair)
        kept, sqrt = (make_plan(tiny(syn_steps=n, states_mib=m)) for m in (budget, 0.0))
        assert kept.growth('recompute') <= sqrt.growth('recompute') + budget * 2**20
    # K students: the budget holds all K students' pairs
    assert recompute_vectors(tiny(syn_steps=5, states_mib=budget, trajectories=2), num_params)['segment'] == 0
    assert recompute_vectors(tiny(syn_steps=6, states_mib=budget, trajectories=2), num_params)['segment'] > 0


@pytest.mark.parametrize('states_mib', [RECOMPUTE_STATES_MIB, 0.0])
@pytest.mark.parametrize('syn_steps', [2, 5, 9, 10, 17])
@pytest.mark.parametrize('middle, auto_steps', [((), False), ((1,), False), ((), True), ((1,), True)])
def test_recompute_vectors_count_what_the_tape_keeps(syn_steps, middle, auto_steps, states_mib):
    net, n = student(), 8
    w0 = net.flat_param()
    images = torch.randn(n, CHANNEL, *IM)
    tape = record_steps(net, images, torch.arange(n) % CLASSES, torch.tensor(0.01), w0, syn_steps=syn_steps,
                        batch_syn=n, generator=torch.Generator().manual_seed(0), keep=set(middle), target=w0 + 1,
                        auto_steps=auto_steps, att_metric='l1', states_bytes=states_mib * 2**20)
    tensors = [t for k, pair in tape.checkpoints.items() if k for t in pair] + list(tape.kept.values())
    storages = {t.untyped_storage().data_ptr() for t in tensors} - {w0.untyped_storage().data_ptr()}
    shape = tiny(syn_steps=syn_steps, middle_steps=middle, auto_steps=auto_steps, states_mib=states_mib)
    rec = recompute_vectors(shape, w0.numel())
    every = checkpoint_every(syn_steps, state_pair_bytes(w0), states_mib * 2**20)
    assert tape.every == every == recompute_every(shape, w0.numel())
    assert (every == 1) == (states_mib > 0)  # the tiny student's states fit the default budget
    read = set(middle) | {syn_steps}
    kept = sum(1 for s in read if s % every) + (auto_steps and syn_steps > 1)  # the plan's count
    assert rec['checkpoints'] == 2 * (syn_steps // every)
    if auto_steps:  # ATT's running best replaces the state at N_opt when the loss reads that step anyway
        assert len(storages) == rec['checkpoints'] + kept - (tape.n_final in read and tape.n_final % every != 0)
    else:
        assert len(storages) == rec['checkpoints'] + kept


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the storages created inside the block and still alive (a CPU stand-in for
    torch.cuda.max_memory_allocated, without the host's allocator and bookkeeping)."""

    def __init__(self):
        super().__init__()
        self.alive, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.alive[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        self.alive = {k: v for k, v in self.alive.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.alive.values()))
        return out


@pytest.mark.parametrize('mode, states_mib', [('bptt', RECOMPUTE_STATES_MIB), ('recompute', RECOMPUTE_STATES_MIB),
                                              ('recompute', 0.0)])
@pytest.mark.parametrize('syn_steps, syn_mom, middle, auto_steps', [(4, 0.0, (), False), (9, 0.9, (4,), True)])
def test_predicted_growth_matches_the_live_tensor_bytes_of_an_iteration(mode, states_mib, syn_steps, syn_mom, middle,
                                                                       auto_steps):
    shape = tiny(ipc=4, syn_steps=syn_steps, syn_mom=syn_mom, middle_steps=middle, auto_steps=auto_steps,
                 states_mib=states_mib)
    net = student()
    w0 = net.flat_param()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(shape.num_syn, CHANNEL, *IM, generator=gen).requires_grad_(True)
    labels = torch.arange(CLASSES).repeat_interleave(shape.ipc)
    lr = torch.tensor(0.01, requires_grad=True)
    targets = Targets(w0, w0 + 0.01 * torch.randn(w0.shape, generator=gen),
                      [(n, w0 + 0.005, 1.0) for n in middle])
    live = LiveTensorBytes()
    with live:
        match_and_backward(net, images, labels, lr, w0, targets, Unroll(syn_steps=syn_steps, batch_syn=shape.batch, syn_mom=syn_mom, mode=mode, auto_steps=auto_steps, states_mib=states_mib), generator=gen)
    assert make_plan(shape).growth(mode) == pytest.approx(live.peak, rel=0.10)


def test_auto_picks_bptt_when_its_peak_fits_with_the_margin_else_recompute():
    plan, cpu, cuda = make_plan(tiny()), torch.device('cpu'), torch.device('cuda')
    need = plan.peak('bptt') * (1 + memplan.MARGIN['cpu'])
    assert choose_unroll(plan, cpu, math.ceil(need))['unroll'] == 'bptt'
    assert choose_unroll(plan, cpu, math.floor(need) - 1)['unroll'] == 'recompute'
    assert choose_unroll(plan, cpu, math.ceil(need), host_extra=10**6)['unroll'] == 'recompute'  # the expert cache
    cuda_need = plan.peak('bptt') * (1 + memplan.MARGIN['cuda'])
    assert choose_unroll(plan, cuda, math.ceil(cuda_need), host_extra=10**9)['unroll'] == 'bptt'  # host RAM only
    choice = choose_unroll(plan, cpu, None)
    assert choice['unroll'] == 'bptt' and choice['free_mib'] is None
    assert choice['peak_bptt_mib'] > choice['peak_recompute_mib'] > 0


def test_gpu_fits_follow_the_peak():
    assert memplan.fits_gpu(10 * memplan.GiB, 24) and not memplan.fits_gpu(20 * memplan.GiB, 24)
    assert memplan.fits_gpu(30 * memplan.GiB, 40) and not memplan.fits_gpu(70 * memplan.GiB, 80)


def test_plan_of_a_cifar_run_exits_0_without_data_buffers_or_run_folder(tmp_path):
    out = subprocess.run([sys.executable, 'distill.py', '--dataset', 'CIFAR10', '--model', MODEL, '--ipc', '1',
                          '--plan', '--data_path', str(tmp_path / 'no_data'), '--buffer_path', str(tmp_path / 'no'),
                          '--run_dir', str(tmp_path / 'runs')], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert 'bptt' in out.stdout and 'recompute' in out.stdout and '3x32x32' in out.stdout
    peak = next(line for line in out.stdout.splitlines() if line.startswith('peak'))
    assert len(peak.split()) == 5  # two sizes with their units
    assert not os.path.exists(tmp_path / 'runs')


@pytest.fixture(scope='module')
def buffers(tmp_path_factory):
    return tiny_buffers(tmp_path_factory, 1, MODEL)


def run(buffers, runs, *extra):
    flags = ['--model', MODEL, '--ipc', '2', '--syn_steps', '3', '--expert_epochs', '1', '--max_start_epoch', '2',
             '--num_eval', '1', '--epoch_eval_train', '2', '--lr_img', '10', '--Iteration', '2', '--eval_it', '100',
             '--wandb', 'disabled', '--buffer_path', buffers, '--run_dir', str(runs)]
    run_dir = distill.main(flags + list(extra))
    with open(os.path.join(run_dir, 'args.json')) as f:
        args = json.load(f)
    return args, torch.load(os.path.join(run_dir, 'checkpoint.pt'), weights_only=True)['images']


def test_default_auto_picks_bptt_on_digits_logs_it_and_changes_nothing(buffers, tmp_path, capsys):
    args, images = run(buffers, tmp_path / 'auto')
    assert 'unroll auto -> bptt' in capsys.readouterr().out
    # the flag stays as given; the mode auto chose, and why, are recorded beside it
    assert args['unroll'] == 'auto' and args['resolved']['unroll'] == 'bptt'
    plan = args['resolved']['unroll_plan']
    assert plan['requested'] == 'auto' and plan['peak_bptt_mib'] > plan['peak_recompute_mib'] > 0
    assert args['resolved']['device'] == 'cpu'
    explicit, same = run(buffers, tmp_path / 'bptt', '--unroll', 'bptt')
    assert explicit['unroll'] == 'bptt' and 'unroll_plan' not in explicit['resolved']
    assert torch.equal(images, same)


def test_auto_falls_back_to_recompute_when_bptt_does_not_fit_and_explicit_modes_win(buffers, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setattr(distill, 'free_bytes', lambda device: 1)  # a device with no room
    args, _ = run(buffers, tmp_path / 'auto')
    assert args['resolved']['unroll'] == 'recompute' and not args['resolved']['unroll_plan']['bptt_fits']
    args, _ = run(buffers, tmp_path / 'bptt', '--unroll', 'bptt')
    assert args['resolved']['unroll'] == 'bptt'


def test_resume_may_change_device_and_plans_auto_again_there(buffers, tmp_path):
    """--device is a resume override; --unroll auto keeps its mode on the same device and is planned again
    on another (here: a run recorded as made on cuda:0 continues on the CPU); the checkpoint holds no
    CUDA RNG state of a CPU run (only the run's own device's, never every visible GPU's)."""
    args, _ = run(buffers, tmp_path / 'runs', '--save_every', '1')
    run_dir = str(sorted((tmp_path / 'runs').iterdir())[0])
    ckpt = torch.load(os.path.join(run_dir, 'checkpoint.pt'), weights_only=True)
    assert 'cuda' not in ckpt['rng']
    path = os.path.join(run_dir, 'args.json')
    with open(path) as f:
        saved = json.load(f)
    os.remove(os.path.join(run_dir, 'final.json'))
    saved['Iteration'], saved['resolved'] = 3, {'unroll': 'recompute', 'device': 'cuda:0'}
    with open(path, 'w') as f:
        json.dump(saved, f)
    distill.main(['--resume', run_dir, '--device', 'cpu'])
    with open(path) as f:
        after = json.load(f)
    assert after['unroll'] == 'auto' and after['device'] == 'cpu'
    assert after['resolved']['device'] == 'cpu' and after['resolved']['unroll'] == 'bptt'
    assert after['resolved']['unroll_plan']['requested'] == 'auto'
    assert after['resume_overrides'][-1]['device'] == {'was': 'auto', 'now': 'cpu'}
