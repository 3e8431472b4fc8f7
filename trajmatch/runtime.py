"""Seeding, device choice and the RNG states a resumed run restores."""
import os
import random
import re

import numpy as np
import torch

from trajmatch.cli import UsageError


# ---------------------------------------------------------------- seeding / device

def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch from one integer; return a CPU generator seeded alike."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(name: str = 'auto') -> torch.device:
    """auto, cpu, cuda, cuda:N or mps; anything else, or a device this machine lacks, is a UsageError."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    m = re.fullmatch(r'(cpu|cuda|mps)(?::(\d+))?', name)
    if not m or (m.group(1) != 'cuda' and m.group(2) is not None):
        raise UsageError(f"--device {name!r}: give auto, cpu, cuda, cuda:N or mps")
    if m.group(1) == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {name} asked for, but CUDA is not available; use --device auto or cpu")
        if m.group(2) is not None and int(m.group(2)) >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    if m.group(1) == 'mps' and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name} asked for, but MPS is not available; use --device auto or cpu")
    return torch.device(name)


def rng_state(device: torch.device | None = None) -> dict:
    """Every RNG state a resumed run needs to continue the same random stream: the host's, and the CUDA
    state of the run's own device only (not of every visible GPU, so a resume may see fewer)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    # numpy's state as tensors/ints so checkpoints load with torch.load(weights_only=True)
    state = {'python': random.getstate(), 'torch': torch.get_rng_state(),
             'numpy': (torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if device is not None and device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Put back rng_state's states. The CUDA state goes to the run's device when it is a CUDA device; a
    checkpoint made on another device (or on the CPU) leaves this device's CUDA stream as seeded: every
    draw of the run is from CPU generators, so only on-device sampling would notice. Checkpoints from
    before this kept every visible GPU's state as a list: the run's device's entry is used."""
    random.setstate(state['python'])
    keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state(('MT19937', keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    cuda = state.get('cuda')
    if cuda is None or device is None or device.type != 'cuda':
        return
    if isinstance(cuda, (list, tuple)):  # every visible GPU's, by index
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def set_deterministic(on: bool) -> None:
    """--deterministic: torch's deterministic kernels where it has them (ops without one warn rather than
    stop the run), cuDNN's deterministic algorithms without autotuning, and cuBLAS's fixed workspace
    (which must be set before the first cuBLAS call: at the entry point's start, unless the user set it)."""
    if not on:
        return
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
