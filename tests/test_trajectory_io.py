"""Expert buffers: the MTT list-of-lists format, distinct snapshots, skip-on-rerun, clear errors."""
import json
import os

import pytest
import torch

import buffer
from trajmatch.cli import UsageError
from compress_buffers import compress_buffer_folder
from networks import get_network
from trajmatch.synthetic import final_expert_net
from trajmatch.trajectory_io import (ExpertCursor, ExpertTrajectory, Trajectory, avg_var, buffer_dir, expert_files,
                           load_trajectories, save_expert, trajectory_kind, trajectory_tensor, validate_buffers)

MODEL = 'ConvNetW32'  # small, and 8x8 Digits fit its depth 3


def shapes():
    return [p.shape for p in get_network(MODEL, 1, 10, (8, 8)).parameters()]


def handmade_mtt_buffer(path, n_traj=2, epochs=3, seed=0):
    """A buffer laid out by hand exactly as MTT's buffer.py saves it: [trajectory][epoch][param tensor]."""
    g = torch.Generator().manual_seed(seed)
    trajs = [[[torch.randn(s, generator=g) for s in shapes()] for _ in range(epochs + 1)] for _ in range(n_traj)]
    torch.save(trajs, path)
    return trajs


def test_handmade_mtt_buffer_reads_back(tmp_path):
    trajs = handmade_mtt_buffer(tmp_path / 'replay_buffer_0.pt')
    handmade_mtt_buffer(tmp_path / 'replay_buffer_1.pt', seed=1)
    files = validate_buffers(str(tmp_path), dataset='Digits', model=MODEL, param_shapes=shapes(), needed_epochs=3)
    assert [os.path.basename(f) for f in files] == ['replay_buffer_0.pt', 'replay_buffer_1.pt']
    loaded = load_trajectories(files[0])
    assert len(loaded) == 2 and len(loaded[0]) == 4
    for a, b in zip(loaded[1][2], trajs[1][2]):
        assert torch.equal(a, b)
    flat = trajectory_tensor(loaded[0])
    assert flat.shape == (4, sum(s.numel() for s in shapes()))
    assert torch.equal(flat[3, :trajs[0][3][0].numel()], trajs[0][3][0].reshape(-1))


def test_cursor_visits_every_expert_once_per_pass_and_resumes(tmp_path):
    for i in range(3):
        handmade_mtt_buffer(tmp_path / f'replay_buffer_{i}.pt', seed=i)  # 3 files x 2 experts
    files = expert_files(str(tmp_path))
    cursor = ExpertCursor(files, seed=5)
    first_pass = [cursor.next().at(0)[0].item() for _ in range(6)]
    everyone = [trajectory_tensor(t)[0, 0].item() for f in files for t in load_trajectories(f)]
    assert sorted(first_pass) == sorted(everyone)
    state = cursor.state_dict()
    expected = [cursor.next().at(1)[3].item() for _ in range(4)]
    resumed = ExpertCursor(files, seed=5)
    resumed.load_state_dict(state)
    assert [resumed.next().at(1)[3].item() for _ in range(4)] == expected


def test_cursor_cache_reads_each_file_once_and_changes_nothing_else(tmp_path):
    for i in range(3):
        handmade_mtt_buffer(tmp_path / f'replay_buffer_{i}.pt', seed=i)
    files = expert_files(str(tmp_path))
    reads = []

    def counting_loader(path):
        reads.append(path)
        return Trajectory.load_file(path)

    cached = ExpertCursor(files, seed=5, loader=counting_loader)
    seq_cached = [cached.next().at(2)[1].item() for _ in range(18)]  # 3 passes
    assert sorted(reads) == sorted(files)  # every file read exactly once
    reads.clear()
    uncached = ExpertCursor(files, seed=5, loader=counting_loader, cache_mib=0)
    assert [uncached.next().at(2)[1].item() for _ in range(18)] == seq_cached
    # without the cache a file is read on each visit (3 files x 3 passes; a file that ends one pass
    # and starts the next is visited once)
    assert 6 <= len(reads) <= 9


def test_mtt_and_mct_trajectories_answer_one_interface_alike(tmp_path):
    """An MTT file and its MCT compression, each read through trajectory_kind, agree wherever MCT stores a point."""
    trajs = handmade_mtt_buffer(tmp_path / 'replay_buffer_0.pt', n_traj=2, epochs=6)
    mct_folder = compress_buffer_folder(str(tmp_path), k=3)['out_folder']
    numels = tuple(s.numel() for s in shapes())
    P, L = sum(numels), len(numels)
    full = trajectory_kind(False).load_file(expert_files(str(tmp_path))[0])
    comp = trajectory_kind(True).load_file(expert_files(mct_folder)[0])
    assert len(full) == len(comp) == 2
    for snaps, f, c in zip(trajs, full, comp):
        for traj in (f, c):
            assert isinstance(traj, ExpertTrajectory)
            assert traj.num_epochs == 6 and traj.param_numels == numels
        assert c.continuous_time and not f.continuous_time
        assert f.nbytes == 7 * P * 4  # the float32 [E+1, P] tensor
        assert c.nbytes == 3 * 8 + 3 * P * 4 + 7 * L * 4 + L * 8  # epochs, waypoints, fractions, layer_sizes
        for e in range(7):
            assert torch.equal(f.at(e), torch.cat([t.reshape(-1) for t in snaps[e]]))
        assert c.epochs.tolist() == [0, 3, 6]
        for e in (0, 3, 6):
            assert torch.equal(c.at(e), f.at(e))
        assert c.at(1.5).shape == (P,)  # between waypoints only MCT's path is defined
        with pytest.raises(TypeError, match='integer epochs'):
            f.at(1.5)
        for outside in (-1, 7):
            with pytest.raises(ValueError, match='outside'):
                f.at(outside)
    # both kinds through the same checks, and the same final expert for K-Means features
    other = [p.shape for p in get_network('ConvNetW64', 1, 10, (8, 8)).parameters()]
    nets = []
    for compressed, folder in ((False, str(tmp_path)), (True, mct_folder)):
        files = validate_buffers(folder, dataset='Digits', model=MODEL, param_shapes=shapes(), needed_epochs=6,
                                 compressed=compressed)
        assert files == expert_files(folder)
        with pytest.raises(UsageError, match='past the end'):
            validate_buffers(folder, dataset='Digits', model=MODEL, param_shapes=shapes(), needed_epochs=7,
                             compressed=compressed)
        with pytest.raises(UsageError, match='another model'):
            validate_buffers(folder, dataset='Digits', model='ConvNetW64', param_shapes=other, needed_epochs=2,
                             compressed=compressed)
        nets.append(final_expert_net(files, compressed, get_network(MODEL, 1, 10, (8, 8))))
    for a, b, last in zip(nets[0].parameters(), nets[1].parameters(), trajs[0][6]):
        assert torch.equal(a, b) and torch.equal(a.detach(), last)


def test_mtt_trajectory_holds_its_tensor_without_a_copy():
    snapshots = torch.randn(4, 9)
    traj = Trajectory(snapshots, [6, 3])
    assert traj.snapshots is snapshots and traj.at(2).data_ptr() == snapshots[2].data_ptr()
    with pytest.raises(ValueError, match='sum of param_numels'):
        Trajectory(snapshots, [6, 4])


def test_buffer_py_saves_distinct_snapshots_metadata_and_skips_on_rerun(tmp_path, capsys):
    argv = ['--num_experts', '2', '--train_epochs', '2', '--model', MODEL, '--buffer_path', str(tmp_path)]
    buffer.main(argv)
    folder = buffer_dir(str(tmp_path), 'Digits', MODEL, zca=False)
    files = expert_files(folder)
    assert [os.path.basename(f) for f in files] == ['replay_buffer_0.pt', 'replay_buffer_1.pt']
    traj = load_trajectories(files[0])
    assert len(traj) == 1 and len(traj[0]) == 3  # one expert per file, E+1 snapshots
    flat = trajectory_tensor(traj[0])
    # every epoch's snapshot differs from the others: no aliasing of the final weights
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.equal(flat[i], flat[j])
    assert not torch.equal(trajectory_tensor(load_trajectories(files[1])[0])[0], flat[0])  # experts differ
    meta = json.load(open(os.path.join(folder, 'replay_buffer_0.json')))
    assert meta['dataset'] == 'Digits' and meta['model'] == MODEL and meta['num_snapshots'] == 3
    assert meta['avg_var'] == pytest.approx(avg_var(flat))
    assert 0.0 <= meta['test_acc'] <= 1.0
    assert not [f for f in os.listdir(folder) if f.endswith('.tmp')]
    mtimes = [os.path.getmtime(f) for f in files]
    capsys.readouterr()
    buffer.main(argv + ['--num_experts', '3'])
    assert '2 experts on disk, training 1' in capsys.readouterr().out
    assert [os.path.getmtime(f) for f in files] == mtimes
    assert len(expert_files(folder)) == 3


def test_buffer_errors_name_the_problem(tmp_path):
    handmade_mtt_buffer(tmp_path / 'replay_buffer_0.pt', epochs=3)
    with pytest.raises(UsageError, match='past the end'):
        validate_buffers(str(tmp_path), dataset='Digits', model=MODEL, param_shapes=shapes(), needed_epochs=4)
    other = [p.shape for p in get_network('ConvNetW64', 1, 10, (8, 8)).parameters()]
    with pytest.raises(UsageError, match='another model'):
        validate_buffers(str(tmp_path), dataset='Digits', model='ConvNetW64', param_shapes=other, needed_epochs=2)
    save_expert(str(tmp_path), 1, [[torch.zeros(s) for s in shapes()]] * 4, {'dataset': 'MNIST', 'model': MODEL})
    with pytest.raises(UsageError, match='MNIST'):
        validate_buffers(str(tmp_path), dataset='Digits', model=MODEL, param_shapes=shapes(), needed_epochs=2)
    with pytest.raises(UsageError, match='no expert buffers'):
        validate_buffers(str(tmp_path / 'empty'), dataset='Digits', model=MODEL, param_shapes=shapes(), needed_epochs=2)
    corrupt = tmp_path / 'c'
    corrupt.mkdir()
    (corrupt / 'replay_buffer_0.pt').write_bytes(b'not a torch file')
    with pytest.raises(UsageError, match='cannot read'):
        validate_buffers(str(corrupt), dataset='Digits', model=MODEL, param_shapes=shapes(), needed_epochs=2)


def test_buffer_dir_follows_mtt_naming():
    assert buffer_dir('b', 'CIFAR10', 'ConvNet', zca=True) == os.path.join('b', 'CIFAR10', 'ConvNet')
    assert buffer_dir('b', 'CIFAR10', 'ConvNet', zca=False) == os.path.join('b', 'CIFAR10_NO_ZCA', 'ConvNet')
    assert buffer_dir('b', 'ImageNet', 'ConvNetD5', zca=False, subset='imagewoof', res=128) == \
        os.path.join('b', 'ImageNet', 'imagewoof', '128', 'ConvNetD5')
    assert buffer_dir('b', 'Tiny', 'ConvNetD4', zca=False) == os.path.join('b', 'Tiny', 'ConvNetD4')
