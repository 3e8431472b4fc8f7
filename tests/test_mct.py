"""MCT compression: waypoints, path fractions, θ(s), state dicts and buffer folders."""
import os

import pytest
import torch

import compress_buffers
from compress_buffers import compress_buffer_folder
from trajmatch.mct import CompressedTrajectory, compress, load_compressed, waypoint_epochs
from trajmatch.cli import UsageError
from trajmatch.trajectory_io import trajectory_tensor

SIZES = [6, 3, 5]  # three "layers", P = 14


def random_walk(E=10, sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    steps = torch.randn(E, sum(sizes), generator=g)
    return torch.cat([torch.randn(1, sum(sizes), generator=g), steps]).cumsum(0)


def layers(theta, sizes=SIZES):
    return list(theta.split(sizes, dim=-1))


# ---------------------------------------------------------------- waypoint epochs

def test_waypoint_epochs():
    assert waypoint_epochs(50, 4) == [0, 17, 33, 50]  # round half up of 16.67, 33.33
    assert waypoint_epochs(3, 4) == [0, 1, 2, 3]
    assert waypoint_epochs(3, 10) == [0, 1, 2, 3]  # k clipped to E+1
    assert waypoint_epochs(7, 2) == [0, 7]
    assert waypoint_epochs(10, 4) == [0, 3, 7, 10]  # 3.33, 6.67
    assert waypoint_epochs(2, 3) == [0, 1, 2]
    assert waypoint_epochs(6, 5) == [0, 2, 3, 5, 6]  # 1.5 -> 2, 4.5 -> 5: half up, not half to even
    for E in range(1, 30):
        for k in range(2, 12):
            ep = waypoint_epochs(E, k)
            assert ep[0] == 0 and ep[-1] == E and len(ep) == min(k, E + 1)
            assert all(b > a for a, b in zip(ep, ep[1:]))
    with pytest.raises(ValueError):
        waypoint_epochs(10, 1)


# ---------------------------------------------------------------- θ(s) on a random walk

@pytest.fixture
def walk():
    traj = random_walk()
    return traj, compress(traj, SIZES, k=4)


def test_shapes(walk):
    traj, c = walk
    assert c.epochs.tolist() == [0, 3, 7, 10] and c.epochs.dtype == torch.int64
    assert c.waypoints.shape == (4, 14) and c.waypoints.dtype == torch.float32
    assert c.fractions.shape == (11, 3) and c.fractions.dtype == torch.float32
    assert c.layer_sizes.tolist() == SIZES and c.num_epochs == 10


def test_exact_at_waypoints(walk):
    traj, c = walk
    for e in c.epochs.tolist():
        assert torch.equal(c.at(e), traj[e]), e
        assert torch.equal(c.at(float(e)), traj[e]), e


def test_fractions_shape_of_each_segment(walk):
    traj, c = walk
    ep = c.epochs.tolist()
    for a, b in zip(ep, ep[1:]):
        assert torch.all(c.fractions[a] == 0)
        seg = c.fractions[a:b]
        assert torch.all(seg[1:] >= seg[:-1])
        assert torch.all(seg <= 1)
        # the fraction is the cumulative path length of that layer, per the definition
        for l, x in enumerate(layers(traj[a:b + 1])):
            steps = (x[1:] - x[:-1]).norm(dim=1)
            expected = torch.cat([torch.zeros(1), steps.cumsum(0)]) / steps.sum()
            assert torch.allclose(c.fractions[a:b, l], expected[:-1], atol=1e-6)
    assert torch.all(c.fractions[-1] == 1)


def test_between_epochs_on_segment_line(walk):
    traj, c = walk
    ep = c.epochs.tolist()
    for s in torch.linspace(0, 10, 97).tolist():
        i, frac = c.segment(s)
        assert ep[i] <= s <= ep[i + 1]
        assert torch.all((frac >= 0) & (frac <= 1))
        # the fraction lies between those of the surrounding integer epochs
        a, b = ep[i], ep[i + 1]
        e0 = min(int(s), b - 1)
        lo = c.fractions[e0]
        hi = c.fractions[e0 + 1] if e0 + 1 < b else torch.ones(3)
        assert torch.all(frac >= lo - 1e-7) and torch.all(frac <= hi + 1e-7)
        theta = c.at(s)
        for l, (x, wa, wb) in enumerate(zip(layers(theta), layers(c.waypoints[i]), layers(c.waypoints[i + 1]))):
            # per layer, on the segment from W_a to W_b at that fraction
            assert torch.allclose(x, wa + frac[l] * (wb - wa), atol=1e-5)
            t = ((x - wa) @ (wb - wa)) / (wb - wa).pow(2).sum()
            assert -1e-6 <= t.item() <= 1 + 1e-6
            assert torch.allclose(x, wa + t * (wb - wa), atol=1e-5)


def test_continuous(walk):
    traj, c = walk
    eps = 1e-4
    for e in range(1, 10):  # every inner integer epoch, waypoints 3 and 7 included
        left, right = c.at(e - eps), c.at(e + eps)
        assert torch.allclose(left, c.at(e), atol=1e-2) and torch.allclose(right, c.at(e), atol=1e-2)
        assert (left - right).abs().max() < 50 * eps * (traj[1:] - traj[:-1]).abs().max()
    # approaching a waypoint from the left ends on it
    assert torch.allclose(c.at(7 - 1e-6), traj[7], atol=1e-4)


def test_out_of_range(walk):
    _, c = walk
    for s in (-1e-3, 10.001, float('nan')):
        with pytest.raises(ValueError):
            c.at(s)


def test_straight_uniform_line_is_linear_interpolation():
    g = torch.Generator().manual_seed(1)
    start, velocity = torch.randn(14, generator=g), torch.randn(14, generator=g)
    # per layer a straight line at constant speed (each layer its own direction and speed)
    traj = start + torch.arange(11.0)[:, None] * velocity
    c = compress(traj, SIZES, k=4)
    for s in torch.linspace(0, 10, 61).tolist():
        e0 = min(int(s), 9)
        linear = torch.lerp(traj[e0], traj[e0 + 1], s - e0)
        assert torch.allclose(c.at(s), linear, atol=1e-5), s


def test_layer_that_never_moves():
    traj = random_walk()
    traj[:, 6:9] = torch.tensor([1.5, -2.0, 0.25])  # layer 1 frozen
    c = compress(traj, SIZES, k=4)
    for s in torch.linspace(0, 10, 41).tolist():
        assert torch.equal(c.at(s)[6:9], traj[0, 6:9])
    # its fractions fall back to the linear epoch fraction
    assert torch.allclose(c.fractions[:3, 1], torch.tensor([0, 1 / 3, 2 / 3]))


def test_layer_still_in_one_segment_only():
    traj = random_walk()
    traj[4:8, :6] = traj[3, :6]  # layer 0 stops during segment [3, 7], moves elsewhere
    c = compress(traj, SIZES, k=4)
    assert torch.allclose(c.fractions[3:7, 0], torch.tensor([0, 0.25, 0.5, 0.75]))
    assert torch.equal(c.at(5.5)[:6], traj[3, :6])


def test_k2_single_segment():
    traj = random_walk(E=5)
    c = compress(traj, SIZES, k=2)
    assert c.epochs.tolist() == [0, 5]
    assert torch.equal(c.at(0), traj[0]) and torch.equal(c.at(5), traj[5])


# ---------------------------------------------------------------- state dict

def test_state_dict_round_trip(tmp_path, walk):
    _, c = walk
    path = tmp_path / 'c.pt'
    torch.save(c.state_dict(), path)
    d = torch.load(path, weights_only=True)
    assert set(d) == {'epochs', 'waypoints', 'fractions', 'layer_sizes'}
    c2 = CompressedTrajectory.from_state_dict(d)
    for key in d:
        assert torch.equal(getattr(c2, key), getattr(c, key))
    assert torch.equal(c2.at(4.3), c.at(4.3))
    with pytest.raises(ValueError):
        CompressedTrajectory.from_state_dict({'epochs': c.epochs})
    bad = dict(d, fractions=d['fractions'][:-1])
    with pytest.raises(ValueError):
        CompressedTrajectory.from_state_dict(bad)


# ---------------------------------------------------------------- buffer folders

# P = 20458 over L = 4 layers: shapes of a small conv layer + bias and a linear layer + bias
SHAPES = [(16, 3, 3, 3), (16,), (10, 2000), (10,)]
E = 50


def mtt_trajectory(seed):
    g = torch.Generator().manual_seed(seed)
    snap = [torch.randn(s, generator=g) for s in SHAPES]
    traj = [snap]
    for _ in range(E):
        snap = [t + 0.01 * torch.randn(t.shape, generator=g) for t in snap]
        traj.append(snap)
    return traj


@pytest.fixture
def mtt_folder(tmp_path):
    folder = tmp_path / 'Digits_NO_ZCA' / 'ConvNetD2'
    folder.mkdir(parents=True)
    torch.save([mtt_trajectory(0), mtt_trajectory(1)], folder / 'replay_buffer_0.pt')  # MTT: several per file
    torch.save([mtt_trajectory(2)], folder / 'replay_buffer_1.pt')
    (folder / 'replay_buffer_1.json').write_text('{"dataset": "Digits", "model": "ConvNetD2"}\n')
    return str(folder)


def test_compress_folder(mtt_folder, capsys):
    stats = compress_buffer_folder(mtt_folder, k=4)
    out = os.path.join(mtt_folder, 'mct4')
    assert stats['files'] == 2 and stats['written'] == 2
    assert os.path.exists(os.path.join(out, 'replay_buffer_1.json'))
    P, L, K = sum(torch.Size(s).numel() for s in SHAPES), len(SHAPES), 4
    assert P == 20458
    expected = (K * P + (E + 1) * L) / ((E + 1) * P)  # ≈ K/(E+1) = 0.078
    with capsys.disabled():  # reported, not just asserted
        print(f"\nMCT storage ratio, E={E} P={P} L={L} K={K}: measured {stats['ratio']:.4f}, "
              f"tensors only {expected:.4f}")
    assert stats['ratio'] < 0.15
    assert abs(stats['ratio'] - expected) < 0.02

    originals = [mtt_trajectory(0), mtt_trajectory(1)]
    path0 = os.path.join(out, 'replay_buffer_0.pt')
    loaded = load_compressed(path0)
    assert len(loaded) == 2
    for c, traj in zip(loaded, originals):
        full = trajectory_tensor(traj)
        assert c.epochs.tolist() == [0, 17, 33, 50] and c.layer_sizes.tolist() == [432, 16, 20000, 10]
        for e in (0, 17, 33, 50):
            assert torch.equal(c.at(e), full[e])

    # re-running skips: nothing rewritten
    mtime = os.path.getmtime(path0)
    again = compress_buffer_folder(mtt_folder, k=4)
    assert again['written'] == 0 and again['skipped'] == 2 and again['ratio'] == stats['ratio']
    assert os.path.getmtime(path0) == mtime

    # the CLI finds the same folder from buffer.py's flags
    root = os.path.dirname(os.path.dirname(mtt_folder))
    cli = compress_buffers.main(['--buffer_path', root, '--dataset', 'Digits', '--model', 'ConvNetD2'])
    assert cli['skipped'] == 2
    assert 'compressed 2 files' in capsys.readouterr().out


def test_empty_folder_fails(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        compress_buffers.main(['--folder', str(tmp_path)])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith('error:') and '\n' not in err
    with pytest.raises(UsageError):
        compress_buffer_folder(str(tmp_path / 'missing'))


def test_load_compressed_rejects_foreign_files(tmp_path, mtt_folder):
    junk = tmp_path / 'junk.pt'
    junk.write_bytes(b'not a torch file')
    with pytest.raises(UsageError):
        load_compressed(str(junk))
    with pytest.raises(UsageError, match='not'):
        load_compressed(os.path.join(mtt_folder, 'replay_buffer_1.pt'))  # an MTT file
