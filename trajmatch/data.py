"""Real datasets held in memory as tensors, plus ZCA whitening.

Every dataset is read from its original on-disk format by the small readers
below (no torchvision dataset classes for reading: they verify md5 checksums
that test fixtures cannot pass). torchvision is used only for `download=True`.
Every problem a user can cause (missing/corrupt files, wrong layout, too little
memory) raises `DataError` with a one-line message saying what was expected
and how to fix it.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from trajmatch.cli import UsageError, integer

# ============================================================================
# Constants
# ============================================================================

DATASETS = ('Digits', 'MNIST', 'FashionMNIST', 'SVHN', 'CIFAR10', 'CIFAR100', 'Tiny', 'ImageNet')

# ImageNet class indices of the MTT paper; index = position of the wnid in the
# sorted list of the 1000 ImageNet train/ class folders.
SUBSETS = {
    'imagenette': [0, 217, 482, 491, 497, 566, 569, 571, 574, 701],
    'imagewoof': [193, 182, 258, 162, 155, 167, 159, 273, 207, 229],
    'imagemeow': [281, 282, 283, 284, 285, 291, 292, 290, 289, 287],
    'imagesquawk': [84, 130, 88, 144, 145, 22, 96, 9, 100, 89],
    'imagefruit': [953, 954, 949, 950, 951, 957, 952, 945, 943, 948],
    'imageyellow': [309, 986, 954, 951, 987, 779, 599, 291, 72, 11],
}

DEFAULT_MODEL = {'Digits': 'ConvNetD2', 'MNIST': 'ConvNet', 'FashionMNIST': 'ConvNet', 'SVHN': 'ConvNet',
                 'CIFAR10': 'ConvNet', 'CIFAR100': 'ConvNet', 'Tiny': 'ConvNetD4', 'ImageNet': 'ConvNetD5'}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Per-channel normalisation constants in [0,1] pixel units (Digits: from its train split).
_STATS = {
    'MNIST': ((0.1307,), (0.3081,)),
    'FashionMNIST': ((0.2861,), (0.3530,)),
    'SVHN': ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    'CIFAR10': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    'CIFAR100': ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    'Tiny': (IMAGENET_MEAN, IMAGENET_STD),
    'ImageNet': (IMAGENET_MEAN, IMAGENET_STD),
}

FASHION_CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                   'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']

# Largest image dimension C*H*W we whiten: the D x D float64 covariance and its
# eigendecomposition grow as D^2 / D^3 (12288 = 3x64x64, Tiny ImageNet).
ZCA_MAX_DIM = 12288

_IMAGE_SUFFIXES = ('.jpeg', '.jpg', '.png')
_TINY_URL = 'http://cs231n.stanford.edu/tiny-imagenet-200.zip'


# ============================================================================
# Errors
# ============================================================================

class DataError(UsageError):
    """A user-facing data problem (bad input: exit 2); the message is one line with the fix."""


def _one_line(e: BaseException) -> str:
    """Short one-line description of an underlying exception."""
    text = ' '.join(str(e).split()) or '(no message)'
    return f'{type(e).__name__}: {text[:200]}'


def _corrupt(what: str, path: Path | str, e: BaseException, fix: str) -> DataError:
    return DataError(f'{what} file {path} is corrupt or malformed ({_one_line(e)}); {fix}')


# ============================================================================
# ZCA whitening
# ============================================================================

class ZCA:
    """ZCA whitening x -> (x - mean) @ W with W = U diag(1/sqrt(S+eps)) U^T.

    Fitted on un-normalised [0,1] pixels. W_inv = U diag(sqrt(S+eps)) U^T is
    kept so that pictures of whitened (synthetic) images can be recovered.
    """

    def __init__(self, mean: Tensor, W: Tensor, W_inv: Tensor, shape: tuple[int, ...]):
        self.mean, self.W, self.W_inv, self.shape = mean, W, W_inv, tuple(int(s) for s in shape)

    @classmethod
    def fit(cls, x: Tensor, eps: float = 0.1, chunk: int = 4096) -> 'ZCA':
        shape = tuple(x.shape[1:])
        flat = x.reshape(x.shape[0], -1)
        n, d = flat.shape
        # Chunked float64 sums: a float64 copy of all data may not fit in memory.
        mean = torch.zeros(d, dtype=torch.float64)
        for i in range(0, n, chunk):
            mean += flat[i:i + chunk].to(torch.float64).sum(0)
        mean /= n
        cov = torch.zeros(d, d, dtype=torch.float64)
        for i in range(0, n, chunk):
            xc = flat[i:i + chunk].to(torch.float64) - mean
            cov.addmm_(xc.T, xc)
        cov /= n
        S, U = torch.linalg.eigh(cov)
        S = S.clamp_min(0) + eps   # tiny negative eigenvalues are float error
        W = (U * S.rsqrt()) @ U.T
        W_inv = (U * S.sqrt()) @ U.T
        return cls(mean.float(), W.float(), W_inv.float(), shape)

    def _apply(self, x: Tensor, M: Tensor, shift_in: Tensor | None, shift_out: Tensor | None) -> Tensor:
        flat = x.reshape(-1, M.shape[0])
        M = M.to(device=x.device, dtype=x.dtype)
        if shift_in is not None:
            flat = flat - shift_in.to(device=x.device, dtype=x.dtype)
        out = flat @ M
        if shift_out is not None:
            out += shift_out.to(device=x.device, dtype=x.dtype)
        return out.reshape(x.shape)

    def transform(self, x: Tensor) -> Tensor:
        """Whiten x [..., C, H, W] (batched or single image)."""
        return self._apply(x, self.W, self.mean, None)

    def inverse(self, x: Tensor) -> Tensor:
        """Exact inverse of transform (up to float error)."""
        return self._apply(x, self.W_inv, None, self.mean)

    def state_dict(self) -> dict[str, Tensor]:
        # Plain tensors only, so torch.load(weights_only=True) can read it.
        return {'mean': self.mean.clone(), 'W': self.W.clone(), 'W_inv': self.W_inv.clone(),
                'shape': torch.tensor(self.shape, dtype=torch.int64)}

    @classmethod
    def from_state_dict(cls, d: dict[str, Tensor]) -> 'ZCA':
        return cls(d['mean'], d['W'], d['W_inv'], tuple(d['shape'].tolist()))


def _transform_inplace(zca: ZCA, x: Tensor, chunk: int = 4096) -> Tensor:
    """Whiten x chunk by chunk into its own storage (no second full copy)."""
    for i in range(0, x.shape[0], chunk):
        x[i:i + chunk] = zca.transform(x[i:i + chunk])
    return x


# ============================================================================
# RealData container
# ============================================================================

@dataclass
class RealData:
    name: str
    channel: int
    im_size: tuple[int, int]
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    images_train: Tensor   # [N,C,H,W] float32, normalised, or ZCA-whitened when zca
    labels_train: Tensor   # [N] int64
    images_test: Tensor
    labels_test: Tensor
    zca: ZCA | None = None
    images_val: Tensor | None = None   # --valid images held out of the training set (None: no split)
    labels_val: Tensor | None = None
    _indices: list[Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def indices_per_class(self) -> list[Tensor]:
        """Indices into images_train for every class (computed once)."""
        if self._indices is None:
            self._indices = [torch.nonzero(self.labels_train == c).flatten() for c in range(self.num_classes)]
        return self._indices

    def check_ipc(self, ipc: int) -> None:
        """ipc images per class must exist in every class (distill.py's set, eval.py's random baseline)."""
        smallest = min(len(idx) for idx in self.indices_per_class())
        if ipc > smallest:
            raise DataError(f"--ipc {ipc} is larger than the smallest class of {self.name} ({smallest} images); "
                            f"lower --ipc")

    def sample_real(self, c: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n distinct random real train images of class c."""
        if not 0 <= c < self.num_classes:
            raise DataError(f'class {c} does not exist in {self.name} (classes 0..{self.num_classes - 1})')
        idx = self.indices_per_class()[c]
        if n > len(idx):
            raise DataError(f"ipc {n} is larger than class {c}'s {len(idx)} images in {self.name}; lower --ipc")
        pick = torch.randperm(len(idx), generator=generator)[:n]
        return self.images_train[idx[pick]]

    def to_pixels(self, x: Tensor) -> Tensor:
        """Undo ZCA or normalisation -> [0,1] pixels (clamped), for pictures."""
        if self.zca is not None:
            x = self.zca.inverse(x)
        else:
            shape = (-1, 1, 1)  # broadcast over [..., C, H, W]
            mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(shape)
            std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(shape)
            x = x * std + mean
        return x.clamp(0, 1)


# ============================================================================
# Small helpers
# ============================================================================

def _to_float(x: Tensor) -> Tensor:
    """uint8 [N,C,H,W] -> float32 in [0,1]; float input is taken as already in [0,1]."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255)
    return x.to(torch.float32)


def _normalise_inplace(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def _labels(y, n_images: int, num_classes: int, what: str, path, fix: str) -> Tensor:
    """Validate labels (length, range) and return an int64 tensor."""
    try:
        y = torch.as_tensor(np.asarray(y, dtype=np.int64).reshape(-1))
    except (TypeError, ValueError) as e:
        raise _corrupt(what, path, e, fix) from e
    if len(y) != n_images or (len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes)):
        raise DataError(f'{what} file {path} is malformed ({len(y)} labels for {n_images} images, '
                        f'expected labels in 0..{num_classes - 1}); {fix}')
    return y


def default_max_bytes() -> int | None:
    """60% of the machine's total RAM, or None where it cannot be read."""
    try:
        return int(0.6 * os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(name: str, n_images: int, shape: tuple[int, int, int], max_bytes: int | None) -> None:
    """Refuse before reading when the float32 tensors would not fit."""
    if max_bytes is None:
        max_bytes = default_max_bytes()
    if max_bytes is None:
        return
    need = n_images * int(np.prod(shape)) * 4
    if need > max_bytes:
        c, h, w = shape
        raise DataError(f'{name} ({n_images} images of {c}x{h}x{w}) needs {need / 2**30:.2f} GiB in memory, '
                        f'more than the allowed {max_bytes / 2**30:.2f} GiB; use a smaller --subset/--res '
                        f'or a machine with more memory')


# ============================================================================
# Digits (sklearn, bundled)
# ============================================================================

def _load_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = d.images.astype(np.float32) / 16.0   # pixels 0..16 -> [0,1]
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=0.2, stratify=d.target, random_state=0)
    x_tr = torch.from_numpy(np.ascontiguousarray(x_tr)).unsqueeze(1)
    x_te = torch.from_numpy(np.ascontiguousarray(x_te)).unsqueeze(1)
    # Normalisation statistics come from the train split only.
    mean, std = (float(x_tr.mean()),), (float(x_tr.std()),)
    return x_tr, torch.as_tensor(y_tr, dtype=torch.int64), x_te, torch.as_tensor(y_te, dtype=torch.int64), \
        [str(i) for i in range(10)], mean, std


# ============================================================================
# MNIST / FashionMNIST (idx files)
# ============================================================================

_IDX_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')


def _has_idx(root: Path, f: str) -> bool:
    return (root / f).is_file() or (root / (f + '.gz')).is_file()


def _idx_dir(name: str, data_path: str) -> Path:
    """DIR itself when the idx files sit there (Debian's dataset-fashion-mnist: /usr/share/datasets/
    fashion-mnist), else torchvision's DIR/<name>/raw."""
    flat = Path(data_path)
    return flat if all(_has_idx(flat, f) for f in _IDX_FILES) else flat / name / 'raw'


def _idx_missing(name: str, data_path: str) -> DataError | None:
    root = _idx_dir(name, data_path)
    for f in _IDX_FILES:
        if not _has_idx(root, f):
            hint = ' (or apt-get install dataset-fashion-mnist and --data_path /usr/share/datasets/fashion-mnist)' \
                if name == 'FashionMNIST' else ''
            return DataError(f'{name} not found: expected the idx files {",".join(_IDX_FILES)} (optionally .gz) '
                             f'in {data_path} or {root}, missing {f}; download it with --download{hint} '
                             f'or pass --data_path DIR')
    return None


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one idx file (big-endian header: magic, dims) into a uint8 array."""
    fix = 'delete it and download again (--download)'
    try:
        opener = gzip.open if path.suffix == '.gz' else open
        with opener(path, 'rb') as f:
            raw = f.read()
    except Exception as e:  # OSError, EOFError, zlib.error for bad .gz files
        if isinstance(e, MemoryError):
            raise
        raise _corrupt('idx', path, e, fix) from e
    ndim = 3 if magic == 2051 else 1
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f'idx file {path} is truncated ({len(raw)} bytes, header alone needs {head}); {fix}')
    found = struct.unpack('>i', raw[:4])[0]
    if found != magic:
        raise DataError(f'idx file {path} has magic number {found}, expected {magic}; {fix}')
    dims = struct.unpack(f'>{ndim}i', raw[4:head])
    size = int(np.prod(dims))
    if len(raw) - head != size:
        raise DataError(f'idx file {path} holds {len(raw) - head} data bytes, header {dims} needs {size}; {fix}')
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims)


def _load_idx(name: str, data_path: str):
    root = _idx_dir(name, data_path)

    def find(f: str) -> Path:
        return root / f if (root / f).is_file() else root / (f + '.gz')

    out = []
    for img_f, lab_f in (_IDX_FILES[:2], _IDX_FILES[2:]):
        x = _read_idx(find(img_f), 2051)
        y = _read_idx(find(lab_f), 2049)
        y = _labels(y, len(x), 10, 'idx', find(lab_f), 'delete it and download again (--download)')
        out += [torch.from_numpy(x.copy()).unsqueeze(1), y]
    names = FASHION_CLASSES if name == 'FashionMNIST' else [str(i) for i in range(10)]
    return (*out, names)


# ============================================================================
# SVHN (.mat files)
# ============================================================================

def _svhn_missing(data_path: str) -> DataError | None:
    root = Path(data_path)
    for f in ('train_32x32.mat', 'test_32x32.mat'):
        if not (root / f).is_file():
            return DataError(f'SVHN not found: expected {root}/train_32x32.mat and {root}/test_32x32.mat '
                             f'(MATLAB files), missing {f}; download it with --download or pass --data_path DIR')
    return None


def _read_svhn(path: Path):
    import scipy.io
    fix = 'delete it and download again (--download)'
    try:
        mat = scipy.io.loadmat(str(path))
        X, y = mat['X'], mat['y']
    except Exception as e:  # scipy raises many types (ValueError, TypeError, NotImplementedError, ...)
        if isinstance(e, MemoryError):
            raise
        raise _corrupt('SVHN', path, e, fix) from e
    if X.ndim != 4 or X.shape[:3] != (32, 32, 3) or X.dtype != np.uint8:
        raise DataError(f"SVHN file {path} is malformed ('X' is {X.dtype} {X.shape}, expected uint8 [32,32,3,N]); {fix}")
    x = torch.from_numpy(np.ascontiguousarray(X.transpose(3, 2, 0, 1)))   # [H,W,C,N] -> [N,C,H,W]
    y = np.asarray(y).reshape(-1).astype(np.int64)
    y[y == 10] = 0   # SVHN stores digit 0 as label 10
    return x, _labels(y, len(x), 10, 'SVHN', path, fix)


def _load_svhn(data_path: str):
    root = Path(data_path)
    x_tr, y_tr = _read_svhn(root / 'train_32x32.mat')
    x_te, y_te = _read_svhn(root / 'test_32x32.mat')
    return x_tr, y_tr, x_te, y_te, [str(i) for i in range(10)]


# ============================================================================
# CIFAR10 / CIFAR100 (python pickles)
# ============================================================================

_CIFAR = {  # name: (folder, train files, test file, meta file, label key, names key)
    'CIFAR10': ('cifar-10-batches-py', [f'data_batch_{i}' for i in range(1, 6)], 'test_batch', 'batches.meta',
                'labels', 'label_names'),
    'CIFAR100': ('cifar-100-python', ['train'], 'test', 'meta', 'fine_labels', 'fine_label_names'),
}


def _cifar_missing(name: str, data_path: str) -> DataError | None:
    folder, train, test, meta, _, _ = _CIFAR[name]
    root = Path(data_path) / folder
    for f in train + [test, meta]:
        if not (root / f).is_file():
            listing = 'data_batch_1..5, test_batch and batches.meta' if name == 'CIFAR10' else 'train, test and meta'
            return DataError(f'{name} not found: expected {root}/ with {listing} (python pickles), missing {f}; '
                             f'download it with --download or pass --data_path DIR')
    return None


class CifarUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR-10/100 files hold: dicts, lists, bytes, str, numbers and numpy
    arrays. Any other global (os.system, builtins.eval, ...) is refused, so a crafted file cannot run code."""
    ALLOWED = {
        ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
        ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
        ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),  # protocol 5
        ('numpy', 'ndarray'), ('numpy', 'dtype'),
        ('_codecs', 'encode'),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name} (not an array type of CIFAR files)")
        return super().find_class(module, name)


def _read_pickle(path: Path, keys: tuple[str, ...]) -> dict[str, object]:
    """Load a CIFAR pickle (restricted: no code runs from it) and return the wanted keys (bytes or str keys)."""
    fix = 'delete the folder and download again (--download)'
    try:
        with open(path, 'rb') as f:
            d = CifarUnpickler(f, encoding='bytes').load()
        out = {}
        for k in keys:
            out[k] = d[k.encode()] if k.encode() in d else d[k]
        return out
    except Exception as e:  # unpickling garbage can raise almost anything
        if isinstance(e, MemoryError):
            raise
        raise _corrupt('CIFAR', path, e, fix) from e


def _load_cifar(name: str, data_path: str):
    folder, train, test, meta, label_key, names_key = _CIFAR[name]
    root = Path(data_path) / folder
    num_classes = 10 if name == 'CIFAR10' else 100
    fix = 'delete the folder and download again (--download)'
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _read_pickle(root / meta, (names_key,))[names_key]]
    if len(names) != num_classes:
        raise DataError(f'CIFAR meta file {root / meta} lists {len(names)} class names, expected {num_classes}; {fix}')

    def read(files: list[str]):
        xs, ys = [], []
        for f in files:
            d = _read_pickle(root / f, ('data', label_key))
            x = d['data']
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
                shape = getattr(x, 'shape', type(x).__name__)
                raise DataError(f"CIFAR file {root / f} is malformed ('data' is {shape}, expected uint8 [N,3072]); {fix}")
            xs.append(x)
            ys.append(_labels(d[label_key], len(x), num_classes, 'CIFAR', root / f, fix))
        x = torch.from_numpy(np.concatenate(xs).reshape(-1, 3, 32, 32))   # rows are CHW
        return x, torch.cat(ys)

    return (*read(train), *read([test]), names)


# ============================================================================
# Image folders (Tiny ImageNet, ImageNet)
# ============================================================================

def _is_image(p: Path) -> bool:
    return p.suffix.lower() in _IMAGE_SUFFIXES


def _images_below(folder: Path) -> list[Path]:
    """All image files at any depth below folder, in a stable order."""
    return sorted(p for p in folder.rglob('*') if _is_image(p) and p.is_file())


def _has_loose_images(folder: Path) -> bool:
    with os.scandir(folder) as it:
        return any(e.is_file() and _is_image(Path(e.name)) for e in it)


def _subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def _read_image(path: Path, res: int) -> np.ndarray:
    """Read one picture as RGB uint8 [res,res,3]: shorter side -> res, centre crop."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert('RGB')
            w, h = im.size
            if (w, h) != (res, res):
                scale = res / min(w, h)
                nw, nh = max(res, round(w * scale)), max(res, round(h * scale))
                im = im.resize((nw, nh), Image.BILINEAR)
                left, top = int(round((nw - res) / 2.0)), int(round((nh - res) / 2.0))
                im = im.crop((left, top, left + res, top + res))
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        if isinstance(e, MemoryError):
            raise
        raise _corrupt('image', path, e, 'delete or replace that file') from e


def _read_images(paths: list[Path], res: int) -> Tensor:
    """Decode pictures in parallel (PIL releases the GIL) into one uint8 [N,3,res,res]."""
    out = np.empty((len(paths), res, res, 3), dtype=np.uint8)

    def one(i: int) -> None:
        out[i] = _read_image(paths[i], res)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(len(paths))))   # list() re-raises the first DataError
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _gather(class_dirs: list[Path]) -> tuple[list[Path], Tensor]:
    """Image paths and labels for folders listed in label order."""
    paths, labels = [], []
    for label, d in enumerate(class_dirs):
        found = _images_below(d) if d.is_dir() else []
        paths += found
        labels += [label] * len(found)
    return paths, torch.tensor(labels, dtype=torch.int64)


# ---------------------------------------------------------------- Tiny ImageNet

def _tiny_missing(data_path: str) -> DataError | None:
    root = Path(data_path) / 'tiny-imagenet-200'
    layout = f'expected {root}/train/<wnid>/images/*.JPEG and {root}/val/images/<wnid>/*.JPEG'
    for d in (root / 'train', root / 'val' / 'images'):
        if not d.is_dir():
            return DataError(f'Tiny ImageNet not found: {layout}, missing {d}; download and unzip {_TINY_URL} '
                             f'into DIR, run python -m tools.prep_tiny --data_path DIR and pass --data_path DIR')
    if not _subdirs(root / 'train'):
        return DataError(f'Tiny ImageNet has no class folders in {root}/train: {layout}; re-extract the dataset')
    if _has_loose_images(root / 'val' / 'images'):
        return DataError(f'Tiny ImageNet validation images in {root}/val/images are not grouped by class '
                         f'({layout}); run python -m tools.prep_tiny --data_path {data_path}')
    return None


def _load_tiny(data_path: str, max_bytes: int | None):
    root = Path(data_path) / 'tiny-imagenet-200'
    wnids = _subdirs(root / 'train')
    unknown = sorted(set(_subdirs(root / 'val' / 'images')) - set(wnids))
    if unknown:
        raise DataError(f'Tiny ImageNet val/images/{unknown[0]} has no matching class folder in {root}/train '
                        f'({len(unknown)} such folders); re-extract the dataset and run python -m tools.prep_tiny again')
    tr_paths, y_tr = _gather([root / 'train' / w for w in wnids])
    te_paths, y_te = _gather([root / 'val' / 'images' / w for w in wnids])
    if not tr_paths:
        raise DataError(f'Tiny ImageNet has no .JPEG images under {root}/train/<wnid>/; re-extract the dataset')
    _check_memory('Tiny ImageNet', len(tr_paths) + len(te_paths), (3, 64, 64), max_bytes)
    return _read_images(tr_paths, 64), y_tr, _read_images(te_paths, 64), y_te, wnids


# ---------------------------------------------------------------- ImageNet subsets

def _imagenet_missing(data_path: str, subset: str) -> DataError | None:
    root = Path(data_path) / 'imagenet'
    layout = f'expected {root}/train/<wnid>/*.JPEG with all 1000 class folders and {root}/val/<wnid>/*.JPEG'
    if subset not in SUBSETS:
        return DataError(f'unknown ImageNet subset {subset!r}; choose --subset from {", ".join(SUBSETS)}')
    for d in (root / 'train', root / 'val'):
        if not d.is_dir():
            return DataError(f'ImageNet not found: {layout}, missing {d}; pass --data_path DIR holding imagenet/')
    wnids = _subdirs(root / 'train')
    if len(wnids) != 1000:
        return DataError(f'ImageNet train folder {root}/train has {len(wnids)} class folders, expected 1000 '
                         f'(class indices are positions in the sorted list of all 1000 wnids); {layout}')
    if _has_loose_images(root / 'val'):
        return DataError(f'ImageNet validation images in {root}/val are not grouped by class ({layout}); '
                         f'move them into val/<wnid>/ folders (e.g. with the usual valprep.sh script)')
    return None


def _load_imagenet(data_path: str, subset: str, res: int, max_bytes: int | None):
    root = Path(data_path) / 'imagenet'
    wnids = [_subdirs(root / 'train')[i] for i in SUBSETS[subset]]
    tr_paths, y_tr = _gather([root / 'train' / w for w in wnids])
    te_paths, y_te = _gather([root / 'val' / w for w in wnids])
    if not tr_paths:
        raise DataError(f'ImageNet subset {subset} has no .JPEG images in {root}/train/<wnid>/ for its wnids '
                        f'{",".join(wnids)}; check the dataset extraction')
    _check_memory(f'ImageNet {subset} at res {res}', len(tr_paths) + len(te_paths), (3, res, res), max_bytes)
    return _read_images(tr_paths, res), y_tr, _read_images(te_paths, res), y_te, wnids


# ============================================================================
# Presence checks and downloads
# ============================================================================

def _missing(name: str, data_path: str, subset: str) -> DataError | None:
    """Cheap existence check: a DataError describing what is missing, or None."""
    if name not in DATASETS:
        return DataError(f'unknown dataset {name!r}; choose --dataset from {", ".join(DATASETS)}')
    if name == 'Digits':
        return None
    if name in ('MNIST', 'FashionMNIST'):
        return _idx_missing(name, data_path)
    if name == 'SVHN':
        return _svhn_missing(data_path)
    if name in _CIFAR:
        return _cifar_missing(name, data_path)
    if name == 'Tiny':
        return _tiny_missing(data_path)
    return _imagenet_missing(data_path, subset)


def check_dataset(name: str, data_path: str = 'data', *, subset: str = 'imagenette') -> None:
    """Raise DataError unless the dataset's files/folders exist (cheap; run before long work)."""
    err = _missing(name, data_path, subset)
    if err is not None:
        raise err


def _download(name: str, data_path: str) -> None:
    """Fetch a dataset with torchvision into data_path; our readers then read the files."""
    import torchvision.datasets as tvd
    os.makedirs(data_path, exist_ok=True)
    try:
        if name == 'SVHN':
            for split in ('train', 'test'):
                tvd.SVHN(root=data_path, split=split, download=True)
        else:
            getattr(tvd, name)(root=data_path, download=True)
    except Exception as e:  # network errors come in many types
        if isinstance(e, MemoryError):
            raise
        raise DataError(f'downloading {name} into {data_path} failed ({_one_line(e)}); check the internet '
                        f'connection or download it by hand and pass --data_path DIR') from e


# ============================================================================
# Public entry point
# ============================================================================

def add_data_flags(p, *, download: bool = False) -> None:
    """The data flags of buffer.py, distill.py and eval.py, declared once (the scripts pass them to load_dataset)."""
    a = p.add_argument
    a('--dataset', default='Digits', choices=DATASETS)
    a('--subset', default='imagenette', choices=list(SUBSETS), help='ImageNet subset')
    a('--res', type=int, default=128, help='ImageNet subset resolution (pixels)')
    a('--zca', action='store_true', help='ZCA-whiten the images (distill.py needs buffers trained with --zca)')
    a('--data_path', default='data',
      help='dataset folder (Fashion-MNIST from Debian\'s dataset-fashion-mnist: /usr/share/datasets/fashion-mnist)')
    a('--valid', type=int, default=0,
      help='hold this many training images out as a validation set (the same images in every run, for '
           'choosing hyper-parameters); 0: no split')
    if download:
        a('--download', action='store_true', help='download torchvision datasets if missing')


DATA_FLAG_DOMAINS = {'res': integer(1, 16_384), 'valid': integer(0)}  # res: an image side in pixels


def _shape(name: str, res: int) -> tuple[int, int, int]:
    return {'Digits': (1, 8, 8), 'MNIST': (1, 28, 28), 'FashionMNIST': (1, 28, 28), 'SVHN': (3, 32, 32),
            'CIFAR10': (3, 32, 32), 'CIFAR100': (3, 32, 32), 'Tiny': (3, 64, 64), 'ImageNet': (3, res, res)}[name]


# Classes and test images of each dataset, known without reading it (memplan.py plans runs from these)
_CLASSES = {'Digits': 10, 'MNIST': 10, 'FashionMNIST': 10, 'SVHN': 10, 'CIFAR10': 10, 'CIFAR100': 100, 'Tiny': 200}
_TEST_IMAGES = {'Digits': 360, 'MNIST': 10000, 'FashionMNIST': 10000, 'SVHN': 26032, 'CIFAR10': 10000,
                'CIFAR100': 10000, 'Tiny': 10000}
_IMAGENET_VAL_PER_CLASS = 50


def dataset_meta(name: str, subset: str = 'imagenette', res: int = 128) -> tuple[int, int, tuple[int, int], int]:
    """(channels, classes, (height, width), test images) of a dataset, without reading any file."""
    if name not in DATASETS:
        raise DataError(f'unknown dataset {name!r}; choose --dataset from {", ".join(DATASETS)}')
    if name == 'ImageNet' and subset not in SUBSETS:
        raise DataError(f'unknown ImageNet subset {subset!r}; choose --subset from {", ".join(SUBSETS)}')
    c, h, w = _shape(name, res)
    classes = len(SUBSETS[subset]) if name == 'ImageNet' else _CLASSES[name]
    tests = classes * _IMAGENET_VAL_PER_CLASS if name == 'ImageNet' else _TEST_IMAGES[name]
    return c, classes, (h, w), tests


# The validation split is the same for every run (experts, distillation, evaluation), whatever --seed is.
VALID_SEED = 0


def hold_out(x: Tensor, y: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train x, train y, validation x, validation y): n training images drawn at random (VALID_SEED)."""
    if not 0 <= n < len(x):
        raise DataError(f'--valid {n} must hold out fewer than the {len(x)} training images (0 = no split); '
                        f'lower --valid')
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(VALID_SEED))
    keep, val = order[n:].sort().values, order[:n].sort().values
    return x[keep], y[keep], x[val], y[val]


def load_dataset(name: str, data_path: str = 'data', *, zca: bool = False, subset: str = 'imagenette',
                 res: int = 128, download: bool = False, max_bytes: int | None = None, valid: int = 0) -> RealData:
    """Load a real dataset into memory as normalised (or ZCA-whitened) float32 tensors; valid > 0 holds
    that many training images out as a validation set (images_val), for choosing hyper-parameters."""
    if name not in DATASETS:
        raise DataError(f'unknown dataset {name!r}; choose --dataset from {", ".join(DATASETS)}')
    if name == 'ImageNet' and res < 1:
        raise DataError(f'--res must be a positive image size, got {res}')
    c, h, w = _shape(name, res)
    # Refuse ZCA first: no point checking files or decoding images for a run that cannot work.
    if zca and c * h * w > ZCA_MAX_DIM:
        d = c * h * w
        raise DataError(f'ZCA on {c} x {h} x {w} images needs a {d} x {d} matrix (at most {ZCA_MAX_DIM} '
                        f'supported); drop --zca for this dataset or lower --res')
    err = _missing(name, data_path, subset)
    # Only torchvision-downloadable sets; Tiny/ImageNet messages already say where to get them.
    if err is not None and download and name in ('MNIST', 'FashionMNIST', 'SVHN', 'CIFAR10', 'CIFAR100'):
        _download(name, data_path)
        err = _missing(name, data_path, subset)
    if err is not None:
        raise err

    mean, std = _STATS.get(name, (None, None))
    if name == 'Digits':
        x_tr, y_tr, x_te, y_te, names, mean, std = _load_digits()
    elif name in ('MNIST', 'FashionMNIST'):
        x_tr, y_tr, x_te, y_te, names = _load_idx(name, data_path)
    elif name == 'SVHN':
        x_tr, y_tr, x_te, y_te, names = _load_svhn(data_path)
    elif name in _CIFAR:
        x_tr, y_tr, x_te, y_te, names = _load_cifar(name, data_path)
    elif name == 'Tiny':
        x_tr, y_tr, x_te, y_te, names = _load_tiny(data_path, max_bytes)
    else:
        x_tr, y_tr, x_te, y_te, names = _load_imagenet(data_path, subset, res, max_bytes)

    if x_tr.shape[1:] != (c, h, w):
        raise DataError(f'{name} images in {data_path} have shape {tuple(x_tr.shape[1:])}, expected '
                        f'{(c, h, w)}; re-download the dataset')
    x_va = y_va = None
    if valid:
        x_tr, y_tr, x_va, y_va = hold_out(x_tr, y_tr, valid)
    # Convert to float once each (uint8 -> float32), freeing the uint8 copy right after.
    x_tr = _to_float(x_tr)
    others = [_to_float(x) for x in (x_te, x_va) if x is not None]
    whitener = None
    if zca:
        whitener = ZCA.fit(x_tr)            # fitted on un-normalised [0,1] training pixels
        for x in [x_tr] + others:
            _transform_inplace(whitener, x)
    else:
        for x in [x_tr] + others:
            _normalise_inplace(x, mean, std)
    x_te, x_va = others[0], (others[1] if valid else None)
    return RealData(name=name, channel=c, im_size=(h, w), num_classes=len(names), class_names=list(names),
                    mean=tuple(mean), std=tuple(std), images_train=x_tr, labels_train=y_tr,
                    images_test=x_te, labels_test=y_te, zca=whitener, images_val=x_va, labels_val=y_va)
