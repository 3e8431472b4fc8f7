"""torchrun on CPU (gloo, 2 processes): buffer.py shards experts, distill.py averages the ranks' gradients."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import buffer
import distill
from trajmatch import distributed
from trajmatch import matching
from trajmatch import synthetic
from trajmatch.data import load_dataset
from networks import get_network
from reparam_module import ReparamModule
from trajmatch.checkpoint import rank_streams
from trajmatch.cli import UsageError
from trajmatch.trajectory_io import buffer_dir, expert_files, load_trajectories
from trajmatch.runtime import seed_everything

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = 'ConvNetW32'
EXPERTS = ['--num_experts', '4', '--train_epochs', '3', '--model', MODEL, '--device', 'cpu']
# as tests/test_pipeline.py, plus what the maths replay below assumes (seed 0, lr_img 10, lr_lr 1e-5, lr 0.01)
TINY = ['--model', MODEL, '--ipc', '2', '--syn_steps', '3', '--expert_epochs', '1', '--max_start_epoch', '2',
        '--num_eval', '1', '--epoch_eval_train', '3', '--lr_img', '10', '--lr_lr', '1e-5', '--lr_teacher', '0.01',
        '--seed', '0', '--device', 'cpu', '--wandb', 'disabled']
ITERATIONS = 4  # with --save_every 2: a checkpoint half way, where the resume test interrupts

# distill.py with match_and_backward dying on its 3rd call in every rank: killed during iteration 2
DIES_IN_ITERATION_2 = '''import sys
sys.path.insert(0, {repo!r})
import distill
from trajmatch import matching
calls = [0]
def dies(*a, **k):
    calls[0] += 1
    if calls[0] == 3:
        raise SystemExit(9)
    return matching.match_and_backward(*a, **k)
distill.match_and_backward = dies
distill.main(sys.argv[1:])
'''


def torchrun(nproc: int, script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', script, *args]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def expert_folder(buffer_path) -> str:
    return buffer_dir(str(buffer_path), 'Digits', MODEL, zca=False)


def metrics(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def checkpoint(run_dir):
    return torch.load(os.path.join(run_dir, 'checkpoint.pt'), weights_only=True)


@pytest.fixture
def one_thread():
    """torchrun's children compute with one thread (OMP_NUM_THREADS=1); so does this process meanwhile,
    so in-process results can be compared with theirs bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def buffers_two_ranks(tmp_path_factory):
    path = tmp_path_factory.mktemp('buffers2')
    out = torchrun(2, 'buffer.py', *EXPERTS, '--buffer_path', str(path))
    return str(path), out.stdout


@pytest.fixture(scope='module')
def two_rank_run(buffers_two_ranks, tmp_path_factory):
    """One uninterrupted 2-rank distillation: evaluation at it 0 and at the end, checkpoints every 2."""
    runs = tmp_path_factory.mktemp('runs2')
    torchrun(2, 'distill.py', *TINY, '--buffer_path', buffers_two_ranks[0], '--run_dir', str(runs),
             '--Iteration', str(ITERATIONS), '--eval_it', '100', '--save_every', '2')
    return str(runs)


# ---------------------------------------------------------------- helpers, in one process

def test_one_process_layout_and_rank_seeds():
    assert distributed.from_env({}) == distributed.Dist(0, 1, 0)
    assert distributed.from_env({'RANK': '1', 'WORLD_SIZE': '2', 'LOCAL_RANK': '1'}) == distributed.Dist(1, 2, 1)
    for bad in ({'WORLD_SIZE': 'two'}, {'RANK': '2', 'WORLD_SIZE': '2'}):
        with pytest.raises(UsageError):
            distributed.from_env(bad)
    d, device = distributed.init_distributed(torch.device('cpu'), {})
    assert d.is_main and device == torch.device('cpu')
    assert distributed.rank_seed(7, 0) == 7  # rank 0 is the plain run
    seeds = [distributed.rank_seed(s, r) for s in (0, 1) for r in (1, 2, 3)]
    assert len(set(seeds) | {0, 1}) == 8 and all(0 <= s < 2**62 for s in seeds)
    parts = [distributed.shard(range(7), r, 3) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    x = torch.arange(3.0)
    assert distributed.mean_over_ranks(x) is x and distributed.all_ranks_true(False) is False
    assert distributed.broadcast_object('a') == 'a' and distributed.all_gather_objects(5) == [5]


# ---------------------------------------------------------------- buffer.py

def test_two_rank_buffer_writes_the_one_process_experts(buffers_two_ranks, tmp_path, one_thread):
    path, stdout = buffers_two_ranks
    folder = expert_folder(path)
    assert sorted(os.listdir(folder)) == sorted(f'replay_buffer_{i}.{ext}' for i in range(4) for ext in ('pt', 'json'))
    assert stdout.count('training 4 on 2 processes') == 1 and stdout.count('over 4 new experts') == 1
    buffer.main(EXPERTS + ['--buffer_path', str(tmp_path)])  # the same experts from one process
    for i in range(4):
        two = load_trajectories(os.path.join(folder, f'replay_buffer_{i}.pt'))[0]
        one = load_trajectories(os.path.join(expert_folder(tmp_path), f'replay_buffer_{i}.pt'))[0]
        assert len(two) == len(one) == 4
        for snap_two, snap_one in zip(two, one):
            assert all(torch.equal(a, b) for a, b in zip(snap_two, snap_one)), f'expert {i}'
    first = load_trajectories(os.path.join(folder, 'replay_buffer_0.pt'))[0][-1][0]
    second = load_trajectories(os.path.join(folder, 'replay_buffer_1.pt'))[0][-1][0]
    assert not torch.equal(first, second)  # distinct seeds per index, not one expert written twice


# ---------------------------------------------------------------- distill.py

def test_one_process_torchrun_is_the_plain_run(buffers_two_ranks, tmp_path, one_thread):
    flags = TINY + ['--buffer_path', buffers_two_ranks[0], '--Iteration', '3', '--eval_it', '100']
    torchrun(1, 'distill.py', *flags, '--run_dir', str(tmp_path / 'torchrun'))
    plain = distill.main(flags + ['--run_dir', str(tmp_path / 'plain')])
    launched = glob.glob(str(tmp_path / 'torchrun' / '000-*'))[0]
    a, b = checkpoint(launched), checkpoint(plain)
    assert torch.equal(a['images'], b['images']) and torch.equal(a['syn_lr'], b['syn_lr'])
    assert a['world_size'] == 1 and a['other_ranks'] == []
    assert metrics(launched) == metrics(plain)


def replay_two_ranks(buffer_path: str, iterations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """Recompute in this process what both ranks do, from distill's own per-rank seeds; average the
    two gradients and apply SGD with momentum 0.5 by hand. Returns (initial images, final images, syn_lr,
    the per-iteration gradient pairs)."""
    data = load_dataset('Digits', 'data')
    files = expert_files(expert_folder(buffer_path))
    gen0 = seed_everything(0)
    images, labels = synthetic.init_synthetic(data, 2, 'real', gen0)
    initial = images.clone()
    streams = [rank_streams(0, rank, gen0, files, mct=False) for rank in range(2)]
    student = ReparamModule(get_network(MODEL, data.channel, data.num_classes, data.im_size))
    syn_lr, v_img, v_lr, pairs = torch.tensor(0.01), None, None, []
    for _ in range(iterations):
        grads = []
        for gen, cursor in streams:  # rank 0, then rank 1
            x, lr = images.clone().requires_grad_(True), syn_lr.clone().requires_grad_(True)
            trajectory = cursor.next()
            t = distill.sample_start(2, False, gen)
            targets = distill.expert_targets(trajectory, t, syn_steps=3, expert_epochs=1, middle=False,
                                             adaptive=False)
            matching.match_and_backward(student, x, labels, lr, targets.start, targets, matching.Unroll(syn_steps=3, batch_syn=20), generator=gen)
            grads.append((x.grad, lr.grad))
        pairs.append(grads)
        g_img, g_lr = (grads[0][0] + grads[1][0]) / 2, (grads[0][1] + grads[1][1]) / 2
        # SGD with momentum 0.5: v = g at the first step, then v = 0.5 v + g; p = p - lr v. Written with
        # torch.optim.SGD's own in-place ops, whose rounding lr_img 10 would amplify ~40x per iteration
        v_img = g_img.clone() if v_img is None else v_img.mul_(0.5).add_(g_img)
        v_lr = g_lr.clone() if v_lr is None else v_lr.mul_(0.5).add_(g_lr)
        images, syn_lr = images.add(v_img, alpha=-10), syn_lr.add(v_lr, alpha=-1e-5)
    return initial, images, syn_lr, pairs


def test_two_rank_distill_steps_with_the_mean_of_both_ranks_gradients(buffers_two_ranks, two_rank_run, one_thread):
    runs = glob.glob(os.path.join(two_rank_run, '*'))
    assert len(runs) == 1  # rank 0 named the one folder
    run_dir = runs[0]
    rows = metrics(run_dir)
    assert [r['it'] for r in rows if 'loss' in r] == list(range(ITERATIONS))  # each iteration once: rank 0 logs
    assert [r['it'] for r in rows if 'eval/ConvNetW32_mean' in r] == [0, ITERATIONS]
    assert os.path.exists(os.path.join(run_dir, 'final.json'))
    ckpt = checkpoint(run_dir)
    assert ckpt['world_size'] == 2 and len(ckpt['other_ranks']) == 1 and ckpt['state']['skipped'] == 0
    assert ckpt['other_ranks'][0]['generator'].shape == ckpt['generator'].shape
    assert not torch.equal(ckpt['other_ranks'][0]['generator'], ckpt['generator'])  # rank 1's own stream

    initial, images, syn_lr, pairs = replay_two_ranks(buffers_two_ranks[0], ITERATIONS)
    assert not torch.allclose(pairs[0][0][0], pairs[0][1][0])  # the ranks matched different trajectories
    assert not torch.allclose(ckpt['images'], initial)
    torch.testing.assert_close(ckpt['images'], images, rtol=0, atol=1e-5)
    torch.testing.assert_close(ckpt['syn_lr'], syn_lr, rtol=1e-6, atol=1e-9)
    # the replay's first step is the plain formula: images_1 = images_0 - lr_img * mean(g_rank0, g_rank1)
    _, one_step, _, _ = replay_two_ranks(buffers_two_ranks[0], 1)
    first = initial - 10 * (pairs[0][0][0] + pairs[0][1][0]) / 2
    # float32: the optimiser's step and this formula round differently; measured 4.8e-7 (AVX-512, AVX2), 0 (scalar)
    torch.testing.assert_close(one_step, first, rtol=1e-5, atol=1e-5)


def test_two_rank_resume_continues_to_the_same_result(buffers_two_ranks, two_rank_run, tmp_path):
    script = tmp_path / 'dies_in_iteration_2.py'
    script.write_text(DIES_IN_ITERATION_2.format(repo=REPO))
    runs = tmp_path / 'runs'
    flags = TINY + ['--buffer_path', buffers_two_ranks[0], '--run_dir', str(runs), '--Iteration', str(ITERATIONS),
                    '--eval_it', '100', '--save_every', '2']
    assert torchrun(2, str(script), *flags, check=False).returncode != 0
    interrupted = glob.glob(str(runs / '000-*'))[0]
    assert checkpoint(interrupted)['state']['it'] == 2
    torchrun(2, 'distill.py', '--resume', 'latest', '--run_dir', str(runs))
    straight = glob.glob(os.path.join(two_rank_run, '000-*'))[0]
    a, b = checkpoint(straight), checkpoint(interrupted)
    assert a['state']['it'] == b['state']['it'] == ITERATIONS
    torch.testing.assert_close(b['images'], a['images'], rtol=0, atol=1e-6)
    torch.testing.assert_close(b['syn_lr'], a['syn_lr'], rtol=0, atol=1e-9)
    assert [r['it'] for r in metrics(interrupted)] == [r['it'] for r in metrics(straight)]


def test_resume_with_another_number_of_processes_fails_with_one_line(two_rank_run, tmp_path, capsys):
    run_dir = str(tmp_path / 'run')
    shutil.copytree(glob.glob(os.path.join(two_rank_run, '000-*'))[0], run_dir)
    os.remove(os.path.join(run_dir, 'final.json'))  # unfinished: resuming a finished run does nothing
    before = open(os.path.join(run_dir, 'metrics.jsonl')).read()
    with pytest.raises(SystemExit) as stop:
        distill.main(['--resume', run_dir])  # one process, a 2-process checkpoint
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert 'checkpointed by 2 process(es), this is 1' in err and 'torchrun --nproc_per_node=2' in err
    assert len(err.splitlines()) == 1
    assert open(os.path.join(run_dir, 'metrics.jsonl')).read() == before  # nothing touched
