"""Tests for data.py and prep_tiny.py on tiny fixtures written in the real on-disk formats."""
import gzip
from collections import Counter
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trajmatch import data  # noqa: E402
from trajmatch.data import DataError, ZCA, check_dataset, load_dataset  # noqa: E402
from tools.prep_tiny import PrepError, regroup_tiny_val  # noqa: E402


# ============================================================================
# Fixture writers (real formats)
# ============================================================================

def _cifar_images(n, offset):
    """uint8 [n,3072] where image i has a unique marker and a known pixel (channel 1, row 2, col 3) = 255."""
    x = np.zeros((n, 3072), dtype=np.uint8)
    x[:, 0] = np.arange(offset, offset + n) % 256   # channel 0, row 0, col 0: unique id
    x[:, 1 * 1024 + 2 * 32 + 3] = 255
    return x


def write_cifar10(root, per_batch=4):
    d = Path(root) / 'cifar-10-batches-py'
    d.mkdir(parents=True)
    for b in range(1, 6):
        labels = [(b * per_batch + i) % 10 for i in range(per_batch)]
        with open(d / f'data_batch_{b}', 'wb') as f:
            pickle.dump({b'data': _cifar_images(per_batch, b * per_batch), b'labels': labels}, f)
    with open(d / 'test_batch', 'wb') as f:
        pickle.dump({b'data': _cifar_images(3, 200), b'labels': [7, 8, 9]}, f)
    with open(d / 'batches.meta', 'wb') as f:
        pickle.dump({b'label_names': [f'c{i}'.encode() for i in range(10)]}, f)
    return d


def write_cifar100(root):
    d = Path(root) / 'cifar-100-python'
    d.mkdir(parents=True)
    with open(d / 'train', 'wb') as f:
        pickle.dump({b'data': _cifar_images(6, 0), b'fine_labels': [0, 99, 5, 5, 42, 1]}, f)
    with open(d / 'test', 'wb') as f:
        pickle.dump({b'data': _cifar_images(2, 10), b'fine_labels': [99, 0]}, f)
    with open(d / 'meta', 'wb') as f:
        pickle.dump({b'fine_label_names': [f'f{i}'.encode() for i in range(100)]}, f)
    return d


def _idx_bytes(arr, magic):
    return struct.pack('>i', magic) + struct.pack(f'>{arr.ndim}i', *arr.shape) + arr.astype(np.uint8).tobytes()


def write_idx(root, name, gz=False, n_train=5, n_test=3, images_magic=2051, flat=False):
    """flat: the files directly in root (Debian's dataset-fashion-mnist), else torchvision's root/name/raw."""
    d = Path(root) if flat else Path(root) / name / 'raw'
    d.mkdir(parents=True, exist_ok=True)
    for prefix, n in (('train', n_train), ('t10k', n_test)):
        x = np.zeros((n, 28, 28), dtype=np.uint8)
        x[:, 4, 7] = 255
        y = np.arange(n) % 10
        for fname, payload in ((f'{prefix}-images-idx3-ubyte', _idx_bytes(x, images_magic)),
                               (f'{prefix}-labels-idx1-ubyte', _idx_bytes(y, 2049))):
            if gz:
                with gzip.open(d / (fname + '.gz'), 'wb') as f:
                    f.write(payload)
            else:
                (d / fname).write_bytes(payload)
    return d


def write_svhn(root):
    for fname, labels in (('train_32x32.mat', [10, 1, 2, 10, 9]), ('test_32x32.mat', [3, 10])):
        n = len(labels)
        X = np.zeros((32, 32, 3, n), dtype=np.uint8)
        X[0, 1, 2, :] = 255              # row 0, col 1, channel 2 of every image
        scipy.io.savemat(str(Path(root) / fname), {'X': X, 'y': np.array(labels, dtype=np.uint8).reshape(n, 1)})


def _jpeg(path, size, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', size, color).save(path, quality=95)


TINY_WNIDS = ['n01443537', 'n01629819', 'n01641577']


def write_tiny_raw(root, size=(64, 64)):
    """Raw Tiny ImageNet layout: train/<wnid>/images/*.JPEG, val/images/*.JPEG + val_annotations.txt."""
    t = Path(root) / 'tiny-imagenet-200'
    lines = []
    for k, w in enumerate(TINY_WNIDS):
        for i in range(4):
            _jpeg(t / 'train' / w / 'images' / f'{w}_{i}.JPEG', size, (60 * k + 20, 100, 200))
        for i in range(2):
            name = f'val_{k * 2 + i}.JPEG'
            _jpeg(t / 'val' / 'images' / name, size, (60 * k + 20, 100, 200))
            lines.append(f'{name}\t{w}\t0\t0\t10\t10')
    (t / 'val' / 'val_annotations.txt').write_text('\n'.join(lines) + '\n')
    return t


def write_imagenet(root, n_classes=1000):
    """1000 empty wnid folders; only the imagenette ones hold pictures (class k has red = 20k+10)."""
    t = Path(root) / 'imagenet'
    wnids = [f'n{i:08d}' for i in range(n_classes)]
    for w in wnids:
        (t / 'train' / w).mkdir(parents=True)
    if n_classes == 1000:
        for k, idx in enumerate(data.SUBSETS['imagenette']):
            w = wnids[idx]
            _jpeg(t / 'train' / w / f'{w}_0.JPEG', (48, 40), (20 * k + 10, 128, 128))
            _jpeg(t / 'train' / w / 'sub' / f'{w}_1.JPEG', (40, 64), (20 * k + 10, 128, 128))
            _jpeg(t / 'val' / w / f'val_{k}.JPEG', (50, 50), (20 * k + 10, 128, 128))
    (t / 'val').mkdir(exist_ok=True)
    return t, wnids


def norm(v, mean, std):
    return (v - mean) / std


# ============================================================================
# Digits
# ============================================================================

def test_digits_split_shapes_and_determinism():
    d = load_dataset('Digits', 'does-not-matter')
    assert d.images_train.shape == (1437, 1, 8, 8) and d.images_test.shape == (360, 1, 8, 8)
    assert d.images_train.dtype == torch.float32 and d.labels_train.dtype == torch.int64
    assert d.num_classes == 10 and d.channel == 1 and d.im_size == (8, 8) and d.class_names[3] == '3'
    assert set(d.labels_train.tolist()) == set(range(10)) == set(d.labels_test.tolist())
    # Normalised with train statistics: mean ~0, std ~1 on the train split.
    assert abs(float(d.images_train.mean())) < 1e-4 and abs(float(d.images_train.std()) - 1) < 1e-3
    px = d.to_pixels(d.images_train)
    assert px.min() >= 0 and px.max() <= 1 and torch.allclose(px * 16, (px * 16).round(), atol=1e-4)
    d2 = load_dataset('Digits')
    assert torch.equal(d.images_train, d2.images_train) and torch.equal(d.labels_test, d2.labels_test)


# ============================================================================
# CIFAR
# ============================================================================

def test_cifar10_load(tmp_path):
    write_cifar10(tmp_path)
    d = load_dataset('CIFAR10', str(tmp_path))
    assert d.images_train.shape == (20, 3, 32, 32) and d.images_test.shape == (3, 3, 32, 32)
    assert d.images_train.dtype == torch.float32 and d.labels_train.dtype == torch.int64
    assert d.labels_train.tolist() == [(b * 4 + i) % 10 for b in range(1, 6) for i in range(4)]
    assert d.labels_test.tolist() == [7, 8, 9] and d.class_names[2] == 'c2' and d.num_classes == 10
    m, s = data._STATS['CIFAR10']
    # Row-major CHW: channel 1, row 2, col 3 was 255; channel 2 at the same place was 0.
    assert torch.allclose(d.images_train[:, 1, 2, 3], torch.full((20,), norm(1.0, m[1], s[1])))
    assert torch.allclose(d.images_train[:, 2, 2, 3], torch.full((20,), norm(0.0, m[2], s[2])))
    assert abs(float(d.images_train[5, 0, 0, 0]) - norm(9 / 255, m[0], s[0])) < 1e-5   # image 5 = batch 2, id 9
    px = d.to_pixels(d.images_test)
    assert torch.allclose(px[:, 1, 2, 3], torch.ones(3), atol=1e-6) and float(px[:, 2].max()) < 1e-6
    assert d.zca is None


def test_cifar100_load(tmp_path):
    write_cifar100(tmp_path)
    d = load_dataset('CIFAR100', str(tmp_path))
    assert d.num_classes == 100 and d.class_names[99] == 'f99'
    assert d.images_train.shape == (6, 3, 32, 32) and d.labels_train.tolist() == [0, 99, 5, 5, 42, 1]
    m, s = data._STATS['CIFAR100']
    assert torch.allclose(d.images_test[:, 1, 2, 3], torch.full((2,), norm(1.0, m[1], s[1])))
    assert torch.allclose(d.to_pixels(d.images_train), (d.images_train * torch.tensor(s).view(3, 1, 1)
                                                          + torch.tensor(m).view(3, 1, 1)).clamp(0, 1))


def test_cifar_truncated_pickle_is_data_error(tmp_path):
    d = write_cifar10(tmp_path)
    raw = (d / 'data_batch_3').read_bytes()
    (d / 'data_batch_3').write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match='data_batch_3'):
        load_dataset('CIFAR10', str(tmp_path))


def test_cifar_garbage_and_wrong_keys_are_data_errors(tmp_path):
    d = write_cifar100(tmp_path)
    (d / 'test').write_bytes(b'this is not a pickle at all')
    with pytest.raises(DataError, match='corrupt'):
        load_dataset('CIFAR100', str(tmp_path))
    with open(d / 'test', 'wb') as f:
        pickle.dump({b'data': _cifar_images(2, 0), b'coarse_labels': [1, 2]}, f)   # no fine_labels
    with pytest.raises(DataError) as e:
        load_dataset('CIFAR100', str(tmp_path))
    assert 'fine_labels' in str(e.value) and '\n' not in str(e.value)


def test_missing_dataset_message_names_path(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset('CIFAR10', str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / 'cifar-10-batches-py') in msg and '--data_path' in msg and '\n' not in msg
    for name, part in (('MNIST', 'MNIST/raw'), ('SVHN', 'train_32x32.mat'), ('CIFAR100', 'cifar-100-python'),
                       ('Tiny', 'tiny-imagenet-200'), ('ImageNet', 'imagenet')):
        with pytest.raises(DataError, match=part):
            load_dataset(name, str(tmp_path))


def test_check_dataset(tmp_path):
    with pytest.raises(DataError, match='cifar-10-batches-py'):
        check_dataset('CIFAR10', str(tmp_path))
    write_cifar10(tmp_path)
    assert check_dataset('CIFAR10', str(tmp_path)) is None
    (tmp_path / 'cifar-10-batches-py' / 'data_batch_5').unlink()
    with pytest.raises(DataError, match='data_batch_5'):
        check_dataset('CIFAR10', str(tmp_path))
    check_dataset('Digits', str(tmp_path))   # bundled with sklearn: always present
    with pytest.raises(DataError, match='unknown dataset'):
        check_dataset('CIFAR11', str(tmp_path))


# ============================================================================
# MNIST / FashionMNIST / SVHN
# ============================================================================

def test_mnist_plain_idx(tmp_path):
    write_idx(tmp_path, 'MNIST')
    d = load_dataset('MNIST', str(tmp_path))
    assert d.images_train.shape == (5, 1, 28, 28) and d.images_test.shape == (3, 1, 28, 28)
    assert d.labels_train.tolist() == [0, 1, 2, 3, 4] and d.labels_train.dtype == torch.int64
    assert torch.allclose(d.images_train[:, 0, 4, 7], torch.full((5,), norm(1.0, 0.1307, 0.3081)))
    assert torch.allclose(d.images_train[:, 0, 7, 4], torch.full((5,), norm(0.0, 0.1307, 0.3081)))
    assert torch.allclose(d.to_pixels(d.images_test)[:, 0, 4, 7], torch.ones(3), atol=1e-6)


def test_fashion_mnist_gz_idx(tmp_path):
    write_idx(tmp_path, 'FashionMNIST', gz=True)
    check_dataset('FashionMNIST', str(tmp_path))
    d = load_dataset('FashionMNIST', str(tmp_path))
    assert d.class_names[9] == 'Ankle boot' and d.labels_test.tolist() == [0, 1, 2]
    assert torch.allclose(d.images_test[:, 0, 4, 7], torch.full((3,), norm(1.0, 0.2861, 0.3530)))


def test_fashion_mnist_debian_layout_reads_the_files_in_data_path_itself(tmp_path):
    with pytest.raises(DataError, match='apt-get install dataset-fashion-mnist'):
        check_dataset('FashionMNIST', str(tmp_path))
    write_idx(tmp_path, 'FashionMNIST', gz=True, flat=True)
    check_dataset('FashionMNIST', str(tmp_path))
    d = load_dataset('FashionMNIST', str(tmp_path))
    assert d.images_train.shape == (5, 1, 28, 28) and d.labels_test.tolist() == [0, 1, 2]
    torchvision_layout = write_idx(tmp_path / 'tv', 'FashionMNIST', gz=True)
    same = load_dataset('FashionMNIST', str(tmp_path / 'tv'))
    assert torchvision_layout.name == 'raw' and torch.equal(same.images_train, d.images_train)


def test_valid_holds_out_the_same_training_images_in_every_run():
    full = load_dataset('Digits')
    torch.manual_seed(123)  # the split ignores the global seed
    a = load_dataset('Digits', valid=100)
    torch.manual_seed(7)
    b = load_dataset('Digits', valid=100)
    assert torch.equal(a.images_val, b.images_val) and torch.equal(a.labels_train, b.labels_train)
    assert len(a.images_val) == 100 and len(a.images_train) + 100 == len(full.images_train)
    assert torch.equal(a.images_test, full.images_test) and full.images_val is None
    # a partition of the training set: every image is in exactly one part, with its own label
    def pairs(x, y):
        return Counter((tuple(i.flatten().tolist()), int(label)) for i, label in zip(x, y))
    assert pairs(a.images_train, a.labels_train) + pairs(a.images_val, a.labels_val) == \
        pairs(full.images_train, full.labels_train)
    assert set(a.labels_val.tolist()) == set(range(10))  # random, not one class
    with pytest.raises(DataError, match='--valid'):
        load_dataset('Digits', valid=len(full.images_train))


def test_idx_wrong_magic_and_truncation(tmp_path):
    write_idx(tmp_path / 'a', 'MNIST', images_magic=1234)
    with pytest.raises(DataError, match='magic'):
        load_dataset('MNIST', str(tmp_path / 'a'))
    d = write_idx(tmp_path / 'b', 'MNIST')
    raw = (d / 't10k-images-idx3-ubyte').read_bytes()
    (d / 't10k-images-idx3-ubyte').write_bytes(raw[:-10])
    with pytest.raises(DataError, match='t10k-images'):
        load_dataset('MNIST', str(tmp_path / 'b'))


def test_svhn_mat(tmp_path):
    write_svhn(tmp_path)
    d = load_dataset('SVHN', str(tmp_path))
    assert d.images_train.shape == (5, 3, 32, 32) and d.images_test.shape == (2, 3, 32, 32)
    assert d.labels_train.tolist() == [0, 1, 2, 0, 9] and d.labels_test.tolist() == [3, 0]
    m, s = data._STATS['SVHN']
    assert torch.allclose(d.images_train[:, 2, 0, 1], torch.full((5,), norm(1.0, m[2], s[2])))
    assert torch.allclose(d.images_train[:, 2, 1, 0], torch.full((5,), norm(0.0, m[2], s[2])))
    (tmp_path / 'test_32x32.mat').write_bytes(b'garbage' * 10)
    with pytest.raises(DataError, match='test_32x32.mat'):
        load_dataset('SVHN', str(tmp_path))


# ============================================================================
# Tiny ImageNet + prep_tiny
# ============================================================================

def test_tiny_raw_layout_regroup_and_load(tmp_path):
    t = write_tiny_raw(tmp_path)
    with pytest.raises(DataError, match='tools.prep_tiny'):
        load_dataset('Tiny', str(tmp_path))
    assert regroup_tiny_val(t) == 6
    assert sorted(p.name for p in (t / 'val' / 'images').iterdir()) == TINY_WNIDS
    assert regroup_tiny_val(t) == 0                      # idempotent
    assert len(list((t / 'val' / 'images' / TINY_WNIDS[1]).glob('*.JPEG'))) == 2
    d = load_dataset('Tiny', str(tmp_path))
    assert d.images_train.shape == (12, 3, 64, 64) and d.images_test.shape == (6, 3, 64, 64)
    assert d.class_names == TINY_WNIDS and d.num_classes == 3
    assert d.labels_train.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and d.labels_test.tolist() == [0, 0, 1, 1, 2, 2]
    px = d.to_pixels(d.images_test)
    red = px[:, 0].mean(dim=(1, 2)) * 255
    assert torch.allclose(red, torch.tensor([20., 20, 80, 80, 140, 140]), atol=3)
    m, s = data.IMAGENET_MEAN, data.IMAGENET_STD
    assert abs(float(d.images_train[0, 2].mean()) - norm(200 / 255, m[2], s[2])) < 0.05


def test_tiny_resizes_other_sizes(tmp_path):
    write_tiny_raw(tmp_path, size=(80, 72))
    regroup_tiny_val(tmp_path)           # a folder holding tiny-imagenet-200/ is accepted too
    d = load_dataset('Tiny', str(tmp_path))
    assert d.images_train.shape == (12, 3, 64, 64)


def test_prep_tiny_cli_errors_and_noop(tmp_path):
    script = str(ROOT / 'tools' / 'prep_tiny.py')
    r = subprocess.run([sys.executable, script, '--data_path', str(tmp_path)], capture_output=True, text=True)
    assert r.returncode != 0 and 'tiny-imagenet-200' in r.stderr and len(r.stderr.strip().splitlines()) == 1
    t = write_tiny_raw(tmp_path)
    (t / 'val' / 'val_annotations.txt').unlink()
    with pytest.raises(PrepError, match='val_annotations.txt'):
        regroup_tiny_val(t)
    (t / 'val' / 'val_annotations.txt').write_text('val_0.JPEG\tn01443537\t0\t0\t1\t1\n')
    with pytest.raises(PrepError, match='not listed'):
        regroup_tiny_val(t)
    assert len(list((t / 'val' / 'images').glob('*.JPEG'))) == 6   # nothing moved on failure


# ============================================================================
# ImageNet subsets
# ============================================================================

def test_imagenet_subset_resize_crop_and_labels(tmp_path):
    t, wnids = write_imagenet(tmp_path)
    d = load_dataset('ImageNet', str(tmp_path), subset='imagenette', res=32)
    assert d.images_train.shape == (20, 3, 32, 32) and d.images_test.shape == (10, 3, 32, 32)
    assert d.class_names == [wnids[i] for i in data.SUBSETS['imagenette']] and d.num_classes == 10
    assert d.labels_train.tolist() == [k for k in range(10) for _ in range(2)]
    assert d.labels_test.tolist() == list(range(10))
    red = d.to_pixels(d.images_train)[:, 0].mean(dim=(1, 2)) * 255
    assert torch.allclose(red, torch.tensor([20. * k + 10 for k in range(10) for _ in range(2)]), atol=3)


def test_imagenet_center_crop(tmp_path):
    t, wnids = write_imagenet(tmp_path)
    # A 96x32 picture: black / white / black thirds. Shorter side -> 16, centre crop 16 = the white third.
    w = wnids[0]
    img = np.zeros((32, 96, 3), dtype=np.uint8)
    img[:, 32:64] = 255
    for f in (t / 'train' / w).rglob('*.JPEG'):
        f.unlink()
    Image.fromarray(img).save(t / 'train' / w / 'stripes.png')
    d = load_dataset('ImageNet', str(tmp_path), res=16)
    x = d.to_pixels(d.sample_real(0, 1))[0]
    assert x.shape == (3, 16, 16)
    assert float(x[:, :, 3:13].min()) > 0.9   # uncentred crops (or a squash) would show black here


def test_imagenet_layout_errors(tmp_path):
    write_imagenet(tmp_path / 'a', n_classes=999)
    with pytest.raises(DataError, match='999 class folders, expected 1000'):
        load_dataset('ImageNet', str(tmp_path / 'a'))
    write_imagenet(tmp_path / 'b')
    with pytest.raises(DataError, match='imagewoof'):
        check_dataset('ImageNet', str(tmp_path / 'b'), subset='imagecats')
    with pytest.raises(DataError, match='drop --zca'):
        load_dataset('ImageNet', str(tmp_path / 'b'), zca=True, res=128)
    with pytest.raises(DataError, match='GiB'):
        load_dataset('ImageNet', str(tmp_path / 'b'), res=32, max_bytes=1000)


def test_tiny_max_bytes(tmp_path):
    write_tiny_raw(tmp_path)
    regroup_tiny_val(tmp_path / 'tiny-imagenet-200')
    with pytest.raises(DataError) as e:
        load_dataset('Tiny', str(tmp_path), max_bytes=1)
    assert 'GiB in memory' in str(e.value) and '\n' not in str(e.value)
    assert 0 < data.default_max_bytes()


def test_corrupt_jpeg_is_data_error(tmp_path):
    t = write_tiny_raw(tmp_path)
    regroup_tiny_val(t)
    (t / 'train' / TINY_WNIDS[0] / 'images' / 'broken.JPEG').write_bytes(b'\xff\xd8\xff not really a jpeg')
    with pytest.raises(DataError, match='broken.JPEG'):
        load_dataset('Tiny', str(tmp_path))


# ============================================================================
# RealData helpers
# ============================================================================

def test_sample_real_distinct_right_class(tmp_path):
    write_cifar10(tmp_path)
    d = load_dataset('CIFAR10', str(tmp_path))
    idx = d.indices_per_class()
    assert d.indices_per_class() is idx and sum(len(i) for i in idx) == 20
    c = int(d.labels_train[0])
    n = len(idx[c])
    assert n >= 2
    g = torch.Generator().manual_seed(0)
    x = d.sample_real(c, n, generator=g)
    assert x.shape == (n, 3, 32, 32)
    ids = set()
    for img in x:   # every sample is a train image of class c
        match = (d.images_train == img).flatten(1).all(1).nonzero().flatten().tolist()
        assert len(match) == 1 and int(d.labels_train[match[0]]) == c
        ids.add(match[0])
    assert len(ids) == n
    a = d.sample_real(c, 1, torch.Generator().manual_seed(3))
    b = d.sample_real(c, 1, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(DataError, match='lower --ipc'):
        d.sample_real(c, n + 1)


# ============================================================================
# ZCA
# ============================================================================

def _correlated(n=400, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, d, generator=g)
    mix = torch.eye(d) + 0.8 * torch.rand(d, d, generator=g)
    x = z @ mix
    return x.reshape(n, 3, 2, 2)


def test_zca_whitens_and_inverts():
    x = _correlated()
    zca = ZCA.fit(x, eps=1e-6)
    w = zca.transform(x).reshape(len(x), -1)
    cov = torch.cov(w.T, correction=0)
    assert torch.allclose(cov, torch.eye(12), atol=1e-2)          # whitened: identity covariance
    orig = torch.cov(x.reshape(len(x), -1).T, correction=0)
    off = ~torch.eye(12, dtype=torch.bool)
    assert orig[off].abs().max() > 10 * cov[off].abs().max()      # fails if W were the identity
    assert torch.allclose(zca.inverse(zca.transform(x)), x, atol=1e-5)
    # Default eps=0.1: still invertible, and correlations shrink.
    z2 = ZCA.fit(x)
    w2 = z2.transform(x).reshape(len(x), -1)
    assert torch.corrcoef(w2.T)[off].abs().mean() < 0.5 * torch.corrcoef(x.reshape(len(x), -1).T)[off].abs().mean()
    assert torch.allclose(z2.inverse(z2.transform(x)), x, atol=1e-5)
    assert torch.allclose(z2.transform(x[0]), z2.transform(x)[0], atol=1e-6)   # single image too


def test_zca_state_dict_roundtrip(tmp_path):
    zca = ZCA.fit(_correlated())
    torch.save(zca.state_dict(), tmp_path / 'zca.pt')
    z2 = ZCA.from_state_dict(torch.load(tmp_path / 'zca.pt', weights_only=True))
    x = _correlated(seed=1)[:5]
    assert torch.equal(z2.transform(x), zca.transform(x)) and z2.shape == (3, 2, 2)


def test_load_with_zca():
    # Digits (D = 64) keeps the eigendecomposition instant; the code path is the same for CIFAR.
    plain = load_dataset('Digits')
    d = load_dataset('Digits', zca=True)
    assert isinstance(d.zca, ZCA) and d.images_train.shape == (1437, 1, 8, 8) and d.images_train.dtype == torch.float32
    assert not torch.allclose(d.images_train, plain.images_train, atol=1e-2)
    assert torch.allclose(d.to_pixels(d.images_train), plain.to_pixels(plain.images_train), atol=1e-4)
    assert torch.allclose(d.to_pixels(d.images_test), plain.to_pixels(plain.images_test), atol=1e-4)
    assert abs(float(d.images_train.mean())) < 1e-3    # mean-centred by the whitening
    # The whitened train covariance against its closed form: with the pixel covariance C = U diag(S) U^T and
    # W = U diag(1/sqrt(S + eps)) U^T, W C W = U diag(S / (S + eps)) U^T. A matrix function of C, so it does
    # not depend on which eigenbasis a BLAS returns; measured error 8e-8 (float32 whitening), bound 1e-4.
    raw = data._load_digits()[0].flatten(1).double()    # [0,1] pixels of the same train split
    S, U = torch.linalg.eigh(torch.cov(raw.T, correction=0))
    S = S.clamp_min(0)
    closed = (U * (S / (S + 0.1))) @ U.T
    whitened = torch.cov(d.images_train.flatten(1).double().T, correction=0)
    assert (whitened - closed).abs().max() < 1e-4
    # and the closed form is far from what no whitening would give (0.32 here), so the check has teeth
    assert (torch.cov(raw.T, correction=0) - closed).abs().max() > 0.1


def test_zca_refused_for_large_images(tmp_path):
    with pytest.raises(DataError, match='drop --zca'):
        load_dataset('ImageNet', str(tmp_path / 'unused'), zca=True, res=128)
