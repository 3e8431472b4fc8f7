"""torch.distributed plumbing for torchrun: the process group, a rank's device and seed, small collectives.

    torchrun --nproc_per_node=K buffer.py ...    # experts sharded across K processes
    torchrun --nproc_per_node=K distill.py ...   # K trajectories per iteration, gradients averaged
Without torchrun (WORLD_SIZE unset or 1) no process group is made and every helper is a no-op that
returns its input, so a plain `python distill.py` runs exactly the code it ran before.
"""
import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from trajmatch.cli import UsageError

# Rank 0 evaluates (minutes to hours on big sets) while the others wait in their next collective.
TIMEOUT = timedelta(hours=4)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env(environ=None) -> Dist:
    """The rank layout torchrun sets in RANK / WORLD_SIZE / LOCAL_RANK; one process when unset."""
    environ = os.environ if environ is None else environ
    try:
        d = Dist(int(environ.get('RANK', 0)), int(environ.get('WORLD_SIZE', 1)), int(environ.get('LOCAL_RANK', 0)))
    except ValueError:
        raise UsageError("RANK / WORLD_SIZE / LOCAL_RANK must be integers; launch with torchrun "
                         "or leave them unset") from None
    if not 0 <= d.rank < d.world_size:
        raise UsageError(f"RANK {d.rank} is outside WORLD_SIZE {d.world_size}; launch with torchrun")
    return d


def init_distributed(device: torch.device, environ=None) -> tuple[Dist, torch.device]:
    """Join torchrun's process group (only when WORLD_SIZE > 1); return the layout and this rank's device.

    The backend follows the device the tensors live on (nccl cannot reduce CPU tensors): nccl on
    CUDA, where each process takes cuda:LOCAL_RANK, else gloo.
    """
    d = from_env(environ)
    if d.world_size == 1:
        return d, device
    if device.type == 'cuda':
        device = torch.device('cuda', d.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', timeout=TIMEOUT)
    return d, device


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _scratch_device() -> torch.device:
    """Where small helper tensors must live for the group's backend."""
    return torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else torch.device('cpu')


# ---------------------------------------------------------------- seeds and work split

def rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps --seed itself (one process is the plain run, bit for bit); rank r > 0 gets a
    well-mixed 62-bit seed from (seed, r), so ranks never share a random stream."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2**64, rank]).generate_state(1, np.uint64)[0]) % 2**62


def shard(indices: list, rank: int, world_size: int) -> list:
    """Round-robin split: rank r takes items r, r+K, r+2K, ... (balanced when items cost the same)."""
    return list(indices)[rank::world_size]


# ---------------------------------------------------------------- collectives (no-ops in one process)

def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor, in place, by its mean over ranks (every rank ends with the same values)."""
    if not _active():
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """A detached copy of x averaged over ranks (x itself when alone)."""
    if not _active():
        return x
    y = x.detach().clone()
    all_reduce_mean_([y])
    return y


def all_ranks_true(flag: bool) -> bool:
    """True only if flag is True on every rank; all ranks get the same answer."""
    if not _active():
        return flag
    t = torch.tensor([int(bool(flag))], device=_scratch_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite tensor, in place, with rank src's values."""
    if _active():
        dist.broadcast(tensor, src)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Rank src's obj (picklable) on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
