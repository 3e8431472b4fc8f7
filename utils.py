"""Small shared helpers: seeding, device choice, atomic writes, CLI error exit.

Anything bigger than a helper lives in its own module (see README "Layout").
"""
import json
import os
import random
import sys
import tempfile

import numpy as np
import torch


# ---------------------------------------------------------------- seeding / device

def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch from one integer; return a CPU generator seeded alike."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(name: str = 'auto') -> torch.device:
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name.startswith('cuda') and not torch.cuda.is_available():
        fail(f"--device {name} asked for, but CUDA is not available; use --device auto or cpu")
    return torch.device(name)


def rng_state() -> dict:
    """Every RNG state a resumed run needs to continue the same random stream."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    # numpy's state as tensors/ints so checkpoints load with torch.load(weights_only=True)
    state = {'python': random.getstate(), 'torch': torch.get_rng_state(),
             'numpy': (torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state['python'])
    keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state(('MT19937', keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# ---------------------------------------------------------------- atomic writes

def _atomic(path: str, write) -> None:
    """Write through a temp file in the same folder, then rename: a crash never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj, path: str) -> None:
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj, path: str) -> None:
    _atomic(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True, default=str) + '\n').encode()))


def atomic_write_bytes(data: bytes, path: str) -> None:
    _atomic(path, lambda f: f.write(data))


# ---------------------------------------------------------------- CLI errors

class UsageError(Exception):
    """Bad input found before long work starts; message is one line: problem and fix."""


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
